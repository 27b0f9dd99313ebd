"""User data: reading files, validating records, mapping columns. Every error names the file,
the line or row and the field, and says what to do."""
from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.stage import DataError


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """Read JSONL / JSON / Parquet / CSV files or a `save_to_disk` directory into
    `(location, record)` pairs; `location` is "file:line N" or "file:row N" for error messages."""
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists() and not (path / "dataset_dict.json").exists():
            raise DataError(f"{path}: a directory but not a datasets.save_to_disk dataset")
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [(f"{path}:row {i}", dict(r)) for i, r in enumerate(ds)]
    if not path.exists():
        if "/" in str(path) and not str(path).startswith((".", "/")) and path.suffix == "":
            return _hub_records(str(path))
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:line {i}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:line {i}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}:line {i}", rec))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:line {e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
        out = [(f"{path}:record {i}", r) for i, r in enumerate(data)]
        for loc, r in out:
            if not isinstance(r, dict):
                raise DataError(f"{loc}: expected a JSON object, got {type(r).__name__}")
    elif suffix in (".parquet", ".csv"):
        from datasets import load_dataset

        ds = load_dataset("parquet" if suffix == ".parquet" else "csv", data_files=str(path), split="train")
        out = [(f"{path}:row {i + (2 if suffix == '.csv' else 0)}", dict(r)) for i, r in enumerate(ds)]
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .parquet, .csv or a save_to_disk directory")
    if not out:
        raise DataError(f"{path}: no records (the file is empty)")
    return out


def _hub_records(name: str) -> list[tuple[str, dict]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split="train")
    except Exception as e:  # network errors, missing dataset
        raise DataError(f"{name}: not a local path, and loading it from the hub failed: {e}") from None
    return [(f"{name}:row {i}", dict(r)) for i, r in enumerate(ds)]


def map_columns(records: list[tuple[str, dict]], mapping: dict[str, str | list[str]]) -> list[tuple[str, dict]]:
    """Rename fields: `{"prompt": ["instruction", "input"], "completion": "output"}` joins listed
    source fields with a blank line (skipping empty ones)."""
    if not mapping:
        return records
    out = []
    for loc, rec in records:
        new = {k: v for k, v in rec.items()}
        for target, source in mapping.items():
            sources = [source] if isinstance(source, str) else list(source)
            missing = [s for s in sources if s not in rec]
            if missing and len(missing) == len(sources):
                raise DataError(f"{loc}: field '{missing[0]}' (mapped to '{target}') is missing")
            parts = [rec[s] for s in sources if s in rec and rec[s] not in (None, "")]
            for s, v in zip(sources, parts):
                if not isinstance(v, str):
                    raise DataError(f"{loc}: field '{s}' must be a string, got {type(v).__name__}")
            new[target] = "\n\n".join(parts) if len(sources) > 1 else rec[sources[0]]
            for s in sources:
                if s != target:
                    new.pop(s, None)
        out.append((loc, new))
    return out


def read_text_documents(files: list[str], field: str = "text", valid_fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """Plain text (blank-line-separated documents) or JSONL/JSON/Parquet/CSV with a text field."""
    docs: list[str] = []
    for f in files:
        p = Path(f)
        if p.suffix.lower() in (".txt", ".md", ""):
            if not p.exists():
                raise DataError(f"{p}: file not found")
            blocks = [b.strip() for b in p.read_text().split("\n\n") if b.strip()]
            if not blocks:
                raise DataError(f"{p}: no text (the file is empty)")
            docs.extend(blocks)
            continue
        for loc, rec in read_records(p):
            if field not in rec:
                raise DataError(f"{loc}: field '{field}' is missing (set data.text_field to the field holding the text)")
            if not isinstance(rec[field], str):
                raise DataError(f"{loc}: field '{field}' must be a string, got {type(rec[field]).__name__}")
            docs.append(rec[field])
    rng = random.Random(0)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_valid = max(1, int(len(docs) * valid_fraction)) if len(docs) > 1 else 0
    valid = [docs[i] for i in order[:n_valid]]
    train = [docs[i] for i in order[n_valid:]] or valid
    return train, valid
