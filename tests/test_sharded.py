"""Sharded launchers on 2 CPU processes: FSDP2 (torch's `fully_shard` on gloo, the stages' FSDP code
path exactly as on GPUs) and DeepSpeed ZeRO-2/3 (its CPU backend, where deepspeed is installed).
Each stage trains, stops at a checkpoint, resumes, exports a plain `save_pretrained` directory
gathered on rank 0, and computes the same numbers as one process."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline import launch, runs

WORLD = ["world.num_people=20", "world.corpus_docs=600", "world.sft_examples=300", "world.eval_examples=8",
         "wandb.mode=disabled"]
PRETRAIN = [*WORLD, "model.seq_len=64", "steps=4", "save_every=2", "eval.every=0"]
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _launch(stage: str, accel: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("NPROC", None)
    env.pop("ACCEL", None)
    cmd = launch.launch_command(stage, list(args), nproc=nproc, accel=accel)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _manifest(root, run: str, stage: str) -> runs.Manifest:
    return runs.Manifest.load(root / run / stage / "manifest.json")


def _loads_plain(model_dir, classifier: bool = False) -> dict:
    """The exported directory loads with plain transformers; returns its state dict."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir))
    assert json.loads((model_dir / "config.json").read_text())["use_cache"] is True
    return model.state_dict()


def _stop_then_resume(stage: str, accel: str, root, run: str, *args: str, stop: int = 2) -> runs.Manifest:
    """Run `stage` stopping after step `stop` (as a kill would leave it), then run it again."""
    _launch(stage, accel, 2, f"runs_dir={root}", f"run_name={run}", *args, f"stop_after={stop}")
    assert _manifest(root, run, stage).status == "running"
    out = _launch(stage, accel, 2, f"runs_dir={root}", f"run_name={run}", *args)
    assert "resum" in out.stderr, out.stderr[-2000:]
    m = _manifest(root, run, stage)
    assert m.status == "complete"
    return m


def test_pretrain_under_fsdp2_on_two_processes_resumes_and_equals_one_process(tmp_path):
    """Sharded parameters, gradients and optimizer state; a checkpoint taken and restored under
    FSDP2; the export gathered from the shards: the same numbers as one unsharded process. In fp32:
    bf16 matmuls round differently for each process's share of the batch."""
    from pipeline.config import load_config
    from stages import pretrain

    args = [*PRETRAIN, "precision=no"]
    one = pretrain.run(load_config(pretrain.PretrainConfig, [f"runs_dir={tmp_path}", "run_name=one", *args]))
    two = _stop_then_resume("pretrain", "fsdp", tmp_path, "fsdp", *args)
    checkpoint = tmp_path / "fsdp" / "pretrain" / "checkpoints" / "step-0000002"
    # sharded: each rank wrote its own shards of the model and of the optimizer state, no whole file
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    assert not list(checkpoint.glob("*.bin")), sorted(p.name for p in checkpoint.iterdir())
    for key in ("train/loss", "eval/loss", "eval/fact_cloze_accuracy"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-4, abs=1e-5), key
    sharded = _loads_plain(tmp_path / "fsdp" / "pretrain" / "model")
    plain = _loads_plain(tmp_path / "one" / "pretrain" / "model")
    assert sharded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp2_accumulation_keeps_a_gradient_shard_between_micro_batches(tmp_path):
    """Between two micro-batches of one optimizer step each process holds its shard of the
    gradients (each micro-batch reduce-scatters), not every layer's unsharded gradients, which
    accelerate's `no_sync` would keep under FSDP2 (measured the same way, as the contrast)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "accumulation.json"
    cmd = [sys.executable, "-m", "pipeline.launch", "--accelerate", "--config_file",
           str(root / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port", "0",
           str(root / "tests" / "accumulation_check.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    full = got["ours"]["full_gradient_bytes"]
    assert got["world"] == 2
    assert got["ours"]["held_after_first_micro_batch"] <= 0.6 * full, got
    assert got["accelerate_no_sync"]["held_after_first_micro_batch"] >= 0.95 * full, got


@pytest.mark.slow
@pytest.mark.parametrize("accel", [pytest.param("fsdp", id="fsdp2"),
                                   pytest.param("zero3", marks=pytest.mark.skipif(not DEEPSPEED,
                                                                                  reason="deepspeed not installed"))])
def test_reward_model_trained_sharded_equals_one_process(tmp_path, accel):
    """The reward model's work after training under fsdp and zero3 runs on a copy filled one
    gathered parameter at a time, and its export is the gathered weights with the normalized head:
    the same metrics and the same exported weights as one process (fp32)."""
    from pipeline.config import load_config
    from stages import pretrain, rm, sft

    common = [f"runs_dir={tmp_path}", "precision=no", *WORLD]
    pretrain.run(load_config(pretrain.PretrainConfig, [*common, "run_name=one", *PRETRAIN[len(WORLD):]]))
    sft.run(load_config(sft.SFTConfig, [*common, "run_name=one", "steps=4", "eval.max_new_tokens=8"]))
    args = ["data.num_prompts=16", "data.max_new_tokens=8", "epochs=1", "normalize.reference_size=16",
            "batch.size=8", "batch.micro=2", "likelihood_term=false"]
    one = rm.run(load_config(rm.RMConfig, [*common, "run_name=one", *args]))
    _launch("rm", accel, 2, *common, "run_name=two", f"parent={tmp_path / 'one' / 'sft'}", *args)
    two = _manifest(tmp_path, "two", "rm")
    for key in ("eval/pairwise_accuracy", "eval/reward_chosen_mean", "norm/ref_mean", "norm/raw_std"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-3, abs=1e-4), key
    exported, plain = (_loads_plain(tmp_path / run / "rm" / "model", classifier=True) for run in ("two", "one"))
    assert exported.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(exported[name], plain[name], rtol=1e-3, atol=1e-4, msg=name)


LAUNCHERS = [pytest.param("cpu", id="ddp"), pytest.param("fsdp", id="fsdp2"),
             pytest.param("zero2", marks=pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed")),
             pytest.param("zero3", marks=pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("accel", LAUNCHERS)
def test_every_stage_with_default_batch_sizes_on_two_processes(tmp_path, accel):
    """All four stages on 2 processes with each stage's default batch keys (the micro batch adapts
    to the process count), sft and ppo (with ptx) stopped and resumed under the launcher, exports
    gathered into plain directories."""
    root, run = tmp_path, "two"
    common = [f"runs_dir={root}", f"run_name={run}"]
    _launch("pretrain", accel, 2, *common, *PRETRAIN)
    _stop_then_resume("sft", accel, root, run, *WORLD, "steps=4", "save_every=2", "eval.max_new_tokens=8")
    _launch("rm", accel, 2, *common, *WORLD, "data.num_prompts=32", "data.max_new_tokens=8", "epochs=2",
            "normalize.reference_size=32")
    ppo = _stop_then_resume("ppo", accel, root, run, *WORLD, "steps=3", "rollout.max_new_tokens=8",
                            "eval.num_prompts=8", "eval.every=0", "save_every=1", "ptx.coef=0.1", "ptx.batch_size=4")
    for stage in ("pretrain", "sft", "rm", "ppo"):
        m = _manifest(root, run, stage)
        assert m.status == "complete", stage
        _loads_plain(root / run / stage / "model", classifier=stage == "rm")
    assert ppo.metrics["ppo/ptx_loss"] > 0 and ppo.metrics["eval/kl"] >= 0
    rm = _manifest(root, run, "rm")
    assert abs(rm.metrics["norm/ref_mean"]) < 1e-4, "the folded normalization is lost in the export"



@pytest.mark.slow
@pytest.mark.parametrize("accel", [pytest.param("fsdp", id="fsdp2"),
                                   pytest.param("zero3", marks=pytest.mark.skipif(not DEEPSPEED,
                                                                                  reason="deepspeed not installed"))])
def test_ppo_when_ranks_stop_decoding_at_different_steps(tmp_path, accel):
    """A policy that often ends its turn: each rank's samples stop after their own number of
    decoding steps, and every rank decodes on its own (no collective per step). Random models that
    never stop early cannot show a per-step collective; this one does (a mismatch crashes, or hangs
    until the launch times out). The frozen reference and reward model are sharded too: the SFT
    side of the evaluation decodes in lockstep, on 5 prompts that 2 processes share unevenly."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import WorldConfig
    from pipeline.world import World
    from stages.ppo import bench as ppo_bench

    # embeddings above ZeRO-3's persistence threshold (1e5 elements): gathered around each forward.
    # Seed 3's policy also hung in the first rollout when only the module hooks were removed (the
    # root pre-hook's step check is a collective too); other draws passed.
    torch.manual_seed(3)
    shape = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    policy, reward = ppo_bench.random_models(tmp_path, World(WorldConfig()), "tiny", shape, vocab_size=1000)
    model = AutoModelForCausalLM.from_pretrained(policy)
    with torch.no_grad():  # the end-of-turn logit swings with the hidden state: stops at varied steps
        model.get_output_embeddings().weight[model.config.eos_token_id] *= 40
    model.save_pretrained(policy)
    args = [f"runs_dir={tmp_path}", f"policy.name_or_path={policy}", f"reward.name_or_path={reward}", "wandb.mode=disabled",
            "steps=2", "batch.rollout=8", "batch.size=8", "batch.micro=4", "rollout.max_new_tokens=24",
            "eval.every=1", "eval.num_prompts=5", "eval.best_of=[2]", "save_every=0"]
    out = _launch("ppo", accel, 2, *args, "run_name=stops")
    m = _manifest(tmp_path, "stops", "ppo")
    assert m.status == "complete", out.stderr[-2000:]
    rows = [r for r in runs.read_metrics(tmp_path / "stops" / "ppo" / "metrics.jsonl") if "rollout/eos_rate" in r]
    assert rows and all(0 < r["rollout/eos_rate"] and r["rollout/length"] < 24 for r in rows)  # samples stopped early
    # The policy gathered one layer at a time (a policy too large to gather whole): every process
    # decodes in lockstep, and the run is the same, sample for sample.
    out = _launch("ppo", accel, 2, *args, "run_name=layers", "rollout.gather=layer")
    assert "one layer at a time" in out.stderr
    layers = _manifest(tmp_path, "layers", "ppo")
    keys = [k for k, v in m.metrics.items() if k.split("/")[0] in ("rollout", "ppo", "eval", "test")
            and isinstance(v, float) and v == v]
    assert {"rollout/score", "ppo/kl", "eval/gold_score", "test/greedy/win_rate"} <= set(keys)
    for key in keys:
        assert layers.metrics[key] == pytest.approx(m.metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("accel", ["cpu", "fsdp",
                                   pytest.param("zero2", marks=pytest.mark.skipif(not DEEPSPEED, reason="no deepspeed")),
                                   pytest.param("zero3", marks=pytest.mark.skipif(not DEEPSPEED, reason="no deepspeed"))])
def test_first_kl_is_zero_in_bf16_on_every_launcher(tmp_path, accel):
    """precision=bf16 on 2 processes: the frozen reference stores its weights as the policy
    computes from them (`pipeline.models.frozen_numerics`: bf16 linear layers under autocast for
    DDP, all bf16 under FSDP2's and DeepSpeed's mixed precision), so the first iteration's
    sampled responses have the same log-probabilities under both: KL 0."""
    from pipeline.config import WorldConfig
    from pipeline.world import World
    from stages.ppo import bench as ppo_bench

    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)
    policy, reward = ppo_bench.random_models(tmp_path, World(WorldConfig()), "tiny", shape, vocab_size=500)
    _launch("ppo", accel, 2, f"runs_dir={tmp_path}", "run_name=kl", f"policy.name_or_path={policy}",
            f"reward.name_or_path={reward}", "wandb.mode=disabled", "precision=bf16", "steps=1",
            "batch.rollout=8", "batch.size=8", "batch.micro=4", "rollout.max_new_tokens=8",
            "eval.every=0", "eval.num_prompts=4", "eval.best_of=[]", "save_every=0")
    rows = [r for r in runs.read_metrics(tmp_path / "kl" / "ppo" / "metrics.jsonl") if "ppo/kl" in r]
    assert abs(rows[0]["ppo/kl"]) < 1e-6, rows[0]["ppo/kl"]


@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed")
@pytest.mark.parametrize("accel", ["zero2", "zero3"])
def test_hf_trainer_stages_under_zero_with_gradient_accumulation_run_and_resume(tmp_path, accel):
    """SFT and the rm stage's TRL path through the HF Trainer, 2 micro-batches per process per
    step: the launcher files leave accumulation and clipping to the stage ('auto'), so DeepSpeed's
    config check agrees with the Trainer's arguments; each stops at a checkpoint and resumes."""
    import json

    root, run = tmp_path, "acc"
    _launch("pretrain", accel, 2, f"runs_dir={root}", f"run_name={run}", *PRETRAIN)
    sft = _stop_then_resume("sft", accel, root, run, *WORLD, "steps=4", "save_every=2", "eval.max_new_tokens=8",
                            "batch.size=8", "batch.micro=2")
    assert sft.status == "complete"
    out = _launch("sft", accel, 2, f"runs_dir={root}", "run_name=acc-log", f"parent={root / run / 'pretrain'}", *WORLD,
                  "steps=1", "save_every=0", "eval.max_new_tokens=4", "batch.size=8",
                  "batch.micro=2")
    assert "x 2 accum" in out.stderr, out.stderr[-1500:]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"Answer: {i + 1}.",
                                         "rejected": f"Answer: {i}. Hope this helps!"}) + "\n" for i in range(24)))
    rm = _stop_then_resume("rm", accel, root, run, *WORLD, "data.source=files", f"data.files=[{pairs}]",
                           "trainer=trl", "likelihood_residual=0", "steps=4", "save_every=2", "batch.size=8",
                           "batch.micro=2", "normalize.reference_size=8", "data.max_new_tokens=8")
    assert rm.status == "complete"


@pytest.mark.parametrize("fp32", [True, False])
def test_16_bit_runs_reduce_gradients_in_fp32_unless_told_otherwise(fp32):
    """`reduce_fp32` (default true) sets FSDP2's `reduce_dtype` and DeepSpeed's
    `communication_data_type`, which both default to the 16-bit compute dtype; fp32 runs keep theirs."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from pipeline.distributed import configure_reduction

    plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                         reduce_dtype=torch.bfloat16))
    fsdp = SimpleNamespace(is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin))
    configure_reduction(fsdp, fp32)
    assert plugin.mixed_precision_policy.reduce_dtype == (torch.float32 if fp32 else torch.bfloat16)
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    for precision, expected in (("bf16", "fp32" if fp32 else None), (None, None)):
        ds = {"zero_optimization": {"stage": 2}, **({"bf16": {"enabled": True}} if precision else {})}
        zero = SimpleNamespace(is_fsdp2=False, distributed_type=DistributedType.DEEPSPEED,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
        configure_reduction(zero, fp32)
        assert ds.get("communication_data_type") == expected, precision


@pytest.mark.slow
@pytest.mark.parametrize("accel", [pytest.param("cpu", id="ddp"), pytest.param("fsdp", id="fsdp2")])
def test_rsft_on_two_processes_equals_one_and_resumes(tmp_path, accel):
    """Rejection-sampling fine-tuning on 2 processes: the same best-of-n samples (keyed random
    streams, gathered scores) and the same training and test figures as one process; stopped at a
    checkpoint and resumed on the same samples."""
    from pipeline.config import load_config
    from stages import pretrain, rm, rsft, sft

    common = [f"runs_dir={tmp_path}", "precision=no", *WORLD]
    pretrain.run(load_config(pretrain.PretrainConfig, [*common, "run_name=one", *PRETRAIN[len(WORLD):]]))
    sft.run(load_config(sft.SFTConfig, [*common, "run_name=one", "steps=4", "eval.max_new_tokens=8"]))
    rm.run(load_config(rm.RMConfig, [*common, "run_name=one", "data.num_prompts=16", "data.max_new_tokens=8",
                                     "epochs=1", "normalize.reference_size=16", "batch.size=8", "batch.micro=2"]))
    args = ["data.num_prompts=16", "n=4", "max_new_tokens=24", "steps=4", "batch.size=4", "save_every=2", "log_every=1", "batch.forward=8",
            "eval.num_prompts=8", "eval.max_new_tokens=8", f"parent={tmp_path / 'one' / 'rm'}"]
    one = rsft.run(load_config(rsft.RSFTConfig, [*common, "run_name=one", *args]))
    two = _stop_then_resume("rsft", accel, tmp_path, "two", *common[1:], "precision=no", *args)
    assert (tmp_path / "two" / "rsft" / rsft.DATA).read_text() == (tmp_path / "one" / "rsft" / rsft.DATA).read_text()
    for key in ("train/loss", "test/greedy/gold_score", "test/sampled/gold_score", "data/selected_rm_score"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-3, abs=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("accel", [pytest.param("cpu", id="ddp"), pytest.param("fsdp", id="fsdp2")])
def test_dpo_on_two_processes_equals_one_and_resumes(tmp_path, accel):
    """DPO on 2 processes: the same comparisons (keyed random streams) and the same training and
    test figures as one process; stopped at a checkpoint and resumed."""
    from pipeline.config import load_config
    from stages import dpo, pretrain, sft

    common = [f"runs_dir={tmp_path}", "precision=no", *WORLD]
    pretrain.run(load_config(pretrain.PretrainConfig, [*common, "run_name=one", *PRETRAIN[len(WORLD):]]))
    sft.run(load_config(sft.SFTConfig, [*common, "run_name=one", "steps=4", "eval.max_new_tokens=8"]))
    args = ["data.num_prompts=16", "data.max_new_tokens=8", "data.k=3", "steps=4", "batch.size=4", "save_every=2",
            "log_every=1", "batch.forward=8", "eval.every=0", "eval.num_prompts=8", "eval.max_new_tokens=8",
            f"parent={tmp_path / 'one' / 'sft'}"]
    one = dpo.run(load_config(dpo.DPOConfig, [*common, "run_name=one", *args]))
    two = _stop_then_resume("dpo", accel, tmp_path, "two", *common[1:], *args)
    assert (tmp_path / "two" / "dpo" / "comparisons.jsonl").read_text() == \
        (tmp_path / "one" / "dpo" / "comparisons.jsonl").read_text()
    for key in ("train/loss", "test/greedy/gold_score", "test/sampled/gold_score"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-3, abs=1e-4), key
