"""The run report: `runs/<run>/report/report.md` with PNG plots of the run's own data.

Reads only what the stages wrote (manifests, metrics.jsonl, samples files), so a report can be
rebuilt at any time: `python -m pipeline report RUN`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import runs
from pipeline.tracking import stratified


def _pyplot():
    """matplotlib without a display (the report is written headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_lines(path: Path, title: str, rows: list[dict], keys: list[str], xlabel: str = "step") -> bool:
    plt = _pyplot()
    present = [k for k in keys if _series(rows, k)[0]]
    if not present:
        return False
    cols = min(3, len(present))
    rows_n = -(-len(present) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.0 * rows_n + 0.4), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, present):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="." if len(x) < 40 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_bars(path: Path, title: str, groups: dict[str, dict[str, float]]) -> bool:
    plt = _pyplot()
    if not groups:
        return False
    labels = sorted({k for g in groups.values() for k in g})
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.2))
    width = 0.8 / len(groups)
    for i, (name, vals) in enumerate(groups.items()):
        ax.bar([j + i * width for j in range(len(labels))], [vals.get(l, 0.0) for l in labels], width, label=name)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_hist(path: Path, title: str, chosen: list[float], rejected: list[float]) -> bool:
    plt = _pyplot()
    if not chosen or not rejected:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(chosen, bins=30, alpha=0.6, label="chosen")
    ax.hist(rejected, bins=30, alpha=0.6, label="rejected")
    ax.set_xlabel("reward")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_overoptimization(path: Path, rows: list[dict]) -> bool:
    """RM score and gold score against KL to the SFT policy along the PPO run (Gao et al. 2022)."""
    plt = _pyplot()
    pts = [(r["eval/kl"], r.get("eval/rm_score"), r.get("eval/gold_score")) for r in rows
           if "eval/kl" in r and ("eval/gold_score" in r or "eval/rm_score" in r)]
    if not pts:
        return False
    pts.sort()
    kl = [p[0] for p in pts]
    fig, ax1 = plt.subplots(figsize=(5.5, 3.5))
    ax1.plot(kl, [p[1] for p in pts], "o-", color="tab:blue", label="RM score")
    ax1.set_xlabel("KL(policy || SFT), nats per response")
    ax1.set_ylabel("RM score", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(kl, [p[2] for p in pts], "s-", color="tab:red", label="gold score")
    ax2.set_ylabel("gold score", color="tab:red")
    ax1.set_title("over-optimization: learned vs true reward")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(runs_dir: str | Path, run_name: str) -> Path:
    """Build `runs/<run>/report/report.md` (+ PNGs) from whatever stages the run has."""
    run_dir = Path(runs_dir) / run_name
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    status = runs.run_status(runs_dir, run_name)
    lines = [f"# Run `{run_name}`", "", "| stage | status | wall time | headline |", "|---|---|---|---|"]
    for r in status:
        t = f"{r['wall_time_s']:.0f}s" if r["wall_time_s"] is not None else "-"
        lines.append(f"| {r['stage']} | {r['status']} | {t} | " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items()) + " |")
    lines.append("")

    def manifest(stage):
        p = run_dir / stage / "manifest.json"
        return runs.Manifest.load(p) if p.exists() else None

    def section(title, png, ok, text=""):
        if ok:
            lines.extend([f"## {title}", "", text, f"![{title}]({png})", ""] if text else [f"## {title}", "", f"![{title}]({png})", ""])

    pre = runs.read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    m = manifest("pretrain")
    text = ""
    if m and m.complete:
        text = (f"Held-out perplexity {m.metrics.get('eval/perplexity', float('nan')):.2f} vs unigram baseline "
                f"{m.metrics.get('eval/unigram_perplexity', float('nan')):.2f}; fact-cloze accuracy "
                f"{m.metrics.get('eval/fact_cloze_accuracy', float('nan')):.1%}.")
    section("Pretraining", "pretrain.png", _plot_lines(out / "pretrain.png", "pretrain", pre,
                                                        ["train/loss", "eval/perplexity", "train/lr"]), text)

    m = manifest("sft")
    if m and m.complete:
        groups = {"SFT (pretrained start)": {k.split("acc_")[1]: v for k, v in m.metrics.items() if k.startswith("eval/acc_")}}
        control = manifest_at(Path(runs_dir) / f"{run_name}-control" / "sft")
        if control:
            groups["SFT (random init control)"] = {k.split("acc_")[1]: v for k, v in control.metrics.items()
                                                   if k.startswith("eval/acc_")}
        text = (f"Held-out accuracy {m.metrics.get('eval/accuracy', 0):.1%}, format rate "
                f"{m.metrics.get('eval/format_rate', 0):.1%}, pretraining-only facts {m.metrics.get('eval/fact_accuracy', 0):.1%}.")
        section("SFT accuracy per skill", "sft.png", _plot_bars(out / "sft.png", "held-out accuracy per skill", groups), text)

    m = manifest("rm")
    if m and m.complete:
        hist = m.extra.get("reward_histogram", {})
        text = f"Held-out pairwise accuracy vs the gold labeler: {m.metrics.get('eval/pairwise_accuracy', float('nan')):.1%}."
        section("Reward model", "rm.png", _plot_hist(out / "rm.png", "held-out rewards", hist.get("chosen", []),
                                                      hist.get("rejected", [])), text)

    ppo = runs.read_metrics(run_dir / "ppo" / "metrics.jsonl")
    m = manifest("ppo")
    if ppo:
        text = ""
        if m and m.complete:
            text = (f"Gold win rate vs SFT {m.metrics.get('eval/win_rate', float('nan')):.1%}; gold score "
                    f"{m.metrics.get('eval/gold_score', float('nan')):.3f}; KL to SFT {m.metrics.get('eval/kl', float('nan')):.2f}.")
        section("PPO training", "ppo.png", _plot_lines(out / "ppo.png", "ppo", ppo, [
            "rollout/score", "ppo/kl", "ppo/beta", "ppo/entropy", "rollout/eos_rate", "rollout/length"]), text)
        section("Over-optimization", "overoptimization.png", _plot_overoptimization(out / "overoptimization.png", ppo),
                "RM score and gold score on held-out prompts against KL to the SFT policy. A rising RM score with a "
                "flat or falling gold score is reward over-optimization.")
    samples_file = run_dir / "ppo" / "samples.jsonl"
    if samples_file.exists():
        rows = [json.loads(l) for l in samples_file.read_text().splitlines() if l.strip()]
        rows = stratified(rows, lambda r: r.get("skill", ""), 12)  # every skill, not the head of one
        lines.extend(["## Samples: SFT vs PPO (same prompts)", "", "| skill | prompt | SFT | PPO |",
                      "|---|---|---|---|"])
        for r in rows:
            cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ")
                     for k in ("skill", "prompt", "sft", "ppo")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    runs.atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def manifest_at(stage_dir: Path) -> runs.Manifest | None:
    p = stage_dir / "manifest.json"
    if not p.exists():
        return None
    m = runs.Manifest.load(p)
    return m if m.complete else None
