"""The bytes PPO really holds per process after one iteration, by model and kind (weights,
gradients at the optimizer step, AdamW state), against what `python -m pipeline plan` predicts.
tests/test_plan.py runs it in one process and, under fsdp, in two:
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/plan_check.py POLICY_DIR REWARD_DIR OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = ["wandb.mode=disabled", "batch.rollout=4", "batch.size=4", "batch.micro=2", "epochs=1",
            "rollout.max_new_tokens=6", "data.num_prompts=8", "eval.every=0"]


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def measure(policy_dir: str, reward_dir: str, accelerator) -> dict:
    from pipeline.config import load_config
    from pipeline.world import World
    from reward_model.likelihood import term_of
    from stages.ppo import loop
    from stages.ppo.config import PPOConfig
    from stages.ppo.data import load_prompts
    from pipeline.distributed import trained_numerics
    from stages.ppo.models import load_models, resolve_sources

    cfg = load_config(PPOConfig, [f"policy.name_or_path={policy_dir}", f"reward.name_or_path={reward_dir}", *SETTINGS])
    models = load_models(cfg, resolve_sources(cfg), accelerator.device, trained_numerics(accelerator))
    trainer = loop.make_trainer(cfg, models, accelerator)
    grads = {}
    real_step = loop._optimizer_step

    def step(t):  # the gradients as they stand when the optimizer steps
        for role, model in (("policy", t.models.policy), ("critic", t.models.value_model)):
            grads[role] = _bytes(p.grad for p in model.parameters() if p.grad is not None)
        return real_step(t)

    loop._optimizer_step = step
    prompts = load_prompts(cfg, World(cfg.world))[: cfg.batch.rollout]
    mine = prompts[accelerator.process_index:: accelerator.num_processes]
    loop.iteration_step(trainer, 0, mine)
    loop._optimizer_step = real_step
    held = {}
    for role, model, opt in (("policy", trainer.models.policy, trainer.opt_policy),
                             ("critic", trainer.models.value_model, trainer.opt_critic)):
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        held[role] = {"weights": _bytes(model.parameters()), "grads": grads[role], "optimizer": _bytes(state)}
    held["reference"] = {"weights": _bytes(models.ref.parameters())}
    held["reward model"] = {"weights": _bytes(models.reward.parameters())}
    term = term_of(models.reward)
    held["likelihood LM"] = {"weights": 0 if models.likelihood_shared else _bytes(term.model.parameters())}
    return {"world": accelerator.num_processes, "held": held}


if __name__ == "__main__":
    torch.set_num_threads(1)
    from pipeline.runtime import make_accelerator

    acc = make_accelerator()
    result = measure(sys.argv[1], sys.argv[2], acc)
    if acc.is_main_process:
        Path(sys.argv[3]).write_text(json.dumps(result))
    acc.wait_for_everyone()
