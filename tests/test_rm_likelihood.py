"""The reward model's likelihood term (reward_model/likelihood.py): score = head + c·log p_SFT(y | x).

The log-likelihood and the coefficient's fit against hand computations; the rm stage fitting,
normalizing and saving the term; PPO's rewards adding it."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.records import parse_comparison
from pipeline.runs import weights_fingerprint
from reward_model.likelihood import fit_coef, fit_on_comparisons, response_log_likelihoods
from tests.test_rm import run_rm, sft  # noqa: F401  (sft: the shared fixture)


def _hand_log_lik(lm, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one unpadded forward."""
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_response_log_likelihood_by_hand(sft):  # noqa: F811
    """Right-padded rows of different lengths give each row's own sum over its response tokens;
    prompt tokens and padding do not count."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward_model.scoring import log_likelihood_ids, render_span, right_pad

    tok = load_tokenizer(sft / "model")
    lm = load_causal_lm(sft / "model", tok).eval()
    spans = [render_span(tok, "What is 1 + 2?", "Answer: 3."), render_span(tok, "What is the first word? cat dog", "dog"),
             render_span(tok, "What is 4 + 4?", "Answer: 8. Hope this helps!", finished=False)]
    hand = [_hand_log_lik(lm, ids, start) for ids, start in spans]
    assert all(start > 3 for _, start in spans) and len({len(ids) for ids, _ in spans}) == 3
    ids, mask = right_pad([s for s, _ in spans], tok.pad_token_id)
    with torch.no_grad():
        batched = response_log_likelihoods(lm, ids, mask, torch.tensor([start for _, start in spans]))
    torch.testing.assert_close(batched.double(), torch.tensor(hand, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    chunked = log_likelihood_ids(lm, [s for s, _ in spans], [start for _, start in spans], tok.pad_token_id, batch_size=2)
    torch.testing.assert_close(chunked.double(), torch.tensor(hand, dtype=torch.float64), atol=1e-4, rtol=1e-5)


def test_fit_coef_by_hand():
    """Two prompts of two responses each, the first better: head differences (2, -1), likelihood
    differences (-1, 1). The loss -log σ(2 - c) - log σ(c - 1) is least where 2 - c = c - 1, c = 1.5.
    A likelihood that only ever disagrees with the ranking gets c = 0 (the term is dropped)."""
    valid = torch.ones(2, 2, dtype=torch.bool)
    ranks = torch.tensor([[0, 1], [0, 1]])
    head = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    log_lik = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    assert fit_coef(head, log_lik, ranks, valid) == pytest.approx(1.5, abs=1e-6)
    assert fit_coef(head, torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]), ranks, valid) == 0.0
    # padding slots (valid False) do not count: a third, padded response changes nothing
    pad_valid = torch.tensor([[True, True, False], [True, True, False]])
    padded = fit_coef(torch.nn.functional.pad(head, (0, 1), value=9.0), torch.nn.functional.pad(log_lik, (0, 1), value=-9.0),
                      torch.tensor([[0, 1, 3], [0, 1, 3]]), pad_valid)
    assert padded == pytest.approx(1.5, abs=1e-6)
    # the same from comparison records and flat per-response values, as the stage calls it. The
    # second prompt has K = 3: d best, c and e tied below it; its two pairs have head differences
    # -1 and likelihood differences +1, and its loss is their mean, -log σ(c - 1): c = 1.5 again.
    comps = [parse_comparison("t", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}),
             parse_comparison("t", {"prompt": "q", "responses": ["c", "d", "e"], "ranking": [1, 0, 1]})]
    flat = fit_on_comparisons(torch.tensor([2.0, 0.0, 1.0, 0.0, 1.0]), torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0]), comps)
    assert flat == pytest.approx(1.5, abs=1e-6)


@pytest.fixture(scope="module")
def likelihood_run(sft, tmp_path_factory):  # noqa: F811
    """An rm run on imported pairs whose preferred response is the one the parent finds more
    likely: the head cannot learn that in two steps, the likelihood term ranks every pair."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward_model.scoring import render_span

    tok = load_tokenizer(sft / "model")
    lm = load_causal_lm(sft / "model", tok).eval()
    prompts = [f"What is {a} + {b}?" for a in range(4) for b in range(4)]
    answers = ["Answer: 3.", "Sure! Answer: 4.", "Answer: 7. Hope this helps!", "dog", "Answer: cat.", "Of course!"]
    records = []
    for i, p in enumerate(prompts):
        x, y = answers[i % len(answers)], answers[(i + 1 + i // len(answers)) % len(answers)]
        lx, ly = (_hand_log_lik(lm, *render_span(tok, p, r)) for r in (x, y))
        records.append({"prompt": p, "chosen": x if lx > ly else y, "rejected": y if lx > ly else x})
    tmp = tmp_path_factory.mktemp("lik")
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    m = run_rm(sft, tmp, "lik", "data.source=files", f"data.files=[{tmp / 'pairs.jsonl'}]", "data.valid_fraction=0.25",
               "steps=2", "likelihood_residual=8")
    return tmp / "lik" / "rm", m, records


def test_rm_stage_fits_normalizes_and_saves_the_term(sft, likelihood_run):  # noqa: F811
    """The coefficient is positive, the saved directory holds the parent's files unchanged, and a
    loaded reward model scores head + c·log-likelihood, computed here by hand from the saved parts."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.models import load_tokenizer
    from reward_model.model import load_reward_model
    from reward_model.scoring import render_span, score

    stage, m, records = likelihood_run
    assert m.complete
    coef = m.metrics["likelihood/coef"]
    config = json.loads((stage / "model" / "config.json").read_text())
    assert coef > 0 and config["reward_likelihood"]["coef"] == pytest.approx(coef)
    assert config["reward_likelihood"]["center"] < 0  # the reference samples' mean log-likelihood
    assert m.extra["likelihood_coef_fitted"] == pytest.approx(coef * m.metrics["norm/raw_std"])
    # no copy of the parent: the term names it, relative to the reward model, with its fingerprint
    assert not (stage / "model" / "likelihood").exists()
    spec = config["reward_likelihood"]
    assert (stage / "model" / spec["model"]).resolve() == (sft / "model").resolve() == Path(spec["model_abs"])
    assert spec["fingerprint"] == weights_fingerprint(sft / "model")
    parts = m.extra["eval_accuracy_of_parts"]
    assert parts["likelihood"]["overall"]["accuracy"] == 1.0  # held-out pairs are ranked by the parent's likelihood
    kinds = set(m.extra["eval_accuracy_by_pair_kind"])
    assert "shorter_better" in kinds or "longer_better" in kinds
    assert set(parts["head"]["by_kind"]) == set(parts["likelihood"]["by_kind"]) == kinds  # each part, every kind
    from pipeline.report import write_report

    assert "| head alone | likelihood alone |" in write_report(stage.parent.parent, stage.parent.name).read_text()
    assert m.metrics["eval/pairwise_accuracy/likelihood_only"] == 1.0 and "eval/pairwise_accuracy/head_only" in m.metrics
    assert abs(m.metrics["norm/ref_mean"]) < 1e-5 and abs(m.metrics["norm/ref_std"] - 1) < 1e-4

    tok = load_tokenizer(stage / "model")
    head = AutoModelForSequenceClassification.from_pretrained(stage / "model").eval()
    lm = AutoModelForCausalLM.from_pretrained(stage / "model" / spec["model"]).eval()
    prompts = [r["prompt"] for r in records[:4] for _ in range(2)]
    responses = [x for r in records[:4] for x in (r["chosen"], r["rejected"])]
    hand = []
    for p, r in zip(prompts, responses):
        ids, start = render_span(tok, p, r)
        with torch.no_grad():
            logit = head(input_ids=torch.tensor([ids])).logits[0, 0].item()
        hand.append(logit + coef * (_hand_log_lik(lm, ids, start) - config["reward_likelihood"]["center"]))
    rm = load_reward_model(stage / "model", tok)
    torch.testing.assert_close(score(rm, tok, prompts, responses, batch_size=3).double(),
                               torch.tensor(hand, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_model_card_snippet_adds_the_term(likelihood_run):
    """The card's code, run as written with transformers alone, prints the score the project gives."""
    import contextlib
    import io
    import re

    from pipeline.models import load_tokenizer
    from reward_model.model import load_reward_model
    from reward_model.scoring import score

    stage = likelihood_run[0]
    card = (stage / "model" / "README.md").read_text()
    assert "reward_likelihood" in card and 'term["model"]' in card
    assert "The classifier alone is not the reward" in card  # its head trained over the likelihood residual
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), {})
    tok = load_tokenizer(stage / "model")
    expected = score(load_reward_model(stage / "model", tok), tok, ["What is 3 + 4?"], ["Answer: 7."]).item()
    assert float(out.getvalue().strip()) == pytest.approx(expected, abs=1e-4)


def test_scoring_refuses_to_drop_the_term(likelihood_run):
    """A reward model with a likelihood term scored without response starts would silently lose
    the term: refused."""
    from pipeline.models import load_tokenizer
    from reward_model.model import load_reward_model
    from reward_model.scoring import forward_rewards, render

    stage = likelihood_run[0]
    tok = load_tokenizer(stage / "model")
    rm = load_reward_model(stage / "model", tok)
    with pytest.raises(ValueError, match="likelihood term: pass each sequence's response start"):
        forward_rewards(rm, [render(tok, "What is 1 + 1?", "Answer: 2.")], tok.pad_token_id)


def test_the_likelihood_model_is_found_where_the_run_went_and_checked(likelihood_run, tmp_path):
    """The term's model is found relative to the reward model (a run directory moved whole), else
    at its absolute path; it must have the fingerprinted weights; missing, it fails clearly."""
    from pipeline.models import load_tokenizer
    from pipeline.runs import HandoffError
    from reward_model.likelihood import likelihood_model_dir, likelihood_spec
    from reward_model.model import load_reward_model

    from reward_model.likelihood import source_for

    rm_dir = likelihood_run[0] / "model"
    spec = likelihood_spec(rm_dir)
    parent = Path(spec["model_abs"])
    run = tmp_path / "run"  # a run directory: sft/model and rm/model, the term recorded as the stage records it
    shutil.copytree(parent, run / "sft" / "model")
    shutil.copytree(rm_dir, run / "rm" / "model")
    recorded = {**spec, **source_for(run / "rm" / "model", run / "sft" / "model")}
    assert recorded["model"] == "../../sft/model" and recorded["fingerprint"] == spec["fingerprint"]
    run.rename(tmp_path / "moved")  # moved whole: the absolute path is gone, the relative one holds
    moved = tmp_path / "moved" / "rm" / "model"
    assert likelihood_model_dir(moved, recorded) == moved / "../../sft/model"
    gone = {**spec, "model_abs": str(tmp_path / "nowhere")}
    alone = tmp_path / "alone"  # the reward model alone: the absolute path still finds the parent
    shutil.copytree(rm_dir, alone)
    assert likelihood_model_dir(alone, spec) == parent
    load_reward_model(alone, load_tokenizer(alone))
    with pytest.raises(FileNotFoundError, match="keep the run directory whole"):
        likelihood_model_dir(alone, gone)
    with pytest.raises(HandoffError, match="other weights"):
        likelihood_model_dir(alone, {**spec, "fingerprint": "0" * 16})


def test_likelihood_copy_makes_a_self_contained_reward_model(sft, likelihood_run, tmp_path):  # noqa: F811
    from pipeline.models import load_tokenizer
    from reward_model.model import load_reward_model

    pairs = likelihood_run[0].parent.parent / "pairs.jsonl"
    m = run_rm(sft, tmp_path, "copy", "data.source=files", f"data.files=[{pairs}]", "data.valid_fraction=0.25",
               "steps=2", "likelihood_copy=true")
    rm_dir = tmp_path / "copy" / "rm" / "model"
    spec = json.loads((rm_dir / "config.json").read_text())["reward_likelihood"]
    assert m.metrics["likelihood/coef"] > 0
    assert spec["model"] == "likelihood" and "model_abs" not in spec
    assert (rm_dir / "likelihood" / "model.safetensors").read_bytes() == (sft / "model" / "model.safetensors").read_bytes()
    moved = tmp_path / "alone"
    shutil.copytree(rm_dir, moved)
    load_reward_model(moved, load_tokenizer(moved))


@pytest.mark.parametrize("same_weights", [True, False], ids=["shared-with-reference", "own-model"])
def test_ppo_rewards_add_the_term(tmp_path, same_weights):
    """PPO loads the term with the reward model: each rollout score is the classifier's logit plus
    c·log p(response) under the likelihood model, recomputed by hand from the rendered text. When
    the term's model has the reference's weights (fingerprints equal), the reference computes the
    term, from its own forward in the rollouts: the SFT weights are held once. Another model (here:
    other weights) loads on its own."""
    from transformers import AutoModelForCausalLM

    from reward_model import scoring
    from reward_model.likelihood import term_of
    from reward_model.scoring import render_span
    from stages.ppo import bench as ppo_bench
    from stages.ppo.loop import iteration_step, make_trainer
    from tests.test_ppo_sampler import random_ppo

    real = ppo_bench.random_models

    def with_term(root, *a, **k):  # the random reward model gets the random policy as its likelihood model
        policy, reward = real(root, *a, **k)
        shutil.copytree(policy, f"{reward}/likelihood")
        if not same_weights:  # the same architecture, other weights
            lm = AutoModelForCausalLM.from_pretrained(f"{reward}/likelihood")
            with torch.no_grad():
                lm.get_input_embeddings().weight.mul_(1.5)
            lm.save_pretrained(f"{reward}/likelihood")
        config = json.loads(open(f"{reward}/config.json").read())
        config["reward_likelihood"] = {"coef": 0.25, "center": -3.0, "model": "likelihood",
                                       "fingerprint": weights_fingerprint(f"{reward}/likelihood")}
        open(f"{reward}/config.json", "w").write(json.dumps(config))
        return policy, reward

    ppo_bench.random_models = with_term
    try:
        cfg, accelerator, models, prompts = random_ppo(tmp_path)
    finally:
        ppo_bench.random_models = real
    assert models.likelihood_shared == same_weights
    assert (term_of(models.reward).model is models.ref) == same_weights   # not a third copy of the SFT weights
    _, rollout = iteration_step(make_trainer(cfg, models, accelerator), 0, prompts)
    lm = AutoModelForCausalLM.from_pretrained(f"{cfg.reward.name_or_path}/likelihood").eval()
    tok = models.reward_tokenizer
    hand = []
    for p, text, done in zip(rollout.prompts, rollout.texts, rollout.has_stop.tolist()):
        ids, start = render_span(tok, p, text, done)
        with torch.no_grad():
            logit = models.reward(input_ids=torch.tensor([ids])).logits[0, 0].item()
        hand.append(logit + 0.25 * (_hand_log_lik(lm, ids, start) + 3.0))
    assert not math.isclose(hand[0], models.reward(input_ids=torch.tensor([render_span(tok, rollout.prompts[0],
                            rollout.texts[0], bool(rollout.has_stop[0]))[0]])).logits[0, 0].item(), abs_tol=1e-3)
    torch.testing.assert_close(rollout.scores.double(), torch.tensor(hand, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    seqs = ppo_bench.reward_inputs(models, rollout)
    ppo_bench.floor_score(models, rollout, 3, seqs)  # the bench floor runs the term's forward too

    # A random policy samples token sequences that decode and re-encode to other ids, whose term is
    # computed on the reward model's rendering. Responses in their canonical ids (as a trained
    # policy writes them): with the reference sharing the weights, the term comes from the
    # rollout's own reference forward, with no forward of the term's model, and equals it.
    from tests.test_ppo_sampler import ScriptedSampler

    ids, start = render_span(tok, prompts[0], "dog", True)
    scripted = ScriptedSampler(ids[start:], cfg.rollout.max_new_tokens, tok.pad_token_id)
    trainer = make_trainer(cfg, models, accelerator, sampler=scripted)
    forwards = []
    real_forward = scoring.response_log_likelihoods
    scoring.response_log_likelihoods = lambda lm, ids, *a: forwards.append(len(ids)) or real_forward(lm, ids, *a)
    try:
        _, rollout = iteration_step(trainer, 1, prompts)
    finally:
        scoring.response_log_likelihoods = real_forward
    assert forwards == ([] if same_weights else [len(prompts)])
    hand = [models.reward(input_ids=torch.tensor([render_span(tok, p, "dog", True)[0]])).logits[0, 0].item()
            + 0.25 * (_hand_log_lik(lm, *render_span(tok, p, "dog", True)) + 3.0) for p in rollout.prompts]
    torch.testing.assert_close(rollout.scores.double(), torch.tensor(hand, dtype=torch.float64), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("residual", [0.0, 3.0])
def test_head_trains_over_the_likelihood_residual(sft, likelihood_run, monkeypatch, residual):  # noqa: F811
    """With the head's scores zeroed, the first step's loss is the residual's alone: log 2 for a
    head alone, and for the pairs (each preferring the response the parent finds more likely, by
    a margin d) the mean of -log σ(r·d/sd) over the batch (sd: the log-likelihoods' standard
    deviation over the training responses), so between its values at the largest and the
    smallest margin, computed here by hand."""
    import stages.rm
    from pipeline import runs
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward_model.scoring import render_span

    stage, _, records = likelihood_run
    real = stages.rm.group_rewards
    monkeypatch.setattr(stages.rm, "group_rewards", lambda *a: (lambda r, m: (r * 0, m))(*real(*a)))
    tmp = stage.parent.parent
    m = run_rm(sft, tmp, f"residual{residual:g}", "data.source=files", f"data.files=[{tmp / 'pairs.jsonl'}]",
               "data.valid_fraction=0.25", "steps=1", "batch.size=64", "batch.micro=64",
               "optim.lr=0", "trainer=kwise", f"likelihood_residual={residual}")
    loss = next(r["train/loss"] for r in runs.read_metrics(tmp / f"residual{residual:g}" / "rm" / "metrics.jsonl")
                if "train/loss" in r)
    assert m.extra["likelihood_residual"] == residual
    if residual == 0:
        assert loss == pytest.approx(math.log(2), abs=1e-6)
        return
    tok = load_tokenizer(sft / "model")
    lm = load_causal_lm(sft / "model", tok).eval()
    margins = [_hand_log_lik(lm, *render_span(tok, r["prompt"], r["chosen"]))
               - _hand_log_lik(lm, *render_span(tok, r["prompt"], r["rejected"])) for r in records]
    assert min(margins) > 0
    sd = m.extra["likelihood_residual_sd"]
    worst, best = (-math.log(1 / (1 + math.exp(-residual * d / sd))) for d in (min(margins), max(margins)))
    assert best - 1e-5 <= loss <= worst + 1e-5 and loss < math.log(2) - 0.05


def test_pairs_train_with_trl_reward_trainer_only_without_the_residual(sft, likelihood_run, capsys):  # noqa: F811
    """TRL's RewardTrainer cannot add the residual: `auto` trains pairs with it only when the
    residual is off, and asking for it with the residual on is a configuration error."""
    from pipeline.config import ConfigError, load_config
    from stages.rm import RMConfig

    stage, _, _ = likelihood_run
    tmp = stage.parent.parent
    files = ["data.source=files", f"data.files=[{tmp / 'pairs.jsonl'}]", "data.valid_fraction=0.25", "steps=1"]
    assert run_rm(sft, tmp, "auto_off", *files, "likelihood_residual=0").complete
    assert "trainer trl RewardTrainer" in capsys.readouterr().err
    assert run_rm(sft, tmp, "auto_files", *files).complete   # on files the residual is off unless asked for
    assert "trainer trl RewardTrainer" in capsys.readouterr().err
    assert run_rm(sft, tmp, "auto_on", *files, "likelihood_residual=8").complete
    err = capsys.readouterr().err
    assert "trainer K-wise" in err and "the head trains as the residual over 8 x log p_SFT(response) /" in err
    with pytest.raises(ConfigError, match="trainer=trl: TRL's RewardTrainer cannot"):
        load_config(RMConfig, ["trainer=trl"])
    load_config(RMConfig, ["trainer=trl", "likelihood_residual=0"])


def test_a_zero_weight_ships_a_head_trained_alone_and_says_so(sft, likelihood_run, capsys):  # noqa: F811
    """Pairs that prefer the response the parent finds LESS likely: the calibration share fits the
    term's weight at 0, so the head that trained over the residual is trained again alone, and
    the stage's last lines, the manifest and the model card say which reward model it is."""
    stage, _, records = likelihood_run
    tmp = stage.parent.parent
    flipped = tmp / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in records))
    m = run_rm(sft, tmp, "flipped", "data.source=files", f"data.files=[{flipped}]", "data.valid_fraction=0.25",
               "steps=2", "likelihood_residual=8", "likelihood_calibration=0.3")
    out = capsys.readouterr()
    assert m.complete and m.extra["likelihood_coef_fitted"] == 0.0
    assert m.extra["likelihood_residual"] == 0.0 and m.extra["reward_model"].startswith("classifier trained alone")
    assert "its head trains again without the likelihood residual" in out.err
    assert "the reward model is a classifier trained alone" in out.out
    config = json.loads((tmp / "flipped" / "rm" / "model" / "config.json").read_text())
    assert "reward_likelihood" not in config
    card = (tmp / "flipped" / "rm" / "model" / "README.md").read_text()
    assert "It is a classifier trained alone" in card and "not the reward" not in card


def test_residual_offsets_keep_their_size_on_300_token_responses(sft):  # noqa: F811
    """Summed log-likelihoods of 300-token responses spread over tens of nats: 6 x their
    differences would be hundreds of logits, and the ranking loss of a head at zero would be
    saturated (no gradient where the residual agrees, a constant one where it does not). The
    standardized offsets stay a few times the weight, and the loss keeps its gradient."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward_model.likelihood import residual_offsets
    from reward_model.losses import kwise_loss
    from reward_model.scoring import log_likelihood_ids, render_span

    tok = load_tokenizer(sft / "model")
    lm = load_causal_lm(sft / "model", tok).eval()
    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "sun", "moon", "tree", "rock", "star", "fish"]
    responses = [" ".join(words[i] for i in torch.randint(0, 8, (300,), generator=g).tolist()) for _ in range(16)]
    spans = [render_span(tok, "Tell me a long story.", r) for r in responses]
    assert min(len(ids) - start for ids, start in spans) >= 300
    log_lik = log_likelihood_ids(lm, [ids for ids, _ in spans], [s for _, s in spans], tok.pad_token_id, 8)
    assert float(log_lik.std()) > 10                        # tens of nats apart
    offsets, sd = residual_offsets(log_lik, [2] * 8, 8.0)
    flat = torch.cat(offsets)
    assert sd == pytest.approx(float(log_lik.double().std()), rel=1e-6)
    assert flat.abs().max() < 8.0 * 4 and abs(float(flat.std()) - 8.0) < 1e-3
    head = torch.zeros(8, 2, requires_grad=True)
    ranks, valid = torch.tensor([[0, 1]] * 8), torch.ones(8, 2, dtype=torch.bool)
    loss, _ = kwise_loss(head + torch.stack(offsets), ranks, valid)
    (grad,) = torch.autograd.grad(loss, head)
    raw = 6.0 * (log_lik - log_lik.mean())                  # the unstandardized residual of before
    assert raw.abs().max() > 50 and grad.abs().mean() > 0.01


def test_exempt_responses_get_no_term_and_the_others_keep_it(likelihood_run):
    """`likelihood_exempt`: a response whose text the pattern matches scores the head alone (its
    log-likelihood set to the term's centre); every other response keeps head + c·(log p − m)."""
    from pipeline.models import load_tokenizer
    from reward_model.likelihood import exempt_mask, neutralize, term_of
    from reward_model.model import load_reward_model
    from reward_model.scoring import score

    assert exempt_mask(r"unknown\.", ["Answer: unknown.", "Sure! Answer: unknown. Bye", "Answer: Rome."]) == \
        [True, True, False]
    assert exempt_mask("", ["Answer: unknown."]) == [False]
    x = torch.tensor([-1.0, -9.0, -3.0])
    assert neutralize(x, [False, True, False]).tolist() == [-1.0, -2.0, -3.0]  # the others' mean
    assert neutralize(x, [False, True, False], 5.0).tolist() == [-1.0, 5.0, -3.0]
    stage, _, records = likelihood_run
    tok = load_tokenizer(stage / "model")
    rm = load_reward_model(stage / "model", tok)
    prompts = [records[0]["prompt"]] * 3
    responses = ["Answer: unknown.", "Answer: 3.", "Answer: unknown. Hope this helps!"]
    with_term = score(rm, tok, prompts, responses)
    term = term_of(rm)
    coef = term.coef
    term.coef = 0.0
    head_only = score(rm, tok, prompts, responses)
    term.coef, term.exempt = coef, r"unknown\."
    exempt = score(rm, tok, prompts, responses)
    torch.testing.assert_close(exempt[[0, 2]], head_only[[0, 2]])  # the abstentions: the head alone
    torch.testing.assert_close(exempt[1], with_term[1])  # the answer keeps its term
    assert not torch.allclose(with_term[[0, 2]], head_only[[0, 2]])  # the term mattered for them before
    assert term.describe()["exempt"] == r"unknown\."
