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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from pipeline.config import F, DataSource, WorldConfig
from pipeline.records import Comparison, load_comparisons
from pipeline.runtime import seed_for
from pipeline.world import ANSWER_RE, UNKNOWN
from pipeline.evaluation import gather, generate, shard
from pipeline.runs import atomic_write_text
from reward_model.scoring import as_messages, prompt_ids


@dataclass
class ComparisonDataConfig(DataSource):
    """The `data` section of the stages that learn from comparisons (rm, dpo): the same keys, so
    the same data reaches both."""

    source: Literal["world", "files"] = F(
        "world", "'world' = sample K responses per world prompt from the parent, gold labeler ranks them; 'files' = import labeled files")
    files: list[str] = F([], "labeled files, dataset directories or hub datasets: K-wise rankings or chosen/rejected "
                             "pairs, explicit or implicit prompt (formats: pipeline/data.py)")
    eval_files: list[str] = F([], "held-out labeled files for evaluation (default: data.valid_fraction of data.files)")
    columns: dict[str, Any] = F({}, "rename fields before parsing, e.g. {prompt: question, chosen: good}")
    split: str | None = F(None, "split of a hub dataset, dataset directory or save_to_disk DatasetDict (default: train), "
                                "e.g. train_prefs")
    eval_split: str | None = F(None, "split of data.eval_files (default: data.split), e.g. test_prefs; with the world: "
                                     "the held-out prompts, test (default: reported figures) or valid (for choosing settings)")
    num_prompts: int = F(1000, "world prompts to sample comparisons for", gt=0)
    k: int = F(4, "responses sampled per prompt (K of the K-wise ranking)", ge=2)
    eval_k: int = F(8, "responses sampled per held-out world prompt: more pairs from the same prompts, a tighter "
                       "accuracy estimate (the expected share of correctness vs style pairs does not depend on K); 0 = k", ge=0)
    max_new_tokens: int = F(64, "response length limit when sampling: one in which the SFT policy's chatty answers "
                                "(~40-50 tokens) finish, so that pairs differ in the answer, not in which one was cut off", gt=0)
    temperature: float = F(0.7, "sampling temperature; default = PPO's rollout temperature, so the RM learns the distribution it will score (1.0 = the raw policy, as InstructGPT)", gt=0)
    abstentions: float = F(0.0, "with the honesty axis (world.strangers > 0): share of the training comparisons on "
                                "questions that have an answer that get one more response, the first one with its answer "
                                "replaced by the abstention (`Answer: unknown.`, its style kept). The SFT policy rarely "
                                "abstains on a question it can answer, so without them no abstention is ranked beside a "
                                "wrong answer", ge=0, le=1)
    label_noise: float = F(0.0, "simulated labeler noise: probability of swapping two adjacent ranks of a sampled comparison", ge=0, le=1)
    valid_fraction: float = F(0.1, "share of imported comparisons held out for evaluation when no eval_files are given", ge=0, lt=1)
    max_length: int = F(512, "drop comparisons with a rendered prompt+response longer than this many tokens", gt=0)



def parent_sampler(accelerator, parent_dir, tokenizer, d: ComparisonDataConfig, precision: str, attn: str,
                   batch_size: int) -> Callable:
    """`sample(prompts, k, seed)` for `build_comparisons`: K responses per prompt record from the
    parent policy, loaded once on first use as the trained models compute
    (`pipeline.distributed.load_frozen`), at `d.temperature` with `d.max_new_tokens`."""
    from pipeline.distributed import load_frozen

    policy = None

    def sample(prompts: list[dict], k: int, seed: int) -> list[Comparison]:
        nonlocal policy
        policy = policy or load_frozen(accelerator, parent_dir, tokenizer, precision, attn)
        return sample_responses(policy, tokenizer, [p["prompt"] for p in prompts], k, d.max_new_tokens, d.temperature,
                                seed, accelerator, batch_size, skills=[p.get("skill") for p in prompts])

    return sample


SAVED = ("comparisons.jsonl", "eval_comparisons.jsonl")  # a stage directory's world comparisons, train and held out


def build_comparisons(d: ComparisonDataConfig, seed: int, world: WorldConfig, sample: Callable, log,
                      saved_in: Path | None = None) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held_out): the comparisons a preference stage (rm, dpo) learns from, the same for
    every such stage at the same seed. Files: read and validated, `valid_fraction` held out when no
    eval files are given. World: `sample(prompts, k, seed)` writes K responses per prompt (the
    parent policy), the gold labeler ranks them, `label_noise` swaps adjacent ranks; an interrupted
    run's comparisons saved in `saved_in` (`SAVED`) are reused."""
    rng = random.Random(seed)
    if d.source == "files":
        train = load_comparisons(d.files, d.columns, d.config, d.split, log)
        held_out = load_comparisons(d.eval_files, d.columns, d.config, d.eval_split or d.split, log) if d.eval_files else []
        if not d.eval_files and len(train) > 1 and d.valid_fraction > 0:
            order = list(range(len(train)))
            rng.shuffle(order)
            n_eval = max(1, int(len(train) * d.valid_fraction))
            held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
        return train, held_out
    files = [Path(saved_in) / name for name in SAVED] if saved_in is not None else []
    if files and all(f.exists() for f in files):
        log(f"reusing the comparisons of the interrupted run: {files[0]}")
        return load_comparisons([str(files[0])], log=log), load_comparisons([str(files[1])], log=log)
    from pipeline.world import World

    labeler, t0 = World(world), time.time()
    train = sample(labeler.prompts("rm", d.num_prompts), d.k, seed)
    if d.abstentions > 0 and labeler.strangers:
        add_abstentions(labeler, train, d.abstentions, random.Random(seed_for(seed, "abstentions")))
    held_out = sample(labeler.prompts(d.eval_split or "test"), d.eval_k or d.k, seed_for(seed, "held_out"))
    rank_with_labeler(labeler, train + held_out)
    for c in train:
        c.ranking = add_label_noise(c.ranking, d.label_noise, rng)
    log(f"sampled {d.k} responses for {len(train)} + {len(held_out)} held-out prompts in {time.time() - t0:.0f}s")
    return train, held_out


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


def add_abstentions(world, comparisons: list[Comparison], share: float, rng: random.Random) -> None:
    """Give `share` of the comparisons whose question has an answer one more response, in place:
    the first response with its answer replaced by the abstention (style kept). Before ranking."""
    for c in comparisons:
        if rng.random() >= share or world.answer(c.prompt) == UNKNOWN:
            continue
        m = ANSWER_RE.search(c.responses[0])
        if m is not None and m.group(1).strip() != UNKNOWN:
            c.responses.append(c.responses[0][: m.start(1)] + UNKNOWN + c.responses[0][m.end(1):])
            c.finished.append(c.finished[0])


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
