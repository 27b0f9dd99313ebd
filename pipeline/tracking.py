"""Metrics: `metrics.jsonl` (the readable record) and wandb, both written by rank 0 only.

`make_tracker` returns a `NullTracker` on other ranks or when disabled, so stage code never
branches on the rank to log. wandb runs offline unless an API key is configured; `wandb sync`
uploads later.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class NullTracker:
    """The no-op tracker: same interface, does nothing."""

    def log(self, metrics: dict, step: int) -> None: ...
    def table(self, name: str, columns: list[str], rows: list[list]) -> None: ...
    def summary(self, metrics: dict) -> None: ...
    def finish(self) -> None: ...


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker(NullTracker):
    def __init__(self, stage_dir: Path, stage: str, run_name: str, config: dict, wandb_cfg: Any,
                 resume_step: int | None = None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # On resume keep the history up to the checkpoint; later rows would be logged twice.
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [l for l in self.path.read_text().splitlines() if _row_step(l) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        self._file = open(self.path, "a")
        self.run = None
        mode = _wandb_mode(wandb_cfg.mode)
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
            import wandb

            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=run_name,
                                  job_type=stage, name=f"{run_name}-{stage}", config=config, mode=mode,
                                  dir=str(stage_dir), reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log(clean, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=[list(r) for r in rows])})

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:
        return math.inf


def make_tracker(is_main: bool, stage_dir: Path, stage: str, run_name: str, config: dict, wandb_cfg: Any,
                 resume_step: int | None = None):
    if not is_main:
        return NullTracker()
    return Tracker(stage_dir, stage, run_name, config, wandb_cfg, resume_step)


class Progress:
    """Prints `step i/N | metrics | rate | ETA` every `every` steps (rank 0 only)."""

    def __init__(self, name: str, total: int, start: int = 0, every: int = 10, unit: str = "tok",
                 enabled: bool = True):
        self.name, self.total, self.every, self.unit, self.enabled = name, total, every, unit, enabled
        self.start_step = start
        self.t0 = time.time()
        self.count = 0.0

    def update(self, step: int, amount: float = 0.0, **metrics: float) -> float:
        """Record `amount` units done; print when due. Returns the running rate (units/s)."""
        self.count += amount
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = self.count / elapsed
        if self.enabled and (step % self.every == 0 or step == self.total):
            done = step - self.start_step
            eta = elapsed / max(done, 1) * (self.total - step)
            parts = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"[{self.name}] step {step}/{self.total} | {parts} | {_human(rate)} {self.unit}/s | "
                  f"ETA {_duration(eta)}", file=sys.stderr, flush=True)
        return rate


def _human(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.1f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
