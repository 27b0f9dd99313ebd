"""Metrics: `metrics.jsonl` (the readable record) and wandb, both written by rank 0 only.

`make_tracker` returns a `NullTracker` on other ranks or when disabled, so stage code never
branches on the rank to log. wandb runs offline unless an API key is configured; `wandb sync`
uploads later.

Every wandb row carries an explicit step. wandb keeps one open history row at its current step:
a call with a step merges into it (the same step) or closes it (a later step), a call without a
step closes it and advances the step by one, and a call at an earlier step is dropped (only
`debug-internal.log` says "ignoring partial history record"). So tables are logged at the step of
their metrics (`table(..., step)`), never without one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable


class NullTracker:
    """The no-op tracker: same interface, does nothing."""

    def log(self, metrics: dict, step: int) -> None: ...
    def table(self, name: str, columns: list[str], rows: list[list], step: int | None = None) -> None: ...
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
        self.step = resume_step or 0  # the latest step logged: wandb drops rows at earlier steps
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
        self._wandb_log(clean, step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """A wandb table at `step` (default: the latest step logged), so that it joins that step's
        metrics row instead of moving wandb's step counter past it."""
        if self.run is not None:
            import wandb

            self._wandb_log({name: wandb.Table(columns=columns, data=[list(r) for r in rows])},
                            self.step if step is None else step)

    def _wandb_log(self, data: dict, step: int) -> None:
        if self.run is None:
            return
        if step < self.step:
            print(f"warning: wandb drops rows at a step before the latest ({step} < {self.step}): "
                  f"{', '.join(data)}", file=sys.stderr, flush=True)
        self.step = max(self.step, step)
        self.run.log(data, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def stratified(rows: list, key: Callable[[Any], Any] | int | str, n: int) -> list:
    """Up to `n` rows taken round-robin across the groups `key` gives (a function of the row, or
    an index into it: e.g. the skill column), groups in order of first appearance and rows of a
    group in their order. Deterministic; `rows[:n]` of a skill-sorted list would show one skill.
    With `n` at least the number of groups, every group is in."""
    get = key if callable(key) else (lambda r: r[key])
    groups: dict[Any, list] = {}
    for r in rows:
        groups.setdefault(get(r), []).append(r)
    out: list = []
    queues = [iter(g) for g in groups.values()]
    while queues and len(out) < n:
        live = []
        for q in queues:
            if len(out) >= n:
                break
            r = next(q, _END)
            if r is not _END:
                out.append(r)
                live.append(q)
        queues = live
    return out


_END = object()


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


def trainer_bridge(cfg, tracker, unit: str, items_per_step: int, is_main: bool, names: dict[str, str] | None = None,
                   shown: tuple[str, ...] = ("loss",), every: int = 0, at_every: Callable[[int], None] | None = None):
    """The one bridge from an HF Trainer (SFT, TRL's RewardTrainer and DPOTrainer) to the stage:
    its logs go to `tracker` (`names`: the Trainer's key -> our metric name; default every number
    as `train/<key>`), with the stage's progress line (`items_per_step` `unit`s per optimizer step,
    `shown` metrics) and `perf/<unit>_per_s`; `stop_after` ends training at its step, leaving a
    checkpoint; with `every`, `at_every(step)` runs before the first step and every `every` steps
    (not at the last: the stage evaluates the final model itself). `bridge.last` holds the last
    value of each logged metric, `bridge.raw` of each number the Trainer logged, `bridge.stopped`
    whether `stop_after` ended it."""
    from transformers import TrainerCallback

    class Bridge(TrainerCallback):
        progress, seen, stopped = None, 0, False

        def __init__(self):
            self.last, self.raw = {}, {}

        def on_train_begin(self, args, state, control, **kw):
            self.seen = state.global_step
            self.progress = Progress(cfg.stage, state.max_steps, start=state.global_step, every=cfg.log_every,
                                     unit=unit, enabled=is_main)
            if at_every is not None and every and state.global_step == 0:
                at_every(0)

        def on_log(self, args, state, control, logs=None, **kw):
            numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            self.raw.update(numbers)
            row = {names[k] if names else f"train/{k}": v for k, v in numbers.items() if not names or k in names}
            if not row:
                return
            self.last.update(row)
            if "train/loss" in row:
                done, self.seen = state.global_step - self.seen, state.global_step
                row[f"perf/{unit}_per_s"] = self.progress.update(
                    state.global_step, items_per_step * done,
                    **{k.split("/")[-1]: self.last[f"train/{k}"] for k in shown if f"train/{k}" in self.last})
            tracker.log(row, state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if cfg.stops_at(state.global_step, state.max_steps):
                control.should_save = control.should_training_stop = True
                self.stopped = True
            elif at_every is not None and every and state.global_step % every == 0 and state.global_step < state.max_steps:
                at_every(state.global_step)

    return Bridge()
