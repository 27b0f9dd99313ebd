"""`pipeline.study`: the sign-flip test by hand, the aggregation of cells, and resuming a study."""
import json

import pytest

from pipeline import study


def test_sign_flip_p_by_hand():
    # 3 cells, all positive: of the 8 sign assignments only (+,+,+) and (-,-,-) reach |mean| 2: p = 2/8
    assert study.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # (+1, -1): every assignment has |sum| 0 or 2 >= 0: p = 1
    assert study.sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    # (3, 1, -1): the sums of the 8 assignments are ±3, ±5, ±1, ±3; 6 of 8 have |sum| >= 3
    assert study.sign_flip_p([3.0, 1.0, -1.0]) == pytest.approx(0.75)


def _rows(ppo_golds, rule_golds, sft_golds):
    entry = lambda g, **kw: {"gold": sum(g) / len(g), "accuracy": 0.5, "hallucination": 0.2, "abstain": 0.1,  # noqa: E731
                             "kl": kw.get("kl"), "wall_s": kw.get("wall"), "golds": g}
    return {"greedy/PPO": entry(ppo_golds, wall=10.0), "greedy/SFT+rule": entry(rule_golds),
            "greedy/SFT": entry(sft_golds)}


def test_aggregate_pairs_prompts_within_each_cell():
    cells = {"w1-s0": _rows([3, 3, 3, 3], [2, 2, 2, 2], [1, 1, 1, 1]),
             "w2-s0": _rows([3, 2, 3, 2], [3, 2, 3, 2], [1, 1, 1, 1])}
    result = study.aggregate(cells)
    vs = result["ppo_versus"]["greedy/SFT+rule"]
    assert vs["diffs"] == [1.0, 0.0]           # cell means of PPO minus the rule, prompt by prompt
    assert vs["cells_above_0"] == 1            # the tie's interval is [0, 0], not above 0
    assert vs["mean_diff"] == pytest.approx(0.5)
    assert vs["sign_flip_p"] == pytest.approx(1.0)  # (1, 0): all 4 assignments have |sum| = 1
    assert result["ppo_versus"]["greedy/SFT"]["cells_above_0"] == 2
    assert result["rows"]["greedy/PPO"]["gold"] == [3.0, 2.5]
    text = study.render(result, wall_s=120.0, machine=" on a test CPU")
    assert "| greedy | SFT+rule | 2.250 ± 0.354 | 50.0% ± 0.0 | 20.0% ± 0.0 | 10.0% ± 0.0 | - | - |" in text
    assert "| greedy | SFT+rule | +0.500 | 1/2 | 1.000 |" in text
    assert "2 min on a test CPU" in text
    assert "Stored but not drawn out" not in text  # cells without the split say nothing of it
    cells["w1-s0"]["greedy/SFT"] |= {"parent_knows": 0.8, "hallucination_known": 0.3, "hallucination_unknown": 0.1}
    cells["w2-s0"]["greedy/SFT"] |= {"parent_knows": 0.9, "hallucination_known": 0.5, "hallucination_unknown": 0.1}
    text = study.render(study.aggregate(cells))
    assert ("completes the corpus sentence of 85.0% ± 7.1 of the test fact and addition prompts; SFT answers "
            "40.0% ± 14.1 of them wrongly where it does and 10.0% ± 0.0 where it does not") in text
    assert "Where the wrong answers are" not in text  # cells without per-skill hallucination say nothing of it
    cells["w1-s0"]["greedy/PPO"] |= {"hallucination_fact": 0.25, "hallucination_add": 0.4}
    cells["w2-s0"]["greedy/PPO"] |= {"hallucination_fact": 0.75, "hallucination_add": 0.2}
    text = study.render(study.aggregate(cells))
    cells["w1-s0"]["greedy/SFT"] |= {"confidence_auroc": 0.7, "probe_auroc": 0.8, "confidence_auroc_fact": 0.9,
                                     "probe_auroc_fact": 1.0, "confidence_auroc_add": 0.5, "probe_auroc_add": 0.6}
    cells["w2-s0"]["greedy/SFT"] |= {"confidence_auroc": 0.7, "probe_auroc": 0.8, "confidence_auroc_fact": None,
                                     "probe_auroc_fact": None, "confidence_auroc_add": 0.7, "probe_auroc_add": 0.6}
    text = study.render(study.aggregate(cells))
    assert ("Apart: on the facts, confidence 0.90 ± 0.00 and probe 1.00 ± 0.00; on the sums, confidence 0.60 ± 0.14 "
            "and probe 0.60 ± 0.00.") in text  # a cell without a value (no wrong fact) left out of its mean
    assert "| greedy | PPO | 50.0% ± 35.4 | 30.0% ± 14.1 |" in text and "| greedy | SFT | - | - |" not in text  # rows without it: left out


def test_cell_entry_reads_hallucination_per_skill():
    from pipeline.stats import policy_summary

    # facts: one wrong, one abstained, one right -> 1/3; sums: both wrong -> 1; the first word is no question of knowledge
    summary = policy_summary(correct=[0, 0, 1, 0, 0, 0], finished=[1] * 6, gold=[0.0] * 6,
                             skills=["fact", "fact", "fact", "add", "add", "first"], abstained=[0, 1, 0, 0, 0, 0])
    assert summary["skills"]["fact"]["hallucination"]["value"] == pytest.approx(1 / 3)
    assert summary["skills"]["add"]["hallucination"]["value"] == pytest.approx(1.0)
    assert "hallucination" not in summary["skills"]["first"]
    assert summary["hallucination"]["value"] == pytest.approx(3 / 5)
    entry = study._entry(summary, None)
    assert entry["hallucination_fact"] == pytest.approx(1 / 3) and entry["hallucination_add"] == pytest.approx(1.0)


def test_study_resumes_at_the_first_cell_without_results(tmp_path, monkeypatch, capsys):
    from pipeline import driver

    calls = []

    def fake_pipeline(run, runs_dir, from_stage, stages, overrides, *a, likelihood_ablation=False):
        assert likelihood_ablation  # every cell also runs PPO without the likelihood term
        calls.append((run, overrides))
        return 0

    monkeypatch.setattr(driver, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(study, "cell_rows", lambda run_dir: _rows([3, 3], [2, 2], [1, 1]))
    cells = tmp_path / "s" / "cells"
    cells.mkdir(parents=True)
    (cells / "w7-s0.json").write_text(json.dumps({"rows": _rows([3, 3], [3, 3], [1, 1]), "wall_s": 60.0}))
    assert study.run_study("s", str(tmp_path), [7, 8], [0], ["ppo.steps=2"], ["pretrain"]) == 0
    assert calls == [("s-w8-s0", ["ppo.steps=2", "world.seed=8", "seed=0"])]  # the finished cell is not re-run
    assert (cells / "w8-s0.json").exists() and (tmp_path / "s" / "study.md").exists()
    result = json.loads((tmp_path / "s" / "study.json").read_text())
    assert result["ppo_versus"]["greedy/SFT+rule"]["diffs"] == [0.0, 1.0]  # both cells: the kept one and the new
    assert "cell 1/2 (world seed 7, seed 0): done, skipping" in capsys.readouterr().out
    assert json.loads((cells / "w8-s0.json").read_text())["wall_s"] >= 0
    assert result["wall_s"] >= 60.0  # the kept cell's time and the new one's


def test_study_stops_at_a_failed_cell_and_keeps_the_others(tmp_path, monkeypatch):
    from pipeline import driver

    monkeypatch.setattr(driver, "run_pipeline", lambda *a, **k: 3)
    assert study.run_study("s", str(tmp_path), [7], [0, 1], [], ["pretrain"]) == 3
    assert not (tmp_path / "s" / "study.md").exists()
