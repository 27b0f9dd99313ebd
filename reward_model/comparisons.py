"""Preference data: sampling K responses per prompt, ranking them, label noise, and the file
formats users import and export.

File formats (JSONL, JSON, Parquet, CSV or a `save_to_disk` directory; one record per line/row):

- K-wise ranking (our native format, also what the stage exports for labeling):
  `{"prompt": P, "responses": [r_1, ..., r_K], "ranking": [k_1, ..., k_K]}` where `k_i` is the
  rank of response i, 0 = best, equal ranks = a tie (no preference between those two).
  Optional: `"finished": [bool, ...]` (False = cut off before its stop token), `"skill"`, and
  `"correct": [bool, ...]` (is each response's answer right? evaluation then reports accuracy on
  pairs that differ in correctness apart from pairs that differ only in style).
  An exported, not yet labeled file has `"ranking": null`.
- Preference, explicit prompt: `{"prompt": P, "chosen": C, "rejected": R}`.
- Preference, implicit prompt: `{"chosen": C, "rejected": R}`; the prompt is their shared prefix
  (cut back to a whitespace for text).
P is a string (one user turn) or a messages list (`[{"role": "user", "content": ...}, ...]`);
C and R are strings, or messages lists that hold exactly one assistant turn after the prompt.
Everything is scored in the chat template (prompt as user turn, response as assistant turn).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.data import map_columns, read_records
from pipeline.evaluation import gather, generate, shard
from pipeline.runs import atomic_write_text
from pipeline.stage import DataError
from reward_model.metrics import ranked_pairs
from reward_model.scoring import as_messages, prompt_ids

ROLES = ("system", "user", "assistant")


@dataclass
class Comparison:
    """One prompt with K >= 2 responses and their ranks (0 = best, equal = tie)."""

    prompt: str | list[dict]
    responses: list[str]
    ranking: list[int] | None
    finished: list[bool] = field(default_factory=list)
    skill: str | None = None
    gold_scores: list[float] | None = None
    correct: list[bool] | None = None  # per response, when the labeler knows (the built-in world)
    loc: str = ""

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) index pairs; ties are not pairs."""
        return list(ranked_pairs(self.ranking or []))

    def record(self) -> dict:
        """The JSONL record of this comparison (the documented K-wise format)."""
        rec = {"prompt": self.prompt, "responses": self.responses, "ranking": self.ranking, "finished": self.finished}
        if self.skill is not None:
            rec["skill"] = self.skill
        if self.gold_scores is not None:
            rec["gold_scores"] = self.gold_scores
        if self.correct is not None:
            rec["correct"] = self.correct
        return rec


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
    as unlabeled comparisons. Batches are split over ranks; each batch draws from its own seeded
    random stream, so the samples do not depend on the number of processes."""
    flat = [ids for p in prompts for ids in [prompt_ids(tokenizer, p)] * k]
    batches = list(enumerate(range(0, len(flat), batch_size)))
    device = next(policy.parameters()).device
    out = []
    for b, start in shard(batches, accelerator):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 100003 + b)
            res = generate(policy, tokenizer, flat[start: start + batch_size], max_new_tokens,
                           temperature=temperature, batch_size=batch_size)
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


# ------------------------------------------------------------------------------------------
# Reading and validating files
# ------------------------------------------------------------------------------------------
def load_comparisons(files: list[str], columns: dict | None = None) -> list[Comparison]:
    """Read and validate every record of every file before anything trains; a bad record raises
    DataError naming file, line and field."""
    out = []
    for f in files:
        records = map_columns(read_records(f), columns or {})
        out.extend(parse_record(loc, rec) for loc, rec in records)
    return out


def load_prompts(files: list[str], columns: dict | None = None) -> list[dict]:
    """Prompt-only records `{"prompt": str | messages}` (for sampling and export)."""
    out = []
    for f in files:
        for loc, rec in map_columns(read_records(f), columns or {}):
            if "prompt" not in rec:
                raise DataError(f"{loc}: field 'prompt' is missing (prompt-only records need a 'prompt')")
            out.append({"prompt": _prompt(loc, rec["prompt"], "prompt"), "skill": rec.get("skill")})
    return out


def parse_record(loc: str, rec: dict) -> Comparison:
    """One record in any supported format -> Comparison; DataError on anything malformed."""
    if "responses" in rec:
        return _kwise(loc, rec)
    if "chosen" in rec or "rejected" in rec:
        for name in ("chosen", "rejected"):
            if name not in rec:
                raise DataError(f"{loc}: field '{name}' is missing (a preference record needs 'chosen' and 'rejected')")
        if "prompt" in rec and rec["prompt"] is not None:
            return _explicit(loc, rec)
        return _implicit(loc, rec)
    raise DataError(f"{loc}: field 'responses' (K-wise ranking) or 'chosen'/'rejected' (preference pair) is missing; "
                    f"found fields {sorted(rec)}. Map other names with data.columns")


def _kwise(loc: str, rec: dict) -> Comparison:
    if "prompt" not in rec:
        raise DataError(f"{loc}: field 'prompt' is missing")
    prompt = _prompt(loc, rec["prompt"], "prompt")
    responses = rec["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{loc}: field 'responses' must be a list of strings, got {_type(responses)}")
    if len(responses) < 2:
        raise DataError(f"{loc}: field 'responses' needs at least 2 responses to compare, got {len(responses)}")
    if "ranking" not in rec:
        raise DataError(f"{loc}: field 'ranking' is missing (ranks of the responses, 0 = best)")
    ranking = rec["ranking"]
    if ranking is None:
        raise DataError(f"{loc}: field 'ranking' is null: this record is not labeled yet")
    if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ranking):
        raise DataError(f"{loc}: field 'ranking' must be a list of non-negative integers (0 = best), got {ranking!r}")
    if len(ranking) != len(responses):
        raise DataError(f"{loc}: field 'ranking' has {len(ranking)} ranks for {len(responses)} responses; give one rank per response")
    finished = rec.get("finished")
    if finished is None:
        finished = [True] * len(responses)
    elif not isinstance(finished, list) or len(finished) != len(responses) or not all(isinstance(x, bool) for x in finished):
        raise DataError(f"{loc}: field 'finished' must be a list of {len(responses)} booleans, got {finished!r}")
    skill, gold, correct = rec.get("skill"), rec.get("gold_scores"), rec.get("correct")
    gold_ok = isinstance(gold, list) and len(gold) == len(responses) and all(isinstance(x, (int, float)) for x in gold)
    correct_ok = isinstance(correct, list) and len(correct) == len(responses) and all(isinstance(x, bool) for x in correct)
    return Comparison(prompt=prompt, responses=list(responses), ranking=list(ranking), finished=list(finished),
                      skill=skill if isinstance(skill, str) else None, gold_scores=gold if gold_ok else None,
                      correct=list(correct) if correct_ok else None, loc=loc)


def _explicit(loc: str, rec: dict) -> Comparison:
    prompt = _prompt(loc, rec["prompt"], "prompt")
    chosen = _response(loc, rec["chosen"], "chosen", expect_messages=not isinstance(prompt, str))
    rejected = _response(loc, rec["rejected"], "rejected", expect_messages=not isinstance(prompt, str))
    return Comparison(prompt=prompt, responses=[chosen, rejected], ranking=[0, 1], finished=[True, True], loc=loc)


def _implicit(loc: str, rec: dict) -> Comparison:
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # cut back to a word boundary so "...is four"/"...is five" share "...is ", not "...is f"
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        prompt = chosen[:n]
        if not prompt.strip():
            raise DataError(f"{loc}: field 'prompt' is missing and 'chosen'/'rejected' share no prefix to infer it from; "
                            "add an explicit 'prompt'")
        a, b = chosen[n:], rejected[n:]
        if a == b:
            raise DataError(f"{loc}: fields 'chosen' and 'rejected' are identical")
        return Comparison(prompt=prompt.rstrip(), responses=[a.strip(), b.strip()], ranking=[0, 1], finished=[True, True], loc=loc)
    if isinstance(chosen, list) and isinstance(rejected, list):
        _messages(loc, chosen, "chosen")
        _messages(loc, rejected, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{loc}: field 'prompt' is missing and 'chosen'/'rejected' share no leading messages")
        prompt = chosen[:n]
        return Comparison(prompt=prompt, responses=[_response(loc, chosen[n:], "chosen", True),
                                                    _response(loc, rejected[n:], "rejected", True)],
                          ranking=[0, 1], finished=[True, True], loc=loc)
    raise DataError(f"{loc}: fields 'chosen' and 'rejected' must both be strings or both messages lists, "
                    f"got {_type(chosen)} and {_type(rejected)}")


def _prompt(loc: str, value, name: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{loc}: field '{name}' is empty")
        return value
    if isinstance(value, list):
        _messages(loc, value, name)
        if not value:
            raise DataError(f"{loc}: field '{name}' is an empty messages list")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{loc}: field '{name}' must be a string or a messages list, got {_type(value)}")


def _response(loc: str, value, name: str, expect_messages: bool) -> str:
    if isinstance(value, str):
        if expect_messages:
            raise DataError(f"{loc}: field '{name}' must be a messages list like the prompt, got a string")
        return value
    if isinstance(value, list):
        _messages(loc, value, name)
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise DataError(f"{loc}: field '{name}' must hold exactly one assistant message after the prompt, "
                            f"got roles {[m['role'] for m in value]}")
        return value[0]["content"]
    raise DataError(f"{loc}: field '{name}' must be a string or a messages list, got {_type(value)}")


def _messages(loc: str, value: list, name: str) -> None:
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{loc}: field '{name}[{i}]' must be an object with string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{loc}: field '{name}[{i}].role' is {m['role']!r}; expected one of {', '.join(ROLES)}")


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


__all__ = ["Comparison", "add_label_noise", "as_messages", "load_comparisons", "load_prompts", "parse_record",
           "rank_with_labeler", "sample_responses", "write_jsonl"]
