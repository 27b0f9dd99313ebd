"""What the rm stage prints when it ends (`stages.rm`): its figures and the warnings a user should
read before PPO optimizes the reward model."""
from __future__ import annotations

from pipeline.stats import fmt_rate
from reward_model.metrics import RM_PAIR_KINDS


def print_report(manifest, metrics: dict, extra: dict, model_dir) -> None:
    """The rm stage's closing lines: held-out accuracy by skill, pair kind and score part, the
    warnings (truncation cue, form over correctness, length bias), normalization and the probes."""
    print(f"\nrm done in {manifest.wall_time_s:.0f}s: the reward model is a {extra['reward_model']}")
    data = manifest.config.get("data", {})
    where = f"{data.get('eval_split') or 'test'} split" if data.get("source", "world") == "world" else "held-out files"
    if metrics["eval/pairs"]:
        overall = _fmt(metrics["eval/pairwise_accuracy"], metrics["eval/pairwise_accuracy_low"],
                       metrics["eval/pairwise_accuracy_high"])
        print(f"  held-out pairwise accuracy  {overall}  ({where}, {metrics['eval/pairs']} ranked pairs, ties excluded; "
              "95% Wilson intervals, which take the pairs of a prompt as independent)")
    else:  # the metric is NaN: there is nothing to rank
        print("  held-out pairwise accuracy  undefined: every held-out comparison is a tie (0 ranked pairs)")
    for skill, v in extra["eval_accuracy_by_skill"].items():
        print(f"    {skill:<36} {_fmt(v['accuracy'], v['low'], v['high'])}  ({v['pairs']} pairs)")
    by_kind = extra.get("eval_accuracy_by_pair_kind", {})
    for kind, what in RM_PAIR_KINDS.items():
        if kind in by_kind:
            v, label = by_kind[kind], ("  " if kind.startswith("correctness_") else "") + kind + " pairs"
            print(f"    {label:<36} {_fmt(v['accuracy'], v['low'], v['high'])}  ({v['pairs']} pairs: {what})")
    for name, v in extra.get("eval_accuracy_of_parts", {}).items():
        correct = v["by_kind"].get("correctness")
        print(f"    {name + ' alone':<36} {_fmt(v['overall']['accuracy'], v['overall']['low'], v['overall']['high'])}"
              + (f"  (correctness pairs {_fmt(correct['accuracy'], correct['low'], correct['high'])})" if correct else ""))
    if metrics["eval/pairs"]:
        share = metrics["eval/different_finish_fraction"]
        print(f"  {share:.1%} of held-out pairs differ in finishing (finished rate of the training responses "
              f"{metrics['data/finished_rate']:.1%})")
        if share > 0.2:
            print("  WARNING: many held-out pairs differ in whether the answer finished within data.max_new_tokens; the RM "
                  "can rank them by the missing end token (a truncation cue). Raise data.max_new_tokens, and judge the RM "
                  "by correctness_same_finish pairs.")
    judge = by_kind.get("correctness_same_finish", by_kind.get("correctness", {}))
    if judge.get("accuracy", 1.0) < 0.6 <= by_kind.get("style", {}).get("accuracy", 0.0):
        print("  WARNING: the reward model ranks form, not correctness: pairs that differ in the answer's correctness "
              "(and not in finishing) are near chance. PPO will optimize style; a larger or stronger SFT backbone, or "
              "more comparisons, is needed to judge answers.")
    print(f"  reward chosen {metrics['eval/reward_chosen_mean']:+.3f} | rejected {metrics['eval/reward_rejected_mean']:+.3f}")
    if "norm/ref_mean" in metrics:
        print(f"  normalized on {extra['normalization']['reference_size']} SFT samples: mean {metrics['norm/ref_mean']:+.2e} "
              f"std {metrics['norm/ref_std']:.3f} (raw mean {metrics['norm/raw_mean']:+.3f}, std {metrics['norm/raw_std']:.3f})")
        print(f"  folded head vs exact shift on held-out samples: max |dev| {metrics['norm/heldout_max_abs_dev']:.3g}, "
              f"mean {metrics['norm/heldout_mean_abs_dev']:.3g}")
    r, gold_r = metrics["eval/length_corr"], metrics.get("eval/gold_length_corr")
    print(f"  reward-length correlation r = {r:+.2f}" + (f" (gold labeler: {gold_r:+.2f})" if gold_r is not None else ""))
    if abs(r) > 0.5:
        print(f"  WARNING: length bias: |r| = {abs(r):.2f} > 0.5; PPO may exploit response length. Compare with the "
              "labeler's own correlation before trusting it.")
    if extra.get("probes"):
        print("  probes (reward_model/probes.py): share of held-out prompts on which the RM prefers the variant to the "
              "right answer (to the abstention in the last) | the gold judge's share")
    for name, v in extra.get("probes", {}).items():
        print(f"    {name:<30} {v['rm_prefers']:6.1%} | {v['gold_prefers']:.1%}  ({v['n']} prompts)")
    print(f"  model: {model_dir} ({extra['reward_model']})")


def _fmt(accuracy: float, low: float, high: float) -> str:
    return fmt_rate({"value": accuracy, "low": low, "high": high})
