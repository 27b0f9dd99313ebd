"""Tracking: wandb's history holds every logged step (tables included), and every sample table
and sample file is stratified across skills.

wandb 0.31 has no public reader for offline runs, so `wandb_history` reads the `.wandb` record
log itself: a LevelDB-style log (7-byte header `:W&B` + magic 0xBEE1 + version, then 32 KiB
blocks of records with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST), each record
a `wandb_internal_pb2.Record`; history rows are `Record.history` with `step.num` and items whose
`nested_key` is the key path and `value_json` the value."""
from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.runs import read_metrics
from pipeline.tracking import Tracker, stratified
from pipeline.world import SKILLS
from tests.test_ppo import ppo_cfg, tiny  # noqa: F401  (fixture)
from tests.test_rm import run_rm, sft  # noqa: F401  (fixture)
from tests.test_sft import SFT_TINY, WORLD as SFT_WORLD


# ---------------------------------------------------------------------------- a .wandb reader
def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, data[:7]
    block, header, pos, buf = 32768, 7, 7, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + header])
        if pos + header + length > len(data):  # still being written
            return
        chunk, pos = data[pos + header: pos + header + length], pos + header + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(stage_dir: Path) -> tuple[dict[int, dict], str]:
    """({step: {key: value}} of the stage's one offline run, its debug-internal.log)."""
    files = list(Path(stage_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # wandb's service may still be writing after `finish()` returns: records are written in
    # order, so the file is whole once its last record is the run's exit record
    deadline = time.time() + 30
    while not (records := list(wandb_records(files[0]))) or records[-1].WhichOneof("record_type") != "exit":
        assert time.time() < deadline, f"{files[0]} never got its exit record"
        time.sleep(0.2)
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row = history.setdefault(r.history.step.num, {})
        assert not row, f"two history records at step {r.history.step.num}"
        for item in r.history.item:
            path = list(item.nested_key) or [item.key]
            node = row
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = json.loads(item.value_json)
    return history, (files[0].parent / "logs" / "debug-internal.log").read_text()


def assert_history_complete(stage_dir: Path) -> dict[int, dict]:
    """Every metrics.jsonl row is in wandb's history at its step with all its values; nothing
    was dropped."""
    history, log = wandb_history(stage_dir)
    assert "ignoring" not in log and "partial history" not in log, log
    rows = read_metrics(Path(stage_dir) / "metrics.jsonl")
    assert rows
    expected: dict[int, dict] = {}  # rows at one step merge into one wandb row; a later value wins
    for row in rows:
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "time")})
    for step, want in expected.items():
        got = history.get(step)
        assert got is not None, f"step {step} missing from wandb history {sorted(history)}"
        for k, v in want.items():
            assert k in got, f"{k} missing at step {step}"
            assert got[k] == v or (isinstance(v, float) and (math.isclose(got[k], v, rel_tol=1e-6)
                                                              or math.isnan(v))), (k, got[k], v)
    return history


def table(stage_dir: Path, entry: dict) -> dict:
    """A logged wandb.Table (its history entry points at the JSON file)."""
    files = list(Path(stage_dir).glob("wandb/offline-run-*"))
    return json.loads((files[0] / "files" / entry["path"]).read_text())


def assert_stratified(t: dict, skills) -> None:
    """The first len(skills) rows are one of each skill (round-robin, not the head of one)."""
    col = t["columns"].index("skill")
    skills = set(skills)
    assert {r[col] for r in t["data"][: len(skills)]} == skills, [r[col] for r in t["data"]]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb offline, with its caches and settings in a temporary directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, d in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / d))
    return "wandb.mode=offline"


# ---------------------------------------------------------------------------- the helper
def test_stratified_round_robin():
    rows = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("c", 2)]
    assert stratified(rows, 0, 4) == [("a", 1), ("b", 1), ("c", 1), ("a", 2)]
    assert stratified(rows, lambda r: r[0], 100) == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2), ("a", 3)]
    assert stratified(rows, 0, 0) == [] and stratified([], 0, 5) == []
    dicts = [{"skill": s, "i": i} for s in SKILLS for i in range(4)]  # skill-sorted, as the world's eval
    for n in range(len(SKILLS), len(dicts) + 1):
        picked = stratified(dicts, "skill", n)
        assert len(picked) == n and {r["skill"] for r in picked} == set(SKILLS)
        assert picked == stratified(dicts, "skill", n)  # deterministic


# ---------------------------------------------------------------------------- wandb history
@pytest.mark.parametrize("table_step", ["explicit", "default"])
def test_tables_keep_every_step_in_wandb_history(tmp_path, offline, table_step, capfd):
    """A stage's order of calls: metrics, a table at the same step, metrics again at that step,
    later steps, and a final table before or after the final metrics row."""
    tracker = Tracker(tmp_path / "stage", "ppo", "r", {}, SimpleNamespace(mode="offline", project="p", entity=None))

    def tab(name, step):
        at = {"step": step} if table_step == "explicit" else {}  # default: the latest step logged
        tracker.table(name, ["skill", "x"], [["first", 1], ["last", 2]], **at)

    tracker.log({"train/loss": 1.0}, 10)
    tracker.log({"train/loss": 0.9}, 20)
    tab("eval/samples", 20)
    tracker.log({"eval/score": 0.5}, 20)      # a later metrics row at the table's step
    tab("rollout/samples", 20)
    tracker.log({"train/loss": 0.8}, 21)      # the very next step
    tracker.log({"train/loss": 0.7}, 30)
    tab("eval/samples", 30)                   # final table before the final metrics (pretrain, SFT)
    tracker.log({"eval/score": 0.6}, 30)
    tracker.log({"train/loss": 0.6}, 40)
    tracker.log({"eval/score": 0.7}, 40)
    tab("eval/samples", 40)                   # final table after them (RM, PPO)
    tracker.finish()
    err = capfd.readouterr().err
    assert "ignoring" not in err and "drops rows" not in err, err
    history = assert_history_complete(tmp_path / "stage")
    assert sorted(history) == [10, 20, 21, 30, 40]
    assert history[20]["train/loss"] == 0.9 and history[20]["eval/score"] == 0.5
    for step, names in ((20, ("eval/samples", "rollout/samples")), (30, ("eval/samples",)), (40, ("eval/samples",))):
        for name in names:
            assert history[step][name]["_type"] == "table-file", (step, name)
            assert table(tmp_path / "stage", history[step][name])["data"] == [["first", 1], ["last", 2]]


def test_a_row_before_the_latest_step_is_reported(tmp_path, offline, capfd):
    tracker = Tracker(tmp_path / "stage", "ppo", "r", {}, SimpleNamespace(mode="offline", project="p", entity=None))
    tracker.log({"train/loss": 1.0}, 5)
    tracker.table("eval/samples", ["skill"], [["first"]], step=3)
    tracker.finish()
    assert "wandb drops rows at a step before the latest (3 < 5): eval/samples" in capfd.readouterr().err


def test_ppo_history_has_every_iteration_and_stratified_samples(tiny, tmp_path, offline, capfd):
    from pipeline.report import write_report
    from pipeline.world import World
    from pipeline.runtime import batch_indices
    from stages.ppo.data import load_prompts
    from stages.ppo.runner import run

    n = len(SKILLS)
    cfg = ppo_cfg(tiny, tmp_path / "runs", offline, "steps=3", "eval.every=1", f"eval.samples={n}",
                  "eval.num_prompts=10")
    run(cfg)
    err = capfd.readouterr().err
    assert "ignoring" not in err and "drops rows" not in err, err
    stage = tmp_path / "runs" / cfg.run_name / "ppo"
    history = assert_history_complete(stage)
    assert set(range(0, 4)) <= set(history)
    for it in range(1, 4):
        assert "rollout/score" in history[it] and "eval/win_rate" in history[it], it
    for step in range(0, 4):  # the gold evaluation's table at every evaluation, one of each skill
        t = table(stage, history[step]["eval/samples"])
        assert len(t["data"]) == n
        assert_stratified(t, SKILLS)
    world = World(cfg.world)
    prompts = load_prompts(cfg, world)
    for it in (1, 2):  # rollout tables: every skill of that iteration's batch, up to n rows
        batch = [prompts[i] for i in batch_indices(it - 1, len(prompts), cfg.batch.rollout, cfg.seed)]
        t = table(stage, history[it]["rollout/samples"])
        assert_stratified(t, {world.skill_of(p) for p in batch})
    samples = [json.loads(l) for l in (stage / "samples.jsonl").read_text().splitlines()]
    assert {s["skill"] for s in samples} == set(SKILLS)
    assert all(world.skill_of(s["prompt"]) == s["skill"] for s in samples)
    report = write_report(tmp_path / "runs", cfg.run_name).read_text()
    rows = report.split("| skill | prompt | SFT | PPO |\n|---|---|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert {r.split(" | ")[0].removeprefix("| ") for r in rows} == set(SKILLS)


def test_pretrain_and_sft_history_complete_and_sft_table_stratified(tmp_path, offline):
    from stages import pretrain, sft as sft_stage

    runs_dir = tmp_path / "runs"
    cfg = load_config(pretrain.PretrainConfig, [f"runs_dir={runs_dir}", "run_name=w", *SFT_WORLD, "model.seq_len=64",
                                                "batch.micro=8", "batch.size=8", "steps=3", "eval.every=2",
                                                "log_every=1", "save_every=0", offline, "threads=1"])
    pretrain.run(cfg)
    history = assert_history_complete(runs_dir / "w" / "pretrain")
    assert "eval/fact_cloze_accuracy" in history[3] and "eval/fact_cloze_samples" in history[3]
    n = len(SKILLS)
    sft_stage.run(load_config(sft_stage.SFTConfig, [f"runs_dir={runs_dir}", "run_name=w", *SFT_TINY, offline,
                                                    f"eval.samples={n}"]))
    stage = runs_dir / "w" / "sft"
    history = assert_history_complete(stage)
    last = max(history)
    assert "eval/accuracy" in history[last] and "eval/gold_score" in history[last]
    t = table(stage, history[last]["eval/samples"])
    assert len(t["data"]) == n
    assert_stratified(t, SKILLS)


def test_rm_history_complete_and_table_stratified(sft, tmp_path, offline):  # noqa: F811
    run_rm(sft, tmp_path / "runs", "w", offline)
    stage = tmp_path / "runs" / "w" / "rm"
    history = assert_history_complete(stage)
    last = max(history)
    assert "eval/pairwise_accuracy" in history[last]
    t = table(stage, history[last]["eval/samples"])
    col = t["columns"].index("skill")
    assert_stratified(t, {r[col] for r in t["data"]})
    assert {r[col] for r in t["data"]} == set(SKILLS)
