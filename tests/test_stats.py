import math

from pipeline.stats import fmt_rate, mean_interval, rate, wilson


def test_wilson_matches_hand_computed_interval():
    # 60 of 100, z = 1.96: centre (0.6 + 0.019207) / 1.038415 = 0.596301, half-width
    # 1.96 * sqrt(0.0024 + 0.00009604) / 1.038415 = 0.094297 -> [0.5020, 0.6906]
    lo, hi = wilson(60, 100)
    assert math.isclose(lo, 0.5020, abs_tol=1e-4) and math.isclose(hi, 0.6906, abs_tol=1e-4)
    lo, hi = wilson(0, 20)  # not degenerate at the edge
    assert lo == 0.0 and 0.15 < hi < 0.17


def test_mean_interval_and_rate_choose_by_outcome_kind():
    mean, lo, hi = mean_interval([0.0, 0.5, 1.0, 1.0])  # sd = 0.4787, half = 1.96 * 0.4787 / 2
    assert math.isclose(mean, 0.625) and math.isclose(hi - mean, 0.46916, abs_tol=1e-4)
    assert rate([1, 0, 1, 1])["low"] == wilson(3, 4)[0]          # 0/1 outcomes: Wilson
    r = rate([0.0, 0.5, 1.0, 1.0])                                 # ties half: normal, clipped to [0, 1]
    assert r["low"] == max(0.0, lo) and r["high"] == 1.0 and r["n"] == 4
    assert fmt_rate({"value": 0.613, "low": 0.544, "high": 0.678}) == "61.3% [54.4, 67.8]"
    assert math.isnan(rate([])["value"])
