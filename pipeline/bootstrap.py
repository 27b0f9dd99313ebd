"""Create `.venv` and install the project into it, once; a fast no-op afterwards.

Run with the system Python (`python3 -m pipeline.bootstrap`); it imports nothing outside the
standard library. On a machine without CUDA the CPU build of torch is installed *before* the
project, so the project's torch range is already satisfied and no CUDA wheels are pulled.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".installed"
CPU_TORCH = os.environ.get("CPU_TORCH", "torch==2.13.0")


def _fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def _pip(*args: str) -> None:
    cmd = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    if STAMP.exists() and STAMP.read_text().strip() == _fingerprint():
        return 0
    if not (VENV / "bin" / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not _has_cuda():
        # An unpinned torch from the registry is the CUDA build (several GB); take the CPU one.
        index = os.environ.get("TORCH_INDEX_URL")
        _pip(CPU_TORCH, *(["--index-url", index] if index else []))
    _pip("-e", f"{ROOT}[dev]")
    STAMP.write_text(_fingerprint())
    print("environment ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
