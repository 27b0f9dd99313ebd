"""Pure tensor reward-model losses (design and sources: docs/ppo.md §13).

Tensors in, tensors out, float32 math. N prompts, K responses per prompt. Stats are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                  margin: float | Tensor | None = None,
                  center_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss mean(-log σ(r_w - r_l - μ)) + c·mean((r_w + r_l)²).

    chosen_rewards, rejected_rewards [N]; margin None, a float or [N] -> (scalar loss, stats).
    stats: `accuracy` (fraction r_w > r_l), `margin_mean` (mean r_w - r_l).
    """
    # Margin: the preferred answer must win by at least μ (Llama-2 RM, TRL RewardTrainer `margin`).
    r_w = chosen_rewards.float()
    r_l = rejected_rewards.to(r_w.device, torch.float32)
    diff = r_w - r_l
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=torch.float32,
                                                                device=diff.device)
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        # BT is shift-invariant, so scores can drift; pull their sum towards 0
        # (Eisenstein et al. arXiv 2312.09244; TRL center_rewards_coefficient).
        loss = loss + center_coef * ((r_w + r_l) ** 2).mean()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().mean(), "margin_mean": diff.mean()}
    return loss, stats


def kwise_loss(rewards: Tensor, ranks: Tensor, valid_mask: Tensor,
               center_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """K-wise ranking loss: per prompt, mean over its ranked pairs of -log σ(r_i - r_j).

    rewards [N,K] (one forward per response), ranks [N,K] long (0 = best, equal = tie),
    valid_mask [N,K] bool (False = padding response) -> (scalar loss, stats).
    Loss = mean over prompts with >= 1 valid pair. stats: `accuracy` (pair-weighted fraction of
    valid pairs with r_i > r_j), `pairs` (number of valid pairs).
    """
    # All C(K,2) comparisons of one prompt form ONE batch element (InstructGPT, Ouyang et al. 2022
    # §3.5): pairs from one ranking are correlated and flattening them overfits within one epoch;
    # grouping also costs K forwards instead of K(K-1).
    valid = valid_mask.to(rewards.device, torch.bool)
    ranks = ranks.to(rewards.device)
    # Zero padded scores first so garbage (inf/NaN) never enters D or its gradient.
    r = torch.where(valid, rewards.float(), 0.0)
    diff = r[:, :, None] - r[:, None, :]  # [N,K,K]: D[n,i,j] = r_i - r_j
    # Pair (i, j) counts once, oriented winner-first; ties (equal rank) and padding are excluded.
    pair_mask = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    pair_loss = torch.where(pair_mask, -F.logsigmoid(diff), 0.0)
    n_pairs = pair_mask.sum(dim=(1, 2)).float()  # [N]
    per_prompt = pair_loss.sum(dim=(1, 2)) / n_pairs.clamp(min=1.0)
    has_pairs = n_pairs > 0
    # Prompts without a single comparison carry no signal and must not dilute the mean.
    loss = (per_prompt * has_pairs).sum() / has_pairs.sum().clamp(min=1)
    if center_coef:
        # Same centering regularizer as pairwise_loss (arXiv 2312.09244), over real responses only.
        loss = loss + center_coef * (r**2).sum() / valid.sum().clamp(min=1)
    with torch.no_grad():
        total = n_pairs.sum()
        correct = (pair_mask & (diff > 0)).sum().float()
        stats = {"accuracy": correct / total.clamp(min=1.0), "pairs": total}
    return loss, stats


__all__ = ["pairwise_loss", "kwise_loss"]
