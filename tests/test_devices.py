"""Device hygiene of the reward-model and PPO tensor code, checked on a CPU-only machine.

Rule: every tensor a function creates follows its inputs' device (`device=x.device`), or is put
on the CPU on purpose (`device="cpu"`, then moved with `.to(...)`); float results handed to the
PPO math are float32 whatever the model dtype. Three CPU-only techniques check it:

1. Meta as the accelerator: the inputs live on the `meta` device (shapes, no data) while the
   default device stays the CPU. Like CUDA, meta accepts 0-dim CPU tensors and rejects others
   ("Tensor on device cpu is not on the expected device meta"), so a `torch.eye(n)` without
   `device=`, or a statistic taken on the CPU and mixed back in, fails here as on a GPU; every
   result must come back on meta (a few kernels, 2-D matmul and linalg.solve, silently return
   CPU tensors instead of raising). No values: code without host syncs only (the PPO math, the
   RM losses, the normalization math).
2. Meta as the default device (`with torch.device("meta")`) on real CPU inputs: any factory call
   that names no device makes a meta tensor, which fails when mixed with CPU tensors, read
   (`.item()`, `.tolist()`) or copied into a CPU tensor. Results must equal a normal run (a 2-D
   CPU @ meta matmul silently returns wrong CPU values in torch 2.13). HF Llama forwards and
   `generate` run under it, so this covers the model-level code: scoring, folding the
   normalization into a real head, sampling, rollouts, padding, data order.
3. Fake CUDA (`FakeTensorMode`, data-less tensors that claim `cuda:0`, device propagation as on
   a GPU) for the one case that needs two devices with values on one side: the rm-stage crash,
   statistics measured on the CPU (where `score_ids` returns hidden states) for a head on the
   GPU, in fp32 or bf16. Fake CUDA cannot index, `copy_` or run HF models on a CPU-only build
   (they reach real CUDA checks), so it is used for that math only.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from reward_model import losses
from reward_model.model import (
    fold_normalization,
    folded_head,
    normalize_on_reference,
    normalized_head,
    shift_deviation,
    shift_direction,
)
from stages.ppo import functional as F

CUDA = torch.device("cuda", 0)  # "cuda" without an index needs a real CUDA build, cuda:0 does not
CPU = torch.device("cpu")
ACC = torch.device("meta")  # the stand-in accelerator of technique 1


def fake_cuda():
    """Fake tensors; with a ShapeEnv, `.item()` gives a symbolic number instead of raising."""
    return FakeTensorMode(shape_env=ShapeEnv())


def tensors(obj):
    """Every tensor inside a (nested) result."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name))


def assert_same(got, want, path="result"):
    """Equal structure and values; every tensor on the CPU (not meta) with the same dtype."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.device == CPU, f"{path} is on {got.device}: created without a device"
        assert got.dtype == want.dtype, path
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]")
    elif dataclasses.is_dataclass(want) and not isinstance(want, type):
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{path}.{f.name}")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, path


def same_on_meta_default(fn, seed: int = 0):
    """fn() normally and with meta as the default device (same seed): results must match."""
    torch.manual_seed(seed)
    want = fn()
    torch.manual_seed(seed)
    with torch.device("meta"):
        got = fn()
    assert_same(got, want)
    return want


def all_on(result, device: torch.device, float_dtype: torch.dtype | None = torch.float32):
    for t in tensors(result):
        assert t.device == device, f"a result is on {t.device}, expected {device}"
        if float_dtype is not None and t.is_floating_point():
            assert t.dtype == float_dtype, f"a result is {t.dtype}, expected {float_dtype}"


# ----------------------------------------------------------------------------- PPO math
def ppo_inputs(device, logits_dtype=torch.bfloat16):
    B, T, V = 3, 5, 11
    g = torch.Generator(device="cpu").manual_seed(0) if device == CPU else None

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    last_index = torch.randint(0, T, (B,), generator=g, device=device)
    mask = torch.arange(T, device=device).unsqueeze(0) <= last_index.unsqueeze(1)
    return SimpleNamespace(
        logits=randn(B, T, V, dtype=logits_dtype), ids=ids, mask=mask, lp=randn(B, T), old_lp=randn(B, T),
        ref_lp=randn(B, T, dtype=logits_dtype), values=randn(B, T, dtype=logits_dtype), adv=randn(B, T),
        rewards=randn(B, T), scores=randn(B), has_stop=randn(B) > 0, last_index=last_index)


def ppo_math(x, scores=None):
    """Every pure PPO function on one set of inputs -> dict of results (no host syncs)."""
    identity = lambda t: t  # noqa: E731  (an all-reduce over one process)
    scores = x.scores if scores is None else scores
    out = {"sum": F.masked_sum(x.lp, x.mask), "sum_dim": F.masked_sum(x.lp, x.mask, dim=1),
           "mean": F.masked_mean(x.lp, x.mask), "var": F.masked_var(x.lp, x.mask, unbiased=True),
           "logprobs": F.selective_log_softmax(x.logits, x.ids), "entropy": F.entropy_from_logits(x.logits)}
    for est in F.KL_ESTIMATORS:
        out[f"kl_{est}"] = F.kl_penalty(x.lp, x.ref_lp, est)
    ids, mask, last, has_stop = F.truncate_at_stop(x.ids, stop_token_id=3, pad_token_id=0)
    out.update(trunc_ids=ids, trunc_mask=mask.float(), trunc_last=last.float(), trunc_stop=has_stop.float())
    processed = F.process_scores(scores, x.has_stop, 1.0, 10.0)
    rewards = F.shaped_rewards(processed, out["kl_k1"], x.mask, x.last_index, 0.05)
    adv, ret = F.gae(rewards, x.values, x.mask, 1.0, 0.95)
    out.update(processed=processed, rewards=rewards, adv=adv, ret=ret,
               whiten=F.masked_whiten(adv, x.mask, all_reduce=identity),
               whiten_scale=F.masked_whiten(rewards, x.mask, shift_mean=False),
               ev=F.explained_variance(x.values, ret, x.mask, all_reduce=identity))
    n_tokens = x.mask.sum().float()
    for name, num in (("float", 7.0), ("tensor", n_tokens)):
        out[f"pg_{name}"] = F.policy_loss(x.lp, x.old_lp, x.adv, x.mask, 0.2, num)
        out[f"vf_{name}"] = F.value_loss(x.values, x.old_lp, ret, x.mask, 0.2, num)
    return out


def test_ppo_math_follows_accelerator_inputs():
    x = ppo_inputs(ACC)
    all_on(ppo_math(x), ACC)
    # the reward model's scores may come back on the CPU (reward_model.scoring returns CPU)
    all_on(ppo_math(x, scores=torch.randn(3)), ACC)
    ema = [torch.randn(4, 3, device=ACC), torch.randn(3, device=ACC)]
    F.ema_update(ema, [torch.randn(4, 3, device=ACC, dtype=torch.bfloat16), torch.randn(3, device=ACC)], 0.9)
    all_on(ema, ACC)


def test_ppo_math_creates_nothing_on_the_default_device():
    x = ppo_inputs(CPU)
    same_on_meta_default(lambda: ppo_math(x))

    kl_high, kl_fixed, live = torch.tensor(8.0), torch.tensor(1.0), torch.ones(2, 2)

    def controllers():
        ada, fixed = F.AdaptiveKLController(0.1, 6.0, 1000), F.FixedKLController(0.05)
        betas = [ada.update(kl_high, 64), ada.update(3.0, 64), fixed.update(kl_fixed, 64)]
        ema = [live.clone().zero_()]
        F.ema_update(ema, [live], 0.75)
        return betas, ada.state_dict(), ema

    same_on_meta_default(controllers)


# ----------------------------------------------------------------------------- RM losses
def rm_losses(device, ranks_device=None):
    g = torch.Generator(device="cpu").manual_seed(1) if device == CPU else None
    chosen, rejected = (torch.randn(6, generator=g, device=device) for _ in range(2))
    rewards = torch.randn(2, 3, generator=g, device=device, dtype=torch.bfloat16)
    ranks = torch.randint(0, 3, (2, 3), generator=g, device=ranks_device or device)
    valid = torch.randn(2, 3, generator=g, device=ranks_device or device) > -1.0
    return {"pair": losses.pairwise_loss(chosen, rejected), "pair_margin": losses.pairwise_loss(chosen, rejected, 0.5, 0.01),
            "pair_margin_t": losses.pairwise_loss(chosen, rejected, torch.full((6,), 0.3, device=device)),
            "kwise": losses.kwise_loss(rewards, ranks, valid), "kwise_center": losses.kwise_loss(rewards, ranks, valid, 0.01)}


def test_rm_losses_follow_accelerator_inputs():
    all_on(rm_losses(ACC), ACC)
    all_on(rm_losses(ACC, ranks_device=CPU), ACC)  # ranks built from Python lists


def test_rm_losses_create_nothing_on_the_default_device():
    same_on_meta_default(lambda: rm_losses(CPU))


# ----------------------------------------------------------------------------- normalization math
def test_normalization_is_measured_on_the_cpu_and_written_in_the_heads_device_and_dtype():
    """The rm-stage crash: score_ids returns hidden states and scores on the CPU while the head
    lives on the GPU (in bf16 runs also in bf16)."""
    with fake_cuda():
        hidden, scores = torch.randn(20, 8), torch.randn(20)  # as score_ids returns them: CPU float32
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.randn(1, 8, device=CUDA, dtype=dtype)
            for use_std in (True, False):
                new, mean, std = folded_head(weight, hidden, scores, use_std)
                assert (new.device, new.dtype) == (CUDA, dtype)
                assert (mean.device, mean.dtype, std.device, std.dtype) == (CPU, torch.float64, CPU, torch.float64)
            direction = shift_direction(hidden)
            assert (direction.device, direction.dtype) == (CPU, torch.float64)
            head = normalized_head(weight, direction, 0.5, 2.0)
            assert (head.device, head.dtype) == (CUDA, dtype)
            shift_deviation(weight, head, hidden, 0.5, 2.0)  # weights on CUDA, hidden on the CPU


def test_normalize_on_reference_mixes_cpu_statistics_with_a_gpu_head(monkeypatch):
    """The glue around the fold: score_ids hands back CPU tensors, the head is on the GPU. The
    forwards (score_ids) and the in-place write (fold_normalization's copy_, always legal across
    devices) cannot run on fake CUDA, so they are stubbed; the rest runs as in the rm stage."""
    import reward_model.model as rm_model
    import reward_model.scoring as scoring

    with fake_cuda():
        model = SimpleNamespace(score=SimpleNamespace(weight=torch.randn(1, 8, device=CUDA, dtype=torch.bfloat16)),
                                config=SimpleNamespace())
        monkeypatch.setattr(scoring, "score_ids", lambda m, seqs, *a, **k: (torch.randn(len(seqs)),
                                                                             torch.randn(len(seqs), 8)))
        monkeypatch.setattr(rm_model, "fold_normalization", lambda m, hidden, scores, use_std=True, offset=None: {
            "mean": scores.double().mean().item(), "std": 1.0, "reference_size": scores.numel()})
        stats = normalize_on_reference(model, [[1]] * 20, [[1]] * 10, pad_id=0)
        assert set(stats) >= {"ref_mean", "ref_std", "heldout_max_abs_dev", "heldout_mean_abs_dev"}


def test_normalization_math_stays_on_the_accelerator():
    d = shift_direction(torch.randn(20, 8, device=ACC))
    assert (d.device, d.dtype) == (ACC, torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        new, mean, std = folded_head(torch.randn(1, 8, device=ACC, dtype=dtype), torch.randn(20, 8, device=ACC),
                                     torch.randn(20, device=ACC))
        assert new.device == mean.device == std.device == ACC and new.dtype == dtype


def test_normalization_math_creates_nothing_on_the_default_device():
    g = torch.Generator(device="cpu").manual_seed(2)
    hidden = torch.randn(30, 8, generator=g) + 3.0
    weight = torch.randn(1, 8, generator=g)
    scores = hidden @ weight[0]

    def run():
        direction = shift_direction(hidden)
        new, mean, std = folded_head(weight, hidden, scores)
        return direction, normalized_head(weight, direction, 0.25, 1.5), new, mean, std, \
            shift_deviation(weight, new, hidden, mean.item(), std.item())

    same_on_meta_default(run)
    # degenerate fit: the fallback direction, chosen without a host sync
    zero = torch.zeros(4, 3)
    same_on_meta_default(lambda: shift_direction(zero))


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny():
    """A tokenizer from a few sentences, a 1-layer random Llama policy, reference, critic and RM."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.tokenizer import train_tokenizer

    texts = ["What is the last word? red fox. Answer: fox.", "What is 3 + 4? Answer: 7.",
             "Write in capitals: sun cat. Answer: SUN CAT."] * 10
    tok = train_tokenizer(texts, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, num_labels=1)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).eval()
    rm = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # RMSNorm output shares a large component, as in trained models
        rm.score.weight.normal_(0.0, 0.25)
    return SimpleNamespace(tok=tok, policy=policy, rm=rm)


PROMPTS = ["What is the last word? red fox", "What is 3 + 4?", "Write in capitals: sun cat"]
RESPONSES = ["Answer: fox.", "Answer: 7", "SUN"]


def test_scoring_creates_nothing_on_the_default_device(tiny):
    from reward_model.metrics import histogram, pearson
    from reward_model.scoring import forward_rewards, group_rewards, render, right_pad, score, score_ids

    tok, rm = tiny.tok, tiny.rm
    seqs = [render(tok, p, r, f) for p, r, f in zip(PROMPTS, RESPONSES, [True, False, True])]

    def run():
        with torch.no_grad():
            return {"pad": right_pad(seqs, tok.pad_token_id), "forward": forward_rewards(rm, seqs, tok.pad_token_id),
                    "groups": group_rewards(rm, [seqs[:2], seqs[2:]], tok.pad_token_id),
                    "ids": score_ids(rm, seqs, tok.pad_token_id, batch_size=2, with_hidden=True),
                    "empty": score_ids(rm, [], tok.pad_token_id, with_hidden=True),
                    "score": score(rm, tok, PROMPTS, RESPONSES, [True, False, True], batch_size=2)}

    out = same_on_meta_default(run)
    all_on(out["score"], CPU)
    all_on(out["ids"], CPU)
    values = [0.1 * i for i in range(12)]
    same_on_meta_default(lambda: (histogram(values, values[::-1], bins=4, max_values=5), pearson(values, values[::2] * 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_the_normalization_into_a_model(tiny, dtype):
    """fold_normalization / normalize_on_reference on a real tiny RM: no untied tensors, the head
    keeps its dtype, scores come back float32, and the reference mean is ~0 afterwards."""
    from reward_model.scoring import render, score_ids

    tok = tiny.tok
    seqs = [render(tok, p, r) for p in PROMPTS for r in RESPONSES + ["7", "fox fox"]]
    base = copy.deepcopy(tiny.rm).to(dtype)

    def run():
        model = copy.deepcopy(base)
        stats = normalize_on_reference(model, seqs[:10], seqs[10:], tok.pad_token_id, batch_size=4)
        scores, hidden = score_ids(model, seqs[:10], tok.pad_token_id, with_hidden=True)
        model2 = copy.deepcopy(base)
        s2, h2 = score_ids(model2, seqs, tok.pad_token_id, with_hidden=True)
        stats2 = fold_normalization(model2, h2, s2, use_std=False)
        return stats, scores, hidden, model.score.weight.detach(), stats2, model2.score.weight.detach()

    stats, scores, hidden, weight, _, weight2 = same_on_meta_default(run)
    assert weight.dtype == weight2.dtype == dtype
    assert scores.dtype == hidden.dtype == torch.float32
    if dtype == torch.float32:
        assert abs(stats["ref_mean"]) < 1e-6 and abs(stats["ref_std"] - 1.0) < 1e-6
    else:  # the folded head is rounded to bf16
        assert abs(stats["ref_mean"]) < 0.1 and abs(stats["ref_std"] - 1.0) < 0.1


# ----------------------------------------------------------------------------- sampling, rollouts
def test_sampling_and_rollouts_create_nothing_on_the_default_device(tiny):
    from pipeline.evaluation import generate, left_pad, row_keys
    from reward_model.comparisons import sample_responses
    from pipeline.runtime import batch_indices
    from stages.ppo.data import PtxData
    from stages.policy_eval import sequence_kl
    from stages.ppo.models import ValueModel
    from stages.ppo.rollout import build_rollout, queries, sample

    tok = tiny.tok
    models = SimpleNamespace(policy=tiny.policy, ref=copy.deepcopy(tiny.policy), value_model=ValueModel(tiny.rm),
                             reward=tiny.rm, tokenizer=tok, reward_tokenizer=tok, likelihood_shared=False)
    accelerator = SimpleNamespace(device=CPU, autocast=contextlib.nullcontext, process_index=0, num_processes=1)

    def run():
        q, qm = queries(tok, PROMPTS, CPU)
        sampled = sample(tiny.policy, tok, q, qm, temperature=1.0, max_new_tokens=5, batch_size=2,
                         keys=row_keys("test", range(len(PROMPTS))))
        sampled[0, 1] = tok.eos_token_id  # one response stops early
        rollout = build_rollout(models, accelerator, PROMPTS, q, qm, sampled, temperature=1.0, batch_size=2)
        ids = [row[m].tolist() for row, m in zip(rollout.response_ids, rollout.response_mask)]
        kl = sequence_kl(tiny.policy, models, PROMPTS, ids, rollout.has_stop.tolist(), 1.0, 2, CPU)
        greedy = generate(tiny.policy, tok, [[tok.bos_token_id, 7, 8], [tok.bos_token_id, 9]], 4, batch_size=1)
        comps = sample_responses(tiny.policy, tok, PROMPTS[:2], k=2, max_new_tokens=4, temperature=1.0, seed=3,
                                 batch_size=3)
        ptx = PtxData([([1, 5, 6, 2], [-100, 5, 6, 2]), ([1, 7, 2], [1, 7, 2])], tok.pad_token_id, seed=0)
        return {"sampled": sampled, "rollout": rollout, "kl": kl, "greedy": greedy,
                "comparisons": [(c.responses, c.finished) for c in comps], "left_pad": left_pad([[1, 2], [3]], 0),
                "order": batch_indices(3, 5, 4, seed=1), "ptx": ptx.batch(1, 2, 0, 1, 1)}

    out = same_on_meta_default(run, seed=11)
    r = out["rollout"]
    for name in ("logprobs", "ref_logprobs", "values", "scores"):
        assert getattr(r, name).dtype == torch.float32, name
