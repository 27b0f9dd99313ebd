"""95% intervals for the figures the stages report (accuracies, finish rates, win rates).

A held-out set of ~200 prompts measures a rate to within several points; every reported rate
carries its interval so that two runs, or two policies, are compared with that in view.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict

from pipeline.world import KNOWN_UNKNOWN_SKILLS

Z95 = 1.959964


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927): stays inside [0, 1] and is not
    degenerate at 0 or n successes, unlike the normal approximation."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal interval of a mean, for scores that are not 0/1 (a win rate
    with ties counted half, a gold score)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def rate(values: list[float]) -> dict:
    """{"value", "low", "high", "n"} of a list of per-prompt outcomes: Wilson when every outcome
    is 0 or 1 (an accuracy), else the normal interval of the mean (a win rate with half ties)."""
    n = len(values)
    if n == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    if all(v in (0, 1) for v in values):
        lo, hi = wilson(sum(values), n)
        return {"value": sum(values) / n, "low": lo, "high": hi, "n": n}
    mean, lo, hi = mean_interval(values)
    return {"value": mean, "low": max(0.0, lo), "high": min(1.0, hi), "n": n}


def policy_summary(correct: list[float], finished: list[float], gold: list[float], skills: list[str],
                   abstained: list[float] | None = None) -> dict:
    """What stands next to every win rate: accuracy and finish rate (`rate`), mean gold score, and
    per skill (sorted) accuracy and finish rate. -> {"accuracy", "finish", "gold_score", "skills":
    {skill: {"accuracy", "finish"}}}. With `abstained` (1 where the response is the abstention)
    also "abstain" (overall and per skill) and "hallucination": the share of the fact and addition
    prompts, the questions the model may not know, answered wrongly rather than abstained on (and
    per skill, for those two)."""
    by_skill: dict = defaultdict(list)
    for c, f, s, a in zip(correct, finished, skills, abstained or [0.0] * len(correct)):
        by_skill[s].append((c, f, a))
    out = {"accuracy": rate(correct), "finish": rate(finished),
           "gold_score": sum(gold) / len(gold) if gold else float("nan"),
           "skills": {s: {"accuracy": rate([c for c, _, _ in v]), "finish": rate([f for _, f, _ in v])}
                      for s, v in sorted(by_skill.items())}}
    if abstained is not None:
        out["abstain"] = rate(abstained)
        for s, v in by_skill.items():
            out["skills"][s]["abstain"] = rate([a for _, _, a in v])
        for s in KNOWN_UNKNOWN_SKILLS:
            if s in by_skill:
                out["skills"][s]["hallucination"] = rate([float(not c and not a) for c, _, a in by_skill[s]])
        out["hallucination"] = rate([float(not c and not a) for s in KNOWN_UNKNOWN_SKILLS for c, _, a in by_skill.get(s, [])])
    return out


def paired_bootstrap(diffs: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of paired differences (one per prompt: a method's gold score minus its opponent's)
    with a 95% percentile-bootstrap interval over prompts (Efron & Tibshirani 1993): resampling
    prompts keeps each pair together. -> {"value", "low", "high", "n"}."""
    n = len(diffs)
    if n == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {"value": sum(diffs) / n, "low": means[int(0.025 * resamples)], "high": means[int(0.975 * resamples) - 1], "n": n}


def fmt_diff(d: dict) -> str:
    """`+0.412 [0.301, 0.530]`: a mean difference and its 95% interval."""
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def fmt_rate(r: dict) -> str:
    """`61.3% [54.4, 67.8]`: a rate and its 95% interval, in percent."""
    return f"{100 * r['value']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"
