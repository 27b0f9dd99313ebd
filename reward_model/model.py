"""The reward model: a sequence-classification backbone with one scalar head, and the
normalization that is folded into its weights after training.

The model is a plain `AutoModelForSequenceClassification` (num_labels=1): transformers reads the
score at the rightmost token that is not `config.pad_token_id`, so sequences are right-padded and
end with eos, and pad must differ from eos (else the score is read one token early, docs/ppo.md §14).
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from pipeline.config import InputError
from pipeline.models import attn_implementation, disable_dropout, whole_on_every_rank
from reward_model.likelihood import attach, load_likelihood


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a causal LM as a classifier reports a missing `score` and an unused `lm_head`:
    both are expected here, and the warning would only alarm users."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    py_logger = logging.getLogger("transformers")
    old_py = py_logger.level
    py_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        py_logger.setLevel(old_py)


def load_reward_model(path: str | Path, tokenizer, dtype: torch.dtype = torch.float32, attn: str = "auto"):
    """Load `path` (an SFT causal LM or a saved reward model) as a scalar reward model.

    Sets `config.pad_token_id` from `tokenizer` (refusing pad == eos), turns dropout off, grows
    the embeddings if the tokenizer gained tokens, attaches the likelihood term a saved reward
    model declares (`reward_model.likelihood`), and gives a new head (absent from an SFT
    checkpoint) the N(0, 1/sqrt(d+1)) init of Stiennon et al. 2020, so initial scores are ~N(0, 1).
    """
    from transformers import AutoModelForSequenceClassification

    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise InputError("the reward model needs a pad token distinct from eos (pipeline.tokenizer.ensure_chat_ready adds one)")
    with _quiet_transformers(), whole_on_every_rank():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=dtype, output_loading_info=True, attn_implementation=attn_implementation(attn))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    if any(k.startswith("score.") for k in info.get("missing_keys", [])):
        d = model.score.in_features
        with torch.no_grad():
            model.score.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
    # a saved reward model with a likelihood term scores with it (reward_model/likelihood.py)
    return attach(model, load_likelihood(path, dtype, attn, model.device))


# ------------------------------------------------------------------------------------------
# Normalization folded into the head
# ------------------------------------------------------------------------------------------
def shift_direction(hidden: Tensor, ridge: float = 1e-3) -> Tensor:
    """The direction v along which a score shift is stored: v·h ≈ 1 for every reference final
    hidden state h [N, d] (ridge-regularised least squares), rescaled so that the reference mean
    of v·h is exactly 1 -> v [d] (float64, on `hidden`'s device).

    The final RMSNorm output has a large component shared by all sequences, so such a v exists
    nearly exactly, and `w − μ·v` shifts every score by almost exactly μ (Llama's head has no bias).
    Falls back to h̄/|h̄|² (exact only at the mean hidden state) if the fit degenerates.
    """
    h = hidden.double()
    gram = h.T @ h
    eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    gram = gram + ridge * gram.diagonal().mean().clamp(min=1e-12) * eye
    v = torch.linalg.solve(gram, h.T @ torch.ones(h.shape[0], dtype=h.dtype, device=h.device))
    scale = (h @ v).mean()
    mean_hidden = h.mean(0)
    fallback = mean_hidden / mean_hidden.dot(mean_hidden)
    # chosen without a host sync (no Python `if` on a device value): same numbers either way
    ok = torch.isfinite(v).all() & (scale.abs() >= 1e-6)
    return torch.where(ok, v / scale, fallback)


def normalized_head(weight: Tensor, direction: Tensor, mean: float | Tensor, std: float | Tensor = 1.0) -> Tensor:
    """The head `w'` whose scores are `(score - mean) / std` over a reference set.

    weight [1, d] (score = w·h, no bias), direction v [d] from `shift_direction` (mean of v·h over
    the reference = 1), mean μ = mean of w·h -> [1, d]:  w' = (w − μ·v) / σ.
    The reference mean of w'·h is exactly 0; any score x moves by μ(1 − v·h_x)/σ more than an
    exact shift would, small because v·h ≈ 1 for hidden states like the reference's.

    The math runs in float64 on `direction`'s device (where the statistics were measured, usually
    the CPU); the result has `weight`'s device and dtype, ready to be copied into the parameter.
    μ and σ may be Python floats or 0-dim tensors.
    """
    dev = direction.device
    w = weight.detach().to(dev, torch.float64)
    mean = torch.as_tensor(mean, dtype=torch.float64, device=dev)
    std = torch.as_tensor(std, dtype=torch.float64, device=dev)
    shifted = w - mean * direction.to(torch.float64)
    return (shifted / std).to(weight.device, weight.dtype)


def folded_head(weight: Tensor, hidden: Tensor, scores: Tensor, use_std: bool = True,
                offset: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The normalized head for reference hidden states [N, d] and their scores [N] (= w·hidden,
    plus `offset` [N], the part of each score that is not the head's: the likelihood term):
    -> (new weight with `weight`'s device and dtype, μ, σ as float64 0-dim tensors on `hidden`'s
    device). Statistics are computed in float64 where `hidden` lives (score_ids returns it on the
    CPU), whatever device and dtype the head has; σ is measured on the shift-folded scores, with
    the head rounded to its own dtype as it will be stored. No host sync."""
    h = hidden.double()
    mean = scores.to(h.device, torch.float64).mean()
    direction = shift_direction(h)
    w = weight.detach().to(h.device)  # a copy on the statistics' device, still in the head's dtype
    std = torch.ones((), dtype=torch.float64, device=h.device)
    if use_std:
        shifted = h @ normalized_head(w, direction, mean, 1.0).double()[0]
        if offset is not None:
            shifted = shifted + offset.to(h.device, torch.float64)
        std = shifted.std(unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return normalized_head(w, direction, mean, std).to(weight.device), mean, std


@torch.no_grad()
def fold_normalization(model, hidden: Tensor, scores: Tensor, use_std: bool = True, offset: Tensor | None = None) -> dict:
    """Normalize `model`'s scores in place from a reference set: hidden [N, d] final hidden
    states at the scored token and scores [N] (= w·hidden), on any device (usually the CPU,
    as `score_ids` returns them). Afterwards the reference scores have mean exactly 0 and (with
    `use_std`) std exactly 1: σ is measured on the shift-folded scores. Returns the statistics
    applied; they are also written to `config.reward_normalization` so the model directory
    describes itself."""
    w = model.score.weight
    new, mean, std = folded_head(w, hidden, scores, use_std, offset)
    w.copy_(new.to(w.device, w.dtype))
    stats = {"mean": mean.item(), "std": std.item(), "reference_size": int(scores.numel())}
    model.config.reward_normalization = stats
    return stats


def shift_deviation(weight_before: Tensor, weight_after: Tensor, hidden: Tensor, mean: float, std: float) -> dict:
    """How far the folded head is from the exact affine map on other samples:
    |score'(x) − (score(x) − μ)/σ| over hidden [N, d] -> {max, mean} (in normalized units).
    Computed in float64 on `hidden`'s device (the weights are copied there)."""
    h = hidden.double()
    exact = (h @ weight_before.detach().to(h.device, torch.float64)[0] - mean) / std
    folded = h @ weight_after.detach().to(h.device, torch.float64)[0]
    dev = (folded - exact).abs()
    return {"max_abs_dev": dev.max().item() if dev.numel() else 0.0,
            "mean_abs_dev": dev.mean().item() if dev.numel() else 0.0}


def normalize_on_reference(model, ref_seqs: list[list[int]], heldout_seqs: list[list[int]], pad_id: int,
                           use_std: bool = True, batch_size: int = 64, accelerator=None,
                           ref_offset: Tensor | None = None) -> dict:
    """Fold the normalization measured on `ref_seqs` (rendered SFT samples) into `model`, and
    measure on `heldout_seqs` how far the folded head is from the exact map (s − μ)/σ.
    `ref_offset` [N]: the rest of each reference score besides the head (the likelihood term,
    already weighted); the caller divides that term's coefficient by the returned `raw_std`.
    -> {raw_mean, raw_std, ref_mean, ref_std, heldout_max_abs_dev, heldout_mean_abs_dev, reference_size}."""
    from reward_model.scoring import score_ids

    _, ref_hidden = score_ids(model, ref_seqs, pad_id, batch_size, accelerator, with_hidden=True)
    _, heldout_hidden = score_ids(model, heldout_seqs, pad_id, batch_size, accelerator, with_hidden=True)
    w_before = model.score.weight.detach().clone()
    # the scores as the head computes them, in float64: under bf16 autocast the forward's own
    # are rounded to ~3 digits, and the folded mean would miss 0 by as much
    ref_scores = ref_hidden.double() @ w_before.to(ref_hidden.device, torch.float64)[0]
    offset = None if ref_offset is None else ref_offset.to(ref_hidden.device, torch.float64)
    if offset is not None:
        ref_scores = ref_scores + offset
    stats = fold_normalization(model, ref_hidden, ref_scores, use_std, offset=offset)
    w_after = model.score.weight.detach()
    after = ref_hidden.double() @ w_after.to(ref_hidden.device, torch.float64)[0]  # where the hidden states are
    if offset is not None:
        after = after + offset / stats["std"]
    dev = shift_deviation(w_before, w_after, heldout_hidden, stats["mean"], stats["std"])
    return {"raw_mean": stats["mean"], "raw_std": stats["std"], "ref_mean": after.mean().item(),
            "ref_std": after.std(unbiased=False).item(), "heldout_max_abs_dev": dev["max_abs_dev"],
            "heldout_mean_abs_dev": dev["mean_abs_dev"], "reference_size": stats["reference_size"]}
