"""Every stage on one GPU, then the stages again under each multi-GPU launcher: `make gpu-smoke`.

    python -m pipeline.gpu_smoke [--dry-run] [--runs-dir DIR] [--skip-deepspeed] [--allow-cpu]
                                 [--row-timeout S]

Runs pretrain -> sft -> rm -> ppo through `python -m pipeline.launch` with the `gpu` launcher
(one process) at the `small` model preset with short step counts, in a fresh run
`<runs-dir>/gpu-smoke-<timestamp>`; then, on every visible GPU (NPROC = the GPU count), sft and
ppo under ddp, fsdp, zero2 and zero3, rm under fsdp and zero3, each in its own run
(`<name>-fsdp`, ...) whose parents are the first run's stages. The zero3 sft and rm rows
accumulate 2 micro-batches per step. Every ppo row must start at KL 0 (its first iteration's
`ppo/kl` within 1e-4 of 0), every row must end within --row-timeout seconds. Without deepspeed the
ZeRO rows fail; --skip-deepspeed skips them, and the table says "skipped", never "complete".
Prints one table (stage, launcher, processes, status, wall time, peak GPU memory, headline
metrics) and exits 1 if any row failed. Each stage's output goes to `<run>/smoke-logs/`; a failure
prints the end of its log.

Without a GPU it stops with exit code 2, unless --allow-cpu: the same plan, every row on the cpu
launcher with the tiny preset (slow; for developing this module).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import registry
from pipeline.runs import HandoffError, Manifest

ROOT = Path(__file__).resolve().parent.parent
# the stages re-run under each multi-GPU launcher
RERUN = {"ddp": ("sft", "ppo"), "fsdp": ("sft", "rm", "ppo"), "zero2": ("sft", "ppo"), "zero3": ("sft", "rm", "ppo")}
# gradient accumulation 2 (2 micro-batches of 2 per process and step), with a global batch fit for the GPU count
ACCUMULATE = {("zero3", "sft"): ("batch.micro=2", "batch.size={4n}"),
              ("zero3", "rm"): ("batch.micro=2", "batch.size={4n}")}
FIRST_KL_TOLERANCE = 1e-4
PARENT = {name: s.parents[0] for name, s in registry.STAGES.items() if s.parents}

# Every stage gets the same (smaller) world: later stages check it matches their parent's.
COMMON = ("wandb.mode=disabled", "world.corpus_docs=4000", "world.sft_examples=2000", "world.eval_examples=16")
# Short runs that still cross a checkpoint (save_every) and an evaluation in every stage.
STAGE_ARGS = {
    "pretrain": ("steps=60", "optim.lr=1e-3", "optim.warmup_steps=10", "eval.every=30", "save_every=30"),
    "sft": ("steps=40", "optim.lr=5e-4", "save_every=20", "eval.max_new_tokens=48"),
    "rm": ("data.num_prompts=128", "epochs=1", "optim.lr=3e-4", "normalize.reference_size=256", "save_every=2"),
    "ppo": ("steps=4", "data.num_prompts=256", "eval.every=2", "eval.num_prompts=64", "save_every=2",
            "log_every=1"),
}
DEEPSPEED_MISSING = "deepspeed not installed"
NOT_FAILURES = ("--skip-deepspeed",)  # skips asked for: every other reason not to run fails the check


@dataclass(frozen=True)
class Row:
    stage: str
    check: str               # the launcher this row checks: gpu (cpu with --allow-cpu), fsdp, zero2, zero3
    launcher: str            # the ACCEL it runs with: `check`, or cpu with --allow-cpu
    stage_dir: Path          # where its manifest.json will be
    parent: Path | None      # the stage dir it starts from (an earlier row's)
    args: tuple[str, ...]    # key=value overrides for the stage
    nproc: int = 1           # processes (GPUs)

    @property
    def label(self) -> str:
        return self.launcher if self.launcher == self.check else f"{self.launcher} (in place of {self.check})"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pipeline.launch", self.stage, *self.args]

    def env(self) -> dict[str, str]:
        return {"NPROC": str(self.nproc), "ACCEL": self.launcher}


def plan(runs_dir: str | Path, name: str, cpu: bool = False, gpus: int = 1) -> list[Row]:
    """The rows to run, in order: each stage once on the default launcher (gpu, one process; cpu
    with `cpu`) in run `name`, then the RERUN stages under every multi-GPU launcher on `gpus`
    processes in run `name-<launcher>`, their parents in run `name`."""
    runs_dir = Path(runs_dir)
    default, preset = ("cpu", "tiny") if cpu else ("gpu", "small")
    rows: list[Row] = []

    def add(stage: str, check: str, nproc: int) -> None:
        run_name = name if check == default else f"{name}-{check}"
        parent = runs_dir / name / PARENT[stage] if stage in PARENT else None
        args = [f"run_name={run_name}", f"runs_dir={runs_dir}", *COMMON, *STAGE_ARGS[stage]]
        args += [a.replace("{4n}", str(4 * nproc)) for a in ACCUMULATE.get((check, stage), ())]
        if stage == "pretrain":
            args.insert(2, f"model.preset={preset}")
        if parent is not None:
            args.append(f"parent={parent}")
        rows.append(Row(stage, check, "cpu" if cpu else check, runs_dir / run_name / stage, parent, tuple(args), nproc))

    for stage in registry.CHAIN:
        add(stage, default, 1)
    for launcher, stages in RERUN.items():
        for stage in stages:
            add(stage, launcher, 1 if cpu else gpus)
    return rows


# ------------------------------------------------------------------------------------ results
@dataclass
class Outcome:
    rc: int | None = None        # the launch's exit status; None = not run
    skipped: str | None = None   # why it did not run
    seconds: float | None = None
    timed_out: bool = False


def first_kl(row: Row) -> float | None:
    """A ppo row's first iteration's measured KL (`ppo/kl`), from its metrics.jsonl."""
    from pipeline.runs import read_metrics

    path = row.stage_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(path) if "ppo/kl" in r] if path.exists() else []
    return rows[0]["ppo/kl"] if rows else None


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def result(row: Row, out: Outcome) -> dict:
    """One table row from the outcome and the stage's manifest.json."""
    r = {"stage": row.stage, "launcher": row.label, "procs": str(row.nproc), "time": "-", "peak": "-", "headline": "",
         "ok": False}
    if out.skipped:
        failed = out.skipped not in NOT_FAILURES
        r.update(status=f"{'failed' if failed else 'skipped'} ({out.skipped})", ok=not failed)
        return r
    try:
        m = Manifest.load(row.stage_dir / "manifest.json")
    except HandoffError:
        m = None
    kl = first_kl(row) if row.stage == "ppo" else None
    if out.timed_out:
        status = f"failed (timed out after {out.seconds:.0f}s)"
    elif out.rc:
        status = f"failed (exit {out.rc})"
    elif m is None:
        status = "failed (no manifest)"
    elif row.stage == "ppo" and (kl is None or abs(kl) > FIRST_KL_TOLERANCE):
        status = f"failed (first KL {kl}, not 0)"
    else:
        status = m.status
    r.update(status=status, ok=status == "complete")
    wall = m.wall_time_s if m is not None and m.wall_time_s is not None else out.seconds
    if wall is not None:
        r["time"] = f"{wall:.1f}"
    if m is not None:
        peak = m.metrics.get("perf/peak_gpu_memory_gib")
        if isinstance(peak, (int, float)):
            r["peak"] = f"{peak:.2f}"
        headline = m.extra.get("headline") or {}
        r["headline"] = "  ".join(f"{k}={_num(v)}" for k, v in list(headline.items())[:4])
    return r


def table(results: list[dict]) -> str:
    cols = [("stage", "stage", "<"), ("launcher", "launcher", "<"), ("procs", "procs", ">"), ("status", "status", "<"),
            ("time", "time (s)", ">"), ("peak", "peak GPU (GiB)", ">"), ("headline", "headline", "<")]
    width = {k: max(len(h), *(len(r[k]) for r in results)) for k, h, _ in cols}
    line = lambda get: "  ".join(f"{get(k, h):{a}{width[k]}}" for k, h, a in cols).rstrip()  # noqa: E731
    return "\n".join([line(lambda k, h: h)] + [line(lambda k, h, r=r: r[k]) for r in results])


def exit_status(results: list[dict]) -> int:
    return 0 if all(r["ok"] for r in results) else 1


# ------------------------------------------------------------------------------------ running
def deepspeed_importable() -> bool:
    """`import deepspeed` in a fresh interpreter (a broken install can fail in many ways, noisily)."""
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, cwd=ROOT)
    return proc.returncode == 0


def shown(row: Row) -> str:
    return " ".join(f"{k}={v}" for k, v in row.env().items()) + " python -m pipeline.launch " + \
        shlex.join([row.stage, *row.args])


def execute(rows: list[Row], log_dir: Path, skip: dict[str, str], timeout: float = 600.0) -> list[Outcome]:
    """Run the rows in order, each stopped after `timeout` seconds. `skip`: launcher -> reason. A
    row whose parent did not complete does not run either."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done: dict[Path, bool] = {}
    outcomes = []
    for i, row in enumerate(rows, 1):
        head = f"[gpu-smoke] {i}/{len(rows)} {row.stage} on {row.label}"
        if row.check in skip:
            out = Outcome(skipped=skip[row.check])
        elif row.parent is not None and not done.get(row.parent, False):
            out = Outcome(skipped=f"parent {row.parent.name} did not complete")
        else:
            log = log_dir / f"{i:02d}-{row.stage}-{row.check}.log"
            print(f"{head}: running (log: {log})", flush=True)
            t0 = time.time()
            timed_out = False
            with open(log, "w") as f:
                try:
                    rc = subprocess.call(row.command(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "WANDB_SILENT": "true", **row.env()}, timeout=timeout)
                except subprocess.TimeoutExpired:
                    rc, timed_out = 124, True
            out = Outcome(rc=rc, seconds=time.time() - t0, timed_out=timed_out)
            if rc == 0:
                print(f"{head}: exited 0 after {out.seconds:.0f}s", flush=True)
            else:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"{head}: exit {rc}; end of {log}:\n  " + "\n  ".join(tail), file=sys.stderr, flush=True)
        if out.skipped:
            print(f"{head}: skipped ({out.skipped})", flush=True)
        done[row.stage_dir] = out.rc == 0 and result(row, out)["ok"]
        outcomes.append(out)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.gpu_smoke", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    ap.add_argument("--runs-dir", default="runs", help="root of the smoke's runs (default: runs)")
    ap.add_argument("--skip-deepspeed", action="store_true",
                    help="skip the zero2/zero3 rows (without this flag and without deepspeed they fail)")
    ap.add_argument("--row-timeout", type=float, default=600.0, help="seconds a row may run before it fails")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="no GPU: run the same plan on the cpu launcher with the tiny preset (slow)")
    opts = ap.parse_args(argv)

    import torch

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not opts.dry_run and not opts.allow_cpu:
        print("error: no GPU is visible (torch.cuda.is_available() is false); this check needs one.\n"
              "  --dry-run prints its commands; --allow-cpu runs them on the CPU with the tiny preset (slow).",
              file=sys.stderr)
        return 2
    cpu = opts.allow_cpu and not has_gpu
    name = f"gpu-smoke-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_dir = Path(opts.runs_dir).resolve()
    if runs_dir.is_relative_to(ROOT):  # the stages run in ROOT: keep their commands short
        runs_dir = runs_dir.relative_to(ROOT)
    rows = plan(runs_dir, name, cpu=cpu, gpus=torch.cuda.device_count() if has_gpu else 1)
    if opts.skip_deepspeed:
        skip = {"zero2": "--skip-deepspeed", "zero3": "--skip-deepspeed"}
    elif not deepspeed_importable():
        skip = {"zero2": DEEPSPEED_MISSING, "zero3": DEEPSPEED_MISSING}
    else:
        skip = {}

    if opts.dry_run:
        for row in rows:
            why = skip.get(row.check)
            note = f"  # {'skipped' if why in NOT_FAILURES else 'fails'} ({why})" if why else ""
            print(shown(row) + note)
        return 0
    t0 = time.time()
    outcomes = execute(rows, ROOT / runs_dir / name / "smoke-logs", skip, opts.row_timeout)
    results = [result(row, out) for row, out in zip(rows, outcomes)]
    print(f"\ngpu smoke: runs {runs_dir / name}*, {time.time() - t0:.0f}s in all")
    print(table(results), flush=True)
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
