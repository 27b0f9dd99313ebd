"""The reward model's likelihood term: score(x, y) = head(x, y) + c · (log p_SFT(y | x) − m).

A scalar head read at the last token learns a small model's cues of form quickly and its
judgement of correctness slowly, while the SFT policy the reward model starts from already tells
many right answers from wrong ones by how likely it finds them (docs/ppo.md §13: on the built-in
world's held-out pairs that only correctness decides, the SFT log-likelihood ranks 79-84% of pairs
right, a head trained alone 62-69%). The term adds that judgement, as a generative verifier reads a
language model's probabilities (Zhang et al. 2024, arXiv 2408.15240): the log-likelihood of the
response tokens (the end-of-turn token included) under the frozen SFT model, weighted by `c`.

`c` is one number, fitted after the head is trained, by maximum likelihood of comparisons the
head did not train on (a calibration share of the training comparisons; on its own training pairs
the head looks better than it is, and `c` would come out too small) under the same ranking model
the head was trained with (the K-wise Bradley-Terry loss, convex in `c`). No evaluation comparison
takes part in it. `m`, the mean log-likelihood of the normalization's reference samples, keeps the
term centred, so the shift folded into the head stays small; normalization scales `c` with the
head. The reward model records where the frozen model is (`source_for`: a relative and an
absolute path and the weights' fingerprint; `likelihood/` when the rm stage copies it) and `c`,
`m` in `config.reward_likelihood`; `reward_model.scoring` adds the term wherever the RM scores.

The head trains as the residual over r · log p_SFT (`likelihood_residual`, the training score is
head + r · (log p_SFT − mean) / sd, standardized so that its size does not depend on the responses'
length), so it learns what the likelihood misjudges, chiefly the form it
prefers and the labeler does not, rather than a form cue whose margin would outweigh the
likelihood's judgement of correctness wherever the better-formed answer is the wrong one.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pipeline.logprobs import selective_log_softmax
from reward_model.losses import kwise_loss

SUBDIR = "likelihood"  # where `likelihood_copy=true` puts a copy of the model inside the reward model


@dataclass
class LikelihoodTerm:
    """A frozen causal LM that reads the RM's token ids, and its weight in the score. `source`:
    where the model lives, as `config.reward_likelihood` records it (`source_for`)."""

    model: torch.nn.Module
    coef: float
    center: float = 0.0
    source: dict = field(default_factory=dict)
    lockstep: bool = False  # the model is sharded over processes: every process forwards every time
    exempt: str = ""        # a regular expression: responses it matches get no term (their value is the centre)

    def __call__(self, log_lik: Tensor) -> Tensor:
        """The term's contribution to the score, from the response log-likelihoods."""
        return self.coef * (log_lik - self.center)

    def describe(self) -> dict:
        """What `config.reward_likelihood` stores."""
        return {"coef": self.coef, "center": self.center, **self.source, **({"exempt": self.exempt} if self.exempt else {}),
                "score": "classifier logit + coef * (sum of log p(response tokens | prompt) - center), under the model "
                         "in `model` (a path relative to this directory; `model_abs` if the two were moved apart), the "
                         "SFT policy the reward model was trained from, checked by `fingerprint`; a response whose text "
                         "matches the regular expression `exempt` gets no term"}


def exempt_mask(pattern: str, responses: list[str]) -> list[bool]:
    """Which responses the term does not judge: those whose text the regular expression `pattern`
    matches (an abstention: its SFT likelihood says how often SFT abstains, not whether abstaining
    is right); none when `pattern` is empty."""
    if not pattern:
        return [False] * len(responses)
    rx = re.compile(pattern)
    return [bool(rx.search(r)) for r in responses]


def neutralize(log_lik: Tensor, mask: list[bool], value: float | None = None) -> Tensor:
    """`log_lik` with the masked (exempt) entries set to `value`, by default the mean of the
    others, so that the term adds nothing to them (`exempt_mask`)."""
    if not any(mask):
        return log_lik
    keep = torch.tensor([not m for m in mask], device=log_lik.device)
    fill = value if value is not None else (log_lik[keep].double().mean().item() if keep.any() else 0.0)
    return torch.where(keep, log_lik, torch.full_like(log_lik, fill))


def source_for(rm_model_dir: str | Path, lm_dir: str | Path) -> dict:
    """Where a reward model saved in `rm_model_dir` finds its likelihood model `lm_dir`: a path
    relative to the reward model (a run directory moved whole keeps working), the absolute path,
    and the weights' fingerprint (`pipeline.runs.weights_fingerprint`), recorded as parents are."""
    from pipeline.runs import weights_fingerprint

    lm_dir = Path(lm_dir).resolve()
    return {"model": os.path.relpath(lm_dir, Path(rm_model_dir).resolve()), "model_abs": str(lm_dir),
            "fingerprint": weights_fingerprint(lm_dir)}


def likelihood_spec(rm_dir: str | Path) -> dict | None:
    """The likelihood term a saved reward model declares in its config (None for a plain classifier)."""
    return json.loads((Path(rm_dir) / "config.json").read_text()).get("reward_likelihood") or None


def likelihood_model_dir(rm_dir: str | Path, spec: dict) -> Path:
    """The directory of the term's model: `model` relative to the reward model, else `model_abs`,
    the first whose weights have the recorded fingerprint (reward models saved before fingerprints
    were recorded: the first that exists)."""
    from pipeline.runs import HandoffError, weights_fingerprint

    candidates = [Path(rm_dir) / spec["model"]] + ([Path(spec["model_abs"])] if spec.get("model_abs") else [])
    found = [c for c in candidates if (c / "config.json").exists()]
    for where in found:
        if not spec.get("fingerprint") or weights_fingerprint(where) == spec["fingerprint"]:
            return where
    looked = ", ".join(str(c) for c in candidates)
    if found:
        raise HandoffError(f"{rm_dir}: the likelihood term's model ({looked}) has other weights than the reward model "
                           f"was fitted with (fingerprint {spec['fingerprint']}); restore the SFT model, or re-run the rm "
                           "stage")
    raise FileNotFoundError(f"{rm_dir}/config.json declares a likelihood term whose model should be at {looked}, which "
                            "is missing: keep the run directory whole (the rm stage records its parent SFT model), or "
                            "re-run rm with likelihood_copy=true for a self-contained reward model")


def response_log_likelihoods(lm: torch.nn.Module, ids: Tensor, mask: Tensor, starts: Tensor) -> Tensor:
    """Sum of log p(token | earlier tokens) over each row's response tokens -> [B] float32.

    ids, mask [B, L] right-padded (mask True = real token); starts [B]: index of each row's first
    response token (>= 1). The response runs from `start` to the row's last real token."""
    # The LM head runs from the earliest response start on (`logits_to_keep`), and only the
    # chosen tokens' log-probs are formed (`pipeline.logprobs`): no [B, L, V] float32 tensor.
    first = max(1, int(starts.min()))
    logits = lm(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=ids.shape[1] - first + 1).logits
    token_lp = selective_log_softmax(logits[:, :-1], ids[:, first:])
    pos = torch.arange(first, ids.shape[1], device=ids.device)[None]
    in_response = (pos >= starts.to(ids.device)[:, None]) & mask[:, first:]
    return torch.where(in_response, token_lp, 0.0).sum(1)


def fit_coef(head: Tensor, log_lik: Tensor, ranks: Tensor, valid_mask: Tensor, steps: int = 50) -> float:
    """The coefficient c >= 0 that minimises the K-wise ranking loss of head + c·log_lik on the
    training comparisons (rewards, ranks and valid_mask as `kwise_loss` takes them, [N, K]).
    The loss is convex in c: projected Newton steps from c = 0, in float64."""
    head, log_lik = head.double(), log_lik.double()
    c = torch.zeros((), dtype=torch.float64, device=head.device)
    for _ in range(steps):
        x = c.clone().requires_grad_(True)
        loss = kwise_loss(head + x * log_lik, ranks, valid_mask)[0].double()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad(g, x)
        if not torch.isfinite(h) or h <= 0:
            break
        new = (c - g.detach() / h).clamp(min=0.0)
        if (new - c).abs() < 1e-9:
            c = new
            break
        c = new
    return float(c)


def fit_on_comparisons(head: Tensor, log_lik: Tensor, comparisons: list) -> float:
    """`fit_coef` for flat per-response values [sum of K] of `comparisons` (their responses in
    order), laid out per prompt with padding slots as the K-wise loss takes them."""
    sizes = torch.tensor([len(c.responses) for c in comparisons])
    k_max = int(sizes.max())
    valid = torch.arange(k_max) < sizes[:, None]

    def grid(v: Tensor) -> Tensor:
        return torch.zeros(len(sizes), k_max, dtype=v.dtype).masked_scatter(valid, v.cpu())

    ranks = torch.stack([torch.nn.functional.pad(torch.tensor(c.ranking), (0, k_max - len(c.ranking)), value=k_max)
                         for c in comparisons])
    return fit_coef(grid(head), grid(log_lik), ranks, valid)


def residual_offsets(log_lik: Tensor, sizes: list[int], coef: float) -> tuple[list[Tensor], float]:
    """The fixed part of the training score when the head trains as the residual over the
    likelihood: coef · (log_lik − mean) / sd, flat [sum of sizes] -> (one [K] tensor per comparison,
    sd). Standardized, the offsets have the same size for 13-token answers as for 300-token ones,
    whose summed log-likelihoods differ by tens of nats and would saturate the ranking loss. (The
    K-wise loss is shift-invariant within a prompt; centring keeps the scores that the optional
    centering penalty sees near zero.)"""
    x = log_lik.double()
    sd = float(x.std()) if len(x) > 1 else 1.0
    sd = sd if sd > 1e-6 else 1.0
    flat = coef * (x - x.mean()) / sd
    return [part.float() for part in torch.split(flat.cpu(), sizes)], sd


def load_likelihood(rm_dir: str | Path, dtype: torch.dtype = torch.float32, attn: str = "auto",
                    device: torch.device | str | None = None) -> LikelihoodTerm | None:
    """The likelihood term a saved reward model declares (None for a plain classifier), its model
    loaded frozen, dropout off, on `device`."""
    from pipeline.models import disable_dropout, load_causal_lm

    spec = likelihood_spec(rm_dir)
    if not spec:
        return None
    lm = disable_dropout(load_causal_lm(likelihood_model_dir(rm_dir, spec), None, dtype, attn)).eval().requires_grad_(False)
    vocab = json.loads((Path(rm_dir) / "config.json").read_text()).get("vocab_size") or 0
    if vocab > lm.get_input_embeddings().weight.shape[0]:  # the RM's tokenizer gained tokens (a pad)
        lm.resize_token_embeddings(vocab)
    if device is not None:
        lm = lm.to(device)
    return term_from_spec(lm, spec)


def term_from_spec(model, spec: dict) -> LikelihoodTerm:
    """A `LikelihoodTerm` with the coefficient and source recorded in `spec`, computed by `model`."""
    source = {k: spec[k] for k in ("model", "model_abs", "fingerprint") if k in spec}
    return LikelihoodTerm(model, float(spec["coef"]), float(spec.get("center", 0.0)), source,
                          exempt=spec.get("exempt", ""))


def attach(model: torch.nn.Module, term: LikelihoodTerm | None) -> torch.nn.Module:
    """Give a reward model its likelihood term, read by `reward_model.scoring` (a plain attribute,
    not a submodule: the term is neither trained nor part of the classifier's weights)."""
    model.__dict__["reward_likelihood"] = term
    if term is None:
        model.config.__dict__.pop("reward_likelihood", None)
    else:
        model.config.reward_likelihood = term.describe()
    return model


def term_of(model: torch.nn.Module) -> LikelihoodTerm | None:
    return model.__dict__.get("reward_likelihood")
