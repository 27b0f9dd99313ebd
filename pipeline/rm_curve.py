"""`python -m pipeline rm-curve` (`make rm-curve`): the reward model's learning curve, held-out
accuracy against the number of comparisons it trained on.

After `make pipeline`, the rm stage runs again from the run's SFT model once per size
(`runs/<name>-n<N>/rm`, `data.num_prompts=N`: the first N of the same comparison prompts; `<name>`
is `<run>-rmcurve` unless `--name` says otherwise),
each judged on the same held-out comparisons (the test prompts' ranked samples). The run's own
reward model is the curve's point at its size (unless settings are passed to the sweep). Beside the whole score: accuracy on the pairs only
correctness decides and on the pairs only style decides, the likelihood term alone (the frozen SFT
model's judgement, which needs no comparison) and the head alone, and the score's length bias
next to the gold judge's. If accuracy at the smallest size is already the largest's, the world's
preferences are too easy to show a reward model learning.

Outputs `runs/<name>/rm_curve.md`, `rm_curve.json` and `rm_curve.png`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import runs
from pipeline.report import manifest_at

SIZES = (25, 50, 100, 250, 500, 1000)  # comparisons (prompts, K responses each); 1000 is the rm default
COLUMNS = (("eval/pairwise_accuracy", "all pairs"),
           ("eval/pairwise_accuracy/correctness_pairs", "correctness pairs"),
           ("eval/pairwise_accuracy/style_pairs", "style pairs"),
           ("eval/pairwise_accuracy/likelihood_only_correctness_pairs", "likelihood alone, correctness pairs"),
           ("eval/pairwise_accuracy/head_only", "head alone"),
           ("eval/length_corr", "length corr."))


def run_name(name: str, n: int) -> str:
    return f"{name}-n{n}"


def _own_size(run: str, runs_dir: str, reuse: bool):
    """(the run's own complete reward model, its number of comparison prompts), or (None, None)."""
    own = manifest_at(runs.stage_dir(runs_dir, run, "rm")) if reuse else None
    return own, (own.config.get("data", {}).get("num_prompts") if own else None)


def points(run: str, runs_dir: str, sizes: list[int], name: str, reuse: bool = True) -> list[dict]:
    """One point per finished size: the comparisons trained on and the rm manifest's figures (with
    `reuse`, the run's own reward model where its size is one of `sizes`)."""
    own, own_n = _own_size(run, runs_dir, reuse)
    out = []
    for n in sizes:
        m = own if n == own_n else manifest_at(runs.stage_dir(runs_dir, run_name(name, n), "rm"))
        if m is None:
            continue
        out.append({"num_prompts": n, "comparisons": m.metrics.get("data/comparisons"),
                    "ranked_pairs": m.metrics.get("data/ranked_pairs"), "wall_s": m.wall_time_s,
                    "gold_length_corr": m.metrics.get("eval/gold_length_corr"),
                    "held_out_pairs": m.metrics.get("eval/pairs"), **{k: m.metrics.get(k) for k, _ in COLUMNS}})
    return out


def _cell(v, pct=True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:+.2f}"


def render(run: str, pts: list[dict], machine: str, overrides: list[str] | None = None) -> str:
    out = ["# The reward model's learning curve", "",
           f"Run `{run}`'s SFT model, the rm stage trained on the first N comparison prompts (K responses each, ranked "
           "by the gold judge); every row judged on the same held-out comparisons. Ranked pairs: the training pairs "
           f"(all-tie comparisons carry none). On {machine}."
           + (f" Settings: `{' '.join(overrides)}`." if overrides else ""), "",
           "| comparisons | ranked pairs | " + " | ".join(name for _, name in COLUMNS) + " | judge's length corr. | "
           "wall time (s) |", "|---" * (len(COLUMNS) + 4) + "|"]
    for p in pts:
        cells = [_cell(p[k], pct=(k != "eval/length_corr")) for k, _ in COLUMNS]
        out.append(f"| {p['comparisons']} | {p['ranked_pairs']} | " + " | ".join(cells)
                   + f" | {_cell(p['gold_length_corr'], pct=False)} | {p['wall_s']:.0f} |")
    if len(pts) > 1 and None not in (pts[0]["eval/pairwise_accuracy"], pts[-1]["eval/pairwise_accuracy"]):
        gain = pts[-1]["eval/pairwise_accuracy"] - pts[0]["eval/pairwise_accuracy"]
        out += ["", f"From {pts[0]['comparisons']} to {pts[-1]['comparisons']} comparisons, held-out accuracy "
                    f"changed by {100 * gain:+.1f} points over {pts[-1]['held_out_pairs']} held-out pairs (pairs of a "
                    "prompt are not independent: a difference of a few points is within the seed spread)."]
    return "\n".join(out + ["", "![learning curve](rm_curve.png)", ""])


def plot(pts: list[dict], path: Path) -> bool:
    from pipeline.plots import pyplot

    if not pts:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [p["comparisons"] for p in pts]
    for key, name in COLUMNS[:5]:
        ys = [p[key] for p in pts]
        if None not in ys:
            ax.plot(xs, ys, "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training comparisons")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def run_curve(run: str, runs_dir: str, sizes: list[int], overrides: list[str], name: str | None = None) -> int:
    from pipeline.driver import run_variants
    from pipeline.runtime import machine

    if manifest_at(runs.stage_dir(runs_dir, run, "sft")) is None:
        print(f"error: run '{run}' has no complete sft stage ({runs.stage_dir(runs_dir, run, 'sft')}); run "
              f"`make pipeline RUN={run}` (or `make sft RUN={run}`) first", file=sys.stderr)
        return 2
    name = name or f"{run}-rmcurve"
    reuse = not overrides  # the run's own reward model was trained without the sweep's settings
    _, own_n = _own_size(run, runs_dir, reuse)
    variants = [(f"{n} comparisons", run_name(name, n),
                 [f"parent={runs.stage_dir(runs_dir, run, 'sft')}", *overrides, f"data.num_prompts={n}"])
                for n in sizes if n != own_n]
    rc = run_variants("rm", runs_dir, variants, "rm-curve")
    if rc != 0:
        return rc
    pts = points(run, runs_dir, sizes, name, reuse)
    home = Path(runs_dir) / name
    home.mkdir(parents=True, exist_ok=True)
    plot(pts, home / "rm_curve.png")
    where = machine()
    runs.write_result(home, "rm_curve", {"run": run, "overrides": overrides, "points": pts, "machine": where},
                      render(run, pts, where, overrides), "rm-curve")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline rm-curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="default", help="the run whose SFT model the reward models start from")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated numbers of comparison prompts")
    p.add_argument("--name", default=None, help="the sweep's name: runs/<name>-n<N>/ and runs/<name>/ (default "
                                               "<run>-rmcurve; give each set of settings its own)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every rm run")
    a = p.parse_args(argv)
    return run_curve(a.run, a.runs_dir, [int(x) for x in a.sizes.split(",") if x], a.overrides, a.name)
