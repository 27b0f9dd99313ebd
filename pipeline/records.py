"""The one home of record formats: every stage parses its records with the `parse_*` functions
and loaders here (files come from `pipeline.data`), so a format means the same everywhere and
every error names the file, the line or row and the field.

Record formats (TRL's, plus K-wise rankings). A prompt is a string (one user turn) or a list of
`{"role": "system" | "user" | "assistant", "content": str}` messages:
- text:              `{"text": str}`; pretraining, and SFT with a plain language-modelling loss
- prompt/completion: `{"prompt": P, "completion": C}` (both strings or both messages); SFT
- conversational:    `{"messages": [...]}`; SFT (loss on the assistant turns)
- preference, explicit prompt: `{"prompt": P, "chosen": C, "rejected": R}`; C and R are response
  strings, the assistant message, or the whole conversation repeating P (UltraFeedback)
- preference, implicit prompt: `{"chosen": C, "rejected": R}`; the prompt is every turn but the
  last assistant one (messages lists, or Anthropic HH text "\\n\\nHuman: ... \\n\\nAssistant: ..."),
  or for other text their shared prefix cut back to a whitespace
- K-wise ranking:    `{"prompt": P, "responses": [r_1, ..., r_K], "ranking": [k_1, ..., k_K]}`,
  k_i = rank of response i, 0 = best, equal ranks = a tie; optional `finished`, `skill`,
  `correct` (per-response booleans), `gold_scores`
- prompt-only:       `{"prompt": P}`, a conversation (its turns up to the last user one), or any
  preference or ranking record (its prompt); PPO and the RM export
"""
from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import TEXT_TYPES, map_columns, read_records, read_text, type_name
from pipeline.stage import DataError


# ------------------------------------------------------------------------------------------
# Record formats
# ------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def ranked_pairs(ranks: list[int]):
    """(better, worse) index pairs of one ranking (0 = best); ties are not pairs."""
    return ((i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j])


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


def parse_text(loc: str, rec: dict, name: str = "text") -> str:
    """The document of a pretraining record (an empty one is allowed: it adds only <s></s>)."""
    if name not in rec:
        raise DataError(f"{loc}: field '{name}' is missing (found fields: {_fields(rec)}); set data.text_field "
                        "to the field holding the text")
    if not isinstance(rec[name], str):
        raise DataError(f"{loc}: field '{name}' must be a string, got {type_name(rec[name])}")
    return rec[name]


def parse_messages(loc: str, name: str, value, need_assistant: bool = False) -> list[dict]:
    """A checked copy of a messages list, keeping only `role` and `content`."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{loc}: field '{name}' must be a non-empty list of {{role, content}} messages, got {_show(value)}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{loc}: field '{name}[{i}]' must be an object with 'role' and 'content', got {_show(m)}")
        if m["role"] not in ROLES:
            raise DataError(f"{loc}: field '{name}[{i}].role' is {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{loc}: field '{name}[{i}].content' must be a string, got {type_name(m['content'])}")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{loc}: field '{name}' has no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_sft(loc: str, rec: dict) -> tuple[str, dict]:
    """(kind, clean record) of an SFT record: 'messages', 'prompt_completion' or 'text'."""
    if "messages" in rec:
        return "messages", {"messages": parse_messages(loc, "messages", rec["messages"], need_assistant=True)}
    if "prompt" in rec or "completion" in rec:
        missing = [f for f in ("prompt", "completion") if f not in rec]
        if missing:
            raise DataError(f"{loc}: field '{missing[0]}' is missing; records need 'prompt' + 'completion', 'messages' "
                            f"or 'text' (present: {_fields(rec)}; map other names with data.columns)")
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, str) and isinstance(c, str):
            if not c.strip():
                raise DataError(f"{loc}: field 'completion' is empty")
            return "prompt_completion", {"prompt": p, "completion": c}
        if isinstance(p, list) and isinstance(c, list):
            return "prompt_completion", {"prompt": parse_messages(loc, "prompt", p),
                                         "completion": parse_messages(loc, "completion", c, need_assistant=True)}
        bad = "prompt" if not isinstance(p, (str, list)) else "completion"
        raise DataError(f"{loc}: field '{bad}' must be a string (or both prompt and completion lists of messages), "
                        f"got {type_name(rec[bad])}")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DataError(f"{loc}: field 'text' must be a non-empty string, got {_show(rec['text'])}")
        return "text", {"text": rec["text"]}
    raise DataError(f"{loc}: field 'messages', 'prompt' + 'completion' or 'text' is missing (present: {_fields(rec)}; "
                    "map other names with data.columns)")


def parse_prompt(loc: str, rec: dict, name: str = "prompt") -> str | list[dict]:
    """The prompt of a prompt-only record (`name`: a string or messages), of a conversation
    (`messages`: its turns up to the last user one), or of a preference or ranking record."""
    if rec.get(name) is not None:
        return _prompt_value(loc, name, rec[name])
    if "messages" in rec:
        msgs = parse_messages(loc, "messages", rec["messages"])
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise DataError(f"{loc}: field 'messages' has no user turn to take the prompt from")
        return msgs[: users[-1] + 1]
    if "chosen" in rec or "rejected" in rec:
        return parse_comparison(loc, rec).prompt
    if name in rec:
        return _prompt_value(loc, name, rec[name])  # null: says so
    raise DataError(f"{loc}: field '{name}' is missing (prompt records need a '{name}', chat 'messages', or a preference "
                    f"record's 'chosen'/'rejected'; present: {_fields(rec)})")


def parse_comparison(loc: str, rec: dict) -> Comparison:
    """A K-wise ranking or a preference pair (explicit or implicit prompt) as a Comparison."""
    if "responses" in rec:
        return _kwise(loc, rec)
    if "chosen" not in rec and "rejected" not in rec:
        raise DataError(f"{loc}: field 'responses' (K-wise ranking) or 'chosen'/'rejected' (preference pair) is missing; "
                        f"present: {_fields(rec)}. Map other names with data.columns")
    for name in ("chosen", "rejected"):
        if name not in rec:
            raise DataError(f"{loc}: field '{name}' is missing (a preference record needs 'chosen' and 'rejected')")
    if rec.get("prompt") is None:
        prompt, chosen, rejected = _implicit(loc, rec["chosen"], rec["rejected"])
    else:
        prompt = _prompt_value(loc, "prompt", rec["prompt"])
        history_c, chosen = _response(loc, "chosen", rec["chosen"], prompt)
        history_r, rejected = _response(loc, "rejected", rec["rejected"], prompt)
        if history_c and history_r and (turn := _first_difference(history_c, history_r)) is not None:
            raise DataError(f"{loc}: fields 'chosen' and 'rejected' repeat different conversations (they differ at "
                            f"turn {turn}); both must repeat the prompt")
        # a repeated conversation may carry turns the prompt field lacks (a system message)
        history = history_c or history_r
        if history and len(history) > len(_as_messages(prompt)):
            prompt = history
    return Comparison(prompt=prompt, responses=[chosen, rejected], ranking=[0, 1], finished=[True, True], loc=loc)


def _kwise(loc: str, rec: dict) -> Comparison:
    if "prompt" not in rec:
        raise DataError(f"{loc}: field 'prompt' is missing")
    prompt = _prompt_value(loc, "prompt", rec["prompt"])
    responses = rec["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{loc}: field 'responses' must be a list of strings, got {_show(responses)}")
    if len(responses) < 2:
        raise DataError(f"{loc}: field 'responses' needs at least 2 responses to compare, got {len(responses)}")
    if "ranking" not in rec:
        raise DataError(f"{loc}: field 'ranking' is missing (ranks of the responses, 0 = best)")
    ranking = rec["ranking"]
    if ranking is None:
        raise DataError(f"{loc}: field 'ranking' is null: this record is not labeled yet")
    if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ranking):
        raise DataError(f"{loc}: field 'ranking' must be a list of non-negative integers (0 = best), got {_show(ranking)}")
    if len(ranking) != len(responses):
        raise DataError(f"{loc}: field 'ranking' has {len(ranking)} ranks for {len(responses)} responses; give one rank per response")
    finished = rec.get("finished")
    if finished is None:
        finished = [True] * len(responses)
    elif not isinstance(finished, list) or len(finished) != len(responses) or not all(isinstance(x, bool) for x in finished):
        raise DataError(f"{loc}: field 'finished' must be a list of {len(responses)} booleans, got {_show(finished)}")
    skill, gold, correct = rec.get("skill"), rec.get("gold_scores"), rec.get("correct")
    gold_ok = isinstance(gold, list) and len(gold) == len(responses) and all(isinstance(x, (int, float)) for x in gold)
    correct_ok = isinstance(correct, list) and len(correct) == len(responses) and all(isinstance(x, bool) for x in correct)
    return Comparison(prompt=prompt, responses=list(responses), ranking=list(ranking), finished=list(finished),
                      skill=skill if isinstance(skill, str) else None, gold_scores=gold if gold_ok else None,
                      correct=list(correct) if correct_ok else None, loc=loc)


def _response(loc: str, name: str, value, prompt: str | list[dict]) -> tuple[list[dict], str]:
    """(repeated conversation or [], response text) of 'chosen'/'rejected' beside an explicit
    prompt: the response as text, as the assistant message, or as the whole conversation that
    repeats the prompt before it (UltraFeedback)."""
    if isinstance(value, str):
        return [], value
    if not isinstance(value, list):
        raise DataError(f"{loc}: field '{name}' must be a string or a messages list, got {type_name(value)}")
    msgs = parse_messages(loc, name, value)
    roles, history, expected = [m["role"] for m in msgs], msgs[:-1], _as_messages(prompt)
    if roles[-1] != "assistant":
        raise DataError(f"{loc}: field '{name}' must end with the assistant's response, got roles {roles}")
    if history and _first_difference(history[-len(expected):], expected) is not None:
        raise DataError(f"{loc}: field '{name}' holds turns before the response (roles {roles}) that do not end with "
                        "'prompt'; give the response alone, or the whole conversation: the prompt, then the response")
    return history, msgs[-1]["content"]


def _implicit(loc: str, chosen, rejected) -> tuple[str | list[dict], str, str]:
    """(prompt, chosen text, rejected text) when the prompt is inside 'chosen' and 'rejected'."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        hh_c, hh_r = _hh_messages(chosen), _hh_messages(rejected)
        if hh_c is None or hh_r is None:
            return _shared_prefix(loc, chosen, rejected)
        chosen, rejected = hh_c, hh_r
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{loc}: fields 'chosen' and 'rejected' must both be strings or both messages lists, "
                        f"got {type_name(chosen)} and {type_name(rejected)}")
    convs = {"chosen": parse_messages(loc, "chosen", chosen), "rejected": parse_messages(loc, "rejected", rejected)}
    for name, msgs in convs.items():
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{loc}: field '{name}' must end with the assistant's response, got roles {[m['role'] for m in msgs]}")
        if len(msgs) < 2:
            raise DataError(f"{loc}: field 'prompt' is missing and '{name}' holds no turn before the response; "
                            "add a 'prompt' or give the whole conversation")
    c, r = convs["chosen"], convs["rejected"]
    if (turn := _first_difference(c[:-1], r[:-1])) is not None:
        raise DataError(f"{loc}: fields 'chosen' and 'rejected' must share every turn but the last assistant one (the "
                        f"implicit prompt); they differ at turn {turn}")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def _hh_messages(text: str) -> list[dict] | None:
    """Anthropic HH dialogue text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages; None for other text."""
    if not re.match(r"\s*Human:", text) or "\n\nAssistant:" not in text:
        return None
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _shared_prefix(loc: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # cut back to a word boundary so "...is four"/"...is five" share "...is ", not "...is f"
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    if not chosen[:n].strip():
        raise DataError(f"{loc}: field 'prompt' is missing and 'chosen'/'rejected' share no prefix to infer it from; "
                        "add an explicit 'prompt'")
    return chosen[:n].rstrip(), chosen[n:].strip(), rejected[n:].strip()


def _prompt_value(loc: str, name: str, value) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{loc}: field '{name}' is empty")
        return value
    if isinstance(value, list):
        msgs = parse_messages(loc, name, value)
        if not any(m["role"] == "user" for m in msgs):
            raise DataError(f"{loc}: field '{name}' has no user message")
        return msgs
    raise DataError(f"{loc}: field '{name}' must be a string or a messages list, got {type_name(value)}")


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _first_difference(a: list[dict], b: list[dict]) -> int | None:
    """Index of the first turn where two conversations differ (whitespace around content aside)."""
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i]["role"] != b[i]["role"] or a[i]["content"].strip() != b[i]["content"].strip():
            return i
    return None


# ------------------------------------------------------------------------------------------
# Loading: files -> validated records, for each stage
# ------------------------------------------------------------------------------------------
def load_sft_records(data_cfg, world, unknown: frozenset[str] = frozenset()) -> tuple[list[dict], list[dict], str]:
    """(train, held-out, kind) where kind is 'messages', 'prompt_completion' or 'text'. `unknown`:
    the world's questions its refusal-aware demonstrations may abstain on (`World.sft_examples`)."""
    if data_cfg.source == "world":
        train = [{"messages": ex["messages"]} for ex in world.sft_examples("train", unknown)]
        return train, [], "messages"
    kinds, clean = set(), []
    for f in data_cfg.files:
        for loc, rec in map_columns(read_records(f, data_cfg.config, data_cfg.split), data_cfg.columns):
            kind, r = parse_sft(loc, rec)
            if kinds and kind not in kinds:
                raise DataError(f"{loc}: record is '{kind}' but earlier records are '{next(iter(kinds))}'; use one format per run")
            kinds.add(kind)
            clean.append(r)
    rng = random.Random(0)
    rng.shuffle(clean)
    n_valid = int(len(clean) * data_cfg.valid_fraction) if len(clean) >= 20 else 0
    return clean[n_valid:], clean[:n_valid], kinds.pop()


def replay_documents(data_cfg, world, demonstrations: int) -> list[str]:
    """`data.replay` pretraining documents per demonstration for SFT to train on beside them:
    the world's corpus (in its own random order) or `data.replay_files`, cycled when there are
    fewer. Replaying pretraining data keeps fine-tuning from overwriting what pretraining stored
    (the ptx idea of InstructGPT, Ouyang et al. 2022, applied to SFT)."""
    n = int(data_cfg.replay * demonstrations)
    if n == 0:
        return []
    if data_cfg.replay_files:
        train, held = read_text_documents(data_cfg.replay_files)  # every document: none is held out here
        docs = train + held
    else:
        docs = world.corpus("train")
    return [docs[i % len(docs)] for i in range(n)]


def load_comparisons(files: list[str], columns: dict | None = None, config: str | None = None,
                     split: str | None = None, log=None) -> list[Comparison]:
    """Every comparison of every file, validated before anything trains. A pair whose two
    responses are identical teaches nothing: such pairs are dropped with a warning (`log`),
    and a file of nothing else is an error."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = []
    for f in files:
        comps = [parse_comparison(loc, rec) for loc, rec in map_columns(read_records(f, config, split), columns or {})]
        same = [c.loc for c in comps if _identical(c)]
        if same and len(same) == len(comps):
            raise DataError(f"{f}: every pair has identical 'chosen' and 'rejected' responses ({_where(same)}); "
                            "there is nothing to learn from this file")
        if same:
            log(f"warning: {f}: dropped {len(same)} of {len(comps)} pairs whose 'chosen' and 'rejected' responses "
                f"are identical ({_where(same)})")
        out.extend(c for c in comps if not _identical(c))
    return out


def load_prompt_records(files: list[str], columns: dict | None = None, name: str = "prompt", config: str | None = None,
                        split: str | None = None) -> list[dict]:
    """`{"prompt": str | messages, "skill": str | None}` of every record (see `parse_prompt`)."""
    out = []
    for f in files:
        for loc, rec in map_columns(read_records(f, config, split), columns or {}):
            out.append({"prompt": parse_prompt(loc, rec, name), "skill": rec.get("skill")})
    return out


def _identical(c: Comparison) -> bool:
    return len(c.responses) == 2 and bool(c.pairs()) and c.responses[0].strip() == c.responses[1].strip()


def _where(locs: list[str], shown: int = 10) -> str:
    """"lines 3, 7, 9" from ["f:line 3", "f:line 7", "f:line 9"]."""
    parts = [loc.rsplit(":", 1)[-1].split() for loc in locs]
    nums = ", ".join(p[-1] for p in parts[:shown]) + (f" and {len(parts) - shown} more" if len(parts) > shown else "")
    return f"{parts[0][0]}{'s' if len(parts) > 1 else ''} {nums}"


def read_text_documents(files: list[str], field: str = "text", valid_fraction: float = 0.02,
                        config: str | None = None, split: str | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: plain text (.txt/.md, documents separated by blank lines) or
    records with a text `field`. Fewer than two documents hold nothing out: the caller cuts its
    held-out part from the token stream instead."""
    docs: list[str] = []
    for f in files:
        p = Path(f)
        if p.suffix.lower() in TEXT_TYPES or (p.is_file() and p.suffix == ""):
            if not p.exists():
                raise DataError(f"{p}: file not found")
            blocks = [b.strip() for b in re.split(r"\n[ \t\r]*\n", read_text(p)) if b.strip()]
            if not blocks:
                raise DataError(f"{p}: no text (the file is empty)")
            docs.extend(blocks)
            continue
        docs.extend(parse_text(loc, rec, field) for loc, rec in read_records(p, config, split))
    rng = random.Random(0)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_valid = max(1, int(len(docs) * valid_fraction)) if len(docs) > 1 else 0
    valid = [docs[i] for i in order[:n_valid]]
    train = [docs[i] for i in order[n_valid:]] or valid
    return train, valid


def _show(value, limit: int = 80) -> str:
    """A value for an error message: its type and a one-line, shortened repr."""
    text = repr(value)
    return f"{type_name(value)} {text if len(text) <= limit else text[:limit] + '...'}"


def _fields(rec: dict) -> str:
    return ", ".join(map(str, rec)) or "none"
