"""`make bench`: training throughput of the pretrain and SFT stages against a bare torch loop on
the same model and batch (the ratio is the framework overhead), and the PPO benchmark.
Figures are printed, never asserted: timing belongs in benchmarks, not in tests.

`python -m pipeline.bench [train|ppo|all]`
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.launch import launch_command
from pipeline.runtime import configure_threads

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["wandb.mode=disabled", "save_every=0", "resume=false"]


def _stage(stage: str, runs_dir: Path, args: list[str]) -> dict:
    cmd = launch_command(stage, [f"runs_dir={runs_dir}", "run_name=bench", *COMMON, *args], nproc=1, accel="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads((runs_dir / "bench" / stage / "manifest.json").read_text())


def bare_loop_tokens_per_s(model, batches: list[torch.Tensor], masks: list[torch.Tensor], lr: float) -> float:
    """The floor: forward, backward, AdamW step, nothing else. First 3 steps are warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    tokens, t0 = 0, None
    for i, (x, m) in enumerate(zip(batches, masks)):
        if i == 3:
            tokens, t0 = 0, time.perf_counter()
        labels = x.masked_fill(~m, -100)
        model(input_ids=x, attention_mask=m.long(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(m.sum())
    return tokens / (time.perf_counter() - t0)


def bench_train(steps: int = 60) -> list[tuple[str, float, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import WorldConfig
    from pipeline.world import World

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp)
        m = _stage("pretrain", runs_dir, [f"steps={steps}", "eval_every=0"])
        model_dir = runs_dir / "bench" / "pretrain" / "model"
        tok = AutoTokenizer.from_pretrained(model_dir)
        cfg = m["config"]
        seq, micro = cfg["model"]["seq_len"], cfg["micro_batch_size"]
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(8, len(tok), (micro, seq), generator=gen) for _ in range(steps // 3 + 3)]
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        bare = bare_loop_tokens_per_s(model, batches, [torch.ones_like(b, dtype=torch.bool) for b in batches],
                                      cfg["optim"]["lr"])
        rows.append(("pretrain", m["metrics"]["perf/tokens_per_s"], bare))

        s = _stage("sft", runs_dir, [f"train.steps={steps // 2}", "eval.max_new_tokens=4", "world.eval_examples=2"])
        scfg = s["config"]["train"]
        world = World(WorldConfig(**s["config"]["world"]))
        texts = [tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=True)["input_ids"]
                 for ex in world.sft_examples()[: scfg["micro_batch_size"] * (steps // 6 + 3)]]
        batches, masks = [], []
        for i in range(0, len(texts), scfg["micro_batch_size"]):
            chunk = texts[i: i + scfg["micro_batch_size"]]
            width = max(len(t) for t in chunk)
            batches.append(torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in chunk]))
            masks.append(torch.tensor([[True] * len(t) + [False] * (width - len(t)) for t in chunk]))
        model = AutoModelForCausalLM.from_pretrained(runs_dir / "bench" / "sft" / "model")
        bare = bare_loop_tokens_per_s(model, batches, masks, scfg["lr"])
        rows.append(("sft", s["metrics"].get("perf/tokens_per_s", float("nan")), bare))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else "all"
    threads = configure_threads(0)
    print(f"benchmarks on {threads} threads, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    if what in ("train", "all"):
        rows = bench_train()
        print(f"\n{'stage':<10} {'stage tok/s':>12} {'bare loop tok/s':>16} {'ratio':>7}")
        for name, stage_rate, bare in rows:
            print(f"{name:<10} {stage_rate:>12.0f} {bare:>16.0f} {stage_rate / bare:>7.2f}")
    if what in ("ppo", "all"):
        print("", flush=True)
        rc = subprocess.call([sys.executable, "-m", "stages.ppo.bench"], cwd=ROOT)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
