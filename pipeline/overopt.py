"""`python -m pipeline overopt` (`make overopt`): reward-model over-optimization measured (Gao et al.
2022, "Scaling Laws for Reward Model Overoptimization", arXiv 2210.10760).

After `make pipeline`, PPO runs again from the run's reward model once per KL coefficient β
(`runs/<name>-b<β>/ppo`, `<name>` being `<run>-overopt` unless `--name` says otherwise; long enough for the policy to drift far from SFT), each drawing its
curve along training on the test prompts (`eval.curve_split=test`: the curve chooses nothing, and it
lies on the prompts of best-of-n). The first run also draws best-of-n of SFT samples for n up to
64, its KL estimated from the samples (`stages.policy_eval.best_of_n`). Every curve, gold score and
RM score gained over its start against d = √KL, gets Gao et al.'s fits: R(d) = d(α − βd), their
best-of-n form, and R(d) = d(α − β log d), their RL form. Both are linear in α and β (least squares
through the origin). A curve whose gold turns down while its RM score climbs is over-optimization.

Outputs `runs/<name>/overopt.md`, `overopt.json` and `overopt.png`. A finished β run is
skipped, an interrupted one resumes (the ppo stage's own checkpoints).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pipeline import runs
from pipeline.report import manifest_at

BETAS = (0.1, 0.03, 0.01)  # the ppo default, and two that let the policy drift further
STEPS = 150                # iterations per run: the default's KL has levelled off by 40 at β = 0.1
EVERY = 10                 # a curve point every this many iterations
BEST_OF = (1, 2, 4, 8, 16, 32, 64)
NOISE = 0.1  # gold: about the spread of one curve point (a mean over ~200 test prompts, one sample each)
FORMS = {"bon": "d(α − βd)", "rl": "d(α − β log d)"}


def fit(ds: list[float], gains: list[float], form: str) -> dict | None:
    """Least-squares α, β of gain ≈ d(α − β g(d)), g(d) = d (`bon`) or log d (`rl`), through the
    origin; with R² and where the fitted curve peaks (d*, its gain and KL = d*²; none when β ≤ 0,
    a curve still rising). None with fewer than two points off the origin."""
    pts = [(d, r) for d, r in zip(ds, gains) if d > 0]
    if len(pts) < 2:
        return None
    g = (lambda d: d * d) if form == "bon" else (lambda d: d * math.log(d))
    # normal equations of r = α·d − β·g(d)
    sdd = sum(d * d for d, _ in pts)
    sdg = sum(d * g(d) for d, _ in pts)
    sgg = sum(g(d) ** 2 for d, _ in pts)
    sdr = sum(d * r for d, r in pts)
    sgr = sum(g(d) * r for d, r in pts)
    det = sdd * sgg - sdg * sdg
    if abs(det) < 1e-12:
        return None
    alpha = (sdr * sgg - sgr * sdg) / det
    beta = (sdr * sdg - sgr * sdd) / det
    pred = [alpha * d - beta * g(d) for d, _ in pts]
    mean = sum(gains) / len(gains)
    ss_res = sum((r - p) ** 2 for (_, r), p in zip(pts, pred))
    ss_tot = sum((r - mean) ** 2 for r in gains)
    out = {"form": FORMS[form], "alpha": alpha, "beta": beta, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}
    if beta > 0:
        d_star = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
        out |= {"peak_d": d_star, "peak_kl": d_star ** 2, "peak_gain": alpha * d_star - beta * g(d_star)}
    return out


def curve_from_metrics(rows: list[dict]) -> list[dict]:
    """The curve along training of one ppo run's `metrics.jsonl`: per evaluation, its step, KL to
    SFT (nats per response), gold and RM score, in step order (the last record of a step wins: a
    resumed run re-logs it)."""
    by_step = {r["step"]: r for r in rows if "eval/kl" in r and "eval/gold_score" in r}
    return [{"step": s, "kl": by_step[s]["eval/kl"], "gold": by_step[s]["eval/gold_score"],
             "rm": by_step[s].get("eval/rm_score")} for s in sorted(by_step)]


def best_of_n_curve(evaluation: dict) -> list[dict]:
    """Best-of-n of SFT samples on the test prompts (the ppo manifest's evaluation), as curve points."""
    return [{"n": b["n"], "kl": b["kl"], "gold": b["gold_score"], "rm": b["rm_score"]}
            for b in sorted(evaluation.get("best_of_n", []), key=lambda b: b["n"])]


def analyse(points: list[dict]) -> dict:
    """One curve's gains over its first point (KL 0: the SFT policy) and both fits, for gold and RM
    score; where measured gold peaked, and how far it fell after."""
    ds = [math.sqrt(max(p["kl"], 0.0)) for p in points]
    out: dict = {"points": points}
    for key in ("gold", "rm"):
        if any(p.get(key) is None for p in points):
            continue
        gains = [p[key] - points[0][key] for p in points]
        out[key] = {"gains": gains, "fits": {form: fit(ds, gains, form) for form in FORMS}}
    top = max(range(len(points)), key=lambda i: points[i]["gold"])
    out["gold_peak"] = {"kl": points[top]["kl"], "gold": points[top]["gold"], "last_kl": points[-1]["kl"],
                        "drop_after": points[top]["gold"] - points[-1]["gold"]}
    return out


def run_name(name: str, beta: float) -> str:
    return f"{name}-b{beta:g}"


def sweep_args(run: str, runs_dir: str, beta: float, steps: int, every: int, best_of: list[int],
               overrides: list[str]) -> list[str]:
    """One β run's ppo arguments: from the run's reward model, the curve on the test prompts."""
    rm_dir = runs.stage_dir(runs_dir, run, "rm")
    return [f"parent={rm_dir}", *overrides,
            f"objective.kl_coef={beta:g}", f"steps={steps}", f"eval.every={every}", "eval.curve_split=test",
            f"eval.best_of=[{','.join(map(str, best_of))}]"]


def collect(run: str, runs_dir: str, betas: list[float], name: str) -> dict:
    """Every finished β run's curve and best-of-n (from the first run that drew it), analysed."""
    curves, bon = [], None
    for beta in betas:
        stage = runs.stage_dir(runs_dir, run_name(name, beta), "ppo")
        m = manifest_at(stage)
        if m is None:
            continue
        curve = analyse(curve_from_metrics(runs.read_metrics(stage / "metrics.jsonl")))
        curves.append({"label": f"PPO β={beta:g}", "beta": beta, "wall_s": m.wall_time_s} | curve)
        points = best_of_n_curve((m.extra or {}).get("evaluation") or {})
        if bon is None and len(points) > 1:
            bon = {"label": "best-of-n of SFT"} | analyse(points)
    return {"run": run, "curves": curves, "best_of_n": bon}


def _fmt_fit(f: dict | None) -> str:
    if not f:
        return "-"
    peak = f" peak KL {f['peak_kl']:.2f}" if "peak_kl" in f else " still rising"
    return f"α {f['alpha']:.3f}, β {f['beta']:.3f}, R² {f['r2']:.2f};{peak}"


def render(result: dict, wall_s: float | None, machine: str) -> str:
    rows = [*result["curves"], *([result["best_of_n"]] if result["best_of_n"] else [])]
    out = ["# Over-optimization: gold and RM score against KL", "",
           f"Run `{result['run']}`'s reward model; every point on its test prompts, sampled at the evaluation's "
           "temperature; KL to the SFT policy in nats per response (best-of-n: estimated from its samples). Gains are "
           "over each curve's start (the SFT policy). Fits of Gao et al. (2022), d = √KL: "
           f"{FORMS['bon']} (their best-of-n form) and {FORMS['rl']} (their RL form)."
           + (f" The ppo runs took {wall_s / 60:.0f} min on {machine}." if wall_s else f" On {machine}."), "",
           "| curve | points | last KL | gold gain: peak (at KL) | gold gain: last | gold fit d(α − βd) | "
           "gold fit d(α − β log d) | RM gain: last | RM fit d(α − βd) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        pk, g0 = c["gold_peak"], c["points"][0]["gold"]
        gold, rm = c.get("gold", {}), c.get("rm", {})
        out.append(f"| {c['label']} | {len(c['points'])} | {c['points'][-1]['kl']:.2f} | "
                   f"{pk['gold'] - g0:+.3f} ({pk['kl']:.2f}) | {gold.get('gains', [0])[-1]:+.3f} | "
                   f"{_fmt_fit(gold.get('fits', {}).get('bon'))} | {_fmt_fit(gold.get('fits', {}).get('rl'))} | "
                   + (f"{rm['gains'][-1]:+.3f} | {_fmt_fit(rm['fits'].get('bon'))} |" if rm else "- | - |"))
    fell = [(c["label"], c["gold_peak"]["drop_after"]) for c in result["curves"]
            if c["gold_peak"]["kl"] < c["points"][-1]["kl"] and c["gold_peak"]["drop_after"] > 0]
    out += ["", f"Gold fell after its peak by more than {NOISE:g} (about the noise of one curve point, a mean over the "
                "test prompts of one sample each) in: " + (", ".join(f"{n} (by {d:.3f})" for n, d in fell if d > NOISE)
                                                          or "none")
            + "; by less in: " + (", ".join(f"{n} ({d:.3f})" for n, d in fell if d <= NOISE) or "none") + ".",
            "", "![over-optimization](overopt.png)", ""]
    return "\n".join(out)


def plot(result: dict, path: Path) -> bool:
    from pipeline.plots import pyplot

    rows = [*result["curves"], *([result["best_of_n"]] if result["best_of_n"] else [])]
    if not rows:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("gold", "rm")):
        for i, c in enumerate(rows):
            if key not in c:
                continue
            ds = [math.sqrt(max(p["kl"], 0.0)) for p in c["points"]]
            line, = ax.plot(ds, c[key]["gains"], "s" if "n" in c["points"][0] else "o", label=c["label"], color=f"C{i}")
            f = c[key]["fits"].get("bon")
            if f:
                xs = [max(ds) * j / 50 for j in range(51)]
                ax.plot(xs, [x * (f["alpha"] - f["beta"] * x) for x in xs], "--", color=line.get_color(), alpha=0.7)
        ax.set_xlabel("d = √KL to the SFT policy (nats per response)")
        ax.set_ylabel(f"{'gold' if key == 'gold' else 'RM'} score gained over SFT")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("over-optimization on the test prompts; dashed: fit d(α − βd)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def run_sweep(run: str, runs_dir: str, betas: list[float], steps: int, every: int, best_of: list[int],
              overrides: list[str], name: str | None = None) -> int:
    from pipeline.driver import run_variants
    from pipeline.runtime import machine

    if manifest_at(runs.stage_dir(runs_dir, run, "rm")) is None:
        print(f"error: run '{run}' has no complete rm stage ({runs.stage_dir(runs_dir, run, 'rm')}); run "
              f"`make pipeline RUN={run}` first", file=sys.stderr)
        return 2
    name = name or f"{run}-overopt"
    home = Path(runs_dir) / name
    home.mkdir(parents=True, exist_ok=True)
    variants = [(f"β={b:g}", run_name(name, b), sweep_args(run, runs_dir, b, steps, every, best_of if i == 0 else [],
                                                          overrides)) for i, b in enumerate(betas)]
    rc = run_variants("ppo", runs_dir, variants, "overopt")
    if rc != 0:
        return rc
    result = collect(run, runs_dir, betas, name) | {"overrides": overrides}
    walls = [c["wall_s"] for c in result["curves"]]
    wall = sum(walls) if walls and None not in walls else None  # the runs' own times: the same after a resume
    result["wall_s"] = wall
    result["machine"] = machine()
    plot(result, home / "overopt.png")
    runs.write_result(home, "overopt", result, render(result, wall, result["machine"]), "overopt")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline overopt", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="default", help="the run whose reward model PPO optimizes (runs/<run>/rm)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS), help="comma-separated KL coefficients β")
    p.add_argument("--steps", type=int, default=STEPS, help="PPO iterations per β")
    p.add_argument("--every", type=int, default=EVERY, help="a curve point every N iterations")
    p.add_argument("--best-of", default=",".join(map(str, BEST_OF)), help="best-of-n values drawn by the first run")
    p.add_argument("--name", default=None, help="the sweep's name: runs/<name>-b<β>/ and runs/<name>/ (default "
                                               "<run>-overopt; give each set of settings its own)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every ppo run")
    a = p.parse_args(argv)
    return run_sweep(a.run, a.runs_dir, [float(x) for x in a.betas.split(",") if x], a.steps, a.every,
                     [int(x) for x in a.best_of.split(",") if x], a.overrides, a.name)
