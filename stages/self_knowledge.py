"""Does the SFT model know what it knows? Two measurements on the built-in world's questions that
have an answer the model may not know (`KNOWN_UNKNOWN_SKILLS`: held-out facts and sums), each an
AUROC of telling the SFT model's right greedy answers from its wrong ones on the test prompts:

- **confidence**: the lowest log-probability among its answer's tokens (`answer_confidence`, what
  the confidence-threshold baseline abstains on);
- **probe**: a logistic regression on the model's hidden states (every layer, at the token that
  predicts the answer's first token), fitted on the SFT model's greedy answers to other
  questions it may not know (`probe_prompts`), its L2 strength chosen by 5-fold
  cross-validation there (Kadavath et al. 2022, "Language models (mostly) know what they know").

A probe well above the confidence says the knowledge is in the model but not in its output
probabilities: what a policy trained from rankings could learn to act on. A probe near 0.5 says
the model is too small (or trained too little) to know what it knows, and no training on its
outputs can teach it to abstain only where it is wrong.
"""
from __future__ import annotations

import math

import torch

from pipeline.evaluation import gather, shard_even
from pipeline.world import KNOWN_UNKNOWN_SKILLS, abstains

L2 = (0.01, 0.1, 1.0, 10.0)


def auroc(scores: list[float], labels: list[float]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting half (the Mann-Whitney U statistic / (n+ n-)); nan without both."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, bias) of an L2-regularised logistic regression, by L-BFGS in float64 (deterministic):
    mean log-loss + l2/2 · |w|² / n."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w @ w) / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, folds: int = 5) -> tuple[list[float], float]:
    """The probe's scores on `test_x`, fitted on standardized training features with the L2
    strength of the best cross-validated AUROC; -> (scores, chosen l2)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tx, sx = (train_x - mean) / std, (test_x - mean) / std
    n = len(train_y)
    fold = torch.arange(n) % folds

    def cv(l2: float) -> float:
        scores, labels = [], []
        for k in range(folds):
            w, b = fit_logistic(tx[fold != k], train_y[fold != k], l2)
            scores += (tx[fold == k].double() @ w + b).tolist()
            labels += train_y[fold == k].tolist()
        return auroc(scores, labels)

    l2 = max(L2, key=lambda v: (cv(v), v))  # ties: the stronger regularisation
    w, b = fit_logistic(tx, train_y, l2)
    return (sx.double() @ w + b).tolist(), l2


def probe_prompts(world) -> list[str]:
    """The probe's training prompts, questions the model may not know and never a test prompt:
    the `valid` fact and addition prompts and the questions only rm and ppo ask
    (`World.rl_questions`)."""
    valid = [r["prompt"] for r in world.prompts("valid") if r["skill"] in KNOWN_UNKNOWN_SKILLS]
    return valid + sorted(world.rl_questions)


@torch.no_grad()
def answer_states(model, tokenizer, prompts: list[str], ids: list[list[int]], finished: list[bool], device) -> list:
    """Per response, every layer's hidden state at the token that predicts its answer's first
    token (None without an `Answer: x.`), concatenated: [layers x hidden] floats."""
    from stages.policy_eval import _responses, answer_span
    from stages.ppo.rollout import queries, sequence_inputs

    q_ids, q_mask = queries(tokenizer, prompts, device)
    r_ids, r_mask = _responses(tokenizer, ids, finished, device)
    input_ids, mask, positions = sequence_inputs(q_ids, q_mask, r_ids, r_mask)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    states = torch.cat(out.hidden_states[1:], dim=-1).float()  # [B, T, layers * hidden], the embeddings left out
    width = q_ids.shape[1]
    res = []
    for j, r in enumerate(ids):
        span = answer_span(tokenizer, r)
        res.append(None if span is None else states[j, width + span[0] - 1].cpu())
    return res


def self_knowledge(models, world, ev, accelerator, test) -> dict:
    """Confidence and probe AUROC on the test fact and addition prompts (`test`: the greedy
    `EvalSet` of the test split), with the base rates; see the module's docstring."""
    from stages.policy_eval import answer_confidence, sample_eval
    from stages.ppo.rollout import reference_context, reference_model

    model, tok, device = reference_model(models), models.tokenizer, accelerator.device
    train_prompts = probe_prompts(world)

    def judged(prompts, texts, finished, ids) -> list:
        """One item per prompt (None where it does not count), every prompt forwarded: all processes
        run as many forwards (a sharded model), and `gather` gets one item per dealt prompt."""
        feats = []
        with reference_context(models):
            for i in range(0, len(prompts), ev.batch_size):
                s = slice(i, i + ev.batch_size)
                feats += answer_states(model, tok, prompts[s], ids[s], finished[s], device)
        conf = answer_confidence(models, prompts, ids, finished, ev.batch_size, device)
        return [(f.tolist(), float(world.is_correct(p, t)), c, world.skill_of(p))
                if f is not None and world.skill_of(p) in KNOWN_UNKNOWN_SKILLS and not abstains(t) and not math.isnan(c)
                else None for p, t, f, c in zip(prompts, texts, feats, conf)]

    rows, n_real = shard_even(list(range(len(train_prompts))), accelerator)
    prompts = [train_prompts[i] for i in rows]
    with reference_context(models):
        texts, finished, ids = sample_eval(model, tok, prompts, ev, 0.0, "unused", rows)
    train = [x for x in gather(judged(prompts, texts, finished, ids)[:n_real], accelerator) if x is not None]
    held = [x for x in gather(judged(test.prompts, test.sft_texts, test.sft_finished, test.sft_ids)[: test.n_real],
                              accelerator) if x is not None]
    if len({y for _, y, _, _ in train}) < 2 or not held:
        return {}
    train_x, train_y, _, _ = zip(*train)
    held_x, labels, confidence, skills = (list(v) for v in zip(*held))
    scores, l2 = probe_scores(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(held_x))
    out = {"probe_auroc": auroc(scores, labels), "confidence_auroc": auroc(confidence, labels),
           "probe_l2": l2, "train_answers": len(train), "train_right": sum(train_y) / len(train),
           "test_answers": len(held), "test_right": sum(labels) / len(labels)}
    return out | aurocs_by_skill(scores, confidence, labels, skills)


def aurocs_by_skill(probe: list[float], confidence: list[float], labels: list[float], skills: list[str]) -> dict:
    """The two AUROCs on each kind of question apart (`probe_auroc_fact`, `confidence_auroc_add`, ...):
    the model can know what it knows about people and not about sums. nan where a kind lacks right
    or wrong answers."""
    out = {}
    for skill in KNOWN_UNKNOWN_SKILLS:
        idx = [i for i, s in enumerate(skills) if s == skill]
        out[f"probe_auroc_{skill}"] = auroc([probe[i] for i in idx], [labels[i] for i in idx])
        out[f"confidence_auroc_{skill}"] = auroc([confidence[i] for i in idx], [labels[i] for i in idx])
    return out
