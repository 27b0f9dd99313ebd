"""The sweeps over one stage: `pipeline.overopt` (Gao et al.'s fits by hand, the curve read from a
ppo run's metrics, the sweep's runs, resume and output on fake ppo runs) and `pipeline.rm_curve`
(its runs and table on fake rm runs)."""
import json
import math

import numpy as np
import pytest

from pipeline import overopt, rm_curve, runs


def test_fit_recovers_both_forms_exactly():
    ds = [0.5, 1.0, 1.5, 2.0]
    f = overopt.fit(ds, [d * (0.8 - 0.3 * d) for d in ds], "bon")
    assert (f["alpha"], f["beta"], f["r2"]) == pytest.approx((0.8, 0.3, 1.0))
    # d(0.8 − 0.3d) peaks at d* = 0.8 / 0.6, gaining 0.8² / (4 · 0.3)
    assert f["peak_d"] == pytest.approx(4 / 3) and f["peak_kl"] == pytest.approx(16 / 9)
    assert f["peak_gain"] == pytest.approx(0.64 / 1.2)
    g = overopt.fit(ds, [d * (0.5 - 0.2 * math.log(d)) for d in ds], "rl")
    assert (g["alpha"], g["beta"]) == pytest.approx((0.5, 0.2))
    # d(α − β log d) peaks where log d = α/β − 1, gaining β·d*
    assert g["peak_d"] == pytest.approx(math.exp(1.5)) and g["peak_gain"] == pytest.approx(0.2 * math.exp(1.5))


def test_fit_is_least_squares_through_the_origin():
    ds, gains = [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 1.0, 0.2]
    f = overopt.fit(ds, gains, "bon")
    x = np.array([[d, -d * d] for d in ds])
    (alpha, beta), *_ = np.linalg.lstsq(x, np.array(gains), rcond=None)
    assert (f["alpha"], f["beta"]) == pytest.approx((alpha, beta))
    pred = x @ np.array([alpha, beta])
    assert f["r2"] == pytest.approx(1 - ((np.array(gains) - pred) ** 2).sum() / np.var(gains) / len(gains))
    rising = overopt.fit([1.0, 2.0], [1.0, 3.0], "bon")  # gains faster than linear: β < 0, no peak
    assert rising["beta"] < 0 and "peak_kl" not in rising
    assert overopt.fit([0.0, 1.0], [0.0, 1.0], "bon") is None  # one point off the origin fits nothing


def test_curve_from_metrics_keeps_the_last_record_of_each_evaluation():
    rows = [{"step": 0, "eval/kl": 0.0, "eval/gold_score": 3.0, "eval/rm_score": 0.1},
            {"step": 5, "ppo/kl": 2.0},  # a training record, not a curve point
            {"step": 10, "eval/kl": 1.0, "eval/gold_score": 3.5, "eval/rm_score": 0.5},
            {"step": 10, "eval/kl": 1.2, "eval/gold_score": 3.4, "eval/rm_score": 0.6}]  # re-logged after a resume
    assert overopt.curve_from_metrics(rows) == [{"step": 0, "kl": 0.0, "gold": 3.0, "rm": 0.1},
                                                {"step": 10, "kl": 1.2, "gold": 3.4, "rm": 0.6}]


def test_analyse_measures_gains_from_the_start_and_the_fall_after_the_peak():
    pts = [{"kl": 0.0, "gold": 3.0, "rm": 0.0}, {"kl": 1.0, "gold": 3.6, "rm": 0.5},
           {"kl": 4.0, "gold": 3.2, "rm": 0.9}]
    a = overopt.analyse(pts)
    assert a["gold"]["gains"] == pytest.approx([0.0, 0.6, 0.2])
    assert a["gold_peak"] == pytest.approx({"kl": 1.0, "gold": 3.6, "last_kl": 4.0, "drop_after": 0.4})
    # the exact fit through (1, 0.6) and (2, 0.2): α − β = 0.6, 2α − 4β = 0.2
    assert a["gold"]["fits"]["bon"]["alpha"] == pytest.approx(1.1)
    assert a["gold"]["fits"]["bon"]["beta"] == pytest.approx(0.5)


def _fake_ppo(runs_dir, run, gold_by_step, best_of=()):
    stage = runs.stage_dir(runs_dir, run, "ppo")
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "eval/kl": s / 10, "eval/gold_score": g, "eval/rm_score": s / 100}) + "\n"
        for s, g in gold_by_step))
    bon = [{"n": n, "kl": math.log(n) / 2, "gold_score": 3.0 + 0.1 * math.log2(n), "rm_score": 0.1 * n}
           for n in best_of]
    runs.Manifest(stage="ppo", run_name=run, status="complete", wall_time_s=5.0,
                  extra={"evaluation": {"best_of_n": bon}}).save(stage)


def test_sweep_runs_each_beta_once_and_writes_its_table(tmp_path, monkeypatch):
    from pipeline import driver

    rm = runs.stage_dir(tmp_path, "r", "rm")
    rm.mkdir(parents=True)
    runs.Manifest(stage="rm", run_name="r", status="complete").save(rm)
    _fake_ppo(tmp_path, "r-overopt-b0.1", [(0, 3.0), (10, 3.5), (20, 3.6)], best_of=(1, 4, 16))  # done before
    launched = []

    def fake_stage(cmd):
        launched.append(cmd)
        run = next(a.split("=", 1)[1] for a in cmd if a.startswith("run_name="))
        _fake_ppo(tmp_path, run, [(0, 3.0), (10, 3.8), (20, 3.3)])
        return 0, None

    monkeypatch.setattr(driver, "run_stage", fake_stage)
    assert overopt.run_sweep("r", str(tmp_path), [0.1, 0.01], 20, 10, [1, 4, 16], ["seed=3"]) == 0
    assert len(launched) == 1  # β = 0.1 was complete
    args = launched[0]
    assert "objective.kl_coef=0.01" in args and "eval.curve_split=test" in args and "steps=20" in args
    assert f"parent={rm}" in args and "seed=3" in args
    assert "eval.best_of=[]" in args  # best-of-n is drawn once, by the first β's run
    result = json.loads((tmp_path / "r-overopt" / "overopt.json").read_text())
    assert [c["label"] for c in result["curves"]] == ["PPO β=0.1", "PPO β=0.01"]
    assert [p["n"] for p in result["best_of_n"]["points"]] == [1, 4, 16]
    text = (tmp_path / "r-overopt" / "overopt.md").read_text()
    assert "Gold fell after its peak by more than 0.1 (about the noise of one curve point" in text
    assert "in: PPO β=0.01 (by 0.500); by less in: none." in text  # β=0.1 peaks at its last point
    assert (tmp_path / "r-overopt" / "overopt.png").exists()


def test_sweep_without_a_reward_model_says_what_to_run(tmp_path, capsys):
    assert overopt.run_sweep("nothing", str(tmp_path), [0.1], 10, 5, [1], []) == 2
    assert "make pipeline RUN=nothing" in capsys.readouterr().err


def _fake_rm(runs_dir, run, n, accuracy):
    stage = runs.stage_dir(runs_dir, run, "rm")
    stage.mkdir(parents=True)
    metrics = {"data/comparisons": n, "data/ranked_pairs": 2 * n, "eval/pairs": 100, "eval/gold_length_corr": -0.3,
               **{k: accuracy for k, _ in rm_curve.COLUMNS}}
    runs.Manifest(stage="rm", run_name=run, status="complete", wall_time_s=7.0, metrics=metrics,
                  config={"data": {"num_prompts": n}}).save(stage)


def test_rm_curve_trains_each_size_once_and_reuses_the_runs_own_reward_model(tmp_path, monkeypatch):
    from pipeline import driver

    sft = runs.stage_dir(tmp_path, "r", "sft")
    sft.mkdir(parents=True)
    runs.Manifest(stage="sft", run_name="r", status="complete").save(sft)
    _fake_rm(tmp_path, "r", 100, 0.9)  # the run's own reward model: the curve's point at 100
    launched = []

    def fake_stage(cmd):
        launched.append(cmd)
        n = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("data.num_prompts=")))
        _fake_rm(tmp_path, next(a.split("=", 1)[1] for a in cmd if a.startswith("run_name=")), n, 0.5 + n / 1000)
        return 0, None

    monkeypatch.setattr(driver, "run_stage", fake_stage)
    assert rm_curve.run_curve("r", str(tmp_path), [10, 100], []) == 0
    assert len(launched) == 1 and "data.num_prompts=10" in launched[0] and f"parent={sft}" in launched[0]
    assert "run_name=r-rmcurve-n10" in launched[0]
    pts = json.loads((tmp_path / "r-rmcurve" / "rm_curve.json").read_text())["points"]
    assert [(p["comparisons"], p["eval/pairwise_accuracy"]) for p in pts] == [(10, 0.51), (100, 0.9)]
    text = (tmp_path / "r-rmcurve" / "rm_curve.md").read_text()
    assert "| 10 | 20 | 51.0% |" in text
    assert "From 10 to 100 comparisons, held-out accuracy changed by +39.0 points" in text
    assert rm_curve.run_curve("r", str(tmp_path), [10, 100], []) == 0 and len(launched) == 1  # all done: no run
    # with settings of its own, the run's reward model is no point of the curve: every size trains, under the name
    assert rm_curve.run_curve("r", str(tmp_path), [10, 100], ["data.label_noise=0.1"], "noisy") == 0
    assert [next(a for a in c if a.startswith("run_name=")) for c in launched[1:]] == \
        ["run_name=noisy-n10", "run_name=noisy-n100"]
    assert all("data.label_noise=0.1" in c for c in launched[1:])
    assert "Settings: `data.label_noise=0.1`" in (tmp_path / "noisy" / "rm_curve.md").read_text()


def test_rm_curve_without_an_sft_model_says_what_to_run(tmp_path, capsys):
    assert rm_curve.run_curve("nothing", str(tmp_path), [10], []) == 2
    assert "make pipeline RUN=nothing" in capsys.readouterr().err
