"""Run directories, manifests and the stage-to-stage handoff.

A run lives in `runs/<run>/<stage>/` with `model/`, `config.yaml`, `manifest.json`,
`metrics.jsonl` and `checkpoints/`. Every write is atomic (temporary sibling, then rename), so
a crash never leaves a file or directory that looks complete. A stage finds its parent only
through the parent's manifest; nothing guesses "latest".
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline import registry


class HandoffError(RuntimeError):
    """A parent stage is missing, incomplete or does not fit this stage."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_result(home: str | Path, stem: str, data: Any, text: str, tag: str) -> None:
    """A tool's result (`make study`, `make overopt`, `make rm-curve`): `<home>/<stem>.json` and the
    readable `<home>/<stem>.md`, both atomic; the text printed, then where it is."""
    home = Path(home)
    atomic_write_text(home / f"{stem}.json", json.dumps(data, indent=1))
    atomic_write_text(home / f"{stem}.md", text)
    print(text, flush=True)
    print(f"[{tag}] {home / f'{stem}.md'}", flush=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing `dst` is swapped out, then deleted."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------
def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weights_fingerprint(model_dir: str | Path) -> str:
    """Hash of a model directory's weight files (names and bytes): equal fingerprints are equal
    weights, so two stages can share one copy without assuming it. Read once per process for
    files that did not change (size and modification time): an 8B model is 16 GB to hash."""
    model_dir = Path(model_dir).resolve()
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise HandoffError(f"{model_dir}: no weight files found (expected *.safetensors)")
    return _hash_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=16)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        p = Path(name)
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Hash of the tokenizer's vocabulary and special tokens as saved in a model directory."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    found = False
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json"):
        p = model_dir / name
        if p.exists():
            found = True
            h.update(name.encode())
            h.update(p.read_bytes())
    if not found:
        raise HandoffError(f"{model_dir}: no tokenizer files found (expected tokenizer.json or vocab files)")
    return h.hexdigest()[:16]


def data_fingerprint(items: Any) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "wandb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What a stage produced, from what, with which settings. Written as `manifest.json`."""

    stage: str
    run_name: str
    status: str = "running"  # running | complete | failed
    model_dir: str | None = None
    parent: str | None = None       # parent manifest, relative to this stage's directory: moves with the run
    parent_abs: str | None = None   # the same, absolute: the fallback when the relative path leads nowhere
    parent_hash: str | None = None
    tokenizer_fingerprint: str | None = None
    data_fingerprint: str | None = None
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    git_commit: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    wall_time_s: float | None = None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    error: str | None = None

    def save(self, stage_dir: str | Path) -> Path:
        path = Path(stage_dir) / "manifest.json"
        atomic_write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HandoffError(f"{path}: manifest not found") from None
        except json.JSONDecodeError as e:
            raise HandoffError(f"{path}: manifest is not valid JSON ({e}); delete the stage directory and re-run it") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def stage_dir(runs_dir: str | Path, run_name: str, stage: str) -> Path:
    return Path(runs_dir) / run_name / stage


def manifest_path(path: str | Path) -> Path:
    """Accept a stage directory or a manifest file; return the manifest file path."""
    path = Path(path)
    return path / "manifest.json" if path.is_dir() or path.suffix != ".json" else path


@dataclass
class Parent:
    """A resolved, checked parent stage."""

    manifest: Manifest
    manifest_path: Path
    model_dir: Path
    hash: str


def resolve_parent(stage: str, runs_dir: str | Path, run_name: str, explicit: str | None = None,
                   allowed: tuple[str, ...] | None = None) -> Parent:
    """Find and check the parent of `stage`: its default parent stage (`pipeline.registry`) of the
    same run, or `explicit`.

    Refuses (HandoffError) a missing or incomplete parent, one of a stage `stage` does not train
    from, or one whose model directory no longer holds the tokenizer recorded in its manifest.
    """
    parents = registry.get(stage).parents
    if explicit:
        path = manifest_path(explicit)
    else:
        if not parents:
            raise HandoffError(f"stage '{stage}' has no parent stage")
        prev = parents[0]
        path = stage_dir(runs_dir, run_name, prev) / "manifest.json"
        if not path.exists():
            raise HandoffError(
                f"stage '{stage}' of run '{run_name}' needs the '{prev}' stage first: {path} does not exist.\n"
                f"Run `make {prev} RUN={run_name}`, or point to another parent with parent=<stage dir>.")
    m = Manifest.load(path)
    if not m.complete:
        raise HandoffError(f"{path}: parent stage '{m.stage}' is {m.status}, not complete; re-run it before '{stage}'")
    allowed = allowed or parents
    if m.stage not in allowed:
        raise HandoffError(f"{path}: a '{m.stage}' stage cannot be the parent of '{stage}' (allowed: {', '.join(allowed)})")
    if not m.model_dir:
        raise HandoffError(f"{path}: manifest records no model directory")
    model_dir = Path(m.model_dir)
    if not model_dir.is_absolute():
        model_dir = path.parent / model_dir
    if not model_dir.exists():
        raise HandoffError(f"{path}: model directory {model_dir} is missing")
    if m.tokenizer_fingerprint and tokenizer_fingerprint(model_dir) != m.tokenizer_fingerprint:
        raise HandoffError(f"{model_dir}: tokenizer differs from the one recorded in {path}; the directory was modified after the stage finished")
    return Parent(manifest=m, manifest_path=path.resolve(), model_dir=model_dir.resolve(), hash=file_hash(path))


def parent_reference(parent_manifest: str | Path, child_dir: str | Path) -> tuple[str, str]:
    """(relative, absolute) path of a parent manifest as a child stage records it. Relative to the
    child's stage directory (`../sft/manifest.json`), so a run copied, moved or renamed as a whole
    still finds its own stages rather than the old location's."""
    absolute = Path(parent_manifest).resolve()
    try:
        relative = os.path.relpath(absolute, Path(child_dir).resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        relative = str(absolute)
    return relative, str(absolute)


def recorded_parent(manifest_file: str | Path, m: Manifest) -> Path:
    """The parent manifest that `m`, read from `manifest_file`, records: the relative path if it
    exists there, else the absolute one (manifests written before relative paths hold only that).
    The caller checks `m.parent_hash` against the file returned."""
    if not m.parent:
        raise HandoffError(f"{manifest_file}: the manifest records no parent")
    here = Path(manifest_file).parent
    candidates = [manifest_path(here / m.parent)]  # an absolute m.parent stays absolute
    if m.parent_abs:
        candidates.append(manifest_path(m.parent_abs))
    for path in candidates:
        if path.exists():
            return path.resolve()
    raise HandoffError(f"{manifest_file}: its parent manifest is missing: not at "
                       f"{' nor at '.join(str(c) for c in candidates)}; copy or move a run directory with all its stages")


def read_metrics(path: str | Path) -> list[dict]:
    """Read a `metrics.jsonl` file, skipping a torn last line."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_status(runs_dir: str | Path, run_name: str) -> list[dict]:
    """One row per stage of a run: status, wall time and headline metrics."""
    rows = []
    for stage in registry.NAMES:
        path = stage_dir(runs_dir, run_name, stage) / "manifest.json"
        if not path.exists() and not registry.get(stage).chain:
            continue  # a stage outside the default chain shows once it ran
        if not path.exists():
            rows.append({"stage": stage, "status": "-", "wall_time_s": None, "metrics": {}})
            continue
        try:
            m = Manifest.load(path)
        except HandoffError:
            rows.append({"stage": stage, "status": "corrupt", "wall_time_s": None, "metrics": {}})
            continue
        rows.append({"stage": stage, "status": m.status, "wall_time_s": m.wall_time_s,
                     "metrics": m.extra.get("headline", m.metrics)})
    return rows


def format_table(rows: list[dict]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [f"{'stage':<9} {'status':<9} {'time':>8}  headline"]
    for r in rows:
        t = f"{r['wall_time_s']:.0f}s" if r["wall_time_s"] is not None else "-"
        head = "  ".join(f"{k}={fmt(v)}" for k, v in r["metrics"].items())
        lines.append(f"{r['stage']:<9} {r['status']:<9} {t:>8}  {head}")
    return "\n".join(lines)
