"""The report's charts (`pipeline.report`, and the sweeps' `pipeline.overopt`, `pipeline.rm_curve`):
PNG files drawn headless with matplotlib from the rows the stages wrote. Each returns False when
it has nothing to draw."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib without a display (the report is written headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_lines(path: Path, title: str, rows: list[dict], keys: list[str], xlabel: str = "step") -> bool:
    plt = pyplot()
    present = [k for k in keys if series(rows, k)[0]]
    if not present:
        return False
    cols = min(3, len(present))
    rows_n = -(-len(present) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.0 * rows_n + 0.4), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, present):
        x, y = series(rows, key)
        ax.plot(x, y, marker="." if len(x) < 40 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_bars(path: Path, title: str, groups: dict[str, dict[str, float]]) -> bool:
    plt = pyplot()
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


def plot_hist(path: Path, title: str, chosen: list[float], rejected: list[float]) -> bool:
    plt = pyplot()
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


def plot_overoptimization(path: Path, rows: list[dict], evaluation: dict | None = None) -> bool:
    """RM score and gold score against KL to the SFT policy (Gao et al. 2022): PPO along training
    (valid prompts) and, on the test prompts, the final PPO policy and best-of-n of SFT samples."""
    plt = pyplot()
    pts = sorted((r["eval/kl"], r.get("eval/rm_score"), r.get("eval/gold_score")) for r in rows
                 if "eval/kl" in r and ("eval/gold_score" in r or "eval/rm_score" in r))
    bon = [(b["kl"], b["rm_score"], b["gold_score"], b["n"]) for b in (evaluation or {}).get("best_of_n", [])]
    sampled = (evaluation or {}).get("comparisons", {}).get("sampled")
    if not pts and not bon:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, j, name in ((ax1, 1, "RM score"), (ax2, 2, "gold score")):
        if pts:
            ax.plot([p[0] for p in pts], [p[j] for p in pts], "o-", label="PPO along training (valid)")
        if bon:
            ax.plot([b[0] for b in bon], [b[j] for b in bon], "s--",
                    label="best-of-n of SFT (test; n = " + ", ".join(str(b[3]) for b in bon) + ")")
        if sampled and sampled["policy"].get("kl") is not None:
            ax.plot([sampled["policy"]["kl"]], [sampled["policy"]["rm_score" if j == 1 else "gold_score"]], "r*",
                    markersize=12, label="PPO final (test)")
        ax.set_xlabel("KL to the SFT policy, nats per response")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle("over-optimization: learned (RM) vs true (gold) reward against KL, sampled at the eval temperature")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
