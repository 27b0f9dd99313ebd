"""Stage `rm` and the reward_model package on a tiny random Llama (fast, one thread).

The parent is a random "SFT" model, so samples are noise; the gold labeler still ranks them
(format, concision, stopping), which is all the machinery needs. The pure math has its own files:
the losses in test_rm_losses.py, the head normalization and accuracy metrics in test_rm_metrics.py."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import runs
from pipeline.config import load_config
from pipeline.records import load_comparisons, parse_comparison
from pipeline.runtime import resolve_precision
from pipeline.stage import DataError
from reward_model import comparisons as cmp
from reward_model.scoring import group_rewards, render, score

ROOT = Path(__file__).resolve().parent.parent
WORLD = ["world.num_people=20", "world.corpus_docs=300", "world.sft_examples=100", "world.eval_examples=3"]
FAST = ["threads=1", "wandb.mode=disabled", *WORLD, "data.num_prompts=12", "data.k=3", "data.max_new_tokens=5",
        "epochs=2", "batch.size=4", "batch.micro=2", "log_every=1", "save_every=0",
        "batch.forward=48", "batch.forward=48", "normalize.reference_size=64"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A complete fake `sft` stage: tiny tokenizer + random tiny Llama + manifest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import WorldConfig
    from pipeline.tokenizer import train_tokenizer
    from pipeline.world import World

    world = World(WorldConfig(num_people=20, corpus_docs=300))
    texts = world.corpus() + [m["content"] for e in world.sft_examples()[:100] for m in e["messages"]]
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    stage = tmp_path_factory.mktemp("parent") / "p" / "sft"
    model.save_pretrained(stage / "model")
    tok.save_pretrained(stage / "model")
    runs.Manifest(stage="sft", run_name="p", status="complete", model_dir="model",
                  tokenizer_fingerprint=runs.tokenizer_fingerprint(stage / "model")).save(stage)
    return stage


def run_rm(sft, runs_dir, run_name, *extra):
    from stages.rm import RMConfig, run

    cfg = load_config(RMConfig, [*FAST, f"parent={sft}", f"runs_dir={runs_dir}", f"run_name={run_name}", *extra])
    return run(cfg)


@pytest.fixture(scope="module")
def finished_run(sft, tmp_path_factory):
    """One complete world run, shared by the tests that only read its outputs."""
    runs_dir = tmp_path_factory.mktemp("runs")
    manifest = run_rm(sft, runs_dir, "a")
    return runs_dir / "a" / "rm", manifest


def _ids(args, kw):
    """input_ids of a hooked backbone call (passed positionally or by name)."""
    return args[0] if args else kw["input_ids"]


def tiny_rm(sft):
    from pipeline.models import load_tokenizer
    from reward_model.model import load_reward_model

    tok = load_tokenizer(sft / "model")
    torch.manual_seed(1)
    return load_reward_model(sft / "model", tok), tok


# ------------------------------------------------------------------------------------------
# model, scoring, normalization
# ------------------------------------------------------------------------------------------
def test_reward_model_setup(sft):
    model, tok = tiny_rm(sft)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    d = model.score.in_features
    assert abs(model.score.weight.std().item() - (d + 1) ** -0.5) < 0.5 * (d + 1) ** -0.5
    ids = render(tok, "What is 1 + 2?", "Answer: 3.")
    assert ids[-1] == tok.eos_token_id and tok.pad_token_id not in ids
    assert render(tok, "What is 1 + 2?", "Answer: 3", finished=False) == ids[:-1] or \
        render(tok, "What is 1 + 2?", "Answer: 3", finished=False)[-1] != tok.eos_token_id


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reward_model_loader_turns_dropout_off(sft, tmp_path, family):
    """A backbone saved with dropout scores differently on every train-mode forward when loaded
    plainly; loaded as a reward model it scores the same twice. GPT-2 has nn.Dropout modules,
    Llama none: its attention reads a float `attention_dropout` in train mode."""
    from transformers import (AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    from pipeline.models import load_tokenizer
    from reward_model.model import load_reward_model

    tok = load_tokenizer(sft / "model")
    torch.manual_seed(0)
    if family == "gpt2":
        backbone = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                              embd_pdrop=0.3, attn_pdrop=0.3, resid_pdrop=0.3))
    else:
        backbone = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                                max_position_embeddings=128, attention_dropout=0.3))
    backbone.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ids = torch.tensor([render(tok, "What is 1 + 2?", "Answer: 3."), render(tok, "What is 2 + 2?", "Answer: 5.")])

    def two_scores(model):
        model.train()
        with torch.no_grad():
            return [model(input_ids=ids).logits for _ in range(2)]

    torch.manual_seed(1)
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m"), num_labels=1)
    plain.config.pad_token_id = tok.pad_token_id
    a, b = two_scores(plain)
    assert (a - b).abs().max() > 1e-4          # dropout is live in this checkpoint: the check below can fail
    torch.manual_seed(1)
    a, b = two_scores(load_reward_model(tmp_path / "m", tok))
    assert torch.equal(a, b)


def test_group_rewards_forwards_each_response_once(sft):
    model, tok = tiny_rm(sft)
    groups = [[render(tok, "What is 1 + 2?", r) for r in ("Answer: 3.", "3", "Sure! Answer: 3.")],
              [render(tok, "What is the first word? cat dog", r) for r in ("Answer: cat.", "dog")]]
    calls = []
    hook = model.model.register_forward_hook(lambda m, args, kw, out: calls.append(_ids(args, kw).shape), with_kwargs=True)
    rewards, valid_mask = group_rewards(model, groups, tok.pad_token_id)
    hook.remove()
    assert calls == [torch.Size([5, max(len(s) for g in groups for s in g)])]  # one forward, 5 responses
    assert valid_mask.tolist() == [[True, True, True], [True, True, False]] and rewards[1, 2] == 0
    alone = score(model, tok, ["What is 1 + 2?"] * 3, ["Answer: 3.", "3", "Sure! Answer: 3."])
    torch.testing.assert_close(rewards[0].detach(), alone, atol=1e-5, rtol=1e-5)


def test_bf16_on_cpu_normalizes_exactly(sft, tmp_path):
    """Under bf16 autocast the forward's scores keep ~3 digits; the folded head still gives the
    reference set mean 0 (taken from the float64 head product)."""
    m = run_rm(sft, tmp_path, "bf16", "precision=bf16")
    assert m.complete and abs(m.metrics["norm/ref_mean"]) < 1e-6


def test_plain_transformers_model_gives_normalized_scores(finished_run):
    """The saved directory needs no project code: AutoModelForSequenceClassification and the
    tokenizer's chat template give the same normalized scores as reward_model.scoring.score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    stage, manifest = finished_run
    acc = manifest.extra["headline"]["pairwise_acc"]
    # NaN (no ranked held-out pair) must fail here: every comparison with NaN is False, so test it
    assert manifest.status == "complete" and manifest.metrics["eval/pairs"] > 0 and math.isfinite(acc) and 0 <= acc <= 1
    recs = [json.loads(line) for line in (stage / "comparisons.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and all(len(r["responses"]) == 3 and r["ranking"] is not None for r in recs)
    assert all(len(r["correct"]) == 3 for r in recs)  # the world labeler marks each answer right or wrong
    from transformers import AutoModelForCausalLM

    from reward_model.likelihood import attach, load_likelihood

    tok = AutoTokenizer.from_pretrained(stage / "model")
    model = AutoModelForSequenceClassification.from_pretrained(stage / "model").eval()
    term = model.config.reward_likelihood   # the likelihood term, as the model card adds it
    assert term["coef"] > 0 and "likelihood" not in {p.name for p in (stage / "model").iterdir()}  # no copy
    lm = AutoModelForCausalLM.from_pretrained(stage / "model" / term["model"]).eval()
    # the stage measured its statistics at its own precision; bf16 keeps ~3 significant digits
    tol = 1e-2 if resolve_precision(manifest.config["precision"]) == "bf16" else 1e-4
    plain = []
    for r in recs:  # the whole reference set (36 samples < normalize.reference_size)
        for resp, done in zip(r["responses"], r["finished"]):
            ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": resp}], return_dict=True)["input_ids"]
            ids = ids if done else ids[:-1]
            start = len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
            with torch.no_grad():
                head = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
                logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            log_lik = logp.gather(-1, torch.tensor(ids)[1:, None])[start - 1:].sum().item()
            plain.append(head + term["coef"] * (log_lik - term["center"]))
    plain = torch.tensor(plain)
    assert abs(plain.mean().item()) < tol and abs(plain.std(unbiased=False).item() - 1) < 10 * tol
    attach(model, load_likelihood(stage / "model"))
    ours = score(model, tok, [r["prompt"] for r in recs for _ in r["responses"]],
                 [x for r in recs for x in r["responses"]], [x for r in recs for x in r["finished"]], batch_size=7)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    m = manifest.metrics
    assert abs(m["norm/ref_mean"]) < 1e-6 and m["norm/heldout_max_abs_dev"] >= m["norm/heldout_mean_abs_dev"] >= 0
    assert {"edges", "chosen", "rejected"} <= set(manifest.extra["reward_histogram"])
    kinds = manifest.extra["eval_accuracy_by_pair_kind"]
    from reward_model.metrics import RM_PAIR_KINDS

    assert set(kinds) <= set(RM_PAIR_KINDS) and {"longer_better", "shorter_better"} & set(kinds)
    assert sum(kinds.get(k, {"pairs": 0})["pairs"] for k in ("correctness", "style")) == m["eval/pairs"]
    assert all(v["low"] <= v["accuracy"] <= v["high"] for v in [*kinds.values(), *manifest.extra["eval_accuracy_by_skill"].values()])
    assert m["eval/pairwise_accuracy_low"] <= m["eval/pairwise_accuracy"] <= m["eval/pairwise_accuracy_high"]
    assert "eval/length_corr" in m and any(k.startswith("eval/pairwise_accuracy/") for k in m)


# ------------------------------------------------------------------------------------------
# K-wise training loop
# ------------------------------------------------------------------------------------------
def test_each_response_forwarded_once_per_step(sft, tmp_path, monkeypatch):
    import stages.rm as rm_stage

    rows_per_call = []
    real = rm_stage.load_reward_model

    def counted(*a, **kw):
        model = real(*a, **kw)
        model.model.register_forward_hook(
            lambda m, args, kw, out: rows_per_call.append(_ids(args, kw).shape[0]) if torch.is_grad_enabled() else None,
            with_kwargs=True)
        return model

    monkeypatch.setattr(rm_stage, "load_reward_model", counted)
    manifest = run_rm(sft, tmp_path, "count", "steps=3")
    assert manifest.status == "complete"
    # 3 steps x 2 micro-batches, each micro-batch = 2 prompts x K=3 responses in ONE forward
    assert rows_per_call == [6] * 6


def test_resume_after_stop_matches_unbroken_run(sft, tmp_path, finished_run):
    stage = tmp_path / "r" / "rm"
    first = run_rm(sft, tmp_path, "r", "stop_after=3")
    assert first.status == "running" and list((stage / "checkpoints").glob("step-*"))
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    resumed = run_rm(sft, tmp_path, "r")
    assert resumed.status == "complete"
    unbroken = finished_run[1]
    for k in ("eval/pairwise_accuracy", "eval/reward_chosen_mean", "eval/reward_rejected_mean", "train/loss", "norm/raw_mean"):
        assert resumed.metrics[k] == pytest.approx(unbroken.metrics[k], abs=1e-4), k


# ------------------------------------------------------------------------------------------
# imported files
# ------------------------------------------------------------------------------------------
PAIRS = [("What is 1 + 2?", "Answer: 3.", "Sure! Answer: 4. Hope this helps!"),
         ("What is the first word? cat dog", "Answer: cat.", "Answer: dog."),
         ("Write in capitals: red fox", "Answer: RED FOX.", "Of course! red fox"),
         ("What is the last word? sun moon", "Answer: moon.", "Answer: sun."),
         ("What is 4 + 4?", "Answer: 8.", "Happy to help! Answer: 8. Anything else?"),
         ("What is the first word? owl bee", "Answer: owl.", "bee"),
         ("Write in capitals: map key", "Answer: MAP KEY.", "Answer: MAP."),
         ("What is 2 + 5?", "Answer: 7.", "Great question! Answer: 6.")]


def _format(kind: str, p: str, c: str, r: str) -> dict:
    user, assistant = {"role": "user", "content": p}, lambda x: {"role": "assistant", "content": x}
    return {"kwise": {"prompt": p, "responses": [r, c, c + " Anything else?"], "ranking": [2, 0, 1]},
            "explicit": {"prompt": p, "chosen": c, "rejected": r},
            "implicit": {"chosen": f"Q: {p} A: {c}", "rejected": f"Q: {p} A: {r}"},
            "messages": {"prompt": [user], "chosen": [assistant(c)], "rejected": [assistant(r)]},
            "implicit_messages": {"chosen": [user, assistant(c)], "rejected": [user, assistant(r)]},
            # UltraFeedback: a prompt string, and chosen/rejected as whole conversations that repeat it
            "ultrafeedback": {"prompt": p, "chosen": [user, assistant(c)], "rejected": [user, assistant(r)]},
            # Anthropic HH: multi-turn dialogue text sharing every turn but the last assistant one
            "hh": {"chosen": f"\n\nHuman: Hello\n\nAssistant: Hi!\n\nHuman: {p}\n\nAssistant: {c}",
                   "rejected": f"\n\nHuman: Hello\n\nAssistant: Hi!\n\nHuman: {p}\n\nAssistant: {r}"}}[kind]


@pytest.mark.parametrize("kind", ["kwise", "explicit", "implicit", "messages", "implicit_messages", "ultrafeedback", "hh"])
def test_imported_formats_train(sft, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.jsonl"
    tie = (PAIRS[0][0], PAIRS[0][1], PAIRS[0][1])  # identical chosen and rejected: dropped with a warning
    path.write_text("".join(json.dumps(_format(kind, *t)) + "\n" for t in PAIRS + [tie] * (kind in ("ultrafeedback", "hh"))))
    comps = load_comparisons([str(path)])
    assert len(comps) == len(PAIRS) and all(c.pairs() for c in comps)
    if kind == "ultrafeedback":
        assert comps[0].prompt == PAIRS[0][0] and comps[0].responses == list(PAIRS[0][1:])
    if kind == "hh":
        assert comps[0].prompt == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                                   {"role": "user", "content": PAIRS[0][0]}] and comps[0].responses == list(PAIRS[0][1:])
    if kind == "implicit":
        assert comps[0].prompt == "Q: What is 1 + 2? A:" and comps[0].responses == ["Answer: 3.", "Sure! Answer: 4. Hope this helps!"]
    if kind == "implicit_messages":
        assert comps[0].prompt == [{"role": "user", "content": PAIRS[0][0]}] and comps[0].responses[0] == "Answer: 3."
    manifest = run_rm(sft, tmp_path, kind, "data.source=files", f"data.files=[{path}]", "data.valid_fraction=0.25",
                      "steps=2")
    assert manifest.status == "complete"
    rows = runs.read_metrics(tmp_path / kind / "rm" / "metrics.jsonl")
    assert any("train/loss" in r for r in rows) and manifest.metrics["eval/pairs"] >= 2
    assert abs(manifest.metrics["norm/ref_mean"]) < 1e-5
    if kind in ("ultrafeedback", "hh"):
        assert f"warning: {path}: dropped 1 of 9 pairs whose 'chosen' and 'rejected' responses are identical (line 9)" \
            in capsys.readouterr().err


BAD = {
    "bad_json": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', "line 2", "malformed JSON"),
    "missing_field": ('{"prompt": "a", "chosen": "b"}\n', "line 1", "'rejected'"),
    "wrong_type": ('{"prompt": "a", "responses": ["x", 3], "ranking": [0, 1]}\n', "line 1", "'responses'"),
    "ranking_length": ('{"prompt": "a", "responses": ["x", "y", "z"], "ranking": [0, 1]}\n', "line 1", "'ranking'"),
    "empty": ("", "", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_file_fails_clearly_and_leaves_outputs(sft, finished_run, tmp_path, capsys, case):
    from stages.rm import main

    text, where, field = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    stage = finished_run[0]
    before = {p: p.read_bytes() for p in [stage / "manifest.json", stage / "model" / "model.safetensors",
                                          sft / "manifest.json", sft / "model" / "model.safetensors"]}
    rc = main([*FAST, f"parent={sft}", f"runs_dir={stage.parent.parent}", "run_name=a", "data.source=files",
               f"data.files=[{path}]"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{path}:{where}" in err and field in err, err
    assert all(p.read_bytes() == b for p, b in before.items())


def test_kwise_validation_messages():
    with pytest.raises(DataError, match=r"f:line 3: field 'ranking' is null: this record is not labeled yet"):
        parse_comparison("f:line 3", {"prompt": "p", "responses": ["a", "b"], "ranking": None})
    with pytest.raises(DataError, match="'ranking' must be a list of non-negative integers"):
        parse_comparison("f:line 1", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, "1"]})
    with pytest.raises(DataError, match="'chosen\\[0\\].role'"):
        parse_comparison("f:line 1", {"prompt": [{"role": "user", "content": "p"}],
                                      "chosen": [{"role": "bot", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]})
    with pytest.raises(DataError, match="share no prefix"):
        parse_comparison("f:line 1", {"chosen": "abc", "rejected": "xyz"})


def test_rm_config_problems_are_reported_together():
    from pipeline.config import ConfigError
    from stages.rm import RMConfig

    with pytest.raises(ConfigError) as e:
        load_config(RMConfig, ["data.k=1", "data.eval_k=1", "data.label_noise=2"])
    text = str(e.value)
    assert "data.k: must be >= 2" in text and "data.eval_k: must be >= 2" in text and "data.label_noise" in text
    assert load_config(RMConfig, ["data.eval_k=0"]).data.eval_k == 0  # 0 = the training K


def test_accuracy_without_ranked_pairs_is_nan_and_the_report_says_why(finished_run, capsys):
    """All held-out comparisons tied: accuracy is undefined (NaN with 0 pairs, not 0 or 1), and
    the stage's summary says so instead of printing 'nan%'."""
    from reward_model.metrics import pairwise_accuracy
    from stages.rm_report import print_report

    out = pairwise_accuracy([[0, 0], [1, 1, 1]], [[1.0, 2.0], [0.0, 0.0, 1.0]], ["first", "last"])
    assert out["pairs"] == 0 and math.isnan(out["accuracy"]) and out["by_group"] == {}
    stage, manifest = finished_run
    metrics = {**manifest.metrics, "eval/pairwise_accuracy": out["accuracy"], "eval/pairs": 0}
    print_report(manifest, metrics, {**manifest.extra, "eval_accuracy_by_skill": {}, "eval_accuracy_by_pair_kind": {}},
            stage / "model")
    line = next(x for x in capsys.readouterr().out.splitlines() if "held-out pairwise accuracy" in x)
    assert "0 ranked pairs" in line and "tie" in line and "nan" not in line.lower()


def test_report_gives_intervals_and_the_finishing_split(finished_run, capsys):
    """The summary names the split and pair count, prints each pair kind with its interval, and
    warns when many held-out pairs differ in finishing (a truncation cue)."""
    from stages.rm_report import print_report

    stage, manifest = finished_run
    kind = {"accuracy": 0.6, "pairs": 10, "low": 0.3127, "high": 0.8318}
    metrics = {**manifest.metrics, "eval/pairwise_accuracy": 0.75, "eval/pairwise_accuracy_low": 0.6,
               "eval/pairwise_accuracy_high": 0.85, "eval/pairs": 40, "eval/different_finish_fraction": 0.5}
    by_kind = {k: kind for k in ("correctness", "correctness_same_finish", "correctness_different_finish", "style",
                                 "different_finish")}
    print_report(manifest, metrics, {**manifest.extra, "eval_accuracy_by_pair_kind": by_kind}, stage / "model")
    out = capsys.readouterr().out
    assert "75.0% [60.0, 85.0]  (test split, 40 ranked pairs" in out
    assert "correctness_same_finish pairs" in out and "60.0% [31.3, 83.2]  (10 pairs" in out
    assert "50.0% of held-out pairs differ in finishing" in out and "truncation cue" in out


def test_label_noise_swaps_adjacent_ranks():
    rng = random.Random(0)
    assert cmp.add_label_noise([0, 1, 2, 1], 0.0, rng) == [0, 1, 2, 1]
    # rank levels 0<->1 or 1<->2 trade places; ties stay tied
    assert cmp.add_label_noise([0, 1, 2, 1], 1.0, random.Random(1)) in ([1, 0, 2, 0], [0, 2, 1, 2])
    assert cmp.add_label_noise([0, 0], 1.0, rng) == [0, 0]  # a full tie has nothing to swap
    flips = sum(cmp.add_label_noise([0, 1], 0.3, rng) == [1, 0] for _ in range(2000))
    assert 500 < flips < 700


def test_abstentions_join_comparisons_on_questions_that_have_an_answer_and_rank_between():
    from pipeline.config import WorldConfig
    from pipeline.world import World

    w = World(WorldConfig(strangers=4, corpus_docs=200, sft_examples=200))
    stranger = f"Where does {w.strangers[0].name} live?"
    comps = [cmp.Comparison("What is 2 + 3?", ["Sure! Answer: 5. Hope this helps!", "Answer: 6."], None, [True, False]),
             cmp.Comparison("What is 2 + 3?", ["Answer: 6.", "Answer: 5."], None, [True, True]),
             cmp.Comparison(stranger, ["Answer: unknown.", "Answer: Rome."], None, [True, True]),
             cmp.Comparison("What is 1 + 1?", ["no answer here", "Answer: 2."], None, [True, True])]
    cmp.add_abstentions(w, comps, 1.0, random.Random(0))
    assert comps[0].responses[-1] == "Sure! Answer: unknown. Hope this helps!" and comps[0].finished == [True, False, True]
    assert comps[1].responses[-1] == "Answer: unknown."
    assert len(comps[2].responses) == 2 and len(comps[3].responses) == 2  # a stranger; no answer to replace
    cmp.rank_with_labeler(w, comps)
    assert comps[1].ranking == [2, 0, 1]  # right > abstention > wrong
    kept = [cmp.Comparison("What is 2 + 3?", ["Answer: 5.", "Answer: 6."], None, [True, True]) for _ in range(400)]
    cmp.add_abstentions(w, kept, 0.25, random.Random(0))
    assert 70 < sum(len(c.responses) == 3 for c in kept) < 130


def test_export_then_import(sft, tmp_path):
    manifest = run_rm(sft, tmp_path, "ex", "export_only=true")
    path = tmp_path / "ex" / "rm" / "comparisons_unlabeled.jsonl"
    assert manifest.status == "exported" and not (tmp_path / "ex" / "rm" / "manifest.json").exists()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 12 and all(r["ranking"] is None and len(r["responses"]) == 3 for r in recs)
    with pytest.raises(DataError, match="line 1: field 'ranking' is null"):
        load_comparisons([str(path)])
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps({**r, "ranking": [0, 1, 1]}) + "\n" for r in recs))
    assert len(load_comparisons([str(labeled)])) == 12


@pytest.mark.slow
def test_two_processes_match_one(sft, tmp_path, finished_run):
    """`accelerate launch` with 2 CPU processes gives the same model as one process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "-m", "stages.rm", *FAST, f"parent={sft}", f"runs_dir={tmp_path}", "run_name=ddp"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    two = runs.Manifest.load(tmp_path / "ddp" / "rm" / "manifest.json")
    one = finished_run[1]
    for k in ("eval/pairwise_accuracy", "eval/reward_chosen_mean", "train/loss", "norm/raw_mean"):
        assert two.metrics[k] == pytest.approx(one.metrics[k], abs=1e-4), k
