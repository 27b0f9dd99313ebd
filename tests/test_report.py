"""The run report's pretraining, SFT and reward-model sections, from hand-written manifests (no training)."""
import pytest

from pipeline import runs
from pipeline.report import write_report


def _rate(value, low, high, n):
    return {"value": value, "low": low, "high": high, "n": n}


def _save(runs_dir, stage, metrics, extra=None, config=None):
    m = runs.Manifest(stage=stage, run_name="r", status="complete", metrics=metrics, extra=extra or {},
                      config=config or {}, wall_time_s=1.0)
    stage_dir = runs.stage_dir(runs_dir, "r", stage)
    stage_dir.mkdir(parents=True)
    m.save(stage_dir)


def _sft_evaluation():
    return {"split": "test", "decoding": "greedy", "max_new_tokens": 64, "prompts": 30,
            "overall": {"accuracy": _rate(0.5, 0.33, 0.67, 30), "finish": _rate(0.9, 0.74, 0.97, 30),
                        "format": _rate(0.8, 0.63, 0.9, 30), "gold_score": 2.5,
                        "hallucination": _rate(0.4, 0.24, 0.58, 30)},
            "parent_knowledge": {"parent_knows": _rate(0.9, 0.74, 0.97, 30),
                                 "hallucination_known": _rate(0.3, 0.17, 0.48, 30),
                                 "hallucination_unknown": _rate(0.1, 0.03, 0.26, 30)},
            "skills": {"add": {"accuracy": _rate(0.6, 0.31, 0.83, 10), "finish": _rate(1.0, 0.72, 1.0, 10), "n": 10},
                       "fact": {"accuracy": _rate(0.45, 0.26, 0.66, 20), "finish": _rate(0.85, 0.64, 0.95, 20),
                                "n": 20}}}


def test_report_tables_sft_skills_and_rm_pair_kinds_with_intervals(tmp_path):
    _save(tmp_path, "pretrain", {"eval/perplexity": 7.5, "eval/unigram_perplexity": 40.0,
                                 "eval/fact_cloze_accuracy": 0.5}, config={"data": {"source": "world"}})
    (tmp_path / "r" / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    _save(tmp_path, "sft", {"eval/accuracy": 0.5, "eval/acc_add": 0.6, "eval/acc_fact": 0.45},
          {"evaluation": _sft_evaluation()})
    by_kind = {"correctness": {"accuracy": 0.75, "pairs": 40, "low": 0.6, "high": 0.86},
               "correctness_same_finish": {"accuracy": 0.7, "pairs": 30, "low": 0.52, "high": 0.83},
               "different_finish": {"accuracy": 0.9, "pairs": 10, "low": 0.6, "high": 0.98}}
    _save(tmp_path, "rm", {"eval/pairwise_accuracy": 0.7, "eval/pairwise_accuracy_low": 0.6,
                           "eval/pairwise_accuracy_high": 0.78, "eval/pairs": 100, "eval/different_finish_fraction": 0.1},
          {"eval_accuracy_by_pair_kind": by_kind, "reward_histogram": {"chosen": [1.0, 2.0], "rejected": [0.0, -1.0]},
           "probes": {"empty": {"rm_prefers": 0.0, "gold_prefers": 0.0, "n": 20},
                      "wrong answer over abstention": {"rm_prefers": 0.85, "gold_prefers": 0.0, "n": 20}}},
          {"data": {"source": "world", "max_new_tokens": 64}})
    report = write_report(tmp_path, "r").read_text()
    assert "on text held out in content (no sentence of it seen in training)" in report
    assert "Test split, greedy, 64 new tokens, 30 prompts" in report
    assert "| fact | 20 | 45.0% [26.0, 66.0] | 85.0% [64.0, 95.0] |" in report
    assert "| **overall** | 30 | 50.0% [33.0, 67.0] | 90.0% [74.0, 97.0] |" in report
    assert ("SFT answers 40.0% [24.0, 58.0] wrongly. The pretrained model completes the corpus sentence that holds "
            "the answer (`Bralo lives in` → `Vemora`) for 90.0% [74.0, 97.0] of them; SFT is wrong on 30.0% [17.0, 48.0] "
            "of the prompts where it does") in report
    assert "and on 10.0% [3.0, 26.0] where it does not." in report
    assert "70.0% [60.0, 78.0] (comparisons sampled on the test prompts at 64 new tokens, 100 ranked pairs" in report
    rows = [l for l in report.splitlines() if l.startswith("| correctness") or l.startswith("| different_finish")]
    assert [r.split(" | ")[0] for r in rows] == ["| correctness", "| correctness_same_finish", "| different_finish"]
    assert rows[1].endswith("| 30 | 70.0% [52.0, 83.0] |")
    assert report.index("| different_finish") < report.index("![Reward model](rm.png)")
    assert "| wrong answer over abstention | 20 | 85.0% | 0.0% |" in report


def test_report_falls_back_on_manifests_without_the_evaluation_tables(tmp_path):
    _save(tmp_path, "sft", {"eval/accuracy": 0.5, "eval/acc_add": 0.6, "eval/format_rate": 0.8,
                            "eval/fact_accuracy": 0.4})
    _save(tmp_path, "rm", {"eval/pairwise_accuracy": 0.7},
          {"eval_accuracy_by_pair_kind": {"correctness": {"accuracy": 0.6, "pairs": 5}}})
    report = write_report(tmp_path, "r").read_text()
    assert "Held-out accuracy 50.0%, format rate 80.0%" in report and "| skill | prompts |" not in report
    assert "Held-out pairwise accuracy vs the gold labeler: 70.0% (" in report
    assert "| correctness | one answer right, the other wrong | 5 | 60.0% |" in report


def test_baseline_table_puts_ppo_beside_sft_the_rule_and_best_of_n():
    from pipeline.report import _baseline_table
    from pipeline.stats import paired_bootstrap

    def side(gold, acc):
        return {"gold_score": gold, "accuracy": _rate(acc, acc - 0.1, acc + 0.1, 10), "kl": None,
                "hallucination": _rate(1 - acc, 0.0, 1.0, 4), "abstain": _rate(0.0, 0.0, 0.5, 10)}

    def comp(decoding, gold, sft_gold, diffs, kl=None):
        return {"decoding": decoding, "win_rate": _rate(0.9, 0.8, 0.95, 10), "gold_diff": paired_bootstrap(diffs),
                "policy": side(gold, 0.6) | {"kl": kl}, "sft": side(sft_gold, 0.5)}

    evaluation = {"comparisons": {"greedy": comp("greedy", 4.0, 3.0, [1.0] * 10),
                                  "sampled": comp("τ=0.7", 3.8, 3.1, [0.5, 0.9] * 5, kl=1.25)},
                  "baselines": {"greedy": {"sft+rule": comp("greedy", 4.0, 3.0, [1.0] * 10)},
                                "sampled": {"sft+rule": comp("τ=0.7", 3.9, 3.1, [0.8] * 10)}},
                  "best_of_n": [{"n": 1, "kl": 0.0}, {"n": 4, "kl": 0.41, "kl_bound": 0.636, "gold_score": 3.5,
                                                      "gold_diff": paired_bootstrap([0.4] * 10),
                                                      "win_rate": _rate(0.6, 0.5, 0.7, 10),
                                                      "accuracy": _rate(0.55, 0.45, 0.65, 10)}]}
    table = "\n".join(_baseline_table(evaluation))
    assert "| greedy | SFT + rule | 4.000 | +1.000 [+1.000, +1.000] |" in table
    assert "| τ=0.7 | best-of-4 | 3.500 | +0.400 [+0.400, +0.400] |" in table and "| 0.41 (0.64) |" in table
    assert "| τ=0.7 | PPO | 3.800 | +0.700 [" in table and table.rstrip().endswith("| 40.0% [0.0, 100.0] | 0.0% [0.0, 50.0] | 1.25 |")
    assert "best-of-1" not in table  # n = 1 is SFT itself


def test_paired_bootstrap_interval_covers_the_mean_and_shrinks_with_agreement():
    from pipeline.stats import paired_bootstrap

    noisy = paired_bootstrap([1.0, -1.0] * 50 + [1.0] * 20)
    assert noisy["low"] < noisy["value"] == 20 / 120 < noisy["high"] and noisy["n"] == 120
    same = paired_bootstrap([0.3] * 40)
    assert [same[k] for k in ("value", "low", "high")] == pytest.approx([0.3] * 3) and same["n"] == 40


def test_report_leads_with_ppo_and_every_baseline_paired_over_prompts(tmp_path):
    """The first table: every row of the run on the same test prompts with PPO's paired difference,
    then the sentence naming the best row per decoding and PPO's place."""
    def side(gold, acc):
        return {"gold_score": gold, "accuracy": _rate(acc, acc - 0.1, acc + 0.1, 4), "kl": None,
                "hallucination": _rate(0.25, 0.0, 0.7, 4), "abstain": _rate(0.0, 0.0, 0.5, 4),
                "finish": _rate(1.0, 0.5, 1.0, 4), "skills": {}}

    golds = {"ppo": [5.0, 4.0, 4.0, 3.0], "sft": [3.0, 3.0, 4.0, 2.0], "rule": [5.0, 4.0, 4.0, 2.0],
             "bon": [5.0, 5.0, 4.0, 3.0]}
    mean = lambda g: sum(g) / len(g)  # noqa: E731
    evaluation = {"comparisons": {
        "greedy": {"decoding": "greedy", "policy": side(mean(golds["ppo"]), 0.75), "sft": side(mean(golds["sft"]), 0.5),
                   "golds": golds["ppo"], "sft_golds": golds["sft"], "win_rate": _rate(0.75, 0.3, 0.95, 4)}},
        "baselines": {"greedy": {"sft+rule": {"policy": side(mean(golds["rule"]), 0.5), "golds": golds["rule"]}}},
        "best_of_n": [{"n": 4, "kl": 0.5, "gold_score": mean(golds["bon"]), "rm_score": 1.0,
                       "golds": golds["bon"], **{k: v for k, v in side(0, 0.75).items() if k != "gold_score"}}]}
    _save(tmp_path, "ppo", {}, {"evaluation": evaluation})
    report = write_report(tmp_path, "r").read_text()
    assert report.index("## PPO and every baseline on the test prompts") < report.index("## Policies on the test")
    assert "| greedy | PPO | 4.000 | - | 75.0% | 25.0% | 0.0% | - | 1 s |" in report
    assert "| greedy | SFT+rule | 3.750 | +0.250 [+0.000, +0.750] | 50.0% |" in report  # one prompt of four differs
    assert "| sampled | best-of-4 | 4.250 | - | 75.0% |" in report  # no sampled PPO row to pair it with
    assert "greedy, PPO scores highest (4.000); sampled, best-of-4 scores highest (4.250)" in report


def test_self_knowledge_sentence_gives_the_facts_and_sums_apart():
    from pipeline.report import _self_knowledge_text

    assert _self_knowledge_text(None) == []  # not measured: nothing said
    sk = {"test_answers": 30, "test_right": 0.6, "confidence_auroc": 0.7, "probe_auroc": 0.75, "train_answers": 60}
    text = "\n".join(_self_knowledge_text(sk))
    assert "its answer confidence tells right from wrong with AUROC 0.70" in text and "Apart" not in text  # older runs
    text = "\n".join(_self_knowledge_text(sk | {"confidence_auroc_fact": 0.9, "probe_auroc_fact": 0.95,
                                                 "confidence_auroc_add": 0.6, "probe_auroc_add": 0.55}))
    assert "Apart: on the facts, confidence 0.90 and probe 0.95; on the sums, confidence 0.60 and probe 0.55." in text
