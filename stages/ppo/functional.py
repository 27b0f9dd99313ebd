"""Pure tensor functions for KL-regularized PPO (the math and its sources: docs/ppo.md §1-§12).

Tensors in, tensors out; no modules, no optimizers, no process groups. Shapes: B episodes,
T response slots, V vocab. Masks are bool (True = keep), right-padded prefix masks
`m[b, t] = t <= e_b`. Every result is float32 whatever the input dtype (docs/ppo.md §30).

Distributed statistics take `all_reduce`: a callable that sums a tensor over processes and
returns the sum (e.g. `lambda t: accelerator.reduce(t, "sum")`); an in-place reducer that
returns None (`torch.distributed.all_reduce`) also works. None = single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.logprobs import entropy_of_slices, selective_log_softmax  # noqa: F401 (part of this API)

AllReduce = Callable[[Tensor], Tensor | None] | None
KL_ESTIMATORS = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------- masked reductions
def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of x where mask. x, mask broadcastable; returns a scalar or x reduced over `dim`."""
    # where, not x*mask: padded slots may hold inf/NaN garbage and 0*inf = NaN.
    kept = torch.where(mask, x.float(), 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of x where mask (0 where the mask is empty). Scalar, or x reduced over `dim`."""
    count = masked_sum(torch.ones_like(x, dtype=torch.float32), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of x over all masked entries (scalar). Bessel-corrected if `unbiased`; 0 if <2 kept."""
    count = mask.sum().float()
    dev2 = masked_sum((x.float() - masked_mean(x, mask)) ** 2, mask)
    # Guard sum(m) == 0 and, for Bessel, sum(m) == 1 (docs/ppo.md §30).
    denom = (count - 1.0) if unbiased else count
    return dev2 / denom.clamp(min=1.0)


def _reduce(t: Tensor, all_reduce: AllReduce) -> Tensor:
    if all_reduce is None:
        return t
    out = all_reduce(t)
    return t if out is None else out


def _global_mean_var(x: Tensor, mask: Tensor, all_reduce: AllReduce) -> tuple[Tensor, Tensor]:
    """Masked mean and biased variance over all processes (two reductions). Two scalars."""
    # Two-pass (sum, count) then sum of squared deviations: numerically safer than E[x^2]-E[x]^2
    # (OpenRLHF replay-buffer normalize, MOSS-RLHF get_global_statistics).
    s, n = _reduce(torch.stack([masked_sum(x, mask), mask.sum().float()]), all_reduce).unbind()
    mean = s / n.clamp(min=1.0)
    dev2 = _reduce(masked_sum((x.float() - mean) ** 2, mask), all_reduce)
    return mean, dev2 / n.clamp(min=1.0)


# ----------------------------------------------------------------------------- log-probs, entropy
# selective_log_softmax (log-probs of the chosen tokens, no [B,T,V] fp32 tensor): pipeline.logprobs
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits). logits [B,T,V] -> [B,T] fp32 (pass τ-scaled logits, docs/ppo.md §17).
    Differentiable when `logits` requires grad (the entropy bonus), a diagnostic otherwise."""
    # H = logsumexp(z) - sum softmax(z)*z avoids log(0) for tokens with zero probability.
    if not logits.requires_grad:
        return entropy_of_slices(logits)
    rows = []
    for row_logits in logits:  # the bonus's backward keeps each row's fp32 softmax (off by default)
        row = row_logits.float()
        rows.append(torch.logsumexp(row, dim=-1) - (F.softmax(row, dim=-1) * row).sum(-1))
    return torch.stack(rows)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1",
               clamp: float = 10.0) -> Tensor:
    """Per-token KL(pi || ref) estimate from samples of pi. [B,T], [B,T] -> [B,T] fp32.

    Schulman, "Approximating KL Divergence" (2020): k1 unbiased/high variance, k2 biased >= 0,
    k3 unbiased >= 0. Use k1 in the (detached) reward; never k1 as a loss (zero expected gradient).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = torch.expm1(-log_ratio) + log_ratio  # expm1: exact near l = 0 where k3 ~ l^2/2
    # One runaway token must not dominate the reward (OpenRLHF clamps the estimate to ±10).
    return kl.clamp(-clamp, clamp)


# ----------------------------------------------------------------------------- rollout postprocessing
def truncate_at_stop(response_ids: Tensor, stop_token_id: int,
                     pad_token_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut each response after its first stop token.

    response_ids [B,T] long -> (ids [B,T] with pad after the stop token, response_mask [B,T] bool
    True up to and including the stop token (all T if none), last_index [B] long = e_b, has_stop [B]).
    """
    # Mask from the stop position, never from `!= pad` (pad may equal EOS elsewhere; docs/ppo.md §14, §19).
    B, T = response_ids.shape
    pos = torch.arange(T, device=response_ids.device).expand(B, T)
    is_stop = response_ids == stop_token_id
    has_stop = is_stop.any(dim=1)
    first_stop = torch.where(is_stop, pos, T).min(dim=1).values
    last_index = torch.where(has_stop, first_stop, T - 1)
    response_mask = pos <= last_index.unsqueeze(1)
    ids = torch.where(response_mask, response_ids, pad_token_id)
    return ids, response_mask, last_index, has_stop


def process_scores(scores: Tensor, has_stop: Tensor, missing_stop_penalty: float = 1.0,
                   clip: float = 10.0) -> Tensor:
    """RM scores [B] -> [B] fp32: subtract the penalty where no stop token, then clamp to ±clip."""
    # "EOS trick": truncated answers must not out-score finished ones (TRL missing_eos_penalty,
    # subtract form); clipping bounds reward scale (OpenRLHF ±10, DS-Chat ±5).
    # scores may come from a reward model elsewhere (reward_model.scoring returns CPU): follow the rollout
    penalized = scores.to(has_stop.device, torch.float32) - missing_stop_penalty * (~has_stop).float()
    return penalized.clamp(-clip, clip)


def shaped_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, last_index: Tensor,
                   beta: float | Tensor) -> Tensor:
    """Per-token reward -beta*kl*m with the score added at e_b. scores [B], kl [B,T] -> [B,T] fp32."""
    # KL-in-reward (Ziegler et al. 2019; InstructGPT eq. 2). Score at the last real token, not at
    # the pad slot after it (TRL #1893/#3750), so it is not discounted by an extra λ step.
    rewards = torch.where(response_mask, -beta * kl.float(), 0.0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    # scores come from the reward model (possibly another device, e.g. a CPU-side scorer)
    rewards[rows, last_index.to(rewards.device)] += scores.to(rewards.device, torch.float32)
    return rewards


# ----------------------------------------------------------------------------- advantages
@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016). [B,T] x3 -> (advantages, returns) [B,T].

    response_mask must be a right-padded prefix mask; returns = advantages + values are the λ-returns.
    """
    # V after e_b is 0: the episode terminates at the last real token (docs/ppo.md §21); masking
    # rewards too keeps padded garbage from leaking backwards through the recursion.
    r = torch.where(response_mask, rewards.float(), 0.0)
    v = torch.where(response_mask, values.float(), 0.0)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = v[:, t]
    returns = advantages + v
    zero = torch.zeros_like(v)
    return torch.where(response_mask, advantages, zero), torch.where(response_mask, returns, zero)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce: AllReduce = None,
                  eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over masked entries of all processes; [..] -> same shape fp32, 0 off-mask.

    shift_mean=False rescales only (reward whitening, lm-human-preferences `whiten_rewards`).
    """
    # Global statistics so every rank scales advantages identically (docs/ppo.md §7, §31); TRL 1.12
    # whitens per rank only.
    mean, var = _global_mean_var(x, mask, all_reduce)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


# ----------------------------------------------------------------------------- losses
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                clip_eps: float, num_tokens: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), token-summed / num_tokens. [B,T] x4 -> scalar.

    num_tokens = valid tokens of the whole minibatch (all micro-batches, all ranks), so summing
    micro-batch losses reproduces the minibatch token mean exactly (docs/ppo.md §8, §26).
    stats: detached sums over valid tokens (all-reduce, then divide by `tokens`).
    """
    # Clamp before exp: one stale token can otherwise give inf ratios (OpenRLHF).
    delta = (logprobs.float() - old_logprobs.float()).clamp(-20.0, 20.0)
    ratio = torch.exp(delta)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    # Pessimistic bound: max of the two losses removes the incentive to move ratio outside 1±eps.
    loss = masked_sum(torch.maximum(unclipped, clipped), response_mask) / num_tokens
    with torch.no_grad():
        stats = {
            "clipfrac_sum": masked_sum((clipped > unclipped).float(), response_mask),
            # k2 form ½Δ² of KL(pi_old || pi_theta), step-size diagnostic (lm-human-preferences).
            "approxkl_sum": masked_sum(0.5 * delta**2, response_mask),
            "ratio_sum": masked_sum(ratio, response_mask),
            "ratio_sq_sum": masked_sum(ratio**2, response_mask),
            "tokens": response_mask.sum().float(),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor,
               clip_eps: float, num_tokens: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ½·max((V-R)², (V_clip-R)²), token-summed / num_tokens. [B,T] x4 -> scalar.

    eps is in reward units (docs/ppo.md §9). stats: detached sums `vf_clipfrac_sum`, `tokens`.
    """
    # Value clipping as in the PPO baselines / lm-human-preferences (cliprange_value).
    v = values.float()
    old = old_values.float()
    ret = returns.float()
    # clamp(v, old-ε, old+ε), not old + clamp(v-old, ±ε): inside the band it returns v exactly, so
    # the two losses tie exactly and vf_clipfrac does not count float rounding as clipping.
    v_clip = torch.clamp(v, old - clip_eps, old + clip_eps)
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clip - ret) ** 2
    loss = 0.5 * masked_sum(torch.maximum(loss_unclipped, loss_clipped), response_mask) / num_tokens
    with torch.no_grad():
        stats = {
            "vf_clipfrac_sum": masked_sum((loss_clipped > loss_unclipped).float(), response_mask),
            "tokens": response_mask.sum().float(),
        }
    return loss, stats


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, response_mask: Tensor,
                       all_reduce: AllReduce = None) -> Tensor:
    """1 - Var_m(R - V) / Var_m(R) over all processes (lm-human-preferences). [B,T] x2 -> scalar fp32.

    Returns 0 when Var_m(R) is numerically zero (<= 1e-8), where the ratio is meaningless.
    """
    ret = returns.float()
    _, var_ret = _global_mean_var(ret, response_mask, all_reduce)
    _, var_res = _global_mean_var(ret - values.float(), response_mask, all_reduce)
    ev = 1.0 - var_res / var_ret.clamp(min=1e-8)
    return torch.where(var_ret > 1e-8, ev, torch.zeros_like(ev))


# ----------------------------------------------------------------------------- KL control, EMA
class AdaptiveKLController:
    """β ← β(1 + clip(KL/target - 1, ±0.2)·n/horizon) (Ziegler et al. 2019, lm-human-preferences)."""

    def __init__(self, init_beta: float, target: float, horizon: float):
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        # current_kl must be the global mean sequence KL (nats) and n_steps the global episode
        # count, or β drifts differently per rank (docs/ppo.md §11, §31).
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(d["value"]), float(d["target"]), float(d["horizon"])


class FixedKLController:
    """Constant β (0.05 in Huang et al. 2024, 0.02 in InstructGPT; docs/ppo.md §11); same
    interface as AdaptiveKLController."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


@torch.no_grad()
def ema_update(ema_params: Iterable[Tensor], params: Iterable[Tensor], decay: float) -> None:
    """In place: ema = decay*ema + (1-decay)*p, pairwise over two equal-length iterables."""
    # Weight EMA for eval/checkpoints only, decay ~0.992 (InstructGPT; DS-Chat --enable_ema).
    for ema, p in zip(ema_params, params, strict=True):
        ema.lerp_(p.detach().to(ema.device, ema.dtype), 1.0 - decay)


__all__ = [
    "masked_sum", "masked_mean", "masked_var", "selective_log_softmax", "entropy_from_logits",
    "kl_penalty", "truncate_at_stop", "process_scores", "shaped_rewards", "gae", "masked_whiten",
    "policy_loss", "value_loss", "explained_variance", "AdaptiveKLController", "FixedKLController",
    "ema_update", "KL_ESTIMATORS",
]
