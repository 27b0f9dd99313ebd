"""Stage `ppo`: KL-regularized PPO (`python -m stages.ppo`, `accelerate launch -m stages.ppo`).

Modules: `config` (schema), `models` (the four models, LoRA, EMA), `rollout` (typed rollout
record, generation, teacher-forced forwards, scoring), `functional` (pure PPO math), `loop` (one
iteration by phase), `runner` (the stage; its gold evaluation is `stages.policy_eval`), `bench`.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from pipeline.stage import stage_main
    from stages.ppo.config import PPOConfig
    from stages.ppo.runner import run

    return stage_main(PPOConfig, run, argv)


def __getattr__(name: str):
    """`PPOConfig` and `run`, imported on first use: the package's modules import each other's
    pieces (and `stages.policy_eval` the rollout helpers) without loading the whole stage."""
    if name == "PPOConfig":
        from stages.ppo.config import PPOConfig

        return PPOConfig
    if name == "run":
        from stages.ppo.runner import run

        return run
    raise AttributeError(name)


__all__ = ["PPOConfig", "main", "run"]
