"""The end-to-end driver: pretrain -> sft -> rm -> ppo in one run, with automatic handoff.

Each stage runs in its own `accelerate launch` process (so a stage's memory is freed before the
next starts, and NPROC/ACCEL apply to all). A stage whose manifest is complete is skipped; a
failed stage stops the chain and leaves earlier stages untouched.

On the built-in world, a second PPO run from the same reward model with the other PPO-ptx
setting follows (`runs/<run>-ptx-ablation/ppo`): the report's alignment-tax table compares SFT,
PPO and PPO-ptx on the test prompts (docs/ppo.md §38). With `likelihood_ablation` (the study's
cells), PPO also runs from a reward model without its likelihood term (`runs/<run>-no-likelihood/`).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

from pipeline import registry, runs
from pipeline.launch import exit_code, launch_command
from pipeline.report import ablation_run, likelihood_ablation_run, manifest_at


PTX_ABLATION_COEF = 1.0  # γ of the ablation run when the pipeline's own PPO runs without ptx (the default γ)


def run_pipeline(run_name: str, runs_dir: str, from_stage: str | None, stages: list[str], overrides: list[str],
                 ptx_ablation: bool = True, likelihood_ablation: bool = False) -> int:
    bad = [s for s in stages if s not in registry.STAGES]
    if bad:
        print(f"error: unknown stage(s) {', '.join(bad)}; stages are {', '.join(registry.NAMES)}", file=sys.stderr)
        return 2
    forced = registry.descendants(from_stage) if from_stage else set()
    t0 = time.time()
    for stage in registry.ordered(stages):
        if importlib.util.find_spec(registry.get(stage).module) is None:
            print(f"[pipeline] stage '{stage}' is not available in this version; stopping here", flush=True)
            break
        manifest = runs.stage_dir(runs_dir, run_name, stage) / "manifest.json"
        if stage not in forced and manifest.exists() and runs.Manifest.load(manifest).complete:
            print(f"[pipeline] {stage}: complete, skipping (FROM={stage} re-runs it)", flush=True)
            continue
        args = [f"run_name={run_name}", f"runs_dir={runs_dir}", *stage_overrides(overrides, stage)]
        if stage in forced:
            args.append("resume=false")
        print(f"[pipeline] {stage}: starting", flush=True)
        rc, error = run_stage(launch_command(stage, args))
        if rc != 0:
            _summary(runs_dir, run_name)
            print(f"[pipeline] {stage} failed (exit {rc}); earlier stages are kept. Fix the error and re-run: "
                  f"completed stages are skipped.", file=sys.stderr, flush=True)
            if error:  # the stage's own message, last: what the user must act on
                print(error, file=sys.stderr, flush=True)
            return rc
    if ptx_ablation and "ppo" in stages:
        rc = _ptx_ablation(run_name, runs_dir, "ppo" in forced, overrides)
        if rc != 0:
            return rc
    if likelihood_ablation and "ppo" in stages:
        rc = _likelihood_ablation(run_name, runs_dir, overrides)
        if rc != 0:
            return rc
    _summary(runs_dir, run_name)
    print(f"[pipeline] total time {time.time() - t0:.0f}s", flush=True)
    return 0


def _judged_ppo(runs_dir: str, run_name: str) -> runs.Manifest | None:
    """The run's ppo manifest when the stage is complete and a gold labeler judged it (the world)."""
    m = manifest_at(runs.stage_dir(runs_dir, run_name, "ppo"))
    return m if m is not None and m.config.get("data", {}).get("source", "world") == "world" else None


def ptx_ablation_args(run_name: str, runs_dir: str, overrides: list[str]) -> list[str] | None:
    """The ablation run's arguments: PPO from this run's reward model with the other ptx setting
    (γ = 0 if the run used ptx, else PTX_ABLATION_COEF) and no best-of-n baseline; None when the
    run's PPO has no gold labeler to judge it (user prompts) or is not complete."""
    m = _judged_ppo(runs_dir, run_name)
    if m is None:
        return None
    coef = float(m.config.get("ptx", {}).get("coef", 0.0))
    rm_dir = runs.stage_dir(runs_dir, run_name, "rm")
    # No best-of-n: it samples the same SFT policy and ranks with the same RM as the run's own. No
    # valid-curve points between the first and the last: the report reads only its test figures.
    return [f"run_name={ablation_run(run_name)}", f"runs_dir={runs_dir}", *stage_overrides(overrides, "ppo"),
            f"parent={rm_dir}", "eval.best_of=[]", "eval.every=0", f"ptx.coef={0.0 if coef > 0 else PTX_ABLATION_COEF}"]


def _ptx_ablation(run_name: str, runs_dir: str, forced: bool, overrides: list[str]) -> int:
    args = ptx_ablation_args(run_name, runs_dir, overrides)
    if args is None:
        return 0
    manifest = runs.stage_dir(runs_dir, ablation_run(run_name), "ppo") / "manifest.json"
    if not forced and manifest.exists() and runs.Manifest.load(manifest).complete:
        print("[pipeline] ppo ptx ablation: complete, skipping", flush=True)
        return 0
    print(f"[pipeline] ppo ptx ablation ({args[-1]}, for the alignment-tax table): starting", flush=True)
    rc, error = run_stage(launch_command("ppo", args + (["resume=false"] if forced else [])))
    if rc != 0:
        print(f"[pipeline] the ptx ablation failed (exit {rc}); the run itself is complete. Re-run to retry, or pass "
              f"--no-ptx-ablation.", file=sys.stderr, flush=True)
        if error:
            print(error, file=sys.stderr, flush=True)
    return rc


def likelihood_ablation_args(run_name: str, runs_dir: str, overrides: list[str]) -> dict[str, list[str]] | None:
    """PPO without the reward model's likelihood term (`runs/<run>-no-likelihood/`): a reward
    model from the run's SFT model with `likelihood_term=false`, then PPO from it as the run's own
    (no best-of-n, no curve points between the first and the last); {stage: arguments}, or None
    when the run's PPO is not complete or has no gold labeler to judge it (user prompts)."""
    if _judged_ppo(runs_dir, run_name) is None:
        return None
    run = likelihood_ablation_run(run_name)
    return {"rm": [f"parent={runs.stage_dir(runs_dir, run_name, 'sft')}", *stage_overrides(overrides, "rm"),
                   "likelihood_term=false"],
            "ppo": [*stage_overrides(overrides, "ppo"), f"parent={runs.stage_dir(runs_dir, run, 'rm')}",
                    "eval.best_of=[]", "eval.every=0"]}


def _likelihood_ablation(run_name: str, runs_dir: str, overrides: list[str]) -> int:
    args = likelihood_ablation_args(run_name, runs_dir, overrides)
    if args is None:
        return 0
    run = likelihood_ablation_run(run_name)
    for stage in ("rm", "ppo"):
        rc = run_variants(stage, runs_dir, [(f"{stage} without the likelihood term", run, args[stage])], "pipeline")
        if rc != 0:
            return rc
    return 0


def run_variants(stage: str, runs_dir: str, variants: list[tuple[str, str, list[str]]], tag: str) -> int:
    """Run `stage` once per (label, run name, arguments) of a sweep (`pipeline.overopt`,
    `pipeline.rm_curve`), skipping a run whose stage is complete (an interrupted one resumes from its
    own checkpoints); the first failure stops the sweep, its error last, the finished runs kept."""
    for i, (label, run, args) in enumerate(variants, 1):
        if manifest_at(runs.stage_dir(runs_dir, run, stage)) is not None:
            print(f"[{tag}] {label}: complete, skipping", flush=True)
            continue
        print(f"[{tag}] {label} ({i}/{len(variants)}): {stage} starting", flush=True)
        rc, error = run_stage(launch_command(stage, [f"run_name={run}", f"runs_dir={runs_dir}", *args]))
        if rc != 0:
            print(f"[{tag}] {label} failed (exit {rc}); the finished runs are kept: re-run the same command to resume",
                  file=sys.stderr, flush=True)
            if error:
                print(error, file=sys.stderr, flush=True)
            return rc
    return 0


def run_stage(cmd: list[str]) -> tuple[int, str | None]:
    """Run one stage, passing its stderr through; returns (exit status, its last error message:
    the `error...` line and the indented lines under it)."""
    env = dict(os.environ)
    env.setdefault("WANDB_SILENT", "true")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    error: list[str] = []
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("error"):
            error = [line.rstrip()]
        elif error and line.startswith("  "):
            error.append(line.rstrip())
    while True:
        try:
            return exit_code(proc.wait()), "\n".join(error) or None
        except KeyboardInterrupt:  # Ctrl-C reached the stage too: let it stop cleanly
            continue


def stage_overrides(overrides: list[str], stage: str) -> list[str]:
    """`key=v` goes to every stage; `<stage>.key=v` (e.g. `ppo.steps=20`) only to that one."""
    out = []
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in registry.STAGES and "=" in rest:
            if head == stage:
                out.append(rest)
        else:
            out.append(item)
    return out


def _summary(runs_dir: str, run_name: str) -> None:
    from pipeline.report import write_report

    print(f"\nrun '{run_name}'")
    print(runs.format_table(runs.run_status(runs_dir, run_name)), flush=True)
    print(f"report: {write_report(runs_dir, run_name)}", flush=True)
