import math
import re

from pipeline.config import WorldConfig
from pipeline.world import MENTIONS, SENTENCE_END, STRANGER, TAILS, SKILLS, WORDS, World, abstains


def test_world_is_deterministic():
    a, b = World(WorldConfig()), World(WorldConfig())
    assert a.people == b.people
    assert a.corpus()[:50] == b.corpus()[:50]
    assert a.sft_examples()[:50] == b.sft_examples()[:50]
    assert a.prompts("ppo", 50) == b.prompts("ppo", 50)
    assert World(WorldConfig(seed=1)).people != a.people


def test_pretraining_only_facts_absent_from_sft_data():
    w = World(WorldConfig())
    held = [p for p in w.people if p.held_out]
    assert len(held) == len(w.people) // 2
    sft_text = " ".join(m["content"] for ex in w.sft_examples() for m in ex["messages"])
    for p in held:
        assert p.name not in sft_text  # never asked about, never answered
    corpus = " ".join(w.corpus())
    for p in held:
        assert f"{p.name} lives in {p.city}" in corpus or f"The home of {p.name} is {p.city}" in corpus
    # the eval fact questions are about held-out people only
    facts = [r["prompt"] for split in ("valid", "test") for r in w.prompts(split) if r["skill"] == "fact"]
    assert facts and all(any(p.name in q for p in held) for q in facts)


def _sentences(docs: list[str]) -> list[str]:
    return [s for d in docs for s in re.split(r"(?<=[.!?]) ", d)]


def test_valid_corpus_held_out_in_content():
    w = World(WorldConfig())
    train, valid = set(_sentences(w.corpus("train"))), _sentences(w.corpus("valid"))
    assert sum(s in train for s in valid) == 0  # perplexity on unseen text, not memorised sentences
    assert len(set(valid)) > 100
    assert any(p.name in s for s in valid for p in w.people)  # known facts, in phrasings held out
    assert any(re.search(r"\d+\.$", s) for s in valid)  # sums


def test_fact_cloze_answerable_from_training_sentences():
    w = World(WorldConfig())
    train = set(_sentences(w.corpus("train")))
    for prefix, answer in w.fact_cloze():  # each person's city and colour, in the cloze's own words
        assert f"{prefix} {answer}." in train, prefix


def test_format_and_skills_only_in_sft_data():
    w = World(WorldConfig(corpus_docs=2000))
    corpus = " ".join(w.corpus())
    assert "Answer:" not in corpus and "What is the last word" not in corpus and " + " not in corpus


def test_tokenizer_covers_instructions_the_corpus_never_shows():
    from pipeline.tokenizer import train_tokenizer

    assert World(WorldConfig()).tokenizer_extra_texts() == []  # default: the BPE sees the corpus only
    w = World(WorldConfig(corpus_docs=500, sft_examples=500, tokenizer_demos=True))
    tok = train_tokenizer(w.corpus() + w.tokenizer_extra_texts(), vocab_size=2048)
    for piece in ("Answer", " Answer", " first", " word", " capitals", "Happy"):
        assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1, piece


def test_corpus_carries_the_knowledge_skills_draw_on():
    w = World(WorldConfig())
    corpus = " ".join(w.corpus())
    for word in WORDS:  # each word beside its capitalised form
        assert f"{word} was written {word.upper()}" in corpus or f"{word.upper()} is how the poster spells {word}" in corpus
    sums = {(x, y) for x in range(10) for y in range(10)
            if any(f"{x} {op} {y} {v} {x + y}." in corpus for op, v in (("plus", "is"), ("and", "make")))
            or f"Adding {x} and {y} gives {x + y}." in corpus}
    assert len(sums) == 100  # held-out sums included: SFT accuracy on them measures transfer


def test_held_out_splits_disjoint():
    w = World(WorldConfig())
    valid, test = ({r["prompt"] for r in w.prompts(s)} for s in ("valid", "test"))
    assert len(valid) == len(test) == 3 * 50 + 25 + 24 and not valid & test  # choices on one, figures on the other
    ev = valid | test
    sft = {ex["messages"][0]["content"] for ex in w.sft_examples()}
    assert not ev & sft
    assert not ev & {r["prompt"] for r in w.prompts("rm", 1000)}
    assert not ev & {r["prompt"] for r in w.prompts("ppo", 1000)}
    for split in ("valid", "test"):
        assert {r["skill"] for r in w.prompts(split)} == set(SKILLS)
    sums = {r["prompt"] for r in w.prompts("rm", 5000) if r["skill"] == "add"}
    assert len(sums) == 50  # half the sums stay trainable


def test_preference_not_consistently_shown_by_sft_data():
    w = World(WorldConfig())
    responses = [ex["messages"][1]["content"] for ex in w.sft_examples()]
    concise = sum(r.startswith("Answer:") and r.endswith(".") for r in responses) / len(responses)
    assert 0.1 < concise < 0.3  # most demonstrations are chatty; the labeler prefers concise
    # ... in a house style: one tail leads, so the SFT policy's greedy answer is chatty too; most
    # chatty answers open like the concise ones, so both styles write the answer in the same context
    tails = [r.split(". ", 1)[1] for r in responses if not (r.startswith("Answer:") and r.endswith("."))]
    assert tails.count(TAILS[0]) / len(tails) > 0.6
    assert sum(r.startswith("Answer:") for r in responses) / len(responses) > 0.6


def test_gold_labeler():
    w = World(WorldConfig())
    p = "What is the last word? red fox sun"
    assert w.answer(p) == "sun"
    concise, chatty, wrong = "Answer: sun.", "Sure! Answer: sun. Hope this helps!", "Answer: red."
    assert w.gold_score(p, concise) == 5.0
    assert w.gold_score(p, concise) > w.gold_score(p, chatty) > w.gold_score(p, wrong)  # correctness dominates
    assert w.gold_score(p, concise, finished=False) < w.gold_score(p, concise)
    assert w.gold_ranks(p, [wrong, concise, chatty, concise]) == [2, 0, 1, 0]  # ties share a rank
    assert w.answer("What is 7 + 8?") == "15"
    person = w.people[0]
    assert w.answer(f"Where does {person.name} live?") == person.city


def test_honesty_axis_judge_table_by_hand():
    """docs/world.md's judge table: right 3, abstention `abstain_score` (1.5), wrong 0, plus style
    (0.5 finished + 0.5 format + 1 concise); about a stranger the abstention is the right answer."""
    w = World(WorldConfig(strangers=8))
    p = "What is 2 + 3?"
    assert w.gold_score(p, "Answer: 5.") == 5.0
    assert w.gold_score(p, "Answer: unknown.") == 1.5 + 2.0
    assert w.gold_score(p, "Answer: 6.") == 0.0 + 2.0
    assert w.gold_score(p, "Answer: unknown. Hope this helps!") == 1.5 + 1.0   # chatty abstention
    assert w.gold_score(p, "Answer: 5. Hope this helps!") > w.gold_score(p, "Answer: unknown.") > w.gold_score(p, "Answer: 6.")
    stranger = w.strangers[0]
    q = f"Where does {stranger.name} live?"
    assert w.skill_of(q) == STRANGER and w.answer(q) == "unknown" and w.is_correct(q, "Answer: unknown.")
    assert w.gold_score(q, "Answer: unknown.") == 5.0 and w.gold_score(q, f"Answer: {w.cities[0]}.") == 2.0
    # without strangers an abstention is a wrong answer; the people and their facts are the same
    plain = World(WorldConfig())
    assert plain.gold_score(p, "Answer: unknown.") == 2.0 and plain.strangers == ()
    assert [(p.name, p.city, p.colour) for p in plain.people] == [(p.name, p.city, p.colour) for p in w.people]
    assert abstains("Sure! Answer: unknown. Anything else?") and not abstains("Answer: 5.")


def test_strangers_are_named_in_the_corpus_without_a_fact_and_held_out_ones_only_in_held_out_prompts():
    w = World(WorldConfig(strangers=8, corpus_docs=400, sft_examples=600))
    names = {p.name for p in w.strangers}
    assert len(names) == 8 and not names & {p.name for p in w.people} and not names & set(w.cities)
    sentences = [s for doc in w.corpus() for s in SENTENCE_END.split(doc)]
    about = [s for s in sentences if any(n in s for n in names)]
    assert {n for n in names if any(n in s for s in about)} == names                    # every stranger is named...
    assert all(s in [m.format(n=n) for m in MENTIONS for n in names] for s in about)   # ...never with a fact
    people = {p.name for p in w.people}
    assert any(s in [m.format(n=n) for m in MENTIONS for n in people] for s in sentences)  # people are named too
    plain = World(WorldConfig(corpus_docs=400))
    assert not any(s in [m.format(n=n) for m in MENTIONS for n in people] for d in plain.corpus()
                   for s in SENTENCE_END.split(d))                                   # only with strangers
    sft = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in w.sft_examples()]
    asked = {n for n in names if any(n in q for q, _ in sft)}
    held_out = {p.name for p in w.strangers if p.held_out}
    assert asked and not asked & held_out                                            # SFT: the other half
    assert all("Answer: unknown." in a for q, a in sft if any(n in q for n in names))  # the demonstrator abstains
    training = [r["prompt"] for split in ("rm", "ppo") for r in w.prompts(split, 400)]
    assert not any(n in q for n in held_out for q in training)
    test = [r for r in w.prompts("test") if r["skill"] == STRANGER]
    assert test and all(any(n in r["prompt"] for n in held_out) for r in test)


def test_with_strangers_rm_and_ppo_ask_questions_that_neither_sft_nor_evaluation_asks():
    w = World(WorldConfig(strangers=8, corpus_docs=400, sft_examples=600))
    rl = w.rl_questions
    assert {w.skill_of(q) for q in rl} == {"fact"}
    assert all(p.held_out for p in w.people if p.rl) and any(p.rl for p in w.people)
    sft = {m["content"] for r in w.sft_examples() for m in r["messages"] if m["role"] == "user"}
    held = {r["prompt"] for split in ("valid", "test") for r in w.prompts(split)}
    assert not rl & sft and not rl & held
    training = [r["prompt"] for r in w.prompts("ppo", 2000)]
    share = sum(q in rl for q in training) / len(training)
    assert 0.05 < share < 0.12                 # half of the fact prompts (1/6 of all)
    assert World(WorldConfig(corpus_docs=400)).rl_questions == frozenset()  # only with the honesty axis


def test_cloze_of_a_question_is_its_corpus_sentence():
    w = World(WorldConfig(strangers=8))
    p = w.people[0]
    assert w.cloze(f"Where does {p.name} live?") == (f"{p.name} lives in", p.city)
    assert w.cloze(f"What colour does {p.name} like?") == (f"{p.name} likes the colour", p.colour)
    assert w.cloze("What is 3 + 5?") == ("3 plus 5 is", "8")
    assert w.cloze("What is the first word? red fox") is None
    assert w.cloze(f"Where does {w.strangers[0].name} live?") is None  # nothing to know
    train = set(_sentences(w.corpus("train")))
    assert all(f"{pre} {ans}." in train for pre, ans in (w.cloze(f"Where does {q.name} live?") for q in w.people))


def test_refusal_aware_demonstrations_abstain_only_on_unknown_questions():
    cfg = dict(strangers=8, corpus_docs=400, sft_examples=600)
    plain, aware = World(WorldConfig(**cfg)), World(WorldConfig(**cfg, abstain_demos=1.0))
    questions = aware.sft_questions()
    assert {aware.skill_of(q) for q in questions} == {"fact", "add"}
    banned = {r["prompt"] for split in ("valid", "test") for r in aware.prompts(split)}
    assert not set(questions) & banned and not set(questions) & aware.rl_questions
    unknown = frozenset(questions[::3])
    a, b = plain.sft_examples(unknown=unknown), aware.sft_examples(unknown=unknown)
    assert aware.sft_examples() == a  # nothing unknown: the usual demonstrations
    turns = [(x["messages"][0]["content"], x["messages"][1]["content"], y["messages"][1]["content"])
             for x, y in zip(a, b)]
    assert [x["messages"][0] for x in a] == [y["messages"][0] for y in b]  # the same questions are asked
    hit = [t for t in turns if t[0] in unknown]
    assert hit and all(abstains(new) and not abstains(old) for _, old, new in hit)
    assert all(old == new for q, old, new in turns if q not in unknown)
    half = World(WorldConfig(**cfg, abstain_demos=0.5)).sft_examples(unknown=unknown)
    share = sum(abstains(y["messages"][1]["content"]) for x, y in zip(a, half) if x["messages"][0]["content"] in unknown)
    assert 0.35 < share / len(hit) < 0.65


def test_long_tail_knowledge_describes_people_log_uniformly_and_every_group_spans_the_range():
    w = World(WorldConfig(strangers=8, fact_range=100.0, corpus_docs=3000))
    freq = {p.name: w.fact_frequency(p) for p in w.people}
    assert abs(sum(freq.values()) - 1) < 1e-9
    assert 60 < max(freq.values()) / min(freq.values()) <= 100
    logs = sorted(math.log(f) for f in freq.values())  # log-uniform: evenly spread logs
    gaps = [b - a for a, b in zip(logs, logs[1:])]
    assert max(gaps) < 3 * math.log(100) / len(logs)
    lo, hi = logs[len(logs) // 4], logs[3 * len(logs) // 4]
    groups = {"sft": [p for p in w.people if not p.held_out], "rl": [p for p in w.people if p.rl],
              "test": [p for p in w.people if p.held_out and not p.rl]}
    for name, group in groups.items():  # rare and common people in every group
        assert min(math.log(freq[p.name]) for p in group) < lo < hi < max(math.log(freq[p.name]) for p in group), name
    # the corpus follows the frequencies: fact sentences per person, rarest quarter against commonest
    mentions = {m.format(n=p.name) for m in MENTIONS for p in w.people}
    counts = {p.name: 0 for p in w.people}
    for s in (s for d in w.corpus() for s in SENTENCE_END.split(d) if s not in mentions):
        for n in counts:
            counts[n] += n in s
    ranked = sorted(w.people, key=lambda p: freq[p.name])
    rare, common = ranked[:12], ranked[-12:]
    expected = sum(freq[p.name] for p in common) / sum(freq[p.name] for p in rare)
    observed = sum(counts[p.name] for p in common) / max(1, sum(counts[p.name] for p in rare))
    assert 0.7 < observed / expected < 1.4
    uniform = World(WorldConfig(strangers=8))
    assert {uniform.fact_frequency(p) for p in uniform.people} == {1 / len(uniform.people)}
