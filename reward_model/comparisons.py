"""Preference data: sampling K responses per prompt, ranking them, label noise, and writing
comparisons in the K-wise format for labeling.

Reading and validating comparison files (K-wise rankings, preference pairs with an explicit or
implicit prompt, UltraFeedback and Anthropic HH layouts) is `pipeline.records`', the one home of
record formats; `Comparison` lives there and is re-exported here. The K-wise record:
`{"prompt": P, "responses": [r_1, ..., r_K], "ranking": [k_1, ..., k_K]}`, k_i = rank of
response i, 0 = best, equal ranks = a tie; optional `"finished"` (False = cut off before its stop
token), `"skill"`, `"correct"` (is each answer right? evaluation then reports correctness pairs
apart from style pairs). An exported, not yet labeled file has `"ranking": null`.
Everything is scored in the chat template (prompt as user turn, response as assistant turn).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from pipeline.records import Comparison
from pipeline.evaluation import gather, generate, shard
from pipeline.runs import atomic_write_text
from reward_model.scoring import as_messages, prompt_ids


def write_jsonl(path: str | Path, comparisons: list[Comparison]) -> None:
    """Write comparisons as K-wise JSONL, atomically."""
    atomic_write_text(path, "".join(json.dumps(c.record()) + "\n" for c in comparisons))


# ------------------------------------------------------------------------------------------
# Sampling, ranking, noise
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_responses(policy, tokenizer, prompts: list, k: int, max_new_tokens: int, temperature: float,
                     seed: int, accelerator=None, batch_size: int = 64,
                     skills: list[str | None] | None = None) -> list[Comparison]:
    """K responses per prompt from `policy` (chat-template prompts, pure temperature sampling),
    as unlabeled comparisons. Response j of prompt i is row i * k + j of the random stream
    `{seed}/rm/responses`, so the samples depend neither on the batch size nor on the number of
    processes; batches are split over processes."""
    flat = [ids for p in prompts for ids in [prompt_ids(tokenizer, p)] * k]
    starts = list(range(0, len(flat), batch_size))
    out = []
    for start in shard(starts, accelerator):
        res = generate(policy, tokenizer, flat[start: start + batch_size], max_new_tokens, temperature=temperature,
                       batch_size=batch_size, stream=f"{seed}/rm/responses",
                       rows=list(range(start, min(start + batch_size, len(flat)))))
        out.append([(tokenizer.decode(ids, skip_special_tokens=True), done) for ids, done in res])
    flat_res = [r for part in gather(out, accelerator) for r in part]
    skills = skills or [None] * len(prompts)
    return [Comparison(prompt=p, responses=[t for t, _ in flat_res[i * k:(i + 1) * k]],
                       finished=[f for _, f in flat_res[i * k:(i + 1) * k]], ranking=None, skill=skills[i])
            for i, p in enumerate(prompts)]


def rank_with_labeler(world, comparisons: list[Comparison]) -> None:
    """Rank each comparison in place with the world's deterministic gold labeler."""
    for c in comparisons:
        c.gold_scores = [round(world.gold_score(c.prompt, r, f), 6) for r, f in zip(c.responses, c.finished)]
        c.ranking = world.gold_ranks(c.prompt, c.responses, c.finished)
        c.correct = [world.is_correct(c.prompt, r) for r in c.responses]


def add_label_noise(ranking: list[int], p: float, rng: random.Random) -> list[int]:
    """With probability p swap two adjacent rank levels (a labeler confusing neighbours)."""
    levels = sorted(set(ranking))
    if len(levels) < 2 or rng.random() >= p:
        return list(ranking)
    j = rng.randrange(len(levels) - 1)
    a, b = levels[j], levels[j + 1]
    return [b if x == a else a if x == b else x for x in ranking]


__all__ = ["Comparison", "add_label_noise", "as_messages", "rank_with_labeler", "sample_responses", "write_jsonl"]
