"""Gold evaluation against the SFT policy on held-out prompts (docs/ppo.md §34).

The built-in world's gold labeler, not the learned reward model, judges: a rising RM score with
a flat or falling gold win rate is reward over-optimization. The SFT responses are sampled once
at the start with the same settings and seed as every later evaluation; a tie counts half.
Evaluation runs under a forked random state, so it never changes what training samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.evaluation import gather, generate, shard
from pipeline.tokenizer import end_of_turn_id
from stages.ppo.functional import masked_sum
from stages.ppo.rollout import (
    encode_prompts,
    queries,
    reference_context,
    reference_model,
    score_responses,
    sequence_inputs,
)


def eval_prompts(world, n: int = 0, split: str = "test") -> list[str]:
    """world.prompts(split), or `n` of them taken evenly across the list (all skills stay in)."""
    prompts = [r["prompt"] for r in world.prompts(split)]
    if n <= 0 or n >= len(prompts):
        return prompts
    return [prompts[int(i * len(prompts) / n)] for i in range(n)]


@dataclass
class EvalSet:
    """This process's share of the held-out prompts and the SFT policy's responses to them."""

    prompts: list[str]
    sft_texts: list[str]
    sft_finished: list[bool]
    sft_gold: list[float]


@torch.no_grad()
def sample_eval(model, tokenizer, prompts: list[str], cfg, accelerator) -> tuple[list[str], list[bool], list[list[int]]]:
    """(texts, finished, response ids without stop) sampled with the eval settings and seed."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.eval.seed + 100003 * accelerator.process_index)
        out = generate(model, tokenizer, encode_prompts(tokenizer, prompts), cfg.eval.max_new_tokens,
                       temperature=cfg.eval.temperature, batch_size=cfg.rollout.forward_batch_size)
    ids = [r for r, _ in out]
    return tokenizer.batch_decode(ids, skip_special_tokens=True), [f for _, f in out], ids


def make_eval_set(models, world, cfg, accelerator) -> EvalSet:
    """Sample the SFT policy (the reference) once on this process's held-out prompts."""
    prompts = shard(eval_prompts(world, cfg.eval.num_prompts), accelerator)
    with reference_context(models):
        texts, finished, _ = sample_eval(reference_model(models), models.tokenizer, prompts, cfg, accelerator)
    gold = [world.gold_score(p, t, f) for p, t, f in zip(prompts, texts, finished)]
    return EvalSet(prompts, texts, finished, gold)


@torch.no_grad()
def sequence_kl(model, models, prompts: list[str], ids: list[list[int]], finished: list[bool], temperature: float,
                batch_size: int, device) -> list[float]:
    """Exact KL(π_τ || ref_τ) summed over each response's tokens: Σ_t Σ_v p log(p/q) along the
    sampled trajectory (non-negative, and the sequence KL in expectation over π's samples)."""
    tok, stop = models.tokenizer, end_of_turn_id(models.tokenizer)
    out = []
    for i in range(0, len(prompts), batch_size):
        q_ids, q_mask = queries(tok, prompts[i: i + batch_size], device)
        rows = [r + [stop] if f else r for r, f in zip(ids[i: i + batch_size], finished[i: i + batch_size])]
        T = max(1, max(len(r) for r in rows))
        # built on the CPU row by row, then one transfer to `device`
        r_ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long, device="cpu")
        r_mask = torch.zeros((len(rows), T), dtype=torch.bool, device="cpu")
        for j, r in enumerate(rows):
            r_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
            r_mask[j, : len(r)] = True
        r_ids, r_mask = r_ids.to(device), r_mask.to(device)
        inputs = sequence_inputs(q_ids, q_mask, r_ids, r_mask)
        P = q_ids.shape[1]
        logits = model(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2]).logits[:, P - 1: -1]
        with reference_context(models):
            ref_logits = reference_model(models)(input_ids=inputs[0], attention_mask=inputs[1],
                                                 position_ids=inputs[2]).logits[:, P - 1: -1]
        kl = []
        for z, zr in zip(logits, ref_logits):  # row by row: one [T, V] fp32 pair at a time
            logp = torch.log_softmax(z.float() / temperature, -1)
            logq = torch.log_softmax(zr.float() / temperature, -1)
            kl.append((logp.exp() * (logp - logq)).sum(-1))
        out.extend(masked_sum(torch.stack(kl), r_mask, dim=1).tolist())
    return out


def evaluate(model, models, eval_set: EvalSet, world, cfg, accelerator, prefix: str = "eval") -> tuple[dict, list]:
    """Gold score, win rate vs SFT, RM score and KL of `model` on the held-out prompts.
    Returns (metrics, table rows); every process gets the same numbers."""
    was_training = model.training
    model.eval()
    texts, finished, ids = sample_eval(model, models.tokenizer, eval_set.prompts, cfg, accelerator)
    device = accelerator.device
    rm = score_responses(models.reward, models.reward_tokenizer, eval_set.prompts, texts, finished).tolist() if texts else []
    kl = sequence_kl(model, models, eval_set.prompts, ids, finished, cfg.rollout.temperature,
                     cfg.rollout.forward_batch_size, device) if texts else []
    rows = []
    for i, (p, t, f) in enumerate(zip(eval_set.prompts, texts, finished)):
        gold, sft_gold = world.gold_score(p, t, f), eval_set.sft_gold[i]
        win = 1.0 if gold > sft_gold + 1e-9 else (0.5 if abs(gold - sft_gold) <= 1e-9 else 0.0)
        rows.append([p, eval_set.sft_texts[i], t, sft_gold, gold, rm[i], kl[i], win, float(world.is_correct(p, t)),
                     float(f), len(ids[i]) + int(f), world.skill_of(p)])
    model.train(was_training)
    rows = gather(rows, accelerator)
    n = max(1, len(rows))
    mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
    metrics = {f"{prefix}/gold_score": mean(4), f"{prefix}/win_rate": mean(7), f"{prefix}/rm_score": mean(5),
               f"{prefix}/kl": mean(6), f"{prefix}/accuracy": mean(8), f"{prefix}/eos_rate": mean(9),
               f"{prefix}/length": mean(10), f"{prefix}/sft_gold_score": mean(3)}
    return metrics, rows


TABLE_COLUMNS = ["prompt", "sft_response", "response", "sft_gold", "gold", "rm_score", "kl", "win", "correct",
                 "finished", "length", "skill"]
SKILL = TABLE_COLUMNS.index("skill")
