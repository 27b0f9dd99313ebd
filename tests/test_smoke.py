"""Four stages end to end on a tiny world through `python -m pipeline run`: the manifest chain,
each stage's headline metric moving the right way, the report, and a no-op re-run."""
import subprocess
import sys
import time
from pathlib import Path

from pipeline.runs import Manifest, read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "world.num_people=20", "world.corpus_docs=800", "world.sft_examples=512", "world.eval_examples=6",
    "wandb.mode=disabled", "threads=1", "save_every=0",
    "pretrain.steps=60", "pretrain.model.seq_len=64", "pretrain.batch.micro=16", "pretrain.batch.size=16",
    "pretrain.eval.every=0",
    "sft.steps=120", "sft.batch.micro=16", "sft.batch.size=16",
    "sft.eval.max_new_tokens=32",
    "rm.data.num_prompts=64", "rm.data.max_new_tokens=12", "rm.batch.size=8", "rm.batch.micro=8",
    "rm.normalize.reference_size=64",
    "ppo.steps=6", "ppo.batch.rollout=16", "ppo.batch.size=16", "ppo.batch.micro=16",
    "ppo.rollout.max_new_tokens=12", "ppo.eval.every=3", "ppo.eval.max_new_tokens=12", "ppo.optim.policy_lr=1e-4",
]


def test_four_stage_pipeline(tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "run", "--run", "smoke", "--runs-dir", str(tmp_path), *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "smoke"
    m = {s: Manifest.load(run / s / "manifest.json") for s in ("pretrain", "sft", "rm", "ppo")}
    assert all(x.complete and x.wall_time_s > 0 for x in m.values())
    # the manifest chain: each stage names the previous stage's manifest as its parent (relative
    # to its own directory, so the run can move; absolute as the fallback)
    assert m["pretrain"].parent is None
    for child, parent in (("sft", "pretrain"), ("rm", "sft"), ("ppo", "rm")):
        assert m[child].parent == f"../{parent}/manifest.json"
        assert m[child].parent_abs == str((run / parent / "manifest.json").resolve())
    # each stage moved its headline metric the right way
    assert m["pretrain"].metrics["eval/perplexity"] < m["pretrain"].metrics["eval/unigram_perplexity"]
    sft_losses = [r["train/loss"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "train/lr" in r]
    assert sft_losses[-1] < sft_losses[0]
    assert m["sft"].metrics["eval/format_rate"] > 0.2  # the taught format, absent from pretraining
    assert m["rm"].metrics["eval/pairwise_accuracy"] > 0.6
    # PPO beats SFT on the test prompts by the gold labeler, with the same decoding on both sides
    # (ties count half: an unchanged policy scores exactly 0.5 on both). The per-iteration rollout
    # score is too noisy for a claim at 16 episodes x 6 iterations.
    ppo_metrics = m["ppo"].metrics
    assert ppo_metrics["test/greedy/win_rate"] >= 0.75, ppo_metrics
    assert ppo_metrics["test/sampled/win_rate"] >= 0.6, ppo_metrics
    # the ptx ablation behind the alignment-tax table: PPO from the same reward model, other γ
    ablation = Manifest.load(tmp_path / "smoke-ptx-ablation" / "ppo" / "manifest.json")
    assert ablation.complete and ablation.config["ptx"]["coef"] != m["ppo"].config["ptx"]["coef"]
    assert ablation.parent_abs == str((run / "rm" / "manifest.json").resolve())
    # summary and report: the test-split tables, best-of-n, alignment tax, over-optimization chart
    assert "stage" in proc.stdout and "complete" in proc.stdout
    report = (run / "report" / "report.md").read_text()
    for png in ("pretrain.png", "sft.png", "rm.png", "ppo.png", "overoptimization.png"):
        assert (run / "report" / png).stat().st_size > 1000 and png in report
    for heading in ("## PPO vs SFT on the test prompts", "## PPO and the cheap baselines", "| SFT + rule |",
                    "| best-of-4 |", "## Alignment tax"):
        assert heading in report
    assert "| greedy |" in report and "| best-of-16 |" in report and "PPO-ptx" in report
    # re-running is a no-op that prints the summary again
    t0 = time.time()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("complete, skipping") == 5  # 4 stages + the ablation
    assert time.time() - t0 < 60 and "complete" in again.stdout
