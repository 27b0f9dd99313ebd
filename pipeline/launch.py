"""Launch one stage through `accelerate launch`, choosing the launcher file and process count.

`python -m pipeline.launch STAGE [key=value ...]`, with environment variables
`NPROC` (processes, default 1) and `ACCEL` (a file in configs/accelerate/: cpu, gpu, ddp, fsdp,
zero2, zero3; default cpu without a GPU, gpu or ddp with one).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.runs import STAGES

ROOT = Path(__file__).resolve().parent.parent


def launch_command(stage: str, args: list[str], nproc: int | None = None, accel: str | None = None) -> list[str]:
    if stage not in STAGES:
        raise SystemExit(f"error: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    nproc = int(nproc if nproc is not None else os.environ.get("NPROC", "1") or 1)
    has_gpu = shutil.which("nvidia-smi") is not None
    accel = accel or os.environ.get("ACCEL") or ("cpu" if not has_gpu else ("gpu" if nproc == 1 else "ddp"))
    cfg = ROOT / "configs" / "accelerate" / f"{accel}.yaml"
    if not cfg.exists():
        names = sorted(p.stem for p in cfg.parent.glob("*.yaml"))
        raise SystemExit(f"error: ACCEL={accel}: no {cfg}; choose one of {', '.join(names)}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--num_processes", str(nproc)]
    if accel == "cpu" and nproc > 1:
        # `--cpu` with several processes silently runs one; the multi-GPU launcher with
        # Accelerator(cpu=True) in the stage gives real gloo processes.
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"]
    return cmd + ["-m", f"stages.{stage}", *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    cmd = launch_command(argv[0], argv[1:])
    env = dict(os.environ)
    env.setdefault("WANDB_SILENT", "true")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
