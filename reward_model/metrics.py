"""Evaluation of a reward model on ranked comparisons: pure functions, lists/tensors in,
plain numbers out (for the manifest, wandb and later plots)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from pipeline.records import ranked_pairs  # what a ranking means is part of the K-wise record format
from pipeline.stats import wilson
from reward_model.scoring import score_ids


def _rate(hits: int, pairs: int) -> dict:
    """{accuracy, pairs, low, high}: an accuracy over ranked pairs with its 95% Wilson interval."""
    low, high = wilson(hits, pairs)
    return {"accuracy": hits / pairs if pairs else float("nan"), "pairs": pairs, "low": low, "high": high}


def pairwise_accuracy(rankings: list[list[int]], rewards: list[list[float]], groups: list[str | None] | None = None) -> dict:
    """Fraction of ranked pairs (ties excluded) whose better response gets the higher reward,
    overall and per group (e.g. skill), each with its 95% Wilson interval (`low`, `high`).
    -> {"accuracy", "pairs", "low", "high", "by_group": {g: {accuracy, pairs, low, high}}}.
    The pairs of one prompt share the prompt and responses, so they are not independent: the
    interval is narrower than the truth, the more so the larger K. No ranked pair (every
    comparison a tie): accuracy and interval NaN, undefined rather than 0 or 1, with pairs 0."""
    groups = groups or [None] * len(rankings)
    hits: dict = defaultdict(lambda: [0, 0])
    for ranks, r, g in zip(rankings, rewards, groups):
        for i, j in ranked_pairs(ranks):
            for key in ("__all__", g):
                hits[key][0] += r[i] > r[j]
                hits[key][1] += 1
    by_group = {g: _rate(c, n) for g, (c, n) in hits.items() if g not in ("__all__", None)}
    return {**_rate(*hits.get("__all__", [0, 0])), "by_group": dict(sorted(by_group.items()))}


def accuracy_by_correctness(rankings: list[list[int]], rewards: list[list[float]],
                            correct: list[list[bool] | None], finished: list[list[bool]],
                            lengths: list[list[int]] | None = None) -> dict:
    """Pairwise accuracy split by what separates the two responses of a ranked pair.

    Where correctness is known: `correctness` pairs (one answer right, the other wrong) and
    `style` pairs (both right or both wrong, so only form differs); correctness pairs again as
    `correctness_same_finish` (both finished, or both cut off) and `correctness_different_finish`.
    Over all pairs: `different_finish` (one response finished, the other cut off before its end
    token). With `lengths` (each response's length in tokens): `longer_better` (the better
    response is the longer one: length and quality disagree) and `shorter_better`. An RM can score
    high by ranking style, by the missing end token alone (a truncation cue the labeler also
    punishes) or by preferring short responses; `correctness_same_finish` shows whether it judges
    the answers, `longer_better` whether it does more than prefer the shorter response.
    -> {kind: {accuracy, pairs, low, high}}, only kinds with pairs; low/high = 95% Wilson interval,
    which treats pairs as independent although pairs of one prompt are not (they share the prompt
    and responses): read it as a lower bound on the uncertainty."""
    hits: dict = defaultdict(lambda: [0, 0])
    lengths = lengths or [None] * len(rankings)
    for ranks, r, ok, done, n in zip(rankings, rewards, correct, finished, lengths):
        for i, j in ranked_pairs(ranks):
            same_finish = done[i] == done[j]
            kinds = [] if same_finish else ["different_finish"]
            if n is not None and n[i] != n[j]:
                kinds.append("longer_better" if n[i] > n[j] else "shorter_better")
            if ok is not None and ok[i] != ok[j]:
                kinds += ["correctness", "correctness_same_finish" if same_finish else "correctness_different_finish"]
            elif ok is not None:
                kinds.append("style")
            for kind in kinds:
                hits[kind][0] += r[i] > r[j]
                hits[kind][1] += 1
    return {k: _rate(c, n) for k, (c, n) in sorted(hits.items())}


def per_comparison(comparisons: list, flat: list[float]) -> list[list[float]]:
    """Values of every response in comparison order (`flat`) -> one list per comparison."""
    out, i = [], 0
    for c in comparisons:
        out.append(flat[i: i + len(c.responses)])
        i += len(c.responses)
    return out


def response_lengths(tokenizer, comparisons: list) -> list[int]:
    """Every response's length in tokens (its text, no special tokens), flat in comparison order."""
    return [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for c in comparisons for r in c.responses]


def accuracy_by_part(comparisons: list, scores: list[float], lengths: list[int] | None = None) -> dict:
    """Held-out accuracy of one part of a score (e.g. the likelihood term alone), flat `scores`
    (and `lengths`, `response_lengths`) in comparison order -> {"overall": {accuracy, pairs, low,
    high}, "by_kind": accuracy_by_correctness}, the length kinds included with `lengths`."""
    per_comp = per_comparison(comparisons, scores)
    rankings = [c.ranking for c in comparisons]
    overall = pairwise_accuracy(rankings, per_comp)
    overall.pop("by_group")
    return {"overall": overall, "by_kind": accuracy_by_correctness(
        rankings, per_comp, [c.correct for c in comparisons], [c.finished for c in comparisons],
        per_comparison(comparisons, lengths) if lengths is not None else None)}


def chosen_rejected(rankings: list[list[int]], rewards: list[list[float]]) -> tuple[list[float], list[float]]:
    """Rewards of the preferred and the dispreferred response of every ranked pair."""
    chosen, rejected = [], []
    for ranks, r in zip(rankings, rewards):
        for i, j in ranked_pairs(ranks):
            chosen.append(r[i])
            rejected.append(r[j])
    return chosen, rejected


def histogram(chosen: list[float], rejected: list[float], bins: int = 30, max_values: int = 5000) -> dict:
    """Plot data for the two reward distributions: the values themselves (rounded; a seeded
    subset beyond `max_values`) under `chosen` / `rejected`, and counts over shared bin edges."""
    values = torch.tensor(chosen + rejected, dtype=torch.float64, device="cpu")  # plain numbers: CPU
    if values.numel() == 0:
        return {"chosen": [], "rejected": [], "edges": [], "chosen_counts": [], "rejected_counts": []}
    lo, hi = values.min().item(), values.max().item()
    edges = torch.linspace(lo, max(hi, lo + 1e-6), bins + 1, dtype=torch.float64, device="cpu")

    def counts(x: list[float]) -> list[int]:
        if not x:
            return [0] * bins
        return torch.histogram(torch.tensor(x, dtype=torch.float64, device="cpu"), bins=edges)[0].long().tolist()

    def subset(x: list[float]) -> list[float]:
        if len(x) > max_values:
            g = torch.Generator(device="cpu").manual_seed(0)
            keep = torch.randperm(len(x), generator=g, device="cpu")[:max_values].sort().values
            x = [x[i] for i in keep.tolist()]
        return [round(v, 4) for v in x]

    return {"chosen": subset(chosen), "rejected": subset(rejected), "edges": [round(e, 5) for e in edges.tolist()],
            "chosen_counts": counts(chosen), "rejected_counts": counts(rejected)}


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are < 2 points."""
    if len(x) < 2:
        return float("nan")
    a = torch.tensor(x, dtype=torch.float64, device="cpu")
    b = torch.tensor(y, dtype=torch.float64, device="cpu")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt((a * a).sum().item() * (b * b).sum().item())
    return (a * b).sum().item() / denom if denom > 0 else float("nan")


def evaluate_comparisons(model, tokenizer, held_out: list, seqs: list[list[int]], batch_size: int = 64,
                         accelerator=None, starts: list[int] | None = None,
                         scores: list[float] | None = None,
                         lengths: list[int] | None = None) -> tuple[dict, dict, list[list]]:
    """Score every response of the held-out comparisons (`seqs` = their rendered ids, in order;
    `starts` = their response starts, which a reward model with a likelihood term needs; `scores`
    and `lengths` (`response_lengths`): the model's scores of them and their lengths when the
    caller already has them)
    -> (metrics, manifest extra, sample-table rows). Metrics: pairwise accuracy overall and per
    skill (ties excluded), mean reward of chosen / rejected responses, reward-length correlation
    (and the labeler's own, when gold scores are known). Extra: accuracy by skill, histograms."""
    if scores is None:
        scores = score_ids(model, seqs, tokenizer.pad_token_id, batch_size, accelerator, starts=starts)[0].tolist()
    per_comp = per_comparison(held_out, scores)
    rankings = [c.ranking for c in held_out]
    acc = pairwise_accuracy(rankings, per_comp, [c.skill for c in held_out])
    chosen, rejected = chosen_rejected(rankings, per_comp)
    lengths = response_lengths(tokenizer, held_out) if lengths is None else lengths
    metrics = {"eval/pairwise_accuracy": acc["accuracy"], "eval/pairwise_accuracy_low": acc["low"],
               "eval/pairwise_accuracy_high": acc["high"], "eval/pairs": acc["pairs"],
               "eval/reward_chosen_mean": sum(chosen) / max(1, len(chosen)),
               "eval/reward_rejected_mean": sum(rejected) / max(1, len(rejected)),
               "eval/reward_mean": sum(scores) / max(1, len(scores)),
               "eval/length_corr": pearson(lengths, scores)}
    for skill, v in acc["by_group"].items():
        metrics[f"eval/pairwise_accuracy/{skill}"] = v["accuracy"]
    by_kind = accuracy_by_correctness(rankings, per_comp, [c.correct for c in held_out], [c.finished for c in held_out],
                                      per_comparison(held_out, lengths))
    for kind, v in by_kind.items():
        metrics[f"eval/pairwise_accuracy/{kind}_pairs"] = v["accuracy"]
    # a high share means the RM can rank many pairs by the missing end token alone
    metrics["eval/different_finish_fraction"] = by_kind.get("different_finish", {"pairs": 0})["pairs"] / max(1, acc["pairs"])
    gold = [s for c in held_out for s in (c.gold_scores or [])]
    if len(gold) == len(scores):
        metrics["eval/gold_length_corr"] = pearson(lengths, gold)
    extra = {"eval_accuracy_by_skill": acc["by_group"], "eval_accuracy_by_pair_kind": by_kind,
             "reward_histogram": histogram(chosen, rejected)}
    rows = []
    for c, r in zip(held_out, per_comp):
        for j, resp in enumerate(c.responses):
            gold_score = c.gold_scores[j] if c.gold_scores else None
            rows.append([str(c.prompt), c.skill or "", resp, c.finished[j], c.ranking[j], gold_score, round(r[j], 4)])
    return metrics, extra, rows


# What separates the two responses of a ranked pair (reward_model.metrics.accuracy_by_correctness).
RM_PAIR_KINDS = {
    "correctness": "one answer right, the other wrong",
    "correctness_same_finish": "correctness pairs where both finished or both were cut off: only the answer separates them",
    "correctness_different_finish": "correctness pairs where one finished, the other was cut off",
    "style": "both right or both wrong: only form differs",
    "different_finish": "one finished, the other cut off before its end token",
    "longer_better": "the better response is the longer one: length and quality disagree",
    "shorter_better": "the better response is the shorter one",
}
