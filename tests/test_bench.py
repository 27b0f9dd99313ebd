"""The benchmark code cannot rot: the PPO per-phase bench (ours vs the bare-torch floor) runs on a
tiny shape and returns finite figures. Timings themselves are never asserted."""
import math

from pipeline.config import load_config
from pipeline.world import World
from stages.ppo import bench as ppo_bench
from stages.ppo.config import PPOConfig


def test_ppo_phase_bench_runs_and_returns_finite_ratios(tmp_path):
    cfg = load_config(PPOConfig, ["wandb.mode=disabled", "threads=1", "batch.rollout=8", "batch.size=4",
                                  "batch.micro=2", "epochs=1", "rollout.max_new_tokens=4",
                                  "batch.forward=4", "data.num_prompts=16"])
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64)
    cfg.policy.name_or_path, cfg.reward.name_or_path = ppo_bench.random_models(tmp_path, World(cfg.world), "tiny",
                                                                               shape, vocab_size=300)
    out = ppo_bench.bench(cfg, iterations=1, warmup=0, prompt_len=12, verbose=False)
    ratios = {k: v for k, v in out.items() if k.startswith("ratio_")}
    assert set(ratios) == {"ratio_generate", "ratio_score", "ratio_update", "ratio_total"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    assert math.isfinite(out["episodes_per_s"]) and math.isfinite(out["floor_episodes_per_s"])
    assert abs(out["query_tokens"] - 12) <= 2


def test_score_floor_forwards_the_reward_model_on_what_scoring_reads(tmp_path):
    """The floor's reward forward runs on the RM's own rendering of each response, the very input
    of `score_responses`: the rewards it computes equal the rollout's scores."""
    import torch

    from reward_model.scoring import forward_rewards
    from stages.ppo.loop import iteration_step, make_trainer
    from tests.test_ppo_sampler import random_ppo

    cfg, accelerator, models, prompts = random_ppo(tmp_path)
    _, rollout = iteration_step(make_trainer(cfg, models, accelerator), 0, prompts)
    seqs = ppo_bench.reward_inputs(models, rollout)
    with torch.no_grad():
        rewards = forward_rewards(models.reward, seqs, models.reward_tokenizer.pad_token_id)
    torch.testing.assert_close(rewards, rollout.scores, atol=1e-5, rtol=1e-5)
    ppo_bench.floor_score(models, rollout, 3, seqs)  # runs on those inputs, in chunks


def test_update_flops_against_a_hand_count():
    """6 FLOPs per parameter and token, 12·L·d·S per token for attention (PaLM app. B), the policy's
    LM head on the T + 1 response positions only, input embeddings not counted."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False, num_labels=1)
    policy, critic = LlamaForCausalLM(cfg), LlamaForSequenceClassification(cfg)
    # one layer: q, k, v, o 4x4 each (64) + gate, up, down 4x8 each (96) + two norms (8); final norm 4
    body = 64 + 96 + 8 + 4
    B, P, T, S, epochs = 2, 3, 2, 5, 3
    attention = 12 * 1 * 4 * S * S * B
    expected = epochs * ((6 * B * (S * body + (T + 1) * 40) + attention)     # policy, LM head 10x4
                         + (6 * B * S * (body + 4) + attention))             # critic, score head 4x1
    assert expected == 81360
    assert ppo_bench.update_flops(policy, critic, B, P, T, epochs) == expected
    tied = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": True}))
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert ppo_bench.update_flops(tied, critic, B, P, T, epochs) == expected


def test_stage_overrides_reach_pretrain_and_sft_only_when_every_stage_has_the_key():
    from pipeline.bench import stage_overrides

    args = ["--batch-size", "64", "precision=bf16", "rollout.temperature=1.0", "world.num_people=20", "kl.coef=0.1"]
    assert stage_overrides(args) == ["precision=bf16", "world.num_people=20"]


def test_abba_orders_the_runs_and_averages_each_side():
    """stage, bare, bare, stage: a steady drift of the machine's speed moves both means alike."""
    from pipeline.bench import _abba

    calls = []

    def stage(n):
        calls.append(f"stage{n}")
        return {1: 100.0, 2: 80.0}[n]

    def bare():
        calls.append("bare")
        return 95.0 if calls.count("bare") == 1 else 85.0

    assert _abba(stage, bare) == (90.0, 90.0)
    assert calls == ["stage1", "bare", "bare", "stage2"]
