"""`make bench`: training throughput of the pretrain and SFT stages against a bare torch loop on
the same model and batches (SFT: the stage's own pre-tokenized examples and assistant loss masks;
the ratio is the framework overhead), and the PPO benchmark with its per-phase floors.
Figures are printed, never asserted: timing belongs in benchmarks, not in tests.

`python -m pipeline.bench [train|ppo|all] [--threads N] [--steps N] [PPO options]` (1 thread by
default: figures comparable across machines and with the TRL baseline). The PPO part is
`stages.ppo.bench`: per phase (generate, score, update) and end to end against bare torch on the
same batches; every option it takes (--hidden-size, --batch-size, ...) can be given here.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import StageConfig
from pipeline.launch import launch_command
from pipeline.models import attn_implementation
from pipeline.runtime import adamw, configure_threads, resolve_precision

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["wandb.mode=disabled", "save_every=0", "resume=false"]


def _stage(stage: str, runs_dir: Path, args: list[str], run_name: str = "bench") -> dict:
    cmd = launch_command(stage, [f"runs_dir={runs_dir}", f"run_name={run_name}", *COMMON, *args], nproc=1, accel="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads((runs_dir / run_name / stage / "manifest.json").read_text())


def _abba(stage_rate, bare_rate) -> tuple[float, float]:
    """(stage, bare loop) rates, each the mean of two runs ordered stage, bare, bare, stage: a
    machine whose speed drifts steadily during the measurement slows or speeds both sides alike
    (on shared machines it drifts 10-30% within minutes)."""
    first = stage_rate(1)
    bare = [bare_rate(), bare_rate()]
    return (first + stage_rate(2)) / 2, sum(bare) / 2


def bare_loop_tokens_per_s(model, batches: list[torch.Tensor], masks: list[torch.Tensor], lr: float,
                           labels: list[torch.Tensor] | None = None, precision: str = "no") -> float:
    """The floor: forward, backward, AdamW step, nothing else; tokens = attention-mask tokens
    (what the stages count). `labels` default to every real token. `precision` is the stage's
    resolved mixed precision ('no' or 'bf16': autocast, as accelerate applies it). First 3 steps
    are warm-up."""
    opt = adamw(model.parameters(), lr=lr)  # the stages' optimizer (transformers' Trainer default too)
    model.train()
    tokens, t0 = 0, None
    labels = labels or [x.masked_fill(~m, -100) for x, m in zip(batches, masks)]
    device = model.device.type
    for i, (x, m, y) in enumerate(zip(batches, masks, labels)):
        if i == 3:
            tokens, t0 = 0, time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, attention_mask=m.long(), labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(m.sum())
    return tokens / (time.perf_counter() - t0)


def sft_batches(tok, cfg: dict, n: int) -> tuple[list, list, list]:
    """`n` micro-batches as the sft stage feeds them: its own records and `sft_features` (ids and
    assistant loss masks), cut to data.max_length, shuffled with a fixed seed, right-padded to the
    longest of each micro-batch. Returns (input_ids, attention masks, labels with -100 off-loss)."""
    from pipeline.config import WorldConfig
    from pipeline.records import load_sft_records
    from pipeline.world import World
    from stages.sft import SFTDataConfig, sft_features

    data = SFTDataConfig(**cfg["data"])
    records, _, kind = load_sft_records(data, World(WorldConfig(**cfg["world"])))
    micro = cfg["batch"]["micro"]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))[: micro * n].tolist()
    feats = [sft_features(tok, records[i], kind) for i in order]
    feats = [(f["input_ids"][: data.max_length], f["assistant_masks"][: data.max_length]) for f in feats]
    batches, masks, labels = [], [], []
    for i in range(0, len(feats), micro):
        chunk = feats[i: i + micro]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in chunk])
        real = torch.tensor([[True] * len(a) + [False] * (width - len(a)) for _, a in chunk])
        loss = torch.tensor([[bool(x) for x in a] + [False] * (width - len(a)) for _, a in chunk])
        batches.append(ids)
        masks.append(real)
        labels.append(ids.masked_fill(~loss, -100))
    return batches, masks, labels


def _as_the_stage_ran_it(model_dir: Path, cfg: dict):
    """(the stage's saved model with the attention kernel it trained with, its resolved precision),
    from the stage's resolved config (`manifest.json`'s "config")."""
    from transformers import AutoModelForCausalLM

    precision = resolve_precision(cfg["precision"])
    attn = attn_implementation(cfg["attn_implementation"], precision)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn), precision


def bench_train(steps: int = 60, threads: int = 1, overrides: list[str] = ()) -> list[tuple[str, float, float]]:
    """(stage, stage tokens/s, bare loop tokens/s) for pretrain and SFT, each side the mean of two
    runs (`_abba`); `overrides` (key=value, e.g. precision=bf16) go to both stages, and the bare
    loops follow their precision."""
    from transformers import AutoTokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp)
        args = [f"steps={steps}", "eval.every=0", f"threads={threads}", *overrides]
        runs = {}

        def pretrain(n: int) -> float:
            runs[n] = _stage("pretrain", runs_dir, args, run_name=f"bench{n}")
            return runs[n]["metrics"]["perf/tokens_per_s"]

        @functools.cache
        def pretrain_inputs() -> tuple:  # loaded once, for both bare runs
            model_dir = runs_dir / "bench1" / "pretrain" / "model"
            cfg = runs[1]["config"]
            tok = AutoTokenizer.from_pretrained(model_dir)
            gen = torch.Generator().manual_seed(0)
            shape = (cfg["batch"]["micro"], cfg["model"]["seq_len"])
            batches = [torch.randint(8, len(tok), shape, generator=gen) for _ in range(steps // 3 + 3)]
            model, precision = _as_the_stage_ran_it(model_dir, cfg)
            return model, batches, [torch.ones_like(b, dtype=torch.bool) for b in batches], cfg["optim"]["lr"], precision

        def pretrain_bare() -> float:
            model, batches, masks, lr, precision = pretrain_inputs()
            return bare_loop_tokens_per_s(model, batches, masks, lr, precision=precision)

        rows.append(("pretrain", *_abba(pretrain, pretrain_bare)))

        sft_args = [f"steps={steps // 2}", "eval.max_new_tokens=4", "world.eval_examples=2", f"threads={threads}",
                    *overrides]

        def sft(n: int) -> float:
            runs[n] = _stage("sft", runs_dir, sft_args, run_name=f"bench{n}")  # parent: that run's pretrain
            return runs[n]["metrics"].get("perf/tokens_per_s", float("nan"))

        @functools.cache
        def sft_inputs() -> tuple:  # loaded once, for both bare runs
            model_dir = runs_dir / "bench1" / "sft" / "model"
            tok = AutoTokenizer.from_pretrained(model_dir)
            batches, masks, labels = sft_batches(tok, runs[1]["config"], steps // 2 + 3)
            model, precision = _as_the_stage_ran_it(model_dir, runs[1]["config"])
            return model, batches, masks, runs[1]["config"]["optim"]["lr"], labels, precision

        def sft_bare() -> float:
            model, batches, masks, lr, labels, precision = sft_inputs()
            return bare_loop_tokens_per_s(model, batches, masks, lr, labels, precision=precision)

        rows.append(("sft", *_abba(sft, sft_bare)))
    return rows


def stage_overrides(args: list[str]) -> list[str]:
    """The key=value items of `args` whose key every stage has (StageConfig: precision,
    attn_implementation, world.*, ...): the PPO bench takes them all, pretrain and SFT these."""
    every_stage = {f.name for f in dataclasses.fields(StageConfig)}
    return [a for a in args if "=" in a and not a.startswith("-") and a.split("=")[0].split(".")[0] in every_stage]


def main(argv: list[str] | None = None) -> int:
    """`[train|ppo|all] [--threads N] [--steps N] [PPO bench options ...] [key=value ...]`: options
    are passed to `python -m stages.ppo.bench` (e.g. --hidden-size 128 --batch-size 64); key=value
    overrides that every stage has (precision=bf16, attn_implementation=eager) go to the pretrain
    and SFT stages as well."""
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv.pop(0) if argv and argv[0] in ("train", "ppo", "all") else "all"
    threads, steps, rest = 1, 60, []
    while argv:
        arg = argv.pop(0)
        if arg in ("--threads", "--steps"):
            value = int(argv.pop(0))
            threads, steps = (value, steps) if arg == "--threads" else (threads, value)
        else:
            rest.append(arg)
    threads = configure_threads(threads)
    print(f"benchmarks on {threads} threads, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    if what in ("train", "all"):
        rows = bench_train(steps, threads, stage_overrides(rest))
        print(f"\n{'stage':<10} {'stage tok/s':>12} {'bare loop tok/s':>16} {'ratio':>7}")
        for name, stage_rate, bare in rows:
            print(f"{name:<10} {stage_rate:>12.0f} {bare:>16.0f} {stage_rate / bare:>7.2f}")
    if what in ("ppo", "all"):
        print("", flush=True)
        rc = subprocess.call([sys.executable, "-m", "stages.ppo.bench", "--threads", str(threads), *rest], cwd=ROOT)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
