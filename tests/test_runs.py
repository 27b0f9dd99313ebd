import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time

import pytest

from pipeline import runs
from pipeline.config import StageConfig
from pipeline.stage import StageRun


@dataclasses.dataclass
class _SFTLike(StageConfig):
    stage = "sft"


def _die_if_ever_torn(path):
    """The worst moment to be killed is while the manifest on disk is not a whole document: kill
    the process then (never, if writes are atomic)."""
    while True:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            os.kill(os.getpid(), signal.SIGKILL)


def _stage_killed_mid_run(runs_dir, begun):
    """A stage between `StageRun.begin` and `.finish` that rewrites its manifest (2 MB each time)
    until it is killed."""
    sr = StageRun(_SFTLike(run_name="r", runs_dir=str(runs_dir)))
    sr.begin()
    threading.Thread(target=_die_if_ever_torn, args=(sr.dir / "manifest.json",), daemon=True).start()
    for i in itertools.count():
        sr.manifest.metrics = {"payload": "x" * 2_000_000, "i": i}
        sr.manifest.save(sr.dir)
        begun.set()


def test_killed_stage_reads_running_and_is_refused_as_a_parent(tmp_path):
    """A stage killed before it finished: its manifest is a whole document whose status is
    `running` (never `complete`), and the next stage refuses it as a parent."""
    ctx = mp.get_context("fork")
    begun = ctx.Event()
    p = ctx.Process(target=_stage_killed_mid_run, args=(tmp_path, begun))
    p.start()
    deadline = time.monotonic() + 60
    while not begun.wait(0.05) and p.is_alive() and time.monotonic() < deadline:
        pass
    time.sleep(0.5)                                   # many rewrites
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    d = runs.stage_dir(tmp_path, "r", "sft")
    data = json.loads((d / "manifest.json").read_text())
    assert data["status"] == "running" and data["metrics"]["i"] >= 0 and data["ended"] is None
    assert [r["status"] for r in runs.run_status(tmp_path, "r") if r["stage"] == "sft"] == ["running"]
    with pytest.raises(runs.HandoffError, match="parent stage 'sft' is running, not complete"):
        runs.resolve_parent("rm", tmp_path, "r")
    # the temporary sibling may remain, but it is never the manifest
    assert all(f.name in ("manifest.json", "config.yaml") or f.name.startswith(".") for f in d.iterdir())


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with runs.atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash")
    assert not target.exists()
    with runs.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("whole")
    assert (target / "weights").read_text() == "whole"


def _complete(tmp_path, stage, run="r", status="complete"):
    d = runs.stage_dir(tmp_path, run, stage)
    (d / "model").mkdir(parents=True)
    (d / "model" / "tokenizer.json").write_text("{}")
    m = runs.Manifest(stage=stage, run_name=run, status=status, model_dir="model",
                      tokenizer_fingerprint=runs.tokenizer_fingerprint(d / "model"))
    m.save(d)
    return d


def test_parent_resolution_through_manifests(tmp_path):
    with pytest.raises(runs.HandoffError, match="needs the 'pretrain' stage first"):
        runs.resolve_parent("sft", tmp_path, "r")
    d = _complete(tmp_path, "pretrain")
    parent = runs.resolve_parent("sft", tmp_path, "r")
    assert parent.manifest.stage == "pretrain" and parent.model_dir == (d / "model").resolve()
    # explicit parent may be a stage directory or its manifest
    assert runs.resolve_parent("sft", tmp_path, "other", explicit=str(d)).manifest.stage == "pretrain"
    # order is checked: an rm parent for sft is refused
    rm_dir = _complete(tmp_path, "rm", run="x")
    with pytest.raises(runs.HandoffError, match="cannot be the parent"):
        runs.resolve_parent("sft", tmp_path, "r", explicit=str(rm_dir))


def test_incomplete_or_tampered_parent_refused(tmp_path):
    _complete(tmp_path, "pretrain", status="running")
    with pytest.raises(runs.HandoffError, match="not complete"):
        runs.resolve_parent("sft", tmp_path, "r")
    d = _complete(tmp_path, "pretrain", run="t")
    (d / "model" / "tokenizer.json").write_text('{"changed": 1}')
    with pytest.raises(runs.HandoffError, match="tokenizer differs"):
        runs.resolve_parent("sft", tmp_path, "t")


def test_status_table(tmp_path):
    d = _complete(tmp_path, "pretrain")
    m = runs.Manifest.load(d / "manifest.json")
    m.wall_time_s, m.extra = 12.0, {"headline": {"perplexity": 3.5}}
    m.save(d)
    table = runs.format_table(runs.run_status(tmp_path, "r"))
    assert "pretrain" in table and "complete" in table and "perplexity=3.5" in table and "12s" in table


def test_parent_is_recorded_relative_and_found_where_the_run_went(tmp_path):
    parent = _complete(tmp_path / "a", "sft") / "manifest.json"
    child = _complete(tmp_path / "a", "rm")
    m = runs.Manifest.load(child / "manifest.json")
    m.parent, m.parent_abs = runs.parent_reference(parent, child)
    assert (m.parent, m.parent_abs) == ("../sft/manifest.json", str(parent.resolve()))
    m.save(child)
    # the whole run, moved to another runs dir under another name: its own sft stage, not the old one
    os.renames(tmp_path / "a" / "r", tmp_path / "b" / "renamed")
    moved = tmp_path / "b" / "renamed" / "rm" / "manifest.json"
    assert runs.recorded_parent(moved, runs.Manifest.load(moved)) == (tmp_path / "b/renamed/sft/manifest.json").resolve()
    # its sft stage moved back alone: the relative path leads nowhere, the absolute one is the fallback
    os.renames(tmp_path / "b" / "renamed" / "sft", tmp_path / "a" / "r" / "sft")
    assert runs.recorded_parent(moved, runs.Manifest.load(moved)) == parent.resolve()
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(runs.HandoffError, match="parent manifest is missing"):
        runs.recorded_parent(moved, runs.Manifest.load(moved))


def test_a_manifest_with_only_an_absolute_parent_still_resolves(tmp_path):
    parent = _complete(tmp_path, "sft") / "manifest.json"
    child = _complete(tmp_path / "elsewhere", "rm")
    m = runs.Manifest(stage="rm", run_name="r", parent=str(parent.resolve()))  # as written before parent_abs existed
    assert runs.recorded_parent(child / "manifest.json", m) == parent.resolve()


def test_ptx_ablation_flips_the_runs_ptx_setting(tmp_path):
    """The second PPO run behind the alignment-tax table starts from the run's own reward model
    with the other ptx setting, and is skipped where no gold labeler judges (user prompts)."""
    from pipeline.config import load_config
    from pipeline.driver import PTX_ABLATION_COEF, ptx_ablation_args
    from stages.ppo.config import PPOConfig

    def ppo_manifest(coef, source="world", status="complete"):
        d = runs.stage_dir(tmp_path, "r", "ppo")
        d.mkdir(parents=True, exist_ok=True)
        runs.Manifest(stage="ppo", run_name="r", status=status,
                      config={"ptx": {"coef": coef}, "data": {"source": source}}).save(d)

    assert ptx_ablation_args("r", str(tmp_path), []) is None  # no ppo yet
    ppo_manifest(0.5)
    args = ptx_ablation_args("r", str(tmp_path), ["seed=1", "ppo.steps=3", "sft.steps=2"])
    assert args[0] == "run_name=r-ptx-ablation" and args[-1] == "ptx.coef=0.0"
    assert f"parent={runs.stage_dir(tmp_path, 'r', 'rm')}" in args
    assert load_config(PPOConfig, args).eval.best_of == []  # the run's own best-of-n is the baseline
    assert load_config(PPOConfig, args).eval.every == 0  # only its test figures are read
    assert "seed=1" in args and "steps=3" in args and "steps=2" not in args  # sft's key stays with sft
    ppo_manifest(0.0)
    assert ptx_ablation_args("r", str(tmp_path), [])[-1] == f"ptx.coef={PTX_ABLATION_COEF}"
    ppo_manifest(0.5, source="files")
    assert ptx_ablation_args("r", str(tmp_path), []) is None
    ppo_manifest(0.5, status="failed")
    assert ptx_ablation_args("r", str(tmp_path), []) is None


def test_likelihood_ablation_trains_a_reward_model_without_the_term_then_ppo_from_it(tmp_path):
    from pipeline.config import load_config
    from pipeline.driver import likelihood_ablation_args
    from stages.ppo.config import PPOConfig
    from stages.rm import RMConfig

    assert likelihood_ablation_args("r", str(tmp_path), []) is None  # no ppo yet
    d = runs.stage_dir(tmp_path, "r", "ppo")
    d.mkdir(parents=True)
    runs.Manifest(stage="ppo", run_name="r", status="complete", config={"data": {"source": "world"}}).save(d)
    args = likelihood_ablation_args("r", str(tmp_path), ["seed=1", "rm.epochs=2", "ppo.steps=3"])
    rm = load_config(RMConfig, [f"runs_dir={tmp_path}", "run_name=r-no-likelihood", *args["rm"]])
    assert not rm.likelihood_term and rm.epochs == 2 and rm.seed == 1
    assert rm.parent == str(runs.stage_dir(tmp_path, "r", "sft"))  # the run's own SFT model
    ppo = load_config(PPOConfig, args["ppo"])
    assert ppo.parent == str(runs.stage_dir(tmp_path, "r-no-likelihood", "rm")) and ppo.steps == 3
    assert ppo.eval.best_of == [] and ppo.eval.every == 0
    runs.Manifest(stage="ppo", run_name="r", status="complete", config={"data": {"source": "files"}}).save(d)
    assert likelihood_ablation_args("r", str(tmp_path), []) is None  # no gold labeler to judge it


# ------------------------------------------------------------------------ input errors and bugs
@dataclasses.dataclass
class _ToyConfig(StageConfig):
    stage = "toy"  # no configs/toy.yaml: the schema alone


def _stage_main_output(tmp_path, capsys, exc):
    from pipeline import config
    from pipeline.stage import StageRun, stage_main

    (tmp_path / "toy.yaml").write_text("seed: 0\n")

    def run(cfg):
        StageRun(cfg).begin()
        raise exc

    saved, config.CONFIG_DIR = config.CONFIG_DIR, tmp_path
    try:
        rc = stage_main(_ToyConfig, run, [f"runs_dir={tmp_path}", "run_name=t"])
    finally:
        config.CONFIG_DIR = saved
    err = capsys.readouterr().err
    return rc, err, [line for line in err.splitlines() if line.strip()]


def test_bad_input_ends_with_one_line(tmp_path, capsys):
    from pipeline.config import InputError
    from pipeline.stage import DataError

    for exc in (InputError("batch.rollout=9 is not divisible by 2 processes"), DataError("a.jsonl line 3: no prompt"),
                runs.HandoffError("parent missing"), FileNotFoundError("no such file: x.jsonl")):
        rc, err, lines = _stage_main_output(tmp_path, capsys, exc)
        assert rc == 1 and lines == [f"error in stage 'toy': {exc}"], err


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(tmp_path, capsys):
    """An internal error (here the ValueError of a list-slice assignment, as the uneven gather
    raised) is not reported as if the user's input were wrong."""
    rc, err, lines = _stage_main_output(tmp_path, capsys, ValueError("attempt to assign sequence of size 300"))
    assert rc == 1
    assert "Traceback (most recent call last)" in err
    assert lines[-2].startswith("internal error in stage 'toy': ValueError: attempt to assign"), err
    log = tmp_path / "t" / "toy" / "error-rank0.log"
    assert lines[-1].endswith(f"traceback is above and in {log}") and "ValueError" in log.read_text()
