"""`stages.self_knowledge`: AUROC by hand, the probe on data a linear probe can and cannot separate,
and its training prompts (never a test prompt)."""
import random

import pytest
import torch

from pipeline.config import WorldConfig
from pipeline.world import KNOWN_UNKNOWN_SKILLS, World
from stages import self_knowledge as sk


def test_auroc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4: pairs won 3 + (1 + 0.5 tie) of 6
    assert sk.auroc([0.9, 0.4, 0.5, 0.1, 0.4], [1, 1, 0, 0, 0]) == pytest.approx(4.5 / 6)
    assert sk.auroc([0.2, 0.1], [1, 1]) != sk.auroc([0.2, 0.1], [1, 1])  # nan without a negative


def test_aurocs_by_skill_by_hand():
    # facts: the probe ranks the right answer first (1.0), the confidence last (0.0); sums: one tie each (0.5)
    out = sk.aurocs_by_skill(probe=[0.9, 0.1, 0.3, 0.3, 0.7], confidence=[-2.0, -0.5, -1.0, -1.0, -3.0],
                             labels=[1, 0, 1, 0, 1], skills=["fact", "fact", "add", "add", "first"])
    assert out["probe_auroc_fact"] == 1.0 and out["confidence_auroc_fact"] == 0.0
    assert out["probe_auroc_add"] == 0.5 and out["confidence_auroc_add"] == 0.5
    assert set(out) == {f"{k}_auroc_{s}" for k in ("probe", "confidence") for s in KNOWN_UNKNOWN_SKILLS}


def test_probe_finds_a_direction_the_labels_follow_and_nothing_in_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = (x[:, 3] - 0.5 * x[:, 7] > 0).float()
    scores, _ = sk.probe_scores(x[:120], y[:120], x[120:])
    assert sk.auroc(scores, y[120:].tolist()) > 0.95
    noise = (torch.rand(200, generator=g) > 0.5).float()
    scores, _ = sk.probe_scores(x[:120], noise[:120], x[120:])
    assert 0.3 < sk.auroc(scores, noise[120:].tolist()) < 0.7


def test_probe_prompts_are_held_out_questions_and_never_test_ones():
    w = World(WorldConfig(strangers=8, corpus_docs=400, sft_examples=600))
    train = sk.probe_prompts(w)
    test = {r["prompt"] for r in w.prompts("test")}
    assert train and not set(train) & test
    assert {w.skill_of(p) for p in train} == set(KNOWN_UNKNOWN_SKILLS)
    random.Random(0).shuffle(train)  # a list the caller may reorder
