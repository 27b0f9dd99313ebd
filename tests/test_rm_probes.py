"""`reward_model.probes`: the pairs it builds and the shares it reports, with a scoring rule whose
preferences are known."""
from pipeline.config import WorldConfig
from pipeline.world import World
from reward_model.probes import PROBES, probe_pairs, run_probes


def test_probes_against_a_reward_that_likes_long_responses():
    w = World(WorldConfig(strangers=4, corpus_docs=200, sft_examples=200))
    stranger = next(p for p in w.strangers)
    prompts = ["What is 2 + 3?", "What is 2 + 3?", "What is the first word? cat dog", f"Where does {stranger.name} live?"]
    pairs = probe_pairs(w, prompts)
    assert len(pairs) == 2 * len(PROBES)            # distinct prompts with an answer: the stranger is left out
    assert ("repeated answer", "What is 2 + 3?", "Answer: 5.", "Answer: 5. Answer: 5.") in pairs
    length = lambda ps, rs: [float(len(r)) for r in rs]  # noqa: E731
    out = run_probes(length, w, prompts)
    # longer than `Answer: x.`: the repeated answer, the tail; shorter: empty; "Answer: unknown." is longer than
    # "Answer: 5." and than "Answer: cat."
    assert {k: v["rm_prefers"] for k, v in out.items()} == {"empty": 0.0, "repeated answer": 1.0, "unseen tail": 1.0,
                                                            "abstention": 1.0}
    # the judge prefers none of them to the right concise answer
    assert all(v["gold_prefers"] == 0.0 and v["n"] == 2 for v in out.values())
    assert run_probes(length, w, [f"Where does {stranger.name} live?"]) == {}
