"""Launchers: every shipped accelerate file is accepted by accelerate, `launch_command` builds the
intended command, a failing stage's own error is the last line a user sees, and the GPU smoke
check's plan, table and exit code (the GPU run itself is `make gpu-smoke`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import gpu_smoke, launch
from pipeline.registry import NAMES as STAGES
from pipeline.runs import Manifest

ROOT = Path(__file__).resolve().parent.parent
ACCEL_DIR = ROOT / "configs" / "accelerate"
# launcher file -> (distributed_type, what else it must say)
LAUNCHERS = {
    "cpu": ("NO", {}),
    "gpu": ("NO", {}),
    "ddp": ("MULTI_GPU", {}),
    "fsdp": ("FSDP", {"fsdp_config": {"fsdp_version": 2, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}}),
    "zero2": ("DEEPSPEED", {"deepspeed_config": {"zero_stage": 2}}),
    "zero3": ("DEEPSPEED", {"deepspeed_config": {"zero_stage": 3, "zero3_save_16bit_model": True}}),
}


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "ACCEL")}
    return {**env, **extra}


# ------------------------------------------------------------------------ launcher files
def test_every_shipped_launcher_file_is_tested():
    assert {p.stem for p in ACCEL_DIR.glob("*.yaml")} == set(LAUNCHERS)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_file_is_accepted_by_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = ACCEL_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    dist_type, sections = LAUNCHERS[name]
    # a bare `NO` is YAML's boolean false, not DistributedType.NO
    assert str(cfg.distributed_type.value) == dist_type, cfg.distributed_type
    assert cfg.mixed_precision == "no"  # precision comes from each stage's `precision` key
    assert cfg.num_machines == 1
    for section, want in sections.items():
        got = getattr(cfg, section)
        assert {k: got.get(k) for k in want} == want, got


# ------------------------------------------------------------------------ launch_command
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("accel", LAUNCHERS)
def test_launch_command(accel, stage, nproc, monkeypatch):
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.delenv("ACCEL", raising=False)
    monkeypatch.setattr(launch, "check_gpu", lambda *a, **k: None)  # as on a machine with usable GPUs
    if accel == "gpu" and nproc > 1:
        with pytest.raises(SystemExit, match="ACCEL=gpu runs one process.*ddp"):
            launch.launch_command(stage, [], nproc, accel)
        return
    user = ["run_name=x y", "optim.lr=1e-3", "extra.yaml"]
    cmd = launch.launch_command(stage, user, nproc, accel)
    assert cmd[-len(user) - 2:] == ["-m", f"stages.{stage}", *user]  # user args passed through unchanged
    if nproc == 1 and accel in ("cpu", "gpu"):
        assert cmd == [sys.executable, "-m", f"stages.{stage}", *user]  # no launcher in between
        return
    assert cmd[:4] == [sys.executable, "-m", "pipeline.launch", "--accelerate"]
    launcher_args = cmd[4:]
    assert launcher_args[launcher_args.index("--config_file") + 1] == str(ACCEL_DIR / f"{accel}.yaml")
    assert launcher_args[launcher_args.index("--num_processes") + 1] == str(nproc)
    multi_cpu = accel == "cpu" and nproc > 1
    assert ("--multi_gpu" in cmd) == multi_cpu
    if multi_cpu:
        assert launcher_args[launcher_args.index("--mixed_precision") + 1] == "no"
    # accelerate's own parser and checks accept it, and pick the launcher we mean
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(launcher_args))
    assert args.module and args.training_script == f"stages.{stage}" and args.training_script_args == user
    assert args.num_processes == nproc
    assert bool(args.use_fsdp) == (accel == "fsdp")
    assert bool(args.use_deepspeed) == accel.startswith("zero")
    assert bool(args.multi_gpu) == (accel == "ddp" or multi_cpu)


def test_nproc_and_accel_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("NPROC", "2")
    monkeypatch.setenv("ACCEL", "zero3")
    cmd = launch.launch_command("ppo", [])
    assert str(ACCEL_DIR / "zero3.yaml") in cmd and cmd[cmd.index("--num_processes") + 1] == "2"


@pytest.mark.parametrize("gpu,nproc,want", [(False, 1, "cpu"), (False, 2, "cpu"), (True, 1, "gpu"), (True, 2, "ddp")])
def test_default_launcher(gpu, nproc, want, monkeypatch):
    monkeypatch.delenv("ACCEL", raising=False)
    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu else None)
    monkeypatch.setattr(launch, "check_gpu", lambda *a, **k: None)
    cmd = launch.launch_command("sft", [], nproc)
    if nproc == 1:
        assert cmd == [sys.executable, "-m", "stages.sft"]
    else:
        assert cmd[cmd.index("--config_file") + 1] == str(ACCEL_DIR / f"{want}.yaml")


def test_unknown_accel_names_the_choices(monkeypatch):
    monkeypatch.setenv("ACCEL", "zero4")
    with pytest.raises(SystemExit) as e:
        launch.launch_command("sft", [], 1)
    msg = str(e.value)
    assert msg.startswith("error: ACCEL=zero4") and "choose one of cpu, ddp, fsdp, gpu, zero2, zero3" in msg


def test_bad_stage_and_nproc_are_refused():
    from pipeline import registry

    with pytest.raises(SystemExit, match=f"unknown stage 'nonesuch'; stages are {', '.join(registry.NAMES)}"):
        launch.launch_command("nonesuch", [], 1, "cpu")
    with pytest.raises(SystemExit, match="NPROC=0"):
        launch.launch_command("sft", [], 0, "cpu")


# ------------------------------------------------------------------------ the error is the last line
def _last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_failing_stage_error_is_the_last_line(nproc, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.launch", "rm", "parent=/nonexistent",
                           f"runs_dir={tmp_path}", "run_name=t"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_clean_env(NPROC=nproc, ACCEL="cpu"))
    assert proc.returncode == 1, proc.stderr
    assert _last_line(proc.stderr).startswith("error in stage 'rm': /nonexistent"), proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr


def test_accelerate_wrapper_keeps_exit_code_and_names_a_signal(tmp_path):
    """Rank 0 fails with its own error while rank 1 still runs (and is stopped by the launcher);
    a rank killed by a signal is reported in one line."""
    fail = tmp_path / "fail.py"
    fail.write_text("import os, sys, time\nif os.environ['RANK'] == '0':\n"
                    "    print('error: boom', file=sys.stderr); sys.exit(3)\ntime.sleep(30)\n")
    kill = tmp_path / "kill.py"
    kill.write_text("import os, signal, time\nif os.environ['RANK'] == '1':\n"
                    "    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(30)\n")
    base = [sys.executable, "-m", "pipeline.launch", "--accelerate", "--config_file", str(ACCEL_DIR / "cpu.yaml"),
            "--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
            "--main_process_port", "0"]
    proc = subprocess.run([*base, str(fail)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=_clean_env())
    assert proc.returncode == 3 and _last_line(proc.stderr) == "error: boom", proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*base, str(kill)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=_clean_env())
    assert proc.returncode == 128 + 9, proc.stderr
    assert _last_line(proc.stderr) == f"error: {kill} (rank 1) was killed by SIGKILL", proc.stderr


# ------------------------------------------------------------------------ gpu smoke: plan
def _stage_config_class(stage):
    from pipeline import registry

    return registry.config_class(stage)


def _arg(row, key):
    vals = [a.split("=", 1)[1] for a in row.args if a.startswith(key + "=")]
    assert len(vals) <= 1, row.args
    return vals[0] if vals else None


@pytest.mark.parametrize("cpu", [False, True])
def test_smoke_plan(cpu, tmp_path):
    rows = gpu_smoke.plan(tmp_path, "smk", cpu=cpu, gpus=2)
    default = "cpu" if cpu else "gpu"
    assert [(r.stage, r.check) for r in rows] == [
        ("pretrain", default), ("sft", default), ("rm", default), ("ppo", default), ("sft", "ddp"), ("ppo", "ddp"),
        ("sft", "fsdp"), ("rm", "fsdp"), ("ppo", "fsdp"), ("sft", "zero2"), ("ppo", "zero2"),
        ("sft", "zero3"), ("rm", "zero3"), ("ppo", "zero3")]
    # every GPU: the launcher rows on both (one process each on the CPU stand-in)
    assert all(r.launcher == ("cpu" if cpu else r.check)
               and r.env() == {"NPROC": "1" if cpu or r.check == default else "2", "ACCEL": r.launcher} for r in rows)
    zero3 = {r.stage: r for r in rows if r.check == "zero3"}
    assert _arg(zero3["sft"], "batch.micro") == "2"       # 2 x 2 x 2 = global 8: accumulation 2
    assert _arg(zero3["sft"], "batch.size") == ("4" if cpu else "8")
    assert _arg(zero3["rm"], "batch.micro") == "2"
    assert _arg(rows[0], "model.preset") == ("tiny" if cpu else "small")
    by_dir = {r.stage_dir: r for r in rows}
    assert len(by_dir) == len(rows)  # every row writes its own stage directory
    for r in rows:
        assert r.stage_dir == tmp_path / _arg(r, "run_name") / r.stage and _arg(r, "runs_dir") == str(tmp_path)
        assert _arg(r, "run_name") == ("smk" if r.check == default else f"smk-{r.check}")
        assert r.command()[-len(r.args) - 1:] == [r.stage, *r.args]
        if r.stage == "pretrain":
            assert r.parent is None and _arg(r, "parent") is None
            continue
        # the parent is an earlier row's stage of the first run: sft <- pretrain, rm <- sft, ppo <- rm
        parent = by_dir[r.parent]
        assert _arg(r, "parent") == str(r.parent)
        assert rows.index(parent) < rows.index(r) and parent.check == default
        assert parent.stage == {"sft": "pretrain", "rm": "sft", "ppo": "rm"}[r.stage]
        # every stage sees the same world (later stages check it against their parent's)
        assert [a for a in r.args if a.startswith("world.")] == [a for a in parent.args if a.startswith("world.")]


def test_smoke_plan_arguments_are_valid_stage_configs(tmp_path):
    from pipeline.config import load_config

    for row in gpu_smoke.plan(tmp_path, "smk"):
        cfg = load_config(_stage_config_class(row.stage), list(row.args))  # raises ConfigError on a bad key
        assert cfg.run_name == _arg(row, "run_name") and cfg.wandb.mode == "disabled"


def test_smoke_without_gpu_exits_2_and_dry_run_prints_the_plan(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_smoke, "deepspeed_importable", lambda: False)
    monkeypatch.setattr(gpu_smoke, "execute", lambda *a, **k: pytest.fail("must not run anything"))
    assert gpu_smoke.main([]) == 2
    assert "error: no GPU is visible" in capsys.readouterr().err
    assert gpu_smoke.main(["--dry-run", "--runs-dir", "somewhere"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 14 and all("NPROC=1 ACCEL=" in ln and " python -m pipeline.launch " in ln for ln in lines)
    assert sum("# fails (deepspeed not installed)" in ln for ln in lines) == 5    # a missing deepspeed fails
    assert "ACCEL=gpu python -m pipeline.launch pretrain" in lines[0] and "model.preset=small" in lines[0]
    assert gpu_smoke.main(["--dry-run", "--skip-deepspeed"]) == 0
    assert sum("# skipped (--skip-deepspeed)" in ln for ln in capsys.readouterr().out.splitlines()) == 5


# ------------------------------------------------------------------------ gpu smoke: table, exit code
def _manifest(row, status="complete", peak=None, headline=None):
    metrics = {} if peak is None else {"perf/peak_gpu_memory_gib": peak}
    Manifest(stage=row.stage, run_name=row.stage_dir.parent.name, status=status, wall_time_s=12.345,
             metrics=metrics, extra={"headline": headline or {"acc": 0.123456, "n": 3}}).save(row.stage_dir)


def _first_kl(row, kl):
    (row.stage_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "ppo/kl": kl}) + "\n")


def test_smoke_table_and_exit_code(tmp_path):
    rows = gpu_smoke.plan(tmp_path, "smk", gpus=2)
    first = 9  # the rows up to fsdp's
    for r in rows[:first]:
        _manifest(r, peak=1.5 if r.stage == "pretrain" else None)
        if r.stage == "ppo":
            _first_kl(r, 0.0)
    outs = ([gpu_smoke.Outcome(rc=0, seconds=20.0)] * first
            + [gpu_smoke.Outcome(skipped="--skip-deepspeed")] * (len(rows) - first))
    results = [gpu_smoke.result(r, o) for r, o in zip(rows, outs)]
    lines = gpu_smoke.table(results).splitlines()
    assert lines[0].split()[:4] == ["stage", "launcher", "procs", "status"] and "peak GPU (GiB)" in lines[0]
    assert lines[1].split()[:7] == ["pretrain", "gpu", "1", "complete", "12.3", "1.50", "acc=0.1235"]
    assert lines[2].split()[:6] == ["sft", "gpu", "1", "complete", "12.3", "-"]  # no peak memory recorded
    assert lines[9].split()[:4] == ["ppo", "fsdp", "2", "complete"]
    assert all("skipped (--skip-deepspeed)" in ln for ln in lines[first + 1:])
    assert gpu_smoke.exit_status(results) == 0  # skipped as asked: not a failure, and never "complete"

    # deepspeed missing without the flag fails; a failed manifest, a launch that failed before writing
    # one, a stage that exited 0 without one, a row past its timeout, a PPO whose first KL is not 0
    missing = [gpu_smoke.result(r, gpu_smoke.Outcome(skipped=gpu_smoke.DEEPSPEED_MISSING)) for r in rows[first:]]
    assert all(r["status"] == "failed (deepspeed not installed)" and not r["ok"] for r in missing)
    _manifest(rows[5], status="failed")
    _first_kl(rows[8], 0.03)
    outs[6:8] = [gpu_smoke.Outcome(rc=1, seconds=3.0), gpu_smoke.Outcome(rc=0, seconds=3.0)]
    outs[4] = gpu_smoke.Outcome(rc=124, seconds=601.0, timed_out=True)
    (rows[7].stage_dir / "manifest.json").unlink()
    results = [gpu_smoke.result(r, o) for r, o in zip(rows, outs)]
    assert [r["status"] for r in results[4:9]] == ["failed (timed out after 601s)", "failed", "failed (exit 1)",
                                                   "failed (no manifest)", "failed (first KL 0.03, not 0)"]
    assert results[7]["time"] == "3.0" and results[7]["peak"] == "-"
    assert gpu_smoke.exit_status(results) == 1


def test_smoke_skips_the_children_of_a_failed_row(tmp_path, monkeypatch, capsys):
    rows = gpu_smoke.plan(tmp_path, "smk")

    def fake_call(cmd, **kw):
        row = next(r for r in rows if r.command() == cmd)
        assert kw["env"]["ACCEL"] == row.launcher and kw["env"]["NPROC"] == "1" and kw["timeout"] == 600.0
        if row.stage == "rm" and row.check == "gpu":
            print("error in stage 'rm': boom", file=kw["stdout"])
            return 1
        _manifest(row)
        if row.stage == "ppo":
            _first_kl(row, 0.0)
        return 0

    monkeypatch.setattr(gpu_smoke.subprocess, "call", fake_call)
    outs = gpu_smoke.execute(rows, tmp_path / "logs", {"zero2": "--skip-deepspeed", "zero3": "--skip-deepspeed"})
    results = [gpu_smoke.result(r, o) for r, o in zip(rows, outs)]
    orphan = "failed (parent rm did not complete)"
    assert [r["status"] for r in results] == [
        "complete", "complete", "failed (exit 1)", orphan, "complete", orphan, "complete", "complete", orphan,
        ] + ["skipped (--skip-deepspeed)"] * 5
    assert gpu_smoke.exit_status(results) == 1
    assert "error in stage 'rm': boom" in capsys.readouterr().err  # the end of the failed row's log


def test_pipeline_ends_with_the_failing_stage_error(tmp_path):
    """`make pipeline`: after the summary table, the last lines are the failing stage's own error."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--run", "bad", "--runs-dir", str(tmp_path),
                           "pretrain.steps=abc", "wandb.mode=disabled"],
                          env=_clean_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert tail.startswith("error: invalid configuration: steps") and "expected int" in tail, tail


def test_a_gpu_asked_for_and_missing_is_an_error():
    launch.check_gpu("cpu", has_gpu=False)
    launch.check_gpu("fsdp", has_gpu=False)                  # CPU processes under fsdp: the tests' own way
    launch.check_gpu("ddp", has_gpu=True, torch_cuda=True)
    with pytest.raises(SystemExit, match="ACCEL=gpu, but this machine has no GPU"):
        launch.check_gpu("gpu", has_gpu=False)
    with pytest.raises(SystemExit, match=r"cannot use the GPU(.|\n)*rm -rf .venv && make setup"):
        launch.check_gpu("zero3", has_gpu=True, torch_cuda=False)


def test_a_node_that_cannot_see_rank_0s_runs_dir_stops_the_run(tmp_path, monkeypatch):
    """Two nodes (LOCAL_WORLD_SIZE 1 of 2 processes): the other node reports it does not see the
    file rank 0 wrote into runs_dir: one line naming it and what to do. One node: no check."""
    from types import SimpleNamespace

    from accelerate import utils

    from pipeline.config import InputError
    from pipeline.distributed import check_shared_filesystem

    acc = SimpleNamespace(num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    monkeypatch.setattr(utils, "broadcast_object_list", lambda objects: objects)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_shared_filesystem(acc, tmp_path)                      # one node of 2 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(utils, "gather_object", lambda mine: mine + [("node-b", True)])
    check_shared_filesystem(acc, tmp_path)                      # both see it
    monkeypatch.setattr(utils, "gather_object", lambda mine: mine + [("node-b", False)])
    with pytest.raises(InputError, match="node-b cannot see what rank 0 writes there"):
        check_shared_filesystem(acc, tmp_path)
    assert not list(tmp_path.glob(".shared-check-*"))          # the probe file is gone
