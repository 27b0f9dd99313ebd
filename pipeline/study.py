"""`python -m pipeline study` (`make study`): the built-in world's pipeline over world seeds ×
training seeds, and one table of every policy and baseline with its spread over the seeds.

One seed of one world says little: the same 200 test prompts scored every round of development,
and a training seed moves accuracy by more than a run's own interval. A study runs the whole
pipeline (`pipeline.driver.run_pipeline`, the ptx ablation and PPO without the reward model's
likelihood term included) once per cell, a world seed
(`world.seed`: other people, facts and prompts) and a training seed (`seed`), and reads each cell's
test evaluation into `runs/<study>/cells/w<world>-s<seed>.json` as soon as it ends: an interrupted
study resumes at the first cell without one (and inside that cell at its first incomplete stage).

The default world seeds are fresh: no default of any stage was chosen on them (development used
the default world, `world.seed` 1234). The output, `runs/<study>/study.md` and `study.json`:
per row (policy or baseline, per decoding) the mean ± sd over cells of gold score, accuracy,
hallucination, abstention and KL; per comparison with PPO, the mean gold difference, in how many
cells PPO's paired bootstrap interval over prompts lies above 0, and an exact sign-flip test over
the cells' mean differences.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

from pipeline import registry, runs
from pipeline.runtime import machine
from pipeline.stats import paired_bootstrap
from pipeline.world import KNOWN_UNKNOWN_SKILLS

WORLD_SEEDS = (9101, 9102, 9103)  # fresh worlds: no default was tuned on them (the default world is 1234)
SEEDS = (0, 1)
METRICS = ("gold", "accuracy", "hallucination", "abstain", "kl")
AUROCS = ("confidence_auroc", "probe_auroc",  # stages/self_knowledge.py, overall and per kind of question
          *(f"{k}_auroc_{s}" for s in KNOWN_UNKNOWN_SKILLS for k in ("confidence", "probe")))
KNOWLEDGE = ("parent_knows", "hallucination_known", "hallucination_unknown")  # sft_eval.knowledge_split
BY_SKILL = tuple(f"hallucination_{s}" for s in KNOWN_UNKNOWN_SKILLS)  # where the wrong answers are: facts, sums


def cell_name(study: str, world_seed: int, seed: int) -> str:
    """The run directory of one cell: `runs/<study>-w<world seed>-s<seed>/`."""
    return f"{study}-w{world_seed}-s{seed}"


def _value(summary: dict, key: str):
    v = summary.get(key)
    return v.get("value") if isinstance(v, dict) else v


def _entry(summary: dict, golds: list[float] | None, kl=None, wall=None) -> dict:
    skills = summary.get("skills") or {}
    return {"gold": summary.get("gold_score"), "accuracy": _value(summary, "accuracy"),
            "hallucination": _value(summary, "hallucination"), "abstain": _value(summary, "abstain"),
            "kl": kl, "wall_s": wall, "golds": golds,
            **{k: _value(skills.get(s) or {}, "hallucination") for k, s in zip(BY_SKILL, KNOWN_UNKNOWN_SKILLS)}}


def cell_rows(run_dir: Path) -> dict[str, dict]:
    """`{row name: {gold, accuracy, hallucination, abstain, kl, wall_s, golds}}` of one finished
    run, from what its stages wrote (the ppo manifest's test evaluation, the ptx ablation's and
    every other policy stage's, e.g. dpo): the SFT policy, its baselines and each trained policy,
    per decoding (`greedy`, `sampled`). `golds`: the per-prompt gold scores on the test prompts, in
    the evaluation's order, for paired comparisons."""
    from pipeline.report import ablation_run, likelihood_ablation_run, manifest_at

    out: dict[str, dict] = {}
    ppo = manifest_at(run_dir / "ppo")
    if ppo is None:
        raise ValueError(f"{run_dir}: its ppo stage is not complete")
    evaluation = ppo.extra.get("evaluation") or {}
    for dec, c in evaluation.get("comparisons", {}).items():
        out[f"{dec}/SFT"] = _entry(c["sft"], c.get("sft_golds"), 0.0 if dec == "sampled" else None)
        if dec == "greedy":  # does SFT know what it knows (stages/self_knowledge.py)
            out[f"{dec}/SFT"] |= {k: (evaluation.get("self_knowledge") or {}).get(k) for k in AUROCS}
            sft = manifest_at(run_dir / "sft")
            split = ((sft.extra.get("evaluation") or {}) if sft else {}).get("parent_knowledge") or {}
            out[f"{dec}/SFT"] |= {k: split[k]["value"] if k in split else None for k in KNOWLEDGE}
        for name, b in evaluation.get("baselines", {}).get(dec, {}).items():
            out[f"{dec}/{name.replace('sft', 'SFT')}"] = _entry(b["policy"], b.get("golds"))
    for b in evaluation.get("best_of_n", []):
        if b["n"] > 1:
            out[f"sampled/best-of-{b['n']}"] = _entry(b, b.get("golds"), b.get("kl"))
    policies = [("PPO", ppo)]
    ablation = manifest_at(run_dir.parent / ablation_run(run_dir.name) / "ppo")
    if ablation is not None:
        coef = float(ablation.config.get("ptx", {}).get("coef", 0.0))
        policies.append(("PPO-ptx" if coef > 0 else "PPO without ptx", ablation))
    no_likelihood = manifest_at(run_dir.parent / likelihood_ablation_run(run_dir.name) / "ppo")
    if no_likelihood is not None:
        policies.append(("PPO without likelihood term", no_likelihood))
    for name in registry.NAMES:  # every other policy stage evaluated against SFT (e.g. dpo)
        m = manifest_at(run_dir / name)
        evaluation = (m.extra or {}).get("evaluation") if m is not None and name != "ppo" else None
        if isinstance(evaluation, dict) and evaluation.get("comparisons"):
            policies.append((name.upper() if len(name) <= 4 else name, m))
    for label, m in policies:
        for dec, c in (m.extra.get("evaluation") or {}).get("comparisons", {}).items():
            out[f"{dec}/{label}"] = _entry(c["policy"], c.get("golds"), c["policy"].get("kl"), m.wall_time_s)
    return out


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact sign-flip (permutation) test of mean(diffs) = 0 over paired cells: the share
    of the 2^n sign assignments whose |mean| is at least the observed one (Fisher 1935)."""
    n = len(diffs)
    if n == 0:
        return float("nan")
    observed = abs(sum(diffs)) - 1e-12
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed
               for signs in itertools.product((1, -1), repeat=n))
    return hits / 2 ** n


FORMATS = {"gold": ".3f", "accuracy": "%", "hallucination": "%", "abstain": "%", "kl": ".2f", "wall_s": ".0f",
           **{k: ".2f" for k in AUROCS}, **{k: "%" for k in (*KNOWLEDGE, *BY_SKILL)}}


def _mean_sd(values: list, fmt: str = ".3f") -> str:
    """`mean ± sd` over the cells that have a value (`%`: as a percentage with one decimal)."""
    xs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    if fmt == "%":
        return f"{100 * statistics.mean(xs):.1f}% ± {100 * sd:.1f}"
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"


def aggregate(cells: dict[str, dict[str, dict]]) -> dict:
    """The study's result from every cell's rows (`cell_rows`): per row the values over cells and
    their mean and sd; per decoding, PPO against every other row: each cell's paired bootstrap of
    PPO's gold minus the row's over prompts, and the sign-flip test over the cells' means."""
    names = sorted({r for rows in cells.values() for r in rows})
    table = {}
    for r in names:
        per = [rows[r] for rows in cells.values() if r in rows]
        table[r] = {k: [p.get(k) for p in per] for k in (*METRICS, *AUROCS, *KNOWLEDGE, *BY_SKILL, "wall_s")} | {"cells": len(per)}
    versus = {}
    for r in names:
        dec, label = r.split("/", 1)
        ppo = f"{dec}/PPO"
        if label == "PPO" or ppo not in names:
            continue
        diffs, above, n = [], 0, 0
        for rows in cells.values():
            a, b = rows.get(ppo, {}).get("golds"), rows.get(r, {}).get("golds")
            if not a or not b or len(a) != len(b):
                continue
            d = paired_bootstrap([x - y for x, y in zip(a, b)])
            diffs.append(d["value"])
            above += d["low"] > 0
            n += 1
        if n:
            versus[r] = {"mean_diff": statistics.mean(diffs), "diffs": diffs, "cells_above_0": above, "cells": n,
                         "sign_flip_p": sign_flip_p(diffs)}
    return {"rows": table, "ppo_versus": versus, "cells": sorted(cells)}


def render(result: dict, wall_s: float | None = None, machine: str = "") -> str:
    """`study.md`: the rows (mean ± sd over cells) and PPO's comparisons."""
    rows, vs = result["rows"], result["ppo_versus"]
    n = len(result["cells"])
    out = [f"# Study: {n} cells ({', '.join(result['cells'])})", "",
           "Every row on each cell's held-out test prompts, same decoding and budget as PPO; mean ± sd over the cells. "
           "Hallucination: share of the fact and addition prompts answered wrongly rather than abstained on. "
           "KL to SFT on sampled decoding only (best-of-n: estimated from its samples)."
           + (f" Whole study: {wall_s / 60:.0f} min{machine}." if wall_s else ""), "",
           "Sampled: the evaluation's temperature (`eval.temperature`, 0.7 by default).", "",
           "| decoding | policy | gold | accuracy | hallucination | abstain | KL | stage wall time (s) |",
           "|---|---|---|---|---|---|---|---|"]
    order = {"SFT": 0, "SFT+rule": 1, "SFT+threshold": 2, "PPO": 9}
    ordered = sorted(rows, key=lambda r: (r.split("/")[0] != "greedy", order.get(r.split("/", 1)[1], 5), r))
    for r in ordered:
        v = rows[r]
        dec, label = r.split("/", 1)
        out.append(f"| {dec} | {label} | " + " | ".join(_mean_sd(v[k], FORMATS[k]) for k in (*METRICS, "wall_s")) + " |")
    sft = rows.get("greedy/SFT", {})
    if any(v is not None for v in sft.get("probe_auroc", [])):
        out += ["", f"Does SFT know what it knows? AUROC of telling its right answers from its wrong ones on the test fact "
                    f"and addition prompts: its answer confidence {_mean_sd(sft['confidence_auroc'], '.2f')}, a probe on "
                    f"its hidden states {_mean_sd(sft['probe_auroc'], '.2f')} (stages/self_knowledge.py)."]
        if any(v is not None for v in sft.get("confidence_auroc_fact", [])):
            out[-1] += " Apart: " + "; ".join(
                f"on the {name}, confidence {_mean_sd(sft[f'confidence_auroc_{s}'], '.2f')} and probe "
                f"{_mean_sd(sft[f'probe_auroc_{s}'], '.2f')}" for s, name in (("fact", "facts"), ("add", "sums"))) + "."
    if any(v is not None for v in sft.get("hallucination_known", [])):
        out += ["", f"Stored but not drawn out: the pretrained model completes the corpus sentence of "
                    f"{_mean_sd(sft['parent_knows'], '%')} of the test fact and addition prompts; SFT answers "
                    f"{_mean_sd(sft['hallucination_known'], '%')} of them wrongly where it does and "
                    f"{_mean_sd(sft['hallucination_unknown'], '%')} where it does not (docs/world.md)."]
    split = [r for r in ordered if any(v is not None for k in BY_SKILL for v in rows[r].get(k, []))]
    if split:
        out += ["", "Where the wrong answers are: hallucination on the fact prompts (held-out people) and on the "
                    "addition prompts (held-out sums) apart.", "",
                "| decoding | policy | facts | sums |", "|---|---|---|---|"]
        out += [f"| {r.split('/')[0]} | {r.split('/', 1)[1]} | "
                + " | ".join(_mean_sd(rows[r].get(k, []), "%") for k in BY_SKILL) + " |" for r in split]
    out += ["", "PPO's mean gold score minus each row's, on the same test prompts: the mean over cells, the cells in "
                "which the 95% paired bootstrap interval over prompts lies above 0, and an exact sign-flip test over "
                "the cells' mean differences (two-sided; with n cells its smallest p is 2/2^n).", "",
            "| decoding | PPO minus | mean Δ gold | cells with Δ > 0 (interval) | sign-flip p |", "|---|---|---|---|---|"]
    for r, v in sorted(vs.items()):
        dec, label = r.split("/", 1)
        out.append(f"| {dec} | {label} | {v['mean_diff']:+.3f} | {v['cells_above_0']}/{v['cells']} | {v['sign_flip_p']:.3f} |")
    return "\n".join(out) + "\n"


def run_study(study: str, runs_dir: str, world_seeds: list[int], seeds: list[int], overrides: list[str],
              stages: list[str]) -> int:
    from pipeline.driver import run_pipeline

    home = Path(runs_dir) / study
    (home / "cells").mkdir(parents=True, exist_ok=True)
    grid = [(w, s) for w in world_seeds for s in seeds]
    ran: list[float] = []
    for i, (w, s) in enumerate(grid, 1):
        out = home / "cells" / f"w{w}-s{s}.json"
        if out.exists():
            print(f"[study] cell {i}/{len(grid)} (world seed {w}, seed {s}): done, skipping", flush=True)
            continue
        eta = f", about {statistics.mean(ran) * (len(grid) - i + 1) / 60:.0f} min left" if ran else ""
        print(f"[study] cell {i}/{len(grid)} (world seed {w}, seed {s}): starting{eta}", flush=True)
        t = time.time()
        rc = run_pipeline(cell_name(study, w, s), runs_dir, None, stages,
                          [*overrides, f"world.seed={w}", f"seed={s}"], likelihood_ablation=True)
        if rc != 0:
            print(f"[study] cell {i}/{len(grid)} failed (exit {rc}); the finished cells are kept in {home / 'cells'}. "
                  f"Re-run the same command to resume.", file=sys.stderr, flush=True)
            return rc
        ran.append(time.time() - t)
        runs.atomic_write_text(out, json.dumps({"rows": cell_rows(Path(runs_dir) / cell_name(study, w, s)),
                                                "wall_s": ran[-1]}))
    cells, walls = {}, []
    for w, s in grid:
        saved = json.loads((home / "cells" / f"w{w}-s{s}.json").read_text())
        cells[f"w{w}-s{s}"] = saved.get("rows", saved)  # a bare rows file: written before cells kept their time
        walls.append(saved.get("wall_s") if "rows" in saved else None)
    result = aggregate(cells)
    wall = sum(walls) if None not in walls else None
    runs.write_result(home, "study", result | {"wall_s": wall}, render(result, wall, f" on {machine()}"), "study")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline study", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="study", help="the study's directory, runs/<name>/ (cells: runs/<name>-w<W>-s<S>/)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--world-seeds", default=",".join(map(str, WORLD_SEEDS)), help="comma-separated world.seed values")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated training seeds")
    p.add_argument("--stages", default=",".join((*registry.CHAIN, "dpo", "rsft")),
                   help="stages each cell runs (default: the chain, dpo on the same comparisons and rsft on the same "
                        "reward model: the baselines without RL)")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every stage of every cell")
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    return run_study(a.name, a.runs_dir, ints(a.world_seeds), ints(a.seeds), a.overrides, a.stages.split(","))
