"""Create `.venv` and install the project into it, once; a fast no-op afterwards.

Run with the system Python, 3.11 or newer (`python3 -m pipeline.bootstrap`, which every `make` target
does); it imports nothing outside the standard library. torch is settled *before* the project, so that
pip keeps it (it is in the project's range) instead of pulling another multi-GB build:

* CUDA machine whose Python already imports a CUDA torch in range (a CUDA image): the venv is created
  with the system site-packages and uses that torch; nothing is reinstalled.
* CUDA machine without one: a CUDA build, `CUDA_TORCH` (default torch==2.13.0; PyPI's Linux wheel is one).
* No CUDA: the CPU build, `CPU_TORCH` (default torch==2.13.0), so no CUDA wheels come along.

`TORCH_INDEX_URL` picks the index torch comes from (e.g. https://download.pytorch.org/whl/cu126).
Optional extras: `EXTRAS=deepspeed make setup` installs `.[dev,deepspeed]` (by hand:
`.venv/bin/pip install -e .[deepspeed]`); later runs keep them until EXTRAS says otherwise.
A change to pyproject.toml or to the extras reinstalls the project; the venv itself is never recreated.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".installed"  # line 1: fingerprint of pyproject.toml + extras, line 2: the extras
CPU_TORCH = os.environ.get("CPU_TORCH", "torch==2.13.0")
CUDA_TORCH = os.environ.get("CUDA_TORCH", "torch==2.13.0")


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def _cuda_torch(python: Path | str) -> str | None:
    """The version of the CUDA torch `python` imports, if it is in the project's range; else None."""
    r = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                       capture_output=True, text=True)
    version, cuda = (r.stdout.split() + ["", ""])[:2] if r.returncode == 0 else ("", "None")
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    return version if cuda != "None" and floor and numbers >= tuple(map(int, floor.groups())) else None


def _pip(*args: str) -> None:
    cmd = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    if sys.version_info < (3, 11):
        sys.exit(f"Python >= 3.11 is needed (transformers, trl), this is {sys.version.split()[0]}: "
                 "run `python3.11 -m pipeline.bootstrap` (or newer) once")
    old = STAMP.read_text().splitlines() if STAMP.exists() else []
    extras = os.environ.get("EXTRAS", old[1] if len(old) > 1 else "")
    extras = ",".join(sorted({"dev", *re.split(r"[,\s]+", extras)} - {""}))
    fingerprint = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if old[:1] == [fingerprint]:
        return 0
    index = os.environ.get("TORCH_INDEX_URL")
    index = ["--index-url", index] if index else []
    cuda = _has_cuda()
    if not PYTHON.exists():
        system_torch = cuda and _cuda_torch(sys.executable)
        print(f"creating {VENV}" + (f" on the system site-packages (torch {system_torch})" if system_torch else ""),
              flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=bool(system_torch)).create(VENV)
    if not cuda:
        _pip(CPU_TORCH, *index)  # an unpinned torch from PyPI is the CUDA build (several GB)
    elif not _cuda_torch(PYTHON):
        _pip(CUDA_TORCH, *index)
    _pip("-e", f"{ROOT}[{extras}]")
    STAMP.write_text(f"{fingerprint}\n{extras}\n")
    print("environment ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
