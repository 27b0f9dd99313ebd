"""Throughput of PPO iterations: `python -m stages.ppo.bench [--iterations N] [--preset P] [key=value ...]`.

Runs N iterations of a fixed configuration (configs/ppo.yaml + overrides) after one warm-up
iteration and prints episodes/s, generated tokens/s, the time split (generate / score / update)
and peak memory. Without `policy.name_or_path` / `reward.name_or_path` it builds random models
of size preset P on the fly, so it needs no earlier stage. Writes nothing under runs/.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.runtime import configure_threads, make_accelerator, quiet_libraries, resolve_precision, seed_everything
from pipeline.world import World
from stages.ppo.config import PPOConfig
from stages.ppo.data import batch_indices, load_prompts
from stages.ppo.loop import iteration_step, make_trainer
from stages.ppo.models import load_models, resolve_sources


def random_models(root: Path, world: World, preset: str) -> tuple[str, str]:
    """A tokenizer trained on part of the world corpus, a random Llama of `preset`, and a
    random-head reward model from it: (policy dir, reward dir)."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import llama_from_preset
    from pipeline.tokenizer import train_tokenizer

    tok = train_tokenizer(world.corpus()[:2000], vocab_size=2048)
    policy, reward = root / "policy", root / "reward"
    llama_from_preset(preset, tok, max_position_embeddings=256).save_pretrained(policy)
    tok.save_pretrained(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(reward)
    tok.save_pretrained(reward)
    return str(policy), str(reward)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(cfg: PPOConfig, iterations: int = 5, warmup: int = 1) -> dict:
    """Time `iterations` PPO iterations (after `warmup`); returns the figures it prints."""
    threads = configure_threads(cfg.threads)
    accelerator = make_accelerator(mixed_precision=resolve_precision(cfg.precision))
    seed_everything(cfg.seed)
    world = World(cfg.world)
    models = load_models(cfg, resolve_sources(cfg), accelerator.device)
    trainer = make_trainer(cfg, models, accelerator)
    prompts = load_prompts(cfg, world)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    totals: dict[str, float] = {}
    t_start = 0.0
    for it in range(warmup + iterations):
        if it == warmup:
            t_start = time.perf_counter()
            totals = {}
        idx = batch_indices(it, len(prompts), cfg.rollout_batch_size, cfg.seed)
        mine = [prompts[i] for i in idx][accelerator.process_index:: accelerator.num_processes]
        metrics, _ = iteration_step(trainer, it, mine)
        for k in ("perf/time_generate", "perf/time_score", "perf/time_update", "rollout/generated_tokens"):
            totals[k] = totals.get(k, 0.0) + metrics[k]
    wall = time.perf_counter() - t_start
    out = {"iterations": iterations, "episodes_per_s": iterations * cfg.rollout_batch_size / wall,
           "generated_tokens_per_s": totals["rollout/generated_tokens"] / max(totals["perf/time_generate"], 1e-9),
           "s_per_iteration": wall / iterations,
           **{f"time_{phase}_s": totals[f"perf/time_{phase}"] / iterations for phase in ("generate", "score", "update")},
           "peak_memory_mb": peak_memory_mb(accelerator.device), "device": str(accelerator.device),
           "processes": accelerator.num_processes, "threads": threads}
    if accelerator.is_main_process:
        print(f"ppo bench: {iterations} iterations x {cfg.rollout_batch_size} episodes, {cfg.epochs} epochs x "
              f"{cfg.rollout_batch_size // cfg.minibatch_size} minibatches, max_new_tokens {cfg.rollout.max_new_tokens} | "
              f"{out['device']} x {out['processes']} proc, {threads} threads")
        print(f"  episodes/s          {out['episodes_per_s']:.1f}   ({out['s_per_iteration']:.2f} s/iteration)")
        print(f"  generated tokens/s  {out['generated_tokens_per_s']:.0f}   (while generating)")
        print(f"  time split          generate {out['time_generate_s']:.2f}s | score {out['time_score_s']:.2f}s | "
              f"update {out['time_update_s']:.2f}s per iteration")
        kind = "GPU allocated" if out["device"].startswith("cuda") else "max RSS"
        print(f"  peak memory         {out['peak_memory_mb']:.0f} MiB ({kind})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ppo.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--preset", default="tiny", help="size of the random models when no paths are given")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(PPOConfig, overrides + ["wandb.mode=disabled"])
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        if not (cfg.policy.name_or_path and cfg.reward.name_or_path):
            policy, reward = random_models(Path(tmp), World(cfg.world), args.preset)
            cfg.policy.name_or_path = cfg.policy.name_or_path or policy
            cfg.reward.name_or_path = cfg.reward.name_or_path or reward
        bench(cfg, args.iterations, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
