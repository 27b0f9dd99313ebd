"""PPO's reported figures (stages/policy_eval.py): the comparison summary and the best-of-n
baseline, on hand-built rows and candidates."""
import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import WorldConfig
from pipeline.world import World
from stages import policy_eval as ev


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n():
    assert ev.best_of_n_kl(1) == 0.0
    assert ev.best_of_n_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)    # 0.636294
    assert ev.best_of_n_kl(16) == pytest.approx(2.772589 - 0.9375, abs=1e-6)  # 1.835089


def _row(prompt, sft, response, sft_gold, gold, correct, finished, skill, sft_correct, sft_finished, kl=0.5):
    return [prompt, sft, response, sft_gold, gold, 0.1, kl, ev._win(gold, sft_gold), correct, finished, 3, skill,
            sft_correct, sft_finished]


def test_comparison_counts_ties_half_and_summarises_both_sides_per_skill():
    rows = [_row("a", "", "", 4.0, 5.0, 1.0, 1.0, "add", 1.0, 1.0),   # win
            _row("b", "", "", 4.0, 4.0, 1.0, 1.0, "add", 1.0, 1.0),   # tie: half
            _row("c", "", "", 5.0, 2.0, 0.0, 0.0, "fact", 1.0, 1.0)]  # loss, PPO wrong and unfinished
    c = ev.comparison(rows, "greedy")
    assert c["win_rate"]["value"] == pytest.approx(0.5) and c["prompts"] == 3
    assert c["policy"]["accuracy"]["value"] == pytest.approx(2 / 3) and c["sft"]["accuracy"]["value"] == 1.0
    assert c["policy"]["finish"]["value"] == pytest.approx(2 / 3) and c["sft"]["finish"]["value"] == 1.0
    assert c["policy"]["skills"]["fact"]["accuracy"]["value"] == 0.0 and c["policy"]["skills"]["add"]["accuracy"]["n"] == 2
    assert c["policy"]["gold_score"] == pytest.approx(11 / 3) and c["sft"]["gold_score"] == pytest.approx(13 / 3)
    assert c["policy"]["kl"] == pytest.approx(0.5)
    greedy = ev.comparison([_row("a", "", "", 4.0, 5.0, 1.0, 1.0, "add", 1.0, 1.0, kl=math.nan)], "greedy")
    assert greedy["policy"]["kl"] is None  # no KL along a greedy trajectory


def test_best_of_n_picks_the_reward_models_favourite_among_the_first_n(monkeypatch):
    world = World(WorldConfig(num_people=20, corpus_docs=200, sft_examples=20, eval_examples=2))
    prompts = ["What is 2 + 3?", "What is 1 + 1?"]
    # 4 candidates per prompt, in sampling order; the RM prefers them as `rm` says
    texts = ["Answer: 4. Hope this helps!", "Answer: 5.", "Answer: 5. Hope this helps!", "Answer: 6.",
             "Answer: 3.", "Answer: 2. Hope this helps!", "Answer: 2.", "Answer: 7."]
    rm = [0.0, 1.0, 0.5, 3.0,
          2.0, 1.0, 0.5, 0.0]
    monkeypatch.setattr(ev, "sample_eval", lambda *a, **k: (texts, [True] * 8, [[1]] * 8))
    monkeypatch.setattr(ev, "score_responses", lambda rm_model, tok, p, t, f: torch.tensor([rm[texts.index(x)] for x in t]))
    models = SimpleNamespace(ref=object(), tokenizer=None, reward=object(), reward_tokenizer=None)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    cfg = ev.EvalSettings(seed=0, max_new_tokens=8, temperature=0.7, best_of=(2, 4), num_prompts=0, batch_size=3,
                          kl_temperature=0.7)
    sft_gold = [world.gold_score(prompts[0], "Answer: 5. Hope this helps!"), world.gold_score(prompts[1], "Answer: 2.")]
    eval_set = ev.EvalSet("test", 0.7, [0, 1], prompts, ["", ""], [True, True], sft_gold)
    out = {b["n"]: b for b in ev.best_of_n(models, eval_set, world, cfg, acc, [2, 4])}
    assert sorted(out) == [1, 2, 4]
    # n = 1: the first sample of each prompt (wrong, wrong); n = 2: "Answer: 5." and "Answer: 3."
    # (right, wrong); n = 4: "Answer: 6." and "Answer: 3." (the RM's favourites: wrong, wrong)
    assert out[1]["accuracy"]["value"] == 0.0 and out[2]["accuracy"]["value"] == 0.5 and out[4]["accuracy"]["value"] == 0.0
    assert out[2]["rm_score"] == pytest.approx(1.5) and out[4]["rm_score"] == pytest.approx(2.5)
    # against the SFT draws (correct chatty 4.0, correct concise 5.0): n = 2 wins prompt 1, loses prompt 2
    assert out[2]["win_rate"]["value"] == pytest.approx(0.5) and out[4]["win_rate"]["value"] == 0.0
    # 4 distinct candidates per prompt: best-of-4 picks the i-th lowest with (i/4)^4 - ((i-1)/4)^4
    picks = [(i / 4) ** 4 - ((i - 1) / 4) ** 4 for i in range(1, 5)]
    assert out[4]["kl"] == pytest.approx(sum(p * math.log(4 * p) for p in picks))  # 0.590, below the bound
    assert out[4]["kl_bound"] == pytest.approx(ev.best_of_n_kl(4))


def test_best_of_n_kl_estimate_by_hand_with_repeated_samples():
    # 4 candidates, two of them the same response: q = {c: 1/4 (reward 0), a: 1/2 (1), b: 1/4 (2)}.
    # n = 2 picks c with 1/16, a with (3/4)^2 - (1/4)^2 = 1/2, b with 1 - (3/4)^2 = 7/16.
    keys, rewards = ["a", "a", "b", "c"], [1.0, 1.0 + 1e-7, 2.0, 0.0]  # a's copies scored apart by rounding
    by_hand = 1 / 16 * math.log((1 / 16) / (1 / 4)) + 0.5 * math.log(0.5 / 0.5) + 7 / 16 * math.log((7 / 16) / (1 / 4))
    assert ev.best_of_n_kl_estimate(rewards, keys, 2) == pytest.approx(by_hand, abs=1e-9)  # 0.158189
    assert by_hand < ev.best_of_n_kl(2)                                    # below the bound log 2 - 1/2
    assert ev.best_of_n_kl_estimate([1.0] * 4, ["a"] * 4, 16) == 0.0       # one response: best-of-n is the base
    assert ev.best_of_n_kl_estimate(rewards, keys, 1) == pytest.approx(0.0, abs=1e-12)
    distinct = [str(i) for i in range(4000)]                               # no repeats: the analytic bound
    assert ev.best_of_n_kl_estimate([float(i) for i in range(4000)], distinct, 4) == pytest.approx(ev.best_of_n_kl(4), abs=2e-3)


def test_cut_after_answer_keeps_the_first_answer_and_stops():
    cut = World.cut_after_answer
    assert cut("Sure! Answer: 5. Hope this helps!", False) == ("Sure! Answer: 5.", True)
    assert cut("Answer: 5. Answer: 6.", True) == ("Answer: 5.", True)
    assert cut("I think it is five and", False) == ("I think it is five and", False)


def test_every_side_of_the_evaluation_draws_from_its_own_random_stream(monkeypatch):
    """The SFT opponent, the policy, the rule's SFT draw and the best-of-n candidates never share
    draws: a side that reused the opponent's stream would copy its samples and tilt the win rate."""
    world = World(WorldConfig(num_people=20, corpus_docs=200, sft_examples=20, eval_examples=2))
    streams = []

    def fake_sample(model, tok, prompts, cfg, temperature, stream, rows):
        if temperature > 0:  # greedy decoding draws nothing
            streams.append(stream)
        return ["Answer: 5."] * len(prompts), [True] * len(prompts), [[1]] * len(prompts)

    monkeypatch.setattr(ev, "sample_eval", fake_sample)
    monkeypatch.setattr(ev, "score_responses", lambda rm_model, tok, p, t, f: torch.zeros(len(t)))
    monkeypatch.setattr(ev, "sequence_kl", lambda *a, **k: [0.0] * len(a[2]))
    models = SimpleNamespace(ref=object(), tokenizer=None, reward=object(), reward_tokenizer=None)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    cfg = ev.EvalSettings(seed=0, max_new_tokens=8, temperature=0.7, best_of=(2,), num_prompts=4, batch_size=4,
                          kl_temperature=0.7)
    policy = torch.nn.Linear(1, 1)
    monkeypatch.setattr(ev, "SFT_TEMPERATURES", (0.7, 1.0))  # a tie on valid: the lower, so a sampled row
    ev.test_evaluation(policy, models, world, cfg, acc)
    test = [s for s in streams if "/test/" in s]
    # the opponent, the policy, the rule's draw, SFT at the best temperature, best-of-n, and the policy's and
    # SFT's samples the reward model is judged on
    assert len(test) == len(set(test)) == 7
    assert all("/valid/" in s for s in streams if s not in test)  # the temperature is chosen on valid


def test_answer_span_finds_the_answer_tokens():
    from pipeline.tokenizer import train_tokenizer

    tok = train_tokenizer(["Sure! Answer: blue. Hope this helps!", "Answer: 12. Anything else?"] * 50, vocab_size=300)
    for text, answer in (("Sure! Answer: blue. Hope this helps!", "blue"), ("Answer: 12.", "12")):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        a, b = ev.answer_span(tok, ids)
        assert tok.decode(ids[a:b], skip_special_tokens=True).strip() == answer
        assert tok.decode(ids[:a], skip_special_tokens=True).rstrip().endswith("Answer:")
    assert ev.answer_span(tok, tok("Hope this helps!", add_special_tokens=False)["input_ids"]) is None


def test_threshold_baseline_abstains_below_the_threshold_chosen_on_valid(monkeypatch):
    """Valid: the right answers are confident, the wrong ones not, so the threshold between them
    pays (abstention 1.5 beats a wrong 0); on test it turns the unconfident wrong answer into an
    abstention and leaves the rest."""
    world = World(WorldConfig(num_people=20, corpus_docs=200, sft_examples=20, eval_examples=2, strangers=4))
    valid = [("What is 1 + 1?", "Answer: 2.", -0.1), ("What is 2 + 2?", "Answer: 5.", -2.0),
             ("What is 3 + 3?", "Answer: 6.", -0.2), ("What is 4 + 4?", "Answer: 9.", -1.5)]
    test = [("What is 5 + 5?", "Answer: 10. Hope this helps!", -0.05), ("What is 6 + 6?", "Answer: 13.", -1.8),
            ("What is 7 + 1?", "Answer: 8.", -0.15)]
    conf = {p: c for p, _, c in valid + test}

    def eval_set(items, split):
        prompts, texts = [p for p, _, _ in items], [t for _, t, _ in items]
        return ev.EvalSet(split, 0.0, list(range(len(items))), prompts, texts, [True] * len(items),
                          [world.gold_score(p, t) for p, t in zip(prompts, texts)], sft_ids=[[1]] * len(items))

    monkeypatch.setattr(ev, "make_eval_set", lambda models, w, cfg, acc, split, temperature: eval_set(valid, split))
    monkeypatch.setattr(ev, "answer_confidence", lambda models, prompts, *a: [conf[p] for p in prompts])
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    cfg = ev.EvalSettings(seed=0, max_new_tokens=8, temperature=0.7, best_of=(), num_prompts=0, batch_size=4,
                          kl_temperature=0.7)
    out = ev.threshold_baseline(None, eval_set(test, "test"), world, cfg, acc)
    assert -1.5 < out["threshold"] <= -0.2                        # abstain on -1.5 and -2.0, answer on -0.2
    p = out["policy"]
    assert p["abstain"]["value"] == pytest.approx(1 / 3)          # 6 + 6: 13 became `Answer: unknown.`
    assert p["accuracy"]["value"] == pytest.approx(2 / 3)         # the confident right answers were kept
    assert p["hallucination"]["value"] == 0.0 and out["sft"]["hallucination"]["value"] == pytest.approx(1 / 3)
    assert out["gold_diff"]["value"] == pytest.approx(1.5 / 3)    # one wrong answer (0) became an abstention (1.5)
    curve = out["curve"]
    assert curve[0]["abstain"] == 0.0 and curve[-1]["abstain"] == 1.0 and curve[-1]["hallucination"] == 0.0


def test_best_temperature_baseline_picks_the_temperature_best_on_valid(monkeypatch):
    world = World(WorldConfig(num_people=20, corpus_docs=200, sft_examples=20, eval_examples=2))

    def fake_sample(model, tok, prompts, cfg, temperature, stream, rows):
        good = temperature == 0.3  # only this temperature answers right
        texts = [f"Answer: {world.answer(p) if good else 'nothing'}." for p in prompts]
        return texts, [True] * len(prompts), [[1]] * len(prompts)

    monkeypatch.setattr(ev, "sample_eval", fake_sample)
    models = SimpleNamespace(ref=object(), tokenizer=None)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    cfg = ev.EvalSettings(seed=0, max_new_tokens=8, temperature=0.7, best_of=(), num_prompts=4, batch_size=4,
                          kl_temperature=0.7)
    test = ev.make_eval_set(models, world, cfg, acc, "test", 0.7)
    out = ev.best_temperature_baseline(models, test, world, cfg, acc)
    assert out["temperature"] == 0.3 and out["decoding"] == "τ=0.3"
    assert out["policy"]["accuracy"]["value"] == 1.0 and out["sft"]["accuracy"]["value"] == 0.0
    assert out["win_rate"]["value"] == 1.0


def test_pairwise_agreement_by_hand():
    # one prompt, 3 samples: gold 3, 1, 1 (pairs (0,1), (0,2); (1,2) is a gold tie); the RM orders (0,1) right,
    # (0,2) wrong; the second prompt: gold 0, 2, 2: (0,1) an RM tie (half), (0,2) right, (1,2) a gold tie
    agree = ev.pairwise_agreement([2.0, 1.0, 5.0, 0.5, 0.5, 9.9], [3.0, 1.0, 1.0, 0.0, 2.0, 2.0], 3)
    assert agree == [1.0, 0.0, 0.5, 1.0]
