"""The skeleton every stage shares: command line, stage directory, manifest life cycle,
checkpoints, tracker. A stage's `run(cfg)` reads top to bottom:

    def run(cfg):
        with StageRun.open(cfg) as sr:          # threads, accelerator, seeds; failed on an exception
            parent = runs.resolve_parent(...)   # bad input here leaves every earlier output as it was
            sr.begin(parent, fingerprint, resuming)
            sr.clear_stale_checkpoints(resuming)
            tracker = sr.tracker(resume_step)
            ...                                 # the stage's own loop, explicit
            if stopping: sr.stopped(step); return sr.manifest
            return sr.finish(model_dir, metrics, headline)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from pipeline import runs
from pipeline.config import ConfigError, InputError, help_text, load_config, to_dict, to_yaml
from pipeline.model_card import model_card


class DataError(InputError):
    """A bad input record or file: the message names the file, line/row and field."""


def stage_main(cfg_cls: type, run: Callable, argv: list[str] | None = None) -> int:
    """`python -m stages.<name> [overlay.yaml ...] [key=value ...]`. Exit 2 on a bad config,
    1 on a failed stage; the message says what was wrong and where."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python -m stages.{cfg_cls.stage} [overlay.yaml ...] [key=value ...]\n")
        for k, v in help_text(cfg_cls).items():
            print(f"  {k:<28} {v}")
        return 0
    try:
        cfg = load_config(cfg_cls, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
        _end_process_group()
    except (runs.HandoffError, InputError, FileNotFoundError) as e:
        print(f"error in stage '{cfg_cls.stage}': {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not the user's input: keep the traceback
        where = _save_traceback(cfg, e)
        traceback.print_exc()
        print(f"internal error in stage '{cfg_cls.stage}': {type(e).__name__}: {e}\n"
              f"  this is a bug in the pipeline, not a problem with your input; the traceback is above"
              + (f" and in {where}" if where else ""), file=sys.stderr)
        return 1
    return 0


def _end_process_group() -> None:
    """After a stage that ran on several processes: all arrive, then the process group ends,
    before the interpreter tears down the communication threads (left running, gloo and
    DeepSpeed's ones can abort the process at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _save_traceback(cfg, exc: BaseException) -> Path | None:
    """Write the traceback to `<stage dir>/error-rank<R>.log` if the stage directory exists."""
    stage_dir = runs.stage_dir(cfg.runs_dir, cfg.run_name, cfg.stage)
    if not stage_dir.is_dir():
        return None
    path = stage_dir / f"error-rank{os.environ.get('RANK', '0')}.log"
    try:
        path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        return None
    return path


def check_parent_world(cfg, parent: runs.Parent | None) -> None:
    """One built-in world per run: its facts live in the parent's weights, its prompts and gold
    labeler in every stage. A stage on the world refuses a parent trained on the world with
    another seed or population (a parent on files, or a stage on files, is not checked)."""
    if parent is None or cfg.data.source != "world":
        return
    config = parent.manifest.config or {}
    theirs = config.get("world")
    if not theirs or (config.get("data") or {}).get("source", "world") != "world":
        return
    for key in ("seed", "num_people"):
        if key in theirs and theirs[key] != getattr(cfg.world, key):
            raise InputError(f"world.{key}={getattr(cfg.world, key)} but the parent {parent.manifest_path} "
                             f"({parent.manifest.stage}) was trained in a world with {key}={theirs[key]}; pass "
                             f"world.{key}={theirs[key]}: every stage of a run uses the same world")


def peak_gpu_memory() -> dict:
    """{'perf/peak_gpu_memory_gib': ...} of this process's GPU since it started, or {} on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"perf/peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


class StageRun:
    """Owns `runs/<run>/<stage>/`: config.yaml, the manifest (running -> complete | failed),
    checkpoints, the tracker. `StageRun.open(cfg)` also starts the stage's process state."""

    accelerator = None
    threads = 0

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg):
        """The common start of every stage: threads, the accelerator (at `cfg.precision`), seeds,
        then the stage's `StageRun` (its `accelerator` and `threads` set). An exception after
        `begin` marks the manifest failed; before it nothing is written, so bad input leaves
        every earlier output, a previous run's manifest included, as it was. A Trainer the stage
        builds later shares this accelerator's state, so it must ask for the same precision."""
        from pipeline.runtime import configure_threads, seed_everything, stage_accelerator

        threads = configure_threads(cfg.threads)
        accelerator = stage_accelerator(cfg)
        seed_everything(cfg.seed)
        sr = cls(cfg, accelerator.is_main_process)
        sr.accelerator, sr.threads = accelerator, threads
        try:
            yield sr
        except BaseException as e:
            sr.fail(e)
            raise

    def __init__(self, cfg, is_main: bool = True):
        self.cfg = cfg
        self.is_main = is_main
        self.dir = runs.stage_dir(cfg.runs_dir, cfg.run_name, cfg.stage)
        self.ckpt_dir = self.dir / "checkpoints"
        self.manifest = runs.Manifest(stage=cfg.stage, run_name=cfg.run_name, config=to_dict(cfg))
        self.t0 = time.time()
        self.begun = False  # nothing is written before begin(): bad input fails without a trace
        self.parent: runs.Parent | None = None

    def log(self, *parts) -> None:
        """A `[stage] ...` line on stderr, from rank 0 only."""
        if self.is_main:
            print(f"[{self.cfg.stage}]", *parts, file=sys.stderr, flush=True)

    def begin(self, parent: runs.Parent | None = None, data_fingerprint: str | None = None,
              resuming: bool = False) -> None:
        m = self.manifest
        self.begun = True
        self.parent = parent
        if parent is not None:
            m.parent, m.parent_abs = runs.parent_reference(parent.manifest_path, self.dir)
            m.parent_hash = parent.hash
        m.data_fingerprint = data_fingerprint
        m.versions, m.git_commit = runs.package_versions(), runs.git_commit()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            old = self.dir / "manifest.json"
            if resuming and old.exists():  # keep the original start time across restarts
                try:
                    m.started = runs.Manifest.load(old).started
                except runs.HandoffError:
                    pass
            runs.atomic_write_text(self.dir / "config.yaml", to_yaml(self.cfg))
            m.save(self.dir)

    def finish(self, model_dir: Path, metrics: dict, headline: dict, tokenizer_dir: Path | None = None,
               extra: dict | None = None) -> runs.Manifest:
        m = self.manifest
        m.model_dir = str(Path(model_dir).relative_to(self.dir))
        m.tokenizer_fingerprint = runs.tokenizer_fingerprint(tokenizer_dir or model_dir)
        m.metrics = {**metrics, **peak_gpu_memory()}
        m.extra = {"headline": headline, **(extra or {})}
        m.ended = time.time()
        m.wall_time_s = round(m.ended - m.started, 2)
        m.status = "complete"
        if self.is_main:
            # cards before the manifest: a crash in between leaves a stage that is not complete
            runs.atomic_write_text(Path(model_dir) / "README.md", model_card(m, Path(model_dir), self.parent))
            if m.extra.get("ema_model_dir"):
                ema_dir = self.dir / m.extra["ema_model_dir"]
                runs.atomic_write_text(ema_dir / "README.md", model_card(m, ema_dir, self.parent, ema=True))
            m.save(self.dir)
        return m

    def fail(self, exc: BaseException) -> None:
        m = self.manifest
        m.status, m.error = "failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()
        m.ended = time.time()
        if self.is_main and self.begun:
            m.save(self.dir)

    def tracker(self, resume_step: int | None = None):
        """The stage's tracker (metrics.jsonl + wandb, rank 0); `resume_step`: the step a resumed
        run restarts from (its history after that step is dropped)."""
        from pipeline.tracking import make_tracker

        return make_tracker(self.is_main, self.dir, self.cfg.stage, self.cfg.run_name, self.manifest.config,
                            self.cfg.wandb, resume_step=resume_step)

    def stopped(self, step: int, unit: str = "step") -> runs.Manifest:
        """The end of a run stopped by `stop_after` (a checkpoint was left): says so, returns the
        (still running) manifest."""
        self.log(f"stopping after {unit} {step} as configured (stop_after); re-run to resume")
        return self.manifest

    # ------------------------------------------------------------------ checkpoints
    def clear_stale_checkpoints(self, resuming: bool) -> None:
        """A run that does not resume starts without the checkpoints of an earlier, finished or
        abandoned one (every process waits for rank 0 to remove them)."""
        if self.is_main and not resuming and self.ckpt_dir.exists():
            shutil.rmtree(self.ckpt_dir)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def latest_checkpoint(self, pattern: str = "step-*") -> Path | None:
        """The newest complete checkpoint matching `pattern`: ours (`step-N`) are renamed into
        place only when whole; HF Trainer's (`checkpoint-N`) count once `trainer_state.json`,
        written last, exists. None after a complete stage: a finished stage run again starts afresh."""
        if not self.cfg.resume or not self.ckpt_dir.exists():
            return None
        done = self.dir / "manifest.json"
        if done.exists():
            try:
                if runs.Manifest.load(done).complete:
                    return None
            except runs.HandoffError:
                pass
        found = sorted((p for p in self.ckpt_dir.glob(pattern) if (p / "trainer_state.json").exists()),
                       key=lambda p: int(re.sub(r"\D", "", p.name)))
        return found[-1] if found else None

    def latest_trainer_checkpoint(self) -> tuple[str | None, int | None]:
        """(path, step) of the newest complete HF Trainer `checkpoint-N` to resume from, or
        (None, None): the stages that train through an HF Trainer (sft, rm's TRL path, dpo)."""
        found = self.latest_checkpoint("checkpoint-*")
        return (str(found), int(found.name.split("-")[1])) if found else (None, None)

    def checkpoint(self, accelerator, step: int, total: int, state: dict) -> bool:
        """End of optimizer step `step` of `total`: save a resumable checkpoint every `save_every`
        steps (the final one is the stage's output, not a checkpoint) and at `stop_after`.
        Returns True when the process should end now (stop_after)."""
        stopping = self.cfg.stops_at(step, total)
        if (self.cfg.save_every and step % self.cfg.save_every == 0 and step < total) or stopping:
            self.save_checkpoint(accelerator, step, state)
        return stopping

    def save_checkpoint(self, accelerator, step: int, state: dict) -> Path:
        """`accelerator.save_state` into a temporary sibling, then rename: never half-written."""
        final = self.ckpt_dir / f"step-{step:07d}"
        tmp = self.ckpt_dir / f".tmp-step-{step:07d}"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # pickle format: safetensors refuses tied embeddings and prints a warning for each checkpoint
        accelerator.save_state(str(tmp), safe_serialization=False)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            runs.atomic_write_json(tmp / "trainer_state.json", state)
            runs.replace_dir(tmp, final)
            kept = sorted(self.ckpt_dir.glob("step-*"), key=lambda p: p.name)
            for old in kept[: max(0, len(kept) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load_checkpoint(accelerator, path: Path) -> dict:
        accelerator.load_state(str(path))
        return json.loads((path / "trainer_state.json").read_text())
