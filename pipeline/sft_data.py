"""SFT records: the built-in world's demonstrations or user files in the standard formats
(prompt/completion as strings or messages; conversational `messages`), validated up front."""
from __future__ import annotations

import random

from pipeline.data import map_columns, read_records
from pipeline.stage import DataError

ROLES = ("system", "user", "assistant")


def _check_messages(loc: str, field: str, value, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{loc}: field '{field}' must be a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{loc}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{loc}: field '{field}[{i}].role' is {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{loc}: field '{field}[{i}].content' must be a string, got {type(m['content']).__name__}")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{loc}: field '{field}' has no assistant message to learn from")


def validate_sft_record(loc: str, rec: dict) -> tuple[str, dict]:
    """Return (kind, clean record) or raise DataError naming the location and field."""
    if "messages" in rec:
        _check_messages(loc, "messages", rec["messages"], need_assistant=True)
        return "messages", {"messages": [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]}
    missing = [f for f in ("prompt", "completion") if f not in rec]
    if missing:
        raise DataError(f"{loc}: field '{missing[0]}' is missing; records need 'prompt' + 'completion' or 'messages' "
                        f"(present: {', '.join(rec) or 'none'}; map other names with data.columns)")
    p, c = rec["prompt"], rec["completion"]
    if isinstance(p, str) and isinstance(c, str):
        if not c.strip():
            raise DataError(f"{loc}: field 'completion' is empty")
        return "prompt_completion", {"prompt": p, "completion": c}
    if isinstance(p, list) and isinstance(c, list):
        _check_messages(loc, "prompt", p, need_assistant=False)
        _check_messages(loc, "completion", c, need_assistant=True)
        return "prompt_completion", {"prompt": p, "completion": c}
    bad = "prompt" if not isinstance(p, (str, list)) else "completion"
    raise DataError(f"{loc}: field '{bad}' must be a string (or both prompt and completion lists of messages), "
                    f"got {type(rec[bad]).__name__}")


def load_sft_records(data_cfg, world) -> tuple[list[dict], list[dict], str]:
    """(train, held-out, kind) where kind is 'messages' or 'prompt_completion'."""
    if data_cfg.source == "world":
        train = [{"messages": ex["messages"]} for ex in world.sft_examples("train")]
        return train, [], "messages"
    records = []
    for f in data_cfg.files:
        records.extend(map_columns(read_records(f), data_cfg.columns))
    kinds, clean = set(), []
    for loc, rec in records:
        kind, r = validate_sft_record(loc, rec)
        if kinds and kind not in kinds:
            raise DataError(f"{loc}: record is '{kind}' but earlier records are '{next(iter(kinds))}'; use one format per run")
        kinds.add(kind)
        clean.append(r)
    rng = random.Random(0)
    rng.shuffle(clean)
    n_valid = int(len(clean) * data_cfg.valid_fraction) if len(clean) >= 20 else 0
    return clean[n_valid:], clean[:n_valid], kinds.pop()
