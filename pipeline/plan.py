"""`python -m pipeline plan STAGE [key=value ...] --launcher L --nproc N --gpu-mem GiB` (`make plan`):
what each GPU will hold for a stage, before renting one.

The stage's own `memory_plan` builds its models from the configuration (run manifests, model
directories, or directories holding only a `config.json`) on the meta device and shards them as
`--launcher` will: FSDP2 for real, over torch's fake process group of `--nproc`; the formulas of
DeepSpeed's estimators for ZeRO. It adds the largest phase's activations, KV cache and gathered parameters
(docs/memory.md). Exit 0 when the peak fits in `--gpu-mem`, 1 when it does not (with the cheapest
change that fits), 2 on bad input.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from pipeline import registry
from pipeline.config import ConfigError, InputError, load_config
from pipeline.runs import HandoffError

# stage -> (module with memory_plan and MEMORY_KNOBS, its config class)
STAGES = {name: (s.plan_module, s.config) for name, s in registry.STAGES.items()}
LAUNCHERS = {"cpu": "plain", "gpu": "plain", "ddp": "ddp", "fsdp": "fsdp", "zero2": "zero2", "zero3": "zero3"}


def make_plan(stage: str, overrides: list[str], launcher: str, nproc: int, device: str = "cuda", prompt_len: int = 256,
              gpu_mem: float | None = None):
    """The stage's `pipeline.memory.Plan` for `nproc` processes under `launcher` (a name in
    `LAUNCHERS`: cpu, gpu, ddp, fsdp, zero2, zero3)."""
    from pipeline.memory import build_plan

    module = importlib.import_module(STAGES[stage][0])
    cfg = load_config(getattr(module, STAGES[stage][1]), overrides)
    kind = LAUNCHERS[launcher] if nproc > 1 else "plain"
    if hasattr(module, "resolve_auto"):  # settings a stage decides from the plan (ppo's rollout.gather)
        cfg = module.resolve_auto(cfg, kind, nproc, torch.device(device), prompt_len, gpu_mem)
    return build_plan(module.memory_plan, cfg, kind, nproc, torch.device(device), prompt_len, gpu_mem), cfg, module


def cheapest_fix(stage: str, overrides: list[str], cfg, module, launcher: str, nproc: int, device: str,
                 prompt_len: int, gpu_mem: float) -> tuple[str, object] | None:
    """The first change of `pipeline.memory.cheaper_settings` whose plan fits: (what, plan)."""
    from pipeline.memory import cheaper_settings

    kind = LAUNCHERS[launcher] if nproc > 1 else "plain"
    for what, extra, other, procs in cheaper_settings(cfg, kind, nproc, module.MEMORY_KNOBS):
        name = other if other != "plain" else launcher
        try:
            plan, _, _ = make_plan(stage, [*overrides, *extra], name, procs, device, prompt_len, gpu_mem)
        except (ConfigError, InputError):
            continue
        if plan.fits():
            return what, plan
    return None


def grid(args) -> int:
    """`--grid`: the plan's peak under every launcher, and LoRA under ddp, as markdown rows."""
    module = importlib.import_module(STAGES[args.stage][0])
    lora = module.MEMORY_KNOBS.get("lora", [])
    print(f"| launcher ({args.nproc} GPUs of {args.gpu_mem:g} GiB) | models GiB | peak GiB | fits |\n|---|---|---|---|")
    for name, extra in (("ddp", []), ("zero2", []), ("fsdp", []), ("zero3", []),
                        *([("ddp", [f"{k}=true" for k in lora])] if lora else [])):
        try:
            plan, _, _ = make_plan(args.stage, [*args.overrides, *extra], name, args.nproc, args.device,
                                   args.prompt_len, args.gpu_mem)
        except (ConfigError, InputError, HandoffError, FileNotFoundError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        label = name + (" + LoRA" if extra else "")
        print(f"| {label} | {plan.static / 2**30:.1f} | {plan.peak / 2**30:.1f} | {'yes' if plan.fits() else 'no'} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("overrides", nargs="*", help="the stage's key=value settings (and overlay .yaml files)")
    parser.add_argument("--launcher", default="fsdp", choices=sorted(LAUNCHERS), help="as ACCEL= (default fsdp)")
    parser.add_argument("--nproc", type=int, default=8, help="processes = GPUs (default 8)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence (ppo, rm sampling)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where the stage will run: cuda (bf16 frozen models and activations) or cpu (fp32)")
    parser.add_argument("--grid", action="store_true",
                        help="one markdown row per launcher (ddp, zero2, fsdp, zero3, and LoRA under ddp) instead")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        print("error: --nproc must be >= 1", file=sys.stderr)
        return 2
    if args.grid:
        return grid(args)
    try:
        plan, cfg, module = make_plan(args.stage, args.overrides, args.launcher, args.nproc, args.device,
                                      args.prompt_len, args.gpu_mem)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (InputError, HandoffError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    if plan.fits():
        return 0
    fix = cheapest_fix(args.stage, args.overrides, cfg, module, args.launcher, args.nproc, args.device, args.prompt_len,
                       args.gpu_mem)
    if fix is None:
        print("  no single change tried (gradient checkpointing, micro batch 1, fsdp/zero3, LoRA, 8x the GPUs) fits")
    else:
        print(f"  cheapest change that fits: {fix[0]} (peak {fix[1].peak / 2**30:.1f} GiB)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
