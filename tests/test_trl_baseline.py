"""The TRL 1.12 comparison from the same start: what `export` writes is what our rollouts would
feed the policy, the baseline's flags carry our knobs, what TRL cannot match is refused, and
`judge` measures the policy it is given against the SFT policy."""
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.models import load_tokenizer
from pipeline.world import World
from stages.ppo import bench as ppo_bench
from stages.ppo import trl_baseline
from stages.ppo.config import PPOConfig
from stages.ppo.data import load_prompts
from stages.ppo.rollout import encode_prompts

SHAPE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)


def config(tmp_path, *overrides):
    cfg = load_config(PPOConfig, ["wandb.mode=disabled", "threads=1", "batch.rollout=8", "batch.size=4",
                                  "batch.micro=4", "epochs=3", "steps=5", "data.num_prompts=16",
                                  "optim.policy_lr=2e-5", "optim.critic_lr=2e-5", "objective.kl_coef=0.07",
                                  "rollout.max_new_tokens=6", "eval.num_prompts=5", "eval.max_new_tokens=6",
                                  "eval.best_of=[]", *overrides])
    cfg.policy.name_or_path, cfg.reward.name_or_path = ppo_bench.random_models(tmp_path / "models", World(cfg.world),
                                                                               "tiny", SHAPE, vocab_size=300)
    return cfg


def test_export_writes_our_start_and_the_flags_for_the_same_run(tmp_path):
    cfg = config(tmp_path)
    out = tmp_path / "init"
    flags = trl_baseline.export(cfg, out)
    for name, src in (("policy", cfg.policy.name_or_path), ("reward", cfg.reward.name_or_path),
                      ("value", cfg.reward.name_or_path)):
        assert (out / name / "model.safetensors").read_bytes() == (Path(src) / "model.safetensors").read_bytes()
    tokenizer = load_tokenizer(cfg.policy.name_or_path)
    written = [json.loads(line)["input_ids"] for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert written == encode_prompts(tokenizer, load_prompts(cfg, World(cfg.world)))
    assert len(written) == 16 and all(ids[-1] != tokenizer.eos_token_id for ids in written)
    args = dict(zip(flags[::2], flags[1::2]))
    assert args["--batch-size"] == "8" and args["--mini-batches"] == "2" and args["--ppo-epochs"] == "3"
    assert args["--total-episodes"] == "40" and args["--response-length"] == "6"
    assert args["--lr"] == "2e-05" and args["--kl-coef"] == "0.07" and args["--lr-scheduler"] == "constant"
    assert args["--stop-token"] == "eos" and args["--missing-eos-penalty"] == "1"
    assert args["--value-path"] == str(out / "value") and args["--prompts-path"] == str(out / "prompts.jsonl")


@pytest.mark.parametrize("override, message", [
    ("optim.critic_lr=1e-4", "one learning rate"),
    ("objective.adaptive_kl=true", "β is fixed"),
    ("objective.kl_estimator=k2", "k1 and k3"),
    ("ptx.coef=0.5", "neither"),
])
def test_export_refuses_knobs_trl_cannot_match(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        trl_baseline.export(config(tmp_path, override), tmp_path / "init")
    assert not (tmp_path / "init").exists()


def test_export_refuses_a_reward_model_with_a_likelihood_term(tmp_path):
    cfg = config(tmp_path)
    path = tmp_path / "models" / "reward" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "reward_likelihood": {"coef": 0.5, "model": "likelihood"}}))
    with pytest.raises(ConfigError, match="likelihood term"):
        trl_baseline.export(cfg, tmp_path / "init")


def test_judge_measures_the_given_policy_against_the_sft(tmp_path):
    cfg = config(tmp_path)
    same = trl_baseline.judge(cfg, cfg.policy.name_or_path)["comparisons"]["greedy"]
    assert same["prompts"] == 5 and same["win_rate"]["value"] == 0.5  # itself, greedy: every prompt a tie
    assert same["policy"]["gold_score"] == same["sft"]["gold_score"]
    judged = trl_baseline.judge(cfg, writer(cfg.policy.name_or_path, tmp_path / "writer"))["comparisons"]["greedy"]
    assert judged["sft"]["gold_score"] == same["sft"]["gold_score"]
    assert judged["policy"]["rm_score"] != pytest.approx(same["policy"]["rm_score"])  # its responses, not the SFT's


def writer(policy_dir, out):
    """A copy of the random policy that writes words (a random one emits special tokens, empty
    text): the final norm keeps one hidden dimension, and the LM head turns its sign into one of
    two word tokens."""
    import torch

    from pipeline.models import load_causal_lm

    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, tokenizer)
    plus, minus = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("the", "of"))
    with torch.no_grad():
        model.model.norm.weight.zero_()[0] = 1.0
        head = model.get_output_embeddings().weight
        head.zero_()
        head[plus, 0], head[minus, 0] = 1.0, -1.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
