"""One PPO update on a fixed global rollout, split over however many processes run this script.

`compute(...)` builds the same global batch everywhere (prompts and "sampled" tokens from a
seeded generator), keeps this process's share (rows rank::world), whitens advantages with global
statistics and runs the optimiser; it returns the globally reduced numbers and a parameter
fingerprint. tests/test_ppo.py compares one process with two:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        tests/ppo_ddp_check.py POLICY_DIR REWARD_DIR OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GLOBAL_BATCH = 8
RESPONSE_LEN = 6


def fixed_batch(tokenizer) -> tuple[list[str], torch.Tensor]:
    """8 prompts and [8, 6] response tokens with stop tokens at varied places (one never stops)."""
    prompts = [f"What is the last word? {a} {b}" for a, b in
               [("red", "fox"), ("sun", "cat"), ("dog", "tree"), ("moon", "star"),
                ("fish", "bird"), ("rock", "rain"), ("snow", "wind"), ("leaf", "milk")]]
    g = torch.Generator().manual_seed(123)
    sampled = torch.randint(10, len(tokenizer), (GLOBAL_BATCH, RESPONSE_LEN), generator=g)
    for row, stop_at in enumerate([1, 3, 5, None, 0, 2, 4, 3]):
        if stop_at is not None:
            sampled[row, stop_at] = tokenizer.eos_token_id
    return prompts, sampled


def compute(policy_dir: str, reward_dir: str, accelerator) -> dict:
    from pipeline.config import load_config
    from stages.ppo.config import PPOConfig
    from stages.ppo.loop import compute_advantages, make_trainer, optimise
    from stages.ppo.models import load_models, resolve_sources
    from stages.ppo.rollout import build_rollout, queries

    world = accelerator.num_processes
    cfg = load_config(PPOConfig, [f"policy.name_or_path={policy_dir}", f"reward.name_or_path={reward_dir}",
                                  f"rollout_batch_size={GLOBAL_BATCH}", f"minibatch_size={GLOBAL_BATCH}",
                                  "micro_batch_size=2", "epochs=2", "optim.policy_lr=1e-3", "optim.critic_lr=1e-3",
                                  "objective.kl_coef=0.1"])
    torch.manual_seed(0)
    models = load_models(cfg, resolve_sources(cfg), accelerator.device)
    trainer = make_trainer(cfg, models, accelerator)
    prompts, sampled = fixed_batch(models.tokenizer)
    rows = list(range(accelerator.process_index, GLOBAL_BATCH, world))
    mine = [prompts[i] for i in rows]
    query_ids, query_mask = queries(models.tokenizer, mine, accelerator.device)
    rollout = build_rollout(models, accelerator, mine, query_ids, query_mask, sampled[rows].to(accelerator.device),
                            cfg.rollout.temperature, 64)
    rollout, stats = compute_advantages(rollout, trainer.kl_ctl.value, cfg.objective, trainer.all_reduce)
    minibatches = optimise(trainer, rollout, iteration=0)
    policy = trainer.policy
    fingerprint = [float(p.detach().double().sum()) for p in policy.parameters()]
    fingerprint += [float((p.detach().double() ** 2).sum()) for p in policy.parameters()]
    critic = accelerator.unwrap_model(models.value_model)
    fingerprint += [float(p.detach().double().sum()) for p in critic.parameters()]
    return {"stats": stats, "minibatches": minibatches, "fingerprint": fingerprint, "world": world}


if __name__ == "__main__":
    torch.set_num_threads(1)
    from pipeline.runtime import make_accelerator

    acc = make_accelerator()
    result = compute(sys.argv[1], sys.argv[2], acc)
    if acc.is_main_process:
        Path(sys.argv[3]).write_text(json.dumps(result))
    acc.wait_for_everyone()
