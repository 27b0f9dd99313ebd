"""Stage `ppo` on tiny random Llama models: invariances (ratio 1 at step 0, right padding,
1 vs 2 processes), resume, LoRA reference, EMA, parent hand-off. The ptx and entropy gradients
against hand-computed ones: test_ppo_gradients.py."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
WORLD = ["world.num_people=20", "world.corpus_docs=600", "world.sft_examples=300", "world.eval_examples=8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained on a small world, a 2-layer random Llama policy and a random-head RM."""
    from transformers import AutoModelForSequenceClassification

    from pipeline import models as pm
    from pipeline.config import WorldConfig
    from pipeline.tokenizer import train_tokenizer
    from pipeline.world import World

    root = tmp_path_factory.mktemp("tiny")
    world = World(WorldConfig(num_people=20, corpus_docs=600, sft_examples=300, eval_examples=8))
    texts = world.corpus() + [" ".join(m["content"] for m in ex["messages"]) for ex in world.sft_examples()]
    tok = train_tokenizer(texts, vocab_size=400)
    pm.PRESETS["test-micro"] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64)
    try:
        torch.manual_seed(0)
        # attention dropout in the checkpoint: PPO must turn it off (test_load_models_turns_dropout_off_in_all_four)
        model = pm.llama_from_preset("test-micro", tok, max_position_embeddings=256, dropout=0.1)
    finally:
        del pm.PRESETS["test-micro"]
    policy_dir, reward_dir = root / "policy", root / "reward"
    model.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(str(policy_dir), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)
    return SimpleNamespace(policy=str(policy_dir), reward=str(reward_dir), root=root)


def ppo_cfg(tiny, runs_dir, *overrides):
    from stages.ppo.config import PPOConfig

    return load_config(PPOConfig, [f"policy.name_or_path={tiny.policy}", f"reward.name_or_path={tiny.reward}",
                                   f"runs_dir={runs_dir}", "threads=1", "wandb.mode=disabled", *WORLD,
                                   "data.num_prompts=64", "batch.rollout=8", "batch.size=4",
                                   "batch.micro=2", "epochs=2", "steps=2", "rollout.max_new_tokens=8",
                                   "eval.max_new_tokens=8", "eval.num_prompts=8", "eval.every=0",
                                   "optim.policy_lr=1e-3", "optim.critic_lr=1e-3", "log_every=100", *overrides])


def trainer_for(cfg, ptx=False):
    from pipeline.runtime import make_accelerator, resolve_precision
    from pipeline.world import World
    from stages.ppo.data import load_ptx
    from stages.ppo.loop import make_trainer
    from stages.ppo.models import load_models, resolve_sources

    acc = make_accelerator(mixed_precision=resolve_precision(cfg.precision))
    torch.manual_seed(cfg.seed)
    models = load_models(cfg, resolve_sources(cfg), acc.device)
    data = load_ptx(cfg, World(cfg.world), models.tokenizer) if ptx else None
    return make_trainer(cfg, models, acc, data)


PROMPTS = ["What is the last word? red fox", "What is 3 + 4?", "Write in capitals: sun cat", "What is the first word? dog tree",
           "What is the last word? moon star bird", "What is 2 + 2?", "Write in capitals: rock", "What is the first word? fish"]


def fixed_rollout(trainer, sampled=None):
    """A rollout of PROMPTS with hand-made responses: stop tokens at varied places, one never stops."""
    from stages.ppo.rollout import build_rollout, queries

    tok = trainer.models.tokenizer
    if sampled is None:
        g = torch.Generator().manual_seed(5)
        sampled = torch.randint(10, len(tok), (len(PROMPTS), 7), generator=g)
        for row, stop_at in enumerate([2, 6, None, 0, 4, 1, 3, 5]):
            if stop_at is not None:
                sampled[row, stop_at] = tok.eos_token_id
    q, qm = queries(tok, PROMPTS, trainer.accelerator.device)
    return build_rollout(trainer.models, trainer.accelerator, PROMPTS, q, qm, sampled, trainer.cfg.rollout.temperature, 64)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- invariances
def test_ratio_is_one_on_first_minibatch(tiny, tmp_path):
    from stages.ppo.loop import iteration_step

    t = trainer_for(ppo_cfg(tiny, tmp_path))
    metrics, rollout = iteration_step(t, 0, PROMPTS)
    # old log-probs (rollout forward, chunked, no grad) vs the training forward (micro-batches, grad)
    assert metrics["ppo/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ppo/approxkl_first"] < 1e-10
    # ... and the updates did move the policy, so the check can fail
    assert metrics["ppo/approxkl"] > 1e-6 and metrics["ppo/ratio_var"] > 0
    assert rollout.response_mask.dtype == torch.bool and rollout.logprobs.dtype == torch.float32
    for key in ("rollout/score", "ppo/kl", "ppo/beta", "ppo/entropy", "ppo/clipfrac", "ppo/approxkl", "ppo/ratio",
                "ppo/value_loss", "ppo/explained_variance", "rollout/eos_rate", "rollout/length",
                "perf/episodes_per_s", "perf/time_generate", "perf/time_score", "perf/time_update"):
        assert math.isfinite(metrics[key]), key


def test_compile_gives_the_eager_iteration(tiny, tmp_path):
    """compile=true: scoring and update forwards go through torch.compile wrappers of the prepared
    models, generation stays eager, and one iteration gives the eager run's numbers: the same
    tokens, log-probs, values and updated weights within float rounding, the first ratio 1."""
    from torch._dynamo.eval_frame import OptimizedModule

    from stages.ppo.loop import iteration_step

    runs = {}
    for flag in ("false", "true"):
        t = trainer_for(ppo_cfg(tiny, tmp_path / flag, f"compile={flag}", "epochs=1"))
        assert isinstance(t.policy_forward, OptimizedModule) == (flag == "true")
        assert isinstance(t.value_forward, OptimizedModule) == (flag == "true")
        assert not isinstance(t.policy, OptimizedModule)  # what is saved and sampled from is the plain model
        before = params(t.policy)
        torch.manual_seed(3)
        metrics, r = iteration_step(t, 0, PROMPTS)
        runs[flag] = metrics, r, params(t.policy)
        assert any(not torch.equal(before[n], runs[flag][2][n]) for n in before)  # the update moved the policy
    (_, r0, p0), (m1, r1, p1) = runs["false"], runs["true"]
    assert torch.equal(r0.response_ids, r1.response_ids)
    torch.testing.assert_close(r1.logprobs, r0.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(r1.values, r0.values, atol=1e-5, rtol=0)
    assert m1["ppo/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], atol=1e-4, rtol=0, msg=name)


def test_compile_refused_under_sharded_launchers(tiny, tmp_path):
    from pipeline.config import ConfigError
    from stages.ppo.loop import compiled_forwards

    cfg = ppo_cfg(tiny, tmp_path, "compile=true")
    with pytest.raises(ConfigError, match="compile: not supported under fsdp2"):
        compiled_forwards(cfg, SimpleNamespace(is_fsdp2=True), None)


def test_bf16_on_cpu_ratio_is_one_within_rounding(tiny, tmp_path):
    """precision=bf16 on a CPU (eager attention, autocast): the old log-probs and the training
    forward still agree to bf16's rounding (docs/ppo.md §18), and the models trained."""
    from stages.ppo.loop import iteration_step

    fp32 = fixed_rollout(trainer_for(ppo_cfg(tiny, tmp_path)))  # one live accelerator at a time
    cfg = ppo_cfg(tiny, tmp_path, "precision=bf16")
    t = trainer_for(cfg)
    assert cfg.attention() == "eager" and t.accelerator.mixed_precision == "bf16"
    bf16, m = fixed_rollout(t), fp32.response_mask
    assert not torch.equal(bf16.logprobs[m], fp32.logprobs[m])  # the forwards did run in bf16
    torch.testing.assert_close(bf16.logprobs[m], fp32.logprobs[m], atol=5e-2, rtol=0)
    metrics, _ = iteration_step(t, 0, PROMPTS)
    assert metrics["ppo/ratio_first"] == pytest.approx(1.0, abs=1e-2) and metrics["ppo/approxkl_first"] < 1e-4
    assert metrics["ppo/approxkl"] > 1e-6 and math.isfinite(metrics["ppo/value_loss"])


def with_dropout(family: str, vocab: int, p: float = 0.3):
    """A tiny random causal LM with every dropout its architecture has set to `p`. GPT-2 has
    nn.Dropout modules (embeddings, attention weights, residual branches); Llama has none: its
    attention reads a float `attention_dropout` in train mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                          embd_pdrop=p, attn_pdrop=p, resid_pdrop=p))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                        attention_dropout=p))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_disable_dropout_makes_the_train_mode_ratio_exactly_one(family):
    """PPO trains in train mode; with dropout live the old (rollout) and new (training) log-probs
    of the same weights differ and the step-0 ratio is not 1. After `disable_dropout` it is
    exactly 1, still in train mode."""
    from pipeline.models import disable_dropout
    from stages.ppo.functional import policy_loss
    from stages.ppo.rollout import sequence_inputs, token_logprobs

    model = with_dropout(family, vocab=64).train()
    g = torch.Generator().manual_seed(0)
    q, resp = torch.randint(0, 64, (3, 5), generator=g), torch.randint(0, 64, (3, 6), generator=g)
    mask = torch.ones_like(resp, dtype=torch.bool)
    inputs = sequence_inputs(q, torch.ones_like(q, dtype=torch.bool), resp, mask)
    with torch.no_grad():
        a, b = (token_logprobs(model, *inputs, resp, 0.7) for _ in range(2))
    assert (a - b).abs().max() > 1e-3                   # dropout is live: the check below can fail
    disable_dropout(model)
    assert model.training
    with torch.no_grad():
        old = token_logprobs(model, *inputs, resp, 0.7)  # the rollout's forward
    new = token_logprobs(model, *inputs, resp, 0.7)      # the training forward, with grad
    assert torch.equal(torch.exp(new.detach() - old), torch.ones_like(old))
    _, stats = policy_loss(new, old, torch.randn(3, 6, generator=g), mask, 0.2, mask.sum())
    assert stats["ratio_sum"].item() == stats["tokens"].item() == 18 and stats["approxkl_sum"].item() == 0.0


def test_load_models_turns_dropout_off_in_all_four(tiny, tmp_path):
    """The tiny checkpoints carry attention dropout 0.1; every model PPO loads is deterministic in
    train mode (the policy and critic train in it; the frozen ones must not care)."""
    from transformers import AutoConfig

    from stages.ppo.models import load_models, resolve_sources
    from stages.ppo.rollout import sequence_inputs

    assert AutoConfig.from_pretrained(tiny.policy).attention_dropout == AutoConfig.from_pretrained(tiny.reward).attention_dropout == 0.1
    cfg = ppo_cfg(tiny, tmp_path)
    models = load_models(cfg, resolve_sources(cfg), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(models.tokenizer), (2, 12), generator=g)
    ids_, mask, pos = sequence_inputs(ids[:, :5], torch.ones(2, 5, dtype=torch.bool), ids[:, 5:],
                                      torch.ones(2, 7, dtype=torch.bool))
    calls = {"policy": lambda m: m(input_ids=ids_, attention_mask=mask, position_ids=pos).logits,
             "ref": lambda m: m(input_ids=ids_, attention_mask=mask, position_ids=pos).logits,
             "reward": lambda m: m(input_ids=ids_, attention_mask=mask, position_ids=pos).logits,
             "value_model": lambda m: m(ids_, mask, pos)}
    for name, call in calls.items():
        model = getattr(models, name).train()
        with torch.no_grad():
            assert torch.equal(call(model), call(model)), name


def test_sampling_distribution_is_the_teacher_forced_policy(tiny, tmp_path):
    """Left-padded generation with the KV cache samples from exactly the softmax(z/τ) that the
    teacher-forced forward (explicit position ids) scores: no position or padding mismatch."""
    from pipeline.evaluation import KeyedSampling, generate_ids, generation_config, row_keys
    from pipeline.tokenizer import end_of_turn_id
    from stages.ppo.rollout import build_rollout, queries

    t = trainer_for(ppo_cfg(tiny, tmp_path))
    tok = t.models.tokenizer
    q, qm = queries(tok, PROMPTS, t.accelerator.device)
    assert (~qm[:, 0]).any() and qm[:, -1].all()                      # prompts of several lengths, left-padded
    config = generation_config(end_of_turn_id(tok), tok.pad_token_id, 8)
    config.output_logits, config.return_dict_in_generate = True, True  # raw logits, before any processor
    gen = generate_ids(t.policy, q, qm, config, KeyedSampling(row_keys("test", range(len(PROMPTS))), 0.7))
    sampled = gen.sequences[:, q.shape[1]:]
    behaviour = torch.log_softmax(torch.stack(gen.logits, 1).float() / 0.7, -1).gather(-1, sampled[..., None])[..., 0]
    r = build_rollout(t.models, t.accelerator, PROMPTS, q, qm, sampled, 0.7, 64)
    m = r.response_mask
    torch.testing.assert_close(r.logprobs[m], behaviour[:, : m.shape[1]][m], atol=1e-5, rtol=1e-5)


def _pad_right(r, n: int):
    """Append n response slots: pad tokens, mask False, garbage in every float tensor."""
    B = len(r)
    g = torch.Generator().manual_seed(9)
    junk = lambda: torch.randn(B, n, generator=g) * 100  # noqa: E731
    return replace(r, response_ids=torch.cat([r.response_ids, torch.full((B, n), 0, dtype=torch.long)], 1),
                   response_mask=torch.cat([r.response_mask, torch.zeros(B, n, dtype=torch.bool)], 1),
                   logprobs=torch.cat([r.logprobs, junk()], 1), ref_logprobs=torch.cat([r.ref_logprobs, junk()], 1),
                   values=torch.cat([r.values, junk()], 1))


def test_metrics_and_losses_unchanged_by_right_padding(tiny, tmp_path):
    from stages.ppo.loop import compute_advantages, optimise

    out = []
    for extra in (0, 5):
        t = trainer_for(ppo_cfg(tiny, tmp_path))
        r = fixed_rollout(t)
        assert r.response_mask.sum(1).tolist() == [3, 7, 7, 1, 5, 2, 4, 6]
        r.response_ids[~r.response_mask] = t.models.tokenizer.pad_token_id
        if extra:
            r = _pad_right(r, extra)
        r, stats = compute_advantages(r, t.kl_ctl.value, t.cfg.objective, t.all_reduce)
        minibatches = optimise(t, r, 0)
        out.append((stats, minibatches, params(t.policy), r))
    (s0, m0, p0, r0), (s1, m1, p1, r1) = out
    assert r1.response_ids.shape[1] == r0.response_ids.shape[1] + 5
    for k in s0:
        assert s1[k] == pytest.approx(s0[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(m0, m1):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    torch.testing.assert_close(r1.advantages[:, :-5], r0.advantages, atol=1e-5, rtol=1e-4)
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], atol=1e-6, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("compile=true",)], ids=["eager", "compiled"])
def test_two_processes_match_one(tiny, tmp_path, extra):
    """2 epochs x 2 minibatches x 2 micro-batches with PPO-ptx: the minibatches are drawn from one
    global permutation and split over processes, so 2 processes make the same run as 1 even though
    each holds only its own shard of episodes (different prompt and response widths). With
    compile, the DDP model is compiled whole and its gradient sync still holds."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ppo_ddp_check import compute

    from pipeline.runtime import make_accelerator

    one = json.loads(json.dumps(compute(tiny.policy, tiny.reward, make_accelerator(), extra)))
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(ROOT / "tests" / "ppo_ddp_check.py"),
           tiny.policy, tiny.reward, str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert one["world"] == 1 and two["world"] == 2
    (p0, t0), (p1, t1) = two["shapes"]
    assert p0 != p1 and t0 != t1                      # the shards need left- and right-padding to be joined
    assert one["shapes"] == [[max(p0, p1), max(t0, t1)]]
    assert one["in_order"] and two["in_order"]       # the joined rollout is in one process's episode order
    assert len(one["minibatches"]) == len(two["minibatches"]) == 4   # 2 epochs x 2 minibatches
    diff = {"stats": max(abs(two["stats"][k] - one["stats"][k]) for k in one["stats"]),
            "minibatches": max(abs(b[k] - a[k]) for a, b in zip(one["minibatches"], two["minibatches"]) for k in a),
            "fingerprint": max(abs(b - a) for a, b in zip(one["fingerprint"], two["fingerprint"]))}
    print(f"max abs diff 1 vs 2 processes: {diff}")
    for k in ("ppo/advantage_mean", "ppo/advantage_std", "ppo/kl", "rollout/score", "ppo/explained_variance",
              "rollout/length", "rollout/eos_rate"):
        assert two["stats"][k] == pytest.approx(one["stats"][k], rel=1e-4, abs=1e-6), k
    for i, (a, b) in enumerate(zip(one["minibatches"], two["minibatches"])):
        # gradient norms before clipping catch a wrong DDP scale (Adam alone would hide it)
        for k in ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/clipfrac", "ppo/approxkl", "ppo/ratio",
                  "ppo/ptx_loss", "ppo/loss", "ppo/grad_norm_policy", "ppo/grad_norm_critic"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (i, k)
    assert one["minibatches"][0]["ppo/ptx_loss"] > 1.0                      # ptx is on
    # Before any update the ratio is 1 although the old log-probs came from each shard's own widths
    # and the new ones from the joined, re-padded batch: padding changes no log-prob.
    assert two["minibatches"][0]["ppo/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert two["minibatches"][0]["ppo/approxkl"] < 1e-10
    assert two["fingerprint"] == pytest.approx(one["fingerprint"], rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- the stage
def _rows(runs_dir, run="default"):
    from pipeline.runs import read_metrics

    return read_metrics(Path(runs_dir) / run / "ppo" / "metrics.jsonl")


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("perf/") and k != "time"}


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_resume_after_interruption_matches_unbroken_run(tiny, tmp_path):
    from stages.ppo import run

    extra = ["steps=4", "ema.enabled=true", "objective.adaptive_kl=true", "optim.schedule=linear", "save_every=0"]
    full = run(ppo_cfg(tiny, tmp_path / "a", *extra))
    stopped = run(ppo_cfg(tiny, tmp_path / "b", *extra, "stop_after=2"))
    assert stopped.status == "running" and (tmp_path / "b/default/ppo/checkpoints/step-0000002").exists()
    resumed = run(ppo_cfg(tiny, tmp_path / "b", *extra, "stop_after=2"))
    assert full.status == resumed.status == "complete"
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 4, 4]  # last: valid eval, then test
    for ra, rb in zip(a, b):
        ca, cb = _comparable(ra), _comparable(rb)
        assert ca.keys() == cb.keys()
        for k in ca:
            assert cb[k] == pytest.approx(ca[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    for sub in ("model", "model_ema"):
        wa, wb = _weights(tmp_path / "a/default/ppo" / sub), _weights(tmp_path / "b/default/ppo" / sub)
        for n in wa:
            torch.testing.assert_close(wa[n], wb[n], atol=1e-6, rtol=1e-5)
    assert set(full.extra["headline"]) >= {"gold_win_rate", "gold_score", "kl"}
    assert 0.0 <= full.extra["headline"]["gold_win_rate"] <= 1.0


def test_lora_reference_is_adapter_disabled_base(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages.ppo import run
    from stages.ppo.loop import iteration_step
    from stages.ppo.rollout import reference_context, reference_model, sequence_inputs, token_logprobs

    cfg = ppo_cfg(tiny, tmp_path, "policy.lora.enabled=true", "policy.lora.r=4", "optim.policy_lr=1e-2",
                  "policy.lora.critic=true")
    t = trainer_for(cfg)
    assert t.models.ref is None and hasattr(t.policy, "disable_adapter")
    critic_trainable = [n for n, p in t.models.value_model.named_parameters() if p.requires_grad]
    assert any("lora" in n for n in critic_trainable) and any("score" in n for n in critic_trainable)
    assert 0 < sum(p.numel() for p in t.policy.parameters() if p.requires_grad) < 0.5 * sum(
        p.numel() for p in t.policy.parameters())
    sft = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    iteration_step(t, 0, PROMPTS)
    r = fixed_rollout(t)
    inputs = sequence_inputs(r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    with torch.no_grad():
        with reference_context(t.models):
            ref = token_logprobs(reference_model(t.models), *inputs, r.response_ids, cfg.rollout.temperature)
        expected = token_logprobs(sft, *inputs, r.response_ids, cfg.rollout.temperature)
        live = token_logprobs(t.policy, *inputs, r.response_ids, cfg.rollout.temperature)
    m = r.response_mask
    torch.testing.assert_close(ref[m], expected[m], atol=1e-5, rtol=1e-5)  # adapter off = the SFT weights
    torch.testing.assert_close(r.ref_logprobs[m], expected[m], atol=1e-5, rtol=1e-5)
    assert (live[m] - expected[m]).abs().max() > 1e-4                     # the adapter has learned something
    # the whole stage with LoRA exports plain (merged) weights
    manifest = run(replace(cfg, steps=1))
    assert manifest.status == "complete"
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "default/ppo/model"))
    assert not any("lora" in n for n, _ in exported.named_parameters())


def test_ema_follows_the_recurrence_and_is_exported(tiny, tmp_path):
    from stages.ppo.loop import iteration_step
    from stages.ppo.models import export_policy

    decay = 0.5
    # one optimizer step per iteration: epochs=1, minibatch = rollout batch
    cfg = ppo_cfg(tiny, tmp_path, "ema.enabled=true", f"ema.decay={decay}", "epochs=1", "batch.size=8")
    t = trainer_for(cfg)
    snaps = [params(t.policy)]
    for it in range(2):
        iteration_step(t, it, PROMPTS)
        snaps.append(params(t.policy))
    ema = params(t.ema.model)
    for n in snaps[0]:
        expected = decay * (decay * snaps[0][n] + (1 - decay) * snaps[1][n]) + (1 - decay) * snaps[2][n]
        torch.testing.assert_close(ema[n], expected, atol=1e-6, rtol=1e-5)
    export_policy(t.ema.model, t.models.tokenizer, tmp_path / "model_ema")
    saved = _weights(tmp_path / "model_ema")
    for n, w in saved.items():
        torch.testing.assert_close(w, ema[n], atol=0, rtol=0)
    assert max((ema[n] - snaps[2][n]).abs().max().item() for n in ema) > 1e-5  # differs from the policy


# ----------------------------------------------------------------------------- hand-off
def test_policy_is_the_rm_stages_parent(tiny, tmp_path):
    from pipeline import runs
    from stages.ppo.config import PPOConfig
    from stages.ppo.models import resolve_sources

    def stage(name, model_dir, parent=None):
        d = tmp_path / "r" / name
        d.mkdir(parents=True)
        m = runs.Manifest(stage=name, run_name="r", status="complete", model_dir=str(model_dir),
                          tokenizer_fingerprint=runs.tokenizer_fingerprint(model_dir))
        if parent is not None:
            m.parent, m.parent_hash = str(parent), runs.file_hash(parent)
        return m.save(d)

    sft = stage("sft", tiny.policy)
    stage("rm", tiny.reward, parent=sft)
    cfg = load_config(PPOConfig, [f"runs_dir={tmp_path}", "run_name=r"])
    src = resolve_sources(cfg)
    assert src.policy_dir == str(Path(tiny.policy).resolve()) and src.reward_dir == str(Path(tiny.reward).resolve())
    assert src.parent.manifest.stage == "rm" and src.sft_manifest == sft.resolve()
    # a world other than the reward model's is refused
    from pipeline.stage import check_parent_world as check_world

    rm_manifest = runs.Manifest.load(tmp_path / "r/rm/manifest.json")
    rm_manifest.config = {"world": {"seed": 1234, "num_people": 7}}
    rm_manifest.save(tmp_path / "r/rm")
    with pytest.raises(ValueError, match="world.num_people=7"):
        check_world(cfg, resolve_sources(cfg).parent)
    # an sft stage changed after the RM was trained on it is refused
    m = runs.Manifest.load(sft)
    m.metrics = {"changed": 1}
    m.save(sft.parent)
    with pytest.raises(runs.HandoffError, match="re-run rm"):
        resolve_sources(cfg)


def test_first_kl_is_zero_in_bf16_only_when_the_reference_computes_as_the_policy(tiny, tmp_path):
    """precision=bf16 (CPU autocast): the reference stores its linear layers in bf16 and computes
    under autocast, as the policy's fp32 weights do (`frozen_numerics` 'autocast'): every token's
    log-probability is the policy's, KL 0. A reference all in bf16 (embeddings and norms too)
    computes otherwise, and the first KL is not 0."""
    from stages.ppo.loop import iteration_step, make_trainer
    from stages.ppo.models import load_models, resolve_sources

    cfg = ppo_cfg(tiny, tmp_path, "precision=bf16")
    metrics, r = iteration_step(trainer_for(cfg), 0, PROMPTS)
    m = r.response_mask
    assert torch.equal(r.logprobs[m], r.ref_logprobs[m]) and metrics["ppo/kl"] == 0.0
    from pipeline.runtime import make_accelerator

    acc = make_accelerator(mixed_precision="bf16")
    torch.manual_seed(cfg.seed)
    other = load_models(cfg, resolve_sources(cfg), acc.device, numerics="bf16")
    metrics, r = iteration_step(make_trainer(cfg, other, acc), 0, PROMPTS)
    assert abs(metrics["ppo/kl"]) > 1e-4
