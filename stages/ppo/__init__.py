"""Stage `ppo`: KL-regularized PPO (`python -m stages.ppo`, `accelerate launch -m stages.ppo`).

Modules: `config` (schema), `models` (the four models, LoRA, EMA), `rollout` (typed rollout
record, generation, teacher-forced forwards, scoring), `functional` (pure PPO math), `loop` (one
iteration by phase), `evaluate` (gold evaluation vs SFT), `runner` (the stage), `bench`.
"""
from __future__ import annotations

from pipeline.stage import stage_main
from stages.ppo.config import PPOConfig
from stages.ppo.runner import run


def main(argv: list[str] | None = None) -> int:
    return stage_main(PPOConfig, run, argv)


__all__ = ["PPOConfig", "main", "run"]
