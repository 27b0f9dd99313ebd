"""PPO optimisation on a fixed global rollout, split over however many processes run this script.

`compute(...)` builds the same global batch everywhere (prompts and "sampled" tokens from a
seeded generator) and gives each process exactly the shard the runner would give it
(`pipeline.evaluation.shard`); each process then builds its own rollout (its own prompt width P
and response width T, as after real generation), whitens advantages with global statistics and
runs the optimiser: 2 epochs x 2 minibatches x 2 micro-batches, with PPO-ptx. It returns the
globally reduced numbers and a parameter fingerprint. tests/test_ppo.py compares one process with two:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        tests/ppo_ddp_check.py POLICY_DIR REWARD_DIR OUT.json [key=value ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GLOBAL_BATCH = 8
RESPONSE_LEN = 6
# The small world of tests/test_ppo.py (the ptx demonstrations come from it).
WORLD = ["world.num_people=20", "world.corpus_docs=600", "world.sft_examples=300", "world.eval_examples=8"]


def fixed_batch(tokenizer) -> tuple[list[str], torch.Tensor]:
    """8 prompts and [8, 6] response tokens with stop tokens at varied places (one never stops).
    Dealt out over 2 processes (rows r::2), the even rows have shorter prompts and responses
    (all stop by index 3) than the odd rows, so the two shards differ in P and in T."""
    prompts = ["Say red", "What is the last word? sun cat moon star", "Say dog",
               "What is the first word? fish bird rock", "Say moon", "Write in capitals: rock rain snow wind",
               "Say fish", "What is the last word? leaf milk tree"]
    g = torch.Generator().manual_seed(123)
    sampled = torch.randint(10, len(tokenizer), (GLOBAL_BATCH, RESPONSE_LEN), generator=g)
    for row, stop_at in enumerate([1, 3, 2, None, 0, 5, 3, 4]):
        if stop_at is not None:
            sampled[row, stop_at] = tokenizer.eos_token_id
    return prompts, sampled


def compute(policy_dir: str, reward_dir: str, accelerator, overrides: tuple[str, ...] = ()) -> dict:
    from pipeline.config import load_config
    from pipeline.evaluation import shard
    from pipeline.world import World
    from stages.ppo.config import PPOConfig
    from stages.ppo.data import load_ptx
    from stages.ppo.loop import compute_advantages, make_trainer, optimise
    from pipeline.distributed import trained_numerics
    from stages.ppo.models import load_models, resolve_sources
    from stages.ppo.rollout import build_rollout, queries

    world = accelerator.num_processes
    cfg = load_config(PPOConfig, [f"policy.name_or_path={policy_dir}", f"reward.name_or_path={reward_dir}", *WORLD,
                                  f"batch.rollout={GLOBAL_BATCH}", "batch.size=4", "batch.micro=2",
                                  "epochs=2", "optim.policy_lr=1e-3", "optim.critic_lr=1e-3", "objective.kl_coef=0.1",
                                  "ptx.coef=0.5", "ptx.batch_size=4", *overrides])
    torch.manual_seed(0)
    models = load_models(cfg, resolve_sources(cfg), accelerator.device, trained_numerics(accelerator))
    ptx = load_ptx(cfg, World(cfg.world), models.tokenizer)
    trainer = make_trainer(cfg, models, accelerator, ptx)
    prompts, sampled = fixed_batch(models.tokenizer)
    rows = shard(list(range(GLOBAL_BATCH)), accelerator)    # what the runner deals this process
    mine = [prompts[i] for i in rows]
    query_ids, query_mask = queries(models.tokenizer, mine, accelerator.device)
    rollout = build_rollout(models, accelerator, mine, query_ids, query_mask, sampled[rows].to(accelerator.device),
                            cfg.rollout.temperature, 64)
    shapes = accelerator.gather(torch.tensor([[rollout.query_ids.shape[1], rollout.response_ids.shape[1]]],
                                             device=accelerator.device)).tolist()
    joined = rollout.gather(accelerator, models.tokenizer.pad_token_id)   # what `optimise` works on
    in_order = joined.prompts == prompts and len(joined.texts) == GLOBAL_BATCH
    rollout, stats = compute_advantages(rollout, trainer.kl_ctl.value, cfg.objective, trainer.all_reduce)
    minibatches = optimise(trainer, rollout, iteration=0)
    policy = trainer.policy
    fingerprint = [float(p.detach().double().sum()) for p in policy.parameters()]
    fingerprint += [float((p.detach().double() ** 2).sum()) for p in policy.parameters()]
    critic = accelerator.unwrap_model(models.value_model)
    fingerprint += [float(p.detach().double().sum()) for p in critic.parameters()]
    return {"stats": stats, "minibatches": minibatches, "fingerprint": fingerprint, "world": world, "shapes": shapes,
            "in_order": in_order}


if __name__ == "__main__":
    torch.set_num_threads(1)
    from pipeline.runtime import make_accelerator

    acc = make_accelerator()
    result = compute(sys.argv[1], sys.argv[2], acc, tuple(sys.argv[4:]))
    if acc.is_main_process:
        Path(sys.argv[3]).write_text(json.dumps(result))
    acc.wait_for_everyone()
