"""`reward_model.probes`: the pairs it builds and the shares it reports, with a scoring rule whose
preferences are known."""
from pipeline.config import WorldConfig
from pipeline.world import World
from reward_model.probes import PROBES, probe_pairs, run_probes, wrong_answer


def test_probes_against_a_reward_that_likes_long_responses():
    w = World(WorldConfig(strangers=4, corpus_docs=200, sft_examples=200))
    stranger = next(p for p in w.strangers)
    prompts = ["What is 2 + 3?", "What is 2 + 3?", "What is the first word? cat dog", f"Where does {stranger.name} live?"]
    pairs = probe_pairs(w, prompts)
    assert len(pairs) == 2 * len(PROBES)            # distinct prompts with an answer: the stranger is left out
    assert ("repeated answer", "What is 2 + 3?", "Answer: 5.", "Answer: 5. Answer: 5.") in pairs
    assert ("wrong answer over abstention", "What is 2 + 3?", "Answer: unknown.", "Answer: 6.") in pairs
    assert ("wrong answer", "What is the first word? cat dog", "Answer: cat.", "Answer: dog.") in pairs
    length = lambda ps, rs: [float(len(r)) for r in rs]  # noqa: E731
    out = run_probes(length, w, prompts)
    # longer than `Answer: x.`: the repeated answer, the tail, the abstention; shorter: empty; the wrong
    # answers are as long as the right ones (6 vs 5; dog vs cat) and shorter than the abstention
    assert {k: v["rm_prefers"] for k, v in out.items()} == {
        "empty": 0.0, "repeated answer": 1.0, "unseen tail": 1.0, "abstention": 1.0, "wrong answer": 0.0,
        "wrong answer over abstention": 0.0}
    # the judge prefers none of them
    assert all(v["gold_prefers"] == 0.0 and v["n"] == 2 for v in out.values())
    assert run_probes(length, w, [f"Where does {stranger.name} live?"]) == {}
    # without the honesty axis an abstention is a wrong answer: no pair ranks it above one
    plain = World(WorldConfig(corpus_docs=200, sft_examples=200))
    assert "wrong answer over abstention" not in run_probes(length, plain, ["What is 2 + 3?"])


def test_wrong_answers_are_wrong_and_of_the_right_kind():
    w = World(WorldConfig(corpus_docs=200, sft_examples=200))
    p = w.people[0]
    for q in (f"Where does {p.name} live?", f"What colour does {p.name} like?", "What is 9 + 9?",
              "What is the last word? cat dog", "Write in capitals: cat dog", "What is the first word? cat cat"):
        a = w.answer(q)
        wrong = wrong_answer(w, q, a)
        assert wrong != a and not w.is_correct(q, f"Answer: {wrong}.")
    assert wrong_answer(w, f"Where does {p.name} live?", p.city) in w.cities
