"""User data sources, the one home of file reading. Every stage reads its files through
`read_records` (records) or `pipeline.records.read_text_documents` (pretraining text); what the
records mean is `pipeline.records`'. Every error is a `DataError` that starts with the record's
location: `<file>:line N: ...` (JSONL, JSON, CSV, text: the line in the file) or `<file>:row N: ...`
(Parquet and datasets: counted from 0, as `dataset[N]`).

Sources: `.jsonl`; `.json` (a list of records, `{"data": [...]}`, or JSON Lines); `.csv` (a
header row, every cell a string); `.parquet`; `.txt`/`.md` (pretraining text: blank-line
separated documents); a `datasets.save_to_disk` directory; a dataset directory or hub dataset
name (`datasets.load_dataset`, with a `config` name and a `split`).
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from pipeline.stage import DataError

# A dataset written by `save_to_disk` has one of these; any other directory goes to load_dataset.
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
TEXT_TYPES = (".txt", ".md")


def read_records(source: str | Path, config: str | None = None, split: str | None = None) -> list[tuple[str, dict]]:
    """Every record of one file, directory or hub dataset as `(location, record)` pairs; the
    location ("file:line N", "file:row N") starts every error about the record. `config` and
    `split` choose a dataset's configuration and split (default split: `train`); a plain file
    is a single split and ignores them."""
    path = Path(source)
    if path.is_dir():
        if any((path / name).exists() for name in SAVED_DATASET_FILES):
            return _saved_dataset(path, split)
        return _load_dataset(str(path), config, split)
    if not path.exists():
        if path.suffix.lower() not in FILE_TYPES + TEXT_TYPES and not str(source).startswith((".", "/")):
            return _load_dataset(str(source), config, split)
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = _jsonl_records(path, read_text(path))
    elif suffix == ".json":
        out = _json_records(path, read_text(path))
    elif suffix == ".csv":
        out = _csv_records(path, read_text(path))
    elif suffix == ".parquet":
        out = _parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv, .parquet, a "
                        "save_to_disk directory, a dataset directory or a hub dataset name")
    if not out:
        raise DataError(f"{path}: no records (the file is empty)")
    return out


def read_text(path: Path) -> str:
    """A file's text. A byte that is not UTF-8 is reported by line and column, not by offset."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # the byte-order mark some editors write
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        binary = b"\x00" in data[:8192] or data[:2] in (b"\x1f\x8b", b"PK") or data[:4] == b"PAR1"
        hint = ("the file looks binary (compressed, or another format than its name says)" if binary
                else "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        raise DataError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column {column}; {hint}") from None


def _jsonl_records(path: Path, text: str) -> list[tuple[str, dict]]:
    out = []
    # split on "\n" only: str.splitlines also breaks at U+2028 and others, which JSON strings may hold
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        loc = f"{path}:line {i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{loc}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
        out.append((loc, _object(loc, rec)))
    return out


def _json_records(path: Path, text: str) -> list[tuple[str, dict]]:
    """A list of records, `{"data": [...]}`, one object, or JSON Lines under a .json name; each
    record is located by the line it starts on."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl_records(path, text)
        raise DataError(f"{path}:line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    start = len(text) - len(text.lstrip())
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        start = _json_member(text, start, "data")
    elif isinstance(data, dict):
        return [(f"{path}:line {text.count(chr(10), 0, start) + 1}", data)]
    elif not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, {{\"data\": [...]}} or JSON Lines, got a JSON {type_name(data)}")
    return [(f"{path}:line {line}", _object(f"{path}:line {line}", rec)) for line, rec in _json_items(text, start)]


_WS = re.compile(r"[ \t\n\r]*")


def _json_items(text: str, i: int):
    """(line, value) of each element of the (already validated) JSON array at text[i]."""
    decoder, line, counted = json.JSONDecoder(), 1, 0
    i = _WS.match(text, i + 1).end()
    while text[i] != "]":
        line, counted = line + text.count("\n", counted, i), i
        value, i = decoder.raw_decode(text, i)
        yield line, value
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()


def _json_member(text: str, i: int, key: str) -> int:
    """Position of the value of `key` in the (already validated) JSON object at text[i]."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, i + 1).end()
    while True:
        name, i = decoder.raw_decode(text, i)
        i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # past the colon
        if name == key:
            return i
        _, i = decoder.raw_decode(text, i)
        i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # past the comma


def _csv_records(path: Path, text: str) -> list[tuple[str, dict]]:
    """Rows under a header line; every cell is a string, and a row is located by its first line."""
    rows = csv.reader(io.StringIO(text, newline=""))
    out = []
    try:
        header = next(rows, None)
        if header is None:
            return []
        start = rows.line_num + 1
        for row in rows:
            loc, start = f"{path}:line {start}", rows.line_num + 1
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(f"{loc}: {len(row)} fields, but the header (line 1) names {len(header)} columns "
                                f"({', '.join(header)}); quote cells that hold commas")
            out.append((loc, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{path}:line {rows.line_num}: malformed CSV ({e})") from None
    return out


def _parquet_records(path: Path) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]


def _saved_dataset(path: Path, split: str | None) -> list[tuple[str, dict]]:
    from datasets import DatasetDict, load_from_disk

    ds, name = load_from_disk(str(path)), str(path)
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if split and split not in splits:
            raise DataError(f"{path}: no split '{split}'; it has {', '.join(splits)} (set data.split)")
        if not split and "train" not in splits and len(splits) > 1:
            raise DataError(f"{path}: holds the splits {', '.join(splits)} and none is 'train'; choose one with data.split")
        split = split or ("train" if "train" in splits else splits[0])
        ds, name = ds[split], f"{path}[{split}]"
    return [(f"{name}:row {i}", dict(r)) for i, r in enumerate(ds)]


def _load_dataset(name: str, config: str | None, split: str | None) -> list[tuple[str, dict]]:
    """A dataset directory (data files, configurations in its README) or a hub dataset: one code
    path, `datasets.load_dataset`."""
    from datasets import load_dataset

    split = split or "train"
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # no network, unknown dataset, configuration or split: datasets raises many types
        where = "" if Path(name).exists() else "not a local path, and "
        raise DataError(f"{name}: {where}datasets.load_dataset failed (data.config={config}, data.split={split}): "
                        f"{_one_line(e)}") from None
    label = f"{config}/{split}" if config else split
    return [(f"{name}[{label}]:row {i}", dict(r)) for i, r in enumerate(ds)]


def _object(loc: str, rec) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{loc}: expected a JSON object (one record), got {type_name(rec)}")
    return rec


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


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


def type_name(value) -> str:
    """A value's type as an error message names it."""
    return "null" if value is None else type(value).__name__
