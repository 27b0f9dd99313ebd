"""The stage graph: one declaration per stage, read by everything that lists, orders or connects
stages (the driver, parent resolution, the launchers, chat, model cards, the report, the memory
plan, the GPU smoke, the tests). Adding a method is one `Stage(...)` line here plus its module.

A stage's parent is the stage whose output it trains from, named explicitly: `ppo` reads the
reward model of `rm` (and, through the rm stage's manifest, the SFT policy), `rm` the SFT model.
The declaration order is a topological order of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str                   # `python -m <module>` runs it; it defines `main`, `run` and the config class
    config: str                   # the config class's name in `config_module`
    parents: tuple[str, ...]      # stages it may train from, the default first (in the same run); () = a root
    produces: str                 # "causal_lm" (a chat model) or "reward_model" (a sequence classifier)
    purpose: str                  # one line: what its model is (model cards, help)
    config_module: str = ""       # where the config class and `memory_plan` live (default: `module`)
    chain: bool = True            # part of `make pipeline`'s default chain (the InstructGPT recipe)

    @property
    def plan_module(self) -> str:
        return self.config_module or self.module


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", "stages.pretrain", "PretrainConfig", (), "causal_lm",
          "A causal language model pretrained on plain text."),
    Stage("sft", "stages.sft", "SFTConfig", ("pretrain",), "causal_lm",
          "The parent's model fine-tuned on demonstrations, with the loss on the responses only."),
    Stage("rm", "stages.rm", "RMConfig", ("sft", "pretrain"), "reward_model",
          "A reward model: a one-label sequence classifier trained on ranked responses."),
    Stage("ppo", "stages.ppo", "PPOConfig", ("rm",), "causal_lm",
          "The SFT policy trained with KL-regularised PPO against the reward model.",
          config_module="stages.ppo.runner"),
    Stage("dpo", "stages.dpo", "DPOConfig", ("sft",), "causal_lm",
          "The SFT policy trained with DPO (Rafailov et al. 2023) on ranked comparisons, without a reward model.",
          chain=False),
    Stage("rsft", "stages.rsft", "RSFTConfig", ("rm",), "causal_lm",
          "The SFT policy fine-tuned on its own best-of-n samples as the reward model ranks them (rejection "
          "sampling, Touvron et al. 2023).", chain=False),
)}
NAMES: tuple[str, ...] = tuple(STAGES)
CHAIN: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.chain)


def get(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}")
    return STAGES[name]


def ordered(names) -> list[str]:
    """`names` in the graph's order (parents before children)."""
    wanted = set(names)
    return [n for n in NAMES if n in wanted]


def descendants(name: str) -> set[str]:
    """`name` and every stage that trains from it, directly or not."""
    out = {name}
    for n in NAMES:  # topological: a parent is seen before its children
        if set(STAGES[n].parents[:1]) & out:
            out.add(n)
    return out


def config_class(name: str) -> type:
    """The stage's config class (imports its module)."""
    import importlib

    spec = get(name)
    return getattr(importlib.import_module(spec.plan_module), spec.config)


def chat_stages() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.produces == "causal_lm")
