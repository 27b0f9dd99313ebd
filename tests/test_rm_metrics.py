"""The reward model's pure math: the normalization folded into the score head, and the held-out
accuracy metrics (pair kinds, intervals), against hand-computed values."""
import pytest
import torch

from reward_model.model import fold_normalization, normalized_head, shift_deviation, shift_direction


def _head_only(w):
    """A stand-in with just the score head and a config: what the normalization touches."""
    model = torch.nn.Module()
    model.score = torch.nn.Linear(w.shape[1], 1, bias=False)
    model.config = type("C", (), {})()
    model.score.weight.data.copy_(w)
    return model


def test_normalized_head_math():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=g) + 2.0
    held = torch.randn(20, 8, generator=g) + 2.0
    w = torch.randn(1, 8, generator=g)
    scores = hidden @ w[0]
    model = _head_only(w)
    stats = fold_normalization(model, hidden, scores, use_std=True)
    after = hidden.double() @ model.score.weight.double()[0]
    assert abs(after.mean().item()) < 1e-6 and abs(after.std(unbiased=False).item() - 1) < 1e-5
    assert model.config.reward_normalization == stats
    # the deviation from the exact affine map is μ(1 − v·h)/σ with v the fitted shift direction
    mu, sd = stats["mean"], stats["std"]
    v = shift_direction(hidden)
    assert abs((hidden.double() @ v).mean().item() - 1) < 1e-9
    expected = (mu * (1 - held.double() @ v) / sd).abs()
    dev = shift_deviation(w, model.score.weight.detach(), held, mu, sd)
    assert abs(dev["max_abs_dev"] - expected.max().item()) < 1e-4
    torch.testing.assert_close(normalized_head(w, v.float(), mu, sd) @ hidden.mean(0), torch.zeros(1), atol=1e-5, rtol=0)


def test_shift_is_exact_when_hidden_states_share_a_constant_component():
    """RMSNorm outputs share a large component; when one coordinate is the same for every
    sequence, v·h = 1 can hold exactly and the folded head equals the exact map (s − μ)/σ
    on unseen hidden states too, where shifting along the mean hidden state would not be."""
    g = torch.Generator().manual_seed(1)
    ref, held = torch.randn(64, 6, generator=g), torch.randn(16, 6, generator=g)
    ref[:, 0], held[:, 0] = 3.0, 3.0
    w = torch.randn(1, 6, generator=g)
    model = _head_only(w)
    stats = fold_normalization(model, ref, ref @ w[0], use_std=True)
    dev = shift_deviation(w, model.score.weight.detach(), held, stats["mean"], stats["std"])
    assert dev["max_abs_dev"] < 1e-2
    hbar = ref.double().mean(0)
    along_mean = (stats["mean"] * (1 - held.double() @ hbar / hbar.dot(hbar)) / stats["std"]).abs().max().item()
    assert along_mean > 10 * dev["max_abs_dev"]


def test_accuracy_by_correctness_hand_computed():
    from reward_model.metrics import accuracy_by_correctness

    rankings = [[0, 1, 2], [1, 0], [0, 1], [0, 0, 1]]
    rewards = [[3.0, 1.0, 2.0], [0.5, 0.2], [1.0, 0.0], [1.0, 2.0, 0.0]]
    correct = [[True, True, False], [False, False], None, [True, False, False]]
    finished = [[True] * 3, [True] * 2, [True] * 2, [True] * 3]
    # comparison 1: 0>1 style hit, 0>2 correctness hit, 1>2 correctness miss; 2: 1>0 style miss;
    # 3: correctness unknown, skipped; 4: 0~1 tie skipped, 0>2 correctness hit, 1>2 style hit
    out = accuracy_by_correctness(rankings, rewards, correct, finished)
    assert {k: (v["accuracy"], v["pairs"]) for k, v in out.items()} == {
        "correctness": (2 / 3, 3), "correctness_same_finish": (2 / 3, 3), "style": (2 / 3, 3)}
    assert accuracy_by_correctness(rankings, rewards, [None] * 4, finished) == {}


def test_accuracy_by_correctness_splits_pairs_by_finishing():
    """Correctness pairs are split by whether both responses finished; `different_finish` counts
    every pair with one response cut off, whatever separates the two."""
    from pipeline.stats import wilson
    from reward_model.metrics import accuracy_by_correctness

    # A right and finished, B wrong and cut off, C wrong and finished; the labeler ranks A > C > B
    rankings, correct, finished = [[0, 2, 1]], [[True, False, False]], [[True, False, True]]
    rewards = [[0.0, -1.0, 0.5]]  # the RM ranks C > A > B: A~B hit, A~C miss, C~B hit
    out = accuracy_by_correctness(rankings, rewards, correct, finished)
    assert {k: (v["accuracy"], v["pairs"]) for k, v in out.items()} == {
        "correctness": (1 / 2, 2),                   # A>B hit, A>C miss
        "correctness_same_finish": (0.0, 1),         # A>C: both finished, the RM got it wrong
        "correctness_different_finish": (1.0, 1),    # A>B: B cut off, the end token gives it away
        "different_finish": (1.0, 2),                # A>B and C>B
        "style": (1.0, 1)}                           # C>B: both wrong
    assert (out["correctness"]["low"], out["correctness"]["high"]) == wilson(1, 2)
    # 1 hit of 2: 95% Wilson interval [0.0945, 0.9055] (hand-computed: centre 0.5, half-width 0.4055)
    assert out["correctness"]["low"] == pytest.approx(0.0945, abs=1e-4)
    assert out["correctness"]["high"] == pytest.approx(0.9055, abs=1e-4)
    assert out["different_finish"]["low"] > 0.3 and out["different_finish"]["high"] == 1.0
    # the same pairs, correctness unknown: only the finishing split remains
    assert set(accuracy_by_correctness(rankings, rewards, [None], finished)) == {"different_finish"}


def test_pairwise_accuracy_reports_wilson_intervals():
    from pipeline.stats import wilson
    from reward_model.metrics import pairwise_accuracy

    out = pairwise_accuracy([[0, 1, 2], [0, 1]], [[3.0, 1.0, 2.0], [0.0, 1.0]], ["a", "b"])
    assert (out["accuracy"], out["pairs"]) == (2 / 4, 4) and (out["low"], out["high"]) == wilson(2, 4)
    assert out["by_group"]["a"] == {"accuracy": 2 / 3, "pairs": 3, "low": wilson(2, 3)[0], "high": wilson(2, 3)[1]}
    assert out["by_group"]["b"]["accuracy"] == 0.0 and out["by_group"]["b"]["low"] == 0.0 < out["by_group"]["b"]["high"]


def test_accuracy_by_correctness_splits_pairs_by_which_side_is_longer():
    """`longer_better`: pairs whose better response is the longer one (length and quality disagree
    for a labeler who prefers concise answers); an RM that only prefers short responses gets 0 there."""
    from reward_model.metrics import accuracy_by_correctness

    # A (right, 9 tokens) > B (wrong, 3 tokens) > C (wrong, 3 tokens); the RM prefers the short ones
    rankings, correct, finished, lengths = [[0, 1, 2]], [[True, False, False]], [[True] * 3], [[9, 3, 3]]
    rewards = [[0.0, 2.0, 1.0]]  # B > C > A: A>B miss, A>C miss, B>C hit (same length: neither kind)
    out = accuracy_by_correctness(rankings, rewards, correct, finished, lengths)
    assert (out["longer_better"]["accuracy"], out["longer_better"]["pairs"]) == (0.0, 2)
    assert "shorter_better" not in out
    flipped = accuracy_by_correctness([[2, 1, 0]], rewards, correct, finished, lengths)  # C > B > A
    assert (flipped["shorter_better"]["accuracy"], flipped["shorter_better"]["pairs"]) == (1.0, 2)
    assert "longer_better" not in accuracy_by_correctness(rankings, rewards, correct, finished)  # no lengths given
