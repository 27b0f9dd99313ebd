"""The memory plan (`python -m pipeline plan`, pipeline/memory.py): an 8B PPO run fits on 8 x 80 GB
under fsdp and zero3 with the SFT weights held once and the frozen models sharded, and the plan's
figures are the bytes the stage really holds (tiny and small presets, one process and two under
fsdp on gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import plan as plan_cli
from pipeline.memory import GiB

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
            "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    """Config-only directories shaped like Llama-3-8B: the SFT policy, and a reward model from it
    whose likelihood term is that policy (as the rm stage records it)."""
    root = tmp_path_factory.mktemp("8b")
    (root / "sft").mkdir()
    (root / "sft" / "config.json").write_text(json.dumps(LLAMA_8B))
    (root / "rm").mkdir()
    (root / "rm" / "config.json").write_text(json.dumps({
        **LLAMA_8B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
        "reward_likelihood": {"coef": 1.0, "center": 0.0, "model": "../sft"}}))
    return root


def _ppo(root, *extra):
    return [f"policy.name_or_path={root / 'sft'}", f"reward.name_or_path={root / 'rm'}", "rollout.max_new_tokens=512",
            "gradient_checkpointing=true", *extra]


@pytest.mark.parametrize("launcher", ["fsdp", "zero3"])
def test_8b_ppo_fits_on_8_gpus_with_the_sft_weights_once_and_frozen_models_sharded(llama_8b, launcher):
    plan, _, _ = plan_cli.make_plan("ppo", _ppo(llama_8b), launcher, 8, "cuda", prompt_len=512, gpu_mem=80)
    rows = {r.role: r for r in plan.rows}
    print(plan.table())
    assert plan.peak <= 70 * GiB and plan.fits()
    assert rows["likelihood LM"].total == 0                 # the reference computes the term
    for role in ("reference", "reward model"):               # frozen, bf16, sharded over 8
        assert not rows[role].trained and rows[role].sharded
        assert rows[role].weights == pytest.approx(2 * rows[role].params / 8, rel=0.02)
    assert {p.name for p in plan.phases} == {"generate", "score", "update"}


@pytest.mark.parametrize("launcher", ["fsdp", "zero3"])
def test_a_policy_that_does_not_fit_whole_generates_a_layer_at_a_time(llama_8b, launcher):
    """rollout.gather=auto takes the whole gather where it fits, and a gather per layer on a GPU
    where the whole policy does not fit beside the rest; the generate phase then holds the
    parameters outside the decoder layers and two layers, not the whole policy."""
    h, layers, vocab = LLAMA_8B["hidden_size"], LLAMA_8B["num_hidden_layers"], LLAMA_8B["vocab_size"]
    kv = h // LLAMA_8B["num_attention_heads"] * LLAMA_8B["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * LLAMA_8B["intermediate_size"] + 2 * h  # attention, MLP, two norms
    outside = 2 * vocab * h + h                                                     # embeddings, LM head, final norm
    whole, _, _ = plan_cli.make_plan("ppo", _ppo(llama_8b), launcher, 8, "cuda", prompt_len=512, gpu_mem=80)
    generate = {p.name: p for p in whole.phases}["generate"]
    assert "gathered whole" in generate.note
    tight = whole.static + (whole.peak - whole.static) / 2  # room for everything but the whole gather
    layered, cfg, _ = plan_cli.make_plan("ppo", _ppo(llama_8b), launcher, 8, "cuda", prompt_len=512,
                                         gpu_mem=tight / GiB)
    assert cfg.rollout.gather == "layer" and layered.fits(), layered.table()
    phase = {p.name: p for p in layered.phases}["generate"]
    assert "a layer at a time" in phase.note
    assert generate.bytes - phase.bytes == 2 * (layers * layer + outside) - 2 * (outside + 2 * layer)
    assert plan_cli.make_plan("ppo", _ppo(llama_8b, "rollout.gather=whole"), launcher, 8, "cuda", prompt_len=512,
                              gpu_mem=tight / GiB)[1].rollout.gather == "whole"  # asked for: kept, and reported


def test_a_separate_likelihood_model_and_whole_frozen_models_cost_their_bytes(llama_8b, tmp_path):
    """The breaks the plan must show: a likelihood model that is not the reference (another
    directory) is counted, and ddp keeps the frozen models whole; 8B does not fit under ddp, and
    the plan names a change that does."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(LLAMA_8B))
    rm = tmp_path / "rm"
    rm.mkdir()
    config = json.loads((llama_8b / "rm" / "config.json").read_text())
    config["reward_likelihood"]["model"] = str(other)
    (rm / "config.json").write_text(json.dumps(config))
    plan, _, _ = plan_cli.make_plan("ppo", [f"policy.name_or_path={llama_8b / 'sft'}", f"reward.name_or_path={rm}",
                                            "gradient_checkpointing=true"], "fsdp", 8, "cuda", gpu_mem=80)
    assert {r.role: r for r in plan.rows}["likelihood LM"].weights == pytest.approx(2 * 8.03e9 / 8, rel=0.02)
    ddp, cfg, module = plan_cli.make_plan("ppo", _ppo(llama_8b), "ddp", 8, "cuda", prompt_len=512, gpu_mem=80)
    rows = {r.role: r for r in ddp.rows}
    embedding = LLAMA_8B["vocab_size"] * LLAMA_8B["hidden_size"]  # fp32 beside bf16 linear layers (autocast numerics)
    assert not rows["reference"].sharded and rows["reference"].weights == pytest.approx(2 * 8.03e9 + 2 * embedding,
                                                                                        rel=0.01)
    assert not ddp.fits()
    what, fixed = plan_cli.cheapest_fix("ppo", _ppo(llama_8b), cfg, module, "ddp", 8, "cuda", 512, 80)
    assert fixed.fits() and "fsdp" in what


def test_plan_command_exit_codes_and_sft(llama_8b, capsys):
    assert plan_cli.main(["sft", f"model.name_or_path={llama_8b / 'sft'}", "data.max_length=1024",
                          "--launcher", "fsdp", "--nproc", "8"]) in (0, 1)
    out = capsys.readouterr().out
    assert "memory plan: sft on 8 processes under fsdp" in out and "policy" in out
    assert plan_cli.main(["ppo", *_ppo(llama_8b), "--launcher", "ddp", "--nproc", "8", "--prompt-len", "512"]) == 1
    assert "cheapest change that fits" in capsys.readouterr().out
    assert plan_cli.main(["ppo", "policy.name_or_path=/nonexistent", "reward.name_or_path=/nonexistent"]) == 2


def _measured_vs_planned(measured: dict, plan) -> None:
    rows = {r.role: r for r in plan.rows}
    for role, held in measured.items():
        for kind, value in held.items():
            planned = getattr(rows[role], kind)
            assert value == pytest.approx(planned, rel=0.05, abs=1024), (role, kind, value, planned)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_plan_is_what_one_process_holds(preset, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from plan_check import SETTINGS, measure

    from pipeline.runtime import make_accelerator

    policy, reward = _models(tmp_path, preset)
    measured = measure(policy, reward, make_accelerator())
    plan, _, _ = plan_cli.make_plan("ppo", [f"policy.name_or_path={policy}", f"reward.name_or_path={reward}", *SETTINGS],
                                    "cpu", 1, "cpu")
    _measured_vs_planned(measured["held"], plan)


def test_the_plan_is_what_each_of_two_fsdp_processes_holds(tmp_path):
    policy, reward = _models(tmp_path, "tiny")
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "pipeline.launch", "--accelerate", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port", "0",
           str(ROOT / "tests" / "plan_check.py"), policy, reward, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "tests"))
    from plan_check import SETTINGS

    plan, _, _ = plan_cli.make_plan("ppo", [f"policy.name_or_path={policy}", f"reward.name_or_path={reward}", *SETTINGS],
                                    "fsdp", 2, "cpu")
    assert measured["world"] == 2
    assert {r.role: r.sharded for r in plan.rows}["reference"]
    _measured_vs_planned(measured["held"], plan)


def _models(tmp_path, preset):
    """Random models of `preset`; the reward model's likelihood term is the policy (fingerprinted)."""
    from pipeline.config import WorldConfig
    from pipeline.runs import weights_fingerprint
    from pipeline.world import World
    from stages.ppo import bench as ppo_bench

    policy, reward = ppo_bench.random_models(tmp_path, World(WorldConfig(num_people=20, corpus_docs=300)), preset,
                                             vocab_size=1000)
    config = json.loads(Path(reward, "config.json").read_text())
    config["reward_likelihood"] = {"coef": 0.5, "center": 0.0, "model": os.path.relpath(policy, reward),
                                   "fingerprint": weights_fingerprint(policy)}
    Path(reward, "config.json").write_text(json.dumps(config))
    return policy, reward


def test_a_stage_on_a_gpu_stops_at_start_when_its_plan_does_not_fit(llama_8b, monkeypatch):
    """Before loading anything: one GPU of 24 GiB cannot train 8B with AdamW (the check's own
    plan, the same as the command's); memory_check=false goes ahead."""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import DistributedType

    from pipeline.config import InputError, load_config
    from pipeline.memory import check_fits
    from stages.sft import SFTConfig, memory_plan

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24 * GiB))
    gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=1, is_fsdp2=False,
                          distributed_type=DistributedType.NO)
    cfg = load_config(SFTConfig, [f"model.name_or_path={llama_8b / 'sft'}"])
    with pytest.raises(InputError, match=r"does not fit in GPU memory(.|\n)*does NOT fit in 24 GiB"):
        check_fits(cfg, gpu, memory_plan)
    check_fits(load_config(SFTConfig, [f"model.name_or_path={llama_8b / 'sft'}", "memory_check=false"]), gpu, memory_plan)
    check_fits(cfg, SimpleNamespace(**{**vars(gpu), "device": torch.device("cpu")}), memory_plan)  # CPUs: no check
