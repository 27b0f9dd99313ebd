"""Token log-probabilities without a `[batch, length, vocab]` float32 tensor.

A model's logits are `[B, T, V]` in its own dtype (bf16 on GPUs); upcasting them whole for a
log-softmax costs `4·B·T·V` bytes, 34 GB at B=64, T=1024, V=128k, and autograd keeps that fp32
copy for the backward pass. Here the float32 work runs on slices of at most `CHUNK` elements, and
the backward pass recomputes the softmax slice by slice from the logits (which the caller holds
anyway), so the extra memory is one slice, whatever the batch (TRL `selective_log_softmax`,
OpenRLHF `log_probs_from_logits`; the recomputing backward as in Liger's fused cross-entropy).

Every token log-probability of the project goes through here: PPO's old, new and reference
log-probs, the reward model's likelihood term, SFT's and PPO-ptx's losses, pretraining's loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 25  # float32 elements per slice: 128 MiB


def _slices(logits: Tensor):
    """(b, t0, t1) covering `logits` [B, T, V] with slices of at most CHUNK elements (one token at least)."""
    B, T, V = logits.shape
    step = max(1, CHUNK // max(1, V))
    for b in range(B):
        for t0 in range(0, T, step):
            yield b, t0, min(T, t0 + step)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, temperature: float) -> Tensor:
        out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
        for b, t0, t1 in _slices(logits):
            z = logits[b, t0:t1].float() / temperature
            out[b, t0:t1] = z.gather(-1, index[b, t0:t1, None])[:, 0] - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, index)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, index = ctx.saved_tensors
        tau = ctx.temperature
        grad_logits = torch.empty_like(logits)
        for b, t0, t1 in _slices(logits):
            g = grad[b, t0:t1].float() / tau
            d = torch.softmax(logits[b, t0:t1].float() / tau, dim=-1).mul_(-g[:, None])
            d.scatter_add_(-1, index[b, t0:t1, None], g[:, None])  # d/dz (z[i] - lse z) = onehot(i) - softmax(z)
            grad_logits[b, t0:t1] = d.to(logits.dtype)
        return grad_logits, None, None


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[index]: logits [B, T, V] (any float dtype), index [B, T]
    long -> [B, T] float32, differentiable with respect to `logits`. The division happens a
    slice at a time too."""
    return _SelectiveLogSoftmax.apply(logits, index, temperature)


def token_nll_sum(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed negative log-likelihood of `labels` [B, T] under `logits` [B, T, V] (next-token
    aligned by the caller), skipping `ignore_index`: a float32 scalar, differentiable."""
    keep = labels != ignore_index
    lp = selective_log_softmax(logits, torch.where(keep, labels, 0))
    return -torch.where(keep, lp, 0.0).sum()


@torch.no_grad()
def entropy_of_slices(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) [B, T] float32 from logits [B, T, V] (no gradient)."""
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for b, t0, t1 in _slices(logits):
        z = logits[b, t0:t1].float() / temperature
        out[b, t0:t1] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out


@torch.no_grad()
def sequence_kl_tokens(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact per-token KL(softmax(z/τ) || softmax(z_ref/τ)) = Σ_v p (log p − log q), [B, T] float32,
    from two `[B, T, V]` logits tensors (no gradient); clamped at 0, which fp32 rounding of two
    nearly equal distributions can cross."""
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for b, t0, t1 in _slices(logits):
        logp = torch.log_softmax(logits[b, t0:t1].float() / temperature, -1)
        logq = torch.log_softmax(ref_logits[b, t0:t1].float() / temperature, -1)
        out[b, t0:t1] = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)
    return out
