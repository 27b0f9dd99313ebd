"""Launch one stage, choosing the launcher file and process count.

`python -m pipeline.launch STAGE [key=value ...]`, with environment variables
`NPROC` (processes, default 1) and `ACCEL` (a file in configs/accelerate/: cpu, gpu, ddp, fsdp,
zero2, zero3; default cpu without a GPU, gpu or ddp with one).

One process on the plain `cpu`/`gpu` launchers runs the stage module directly
(`python -m stages.<stage> ...`): nothing stands between the stage's own error line and the user.
Every other launch goes through `accelerate launch`, run inside this module
(`python -m pipeline.launch --accelerate <accelerate launch arguments>`) so that a failing stage
ends with the stage's own error, not the launcher's traceback; the exit code is the stage's.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pipeline import registry

ROOT = Path(__file__).resolve().parent.parent
ACCEL_DIR = ROOT / "configs" / "accelerate"
ACCELERATE_FLAG = "--accelerate"  # internal: `python -m pipeline.launch --accelerate <accelerate launch args>`
DIRECT = ("cpu", "gpu")           # launchers whose single process needs no launcher at all


def launch_command(stage: str, args: list[str], nproc: int | None = None, accel: str | None = None) -> list[str]:
    """The command that runs `stage` with `args`: the stage module itself for one process on the
    plain cpu/gpu launchers, else an `accelerate launch` with the chosen launcher file."""
    if stage not in registry.STAGES:
        raise SystemExit(f"error: unknown stage {stage!r}; stages are {', '.join(registry.NAMES)}")
    raw = nproc if nproc is not None else (os.environ.get("NPROC") or "1")
    try:
        nproc = int(raw)
    except ValueError:
        nproc = 0
    if nproc < 1:
        raise SystemExit(f"error: NPROC={raw}: expected a number of processes >= 1")
    has_gpu = shutil.which("nvidia-smi") is not None
    accel = accel or os.environ.get("ACCEL") or ("cpu" if not has_gpu else ("gpu" if nproc == 1 else "ddp"))
    cfg = ACCEL_DIR / f"{accel}.yaml"
    if not cfg.is_file():
        names = sorted(p.stem for p in ACCEL_DIR.glob("*.yaml"))
        raise SystemExit(f"error: ACCEL={accel}: no launcher file {cfg}; choose one of {', '.join(names)}")
    if accel == "gpu" and nproc > 1:  # accelerate would silently run one process
        raise SystemExit(f"error: ACCEL=gpu runs one process; for NPROC={nproc} choose ddp, fsdp, zero2 or zero3")
    check_gpu(accel, has_gpu)
    module = ["-m", registry.get(stage).module, *args]
    if nproc == 1 and accel in DIRECT:
        return [sys.executable, *module]
    cmd = [sys.executable, "-m", "pipeline.launch", ACCELERATE_FLAG,
           "--config_file", str(cfg), "--num_processes", str(nproc)]
    if accel == "cpu" and nproc > 1:
        # `--cpu` with several processes silently runs one; the multi-GPU launcher with
        # Accelerator(cpu=True) in the stage gives real gloo processes.
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"]
    return cmd + module


def check_gpu(accel: str, has_gpu: bool, torch_cuda: bool | None = None) -> None:
    """A GPU that was asked for and is missing is an error, not a silent CPU run: ACCEL=gpu on a
    machine without one, or any launcher but cpu on a GPU machine whose torch cannot use its GPUs
    (a .venv built on a CPU machine keeps its CPU torch). `torch_cuda`: whether this environment's
    torch sees a GPU (asked of it when None)."""
    if accel == "gpu" and not has_gpu:
        raise SystemExit("error: ACCEL=gpu, but this machine has no GPU (no nvidia-smi); use ACCEL=cpu")
    if accel == "cpu" or not has_gpu:
        return
    if torch_cuda is None:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available(), torch.__version__)"],
                               capture_output=True, text=True)
        torch_cuda, version = (probe.stdout.split() + ["False", "?"])[:2] if probe.returncode == 0 else ("False", "?")
        torch_cuda = torch_cuda == "True"
    else:
        version = "?"
    if not torch_cuda:
        raise SystemExit(f"error: ACCEL={accel} on a GPU machine, but this environment's torch ({version}) cannot use the "
                         "GPU (a CPU build, or one for another CUDA): rebuild it with `rm -rf .venv && make setup` "
                         "(TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXXX for a given CUDA), or run with ACCEL=cpu")


def exit_code(returncode: int) -> int:
    """A process's return code as an exit status: -N (killed by signal N) -> 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` and return its exit status. Ctrl-C reaches the child too (same process group):
    wait for it to stop instead of abandoning it mid-checkpoint."""
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return exit_code(proc.wait())
        except KeyboardInterrupt:
            continue


class _DropFailureLogs(logging.Filter):
    """torchelastic logs 'failed (exitcode: ...)' and 'Sending process ... closing signal' after
    a child fails, burying the child's error; a signal death is reported by `accelerate_launch`."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("failed (exitcode") or msg.startswith("Sending process"))


def accelerate_launch(argv: list[str]) -> int:
    """`accelerate launch <argv>` in this process, ending quietly with the child's exit status
    when a child fails (accelerate re-raises the failure with a launcher traceback)."""
    from accelerate.commands.launch import launch_command as accelerate_launch_command
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailureLogs())
    args = launch_command_parser().parse_args(argv)
    try:
        accelerate_launch_command(args)
    except subprocess.CalledProcessError as e:  # the single-process launcher
        return exit_code(e.returncode) or 1
    except ChildFailedError as e:  # torchrun: the first failure is the root cause
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: {e.name} (rank {rank}) was killed by {failure.signal_name()}", file=sys.stderr)
        return exit_code(failure.exitcode) or 1
    except SignalException as e:  # the launcher itself got SIGINT/SIGTERM; children are stopped
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except ImportError as e:  # e.g. ACCEL=zero2 without deepspeed
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [ACCELERATE_FLAG]:
        return accelerate_launch(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd = launch_command(argv[0], argv[1:])
    env = dict(os.environ)
    env.setdefault("WANDB_SILENT", "true")
    return run(cmd, env)


if __name__ == "__main__":
    sys.exit(main())
