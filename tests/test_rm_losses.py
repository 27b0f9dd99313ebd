"""Hand-computed checks for reward_model/losses.py."""

import itertools
import math

import torch

from reward_model.losses import kwise_loss, pairwise_loss

T_ = True
F_ = False


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32),
                               torch.as_tensor(b, dtype=torch.float32), atol=atol, rtol=1e-5)


def nls(x):
    """-log σ(x) = log(1 + e^-x), in float64 for reference values."""
    return math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- pairwise
def test_pairwise_plain():
    rw = torch.tensor([1.0, 0.0])
    rl = torch.tensor([0.0, 2.0])                        # diffs d = [1, -2]
    loss, st = pairwise_loss(rw, rl)
    # -log σ(1) = log(1+e^-1) = 0.3132617 ; -log σ(-2) = log(1+e^2) = 2.1269280 ; mean 1.2200948
    close(loss, 1.2200948)
    close(st["accuracy"], 0.5)                           # only the first pair has r_w > r_l
    close(st["margin_mean"], -0.5)                       # (1 - 2) / 2


def test_pairwise_margin_float_and_tensor():
    rw = torch.tensor([1.0, 0.0])
    rl = torch.tensor([0.0, 2.0])
    # margin 1: -log σ(0) = ln 2 = 0.6931472 ; -log σ(-3) = log(1+e^3) = 3.0485874 ; mean 1.8708673
    close(pairwise_loss(rw, rl, margin=1.0)[0], 1.8708673)
    # per-pair margin [0.5, 0]: -log σ(0.5) = 0.4740770 ; 2.1269280 ; mean 1.3005025
    close(pairwise_loss(rw, rl, margin=torch.tensor([0.5, 0.0]))[0], 1.3005025)
    close(pairwise_loss(rw, rl, margin=torch.tensor([0.5, 0.0]))[0],
          (nls(0.5) + nls(-2.0)) / 2)


def test_pairwise_center():
    rw = torch.tensor([1.0, 0.0])
    rl = torch.tensor([0.0, 2.0])
    # centering: mean((r_w + r_l)^2) = (1^2 + 2^2) / 2 = 2.5 ; 0.01*2.5 = 0.025 ; 1.2200948 + 0.025
    close(pairwise_loss(rw, rl, center_coef=0.01)[0], 1.2450948)
    # with margin 1 too: 1.8708673 + 0.025
    loss, st = pairwise_loss(rw, rl, margin=1.0, center_coef=0.01)
    close(loss, 1.8958673)
    close(st["accuracy"], 0.5)                           # stats ignore margin and centering


def test_pairwise_grad_and_dtype():
    rw = torch.tensor([0.0], dtype=torch.bfloat16, requires_grad=True)
    rl = torch.tensor([0.0], dtype=torch.bfloat16)
    loss, _ = pairwise_loss(rw, rl)
    assert loss.dtype == torch.float32
    close(loss, math.log(2.0))
    loss.backward()
    close(rw.grad.float(), [-0.5])                       # d/dr_w -log σ(r_w - r_l) = -(1 - σ(0))


# ----------------------------------------------------------------------------- K-wise
def loop_reference(rewards, ranks, valid):
    """Explicit double loop over ordered pairs; mean per prompt, mean over prompts with pairs."""
    per_prompt, correct, pairs = [], 0, 0
    for n in range(rewards.shape[0]):
        losses = []
        for i, j in itertools.permutations(range(rewards.shape[1]), 2):
            if valid[n, i] and valid[n, j] and ranks[n, i] < ranks[n, j]:
                d = float(rewards[n, i] - rewards[n, j])
                losses.append(nls(d))
                correct += d > 0
        pairs += len(losses)
        if losses:
            per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt), correct / pairs, pairs


def test_kwise_hand_k3():
    r = torch.tensor([[2.0, 1.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2]])
    v = torch.ones(1, 3, dtype=torch.bool)
    loss, st = kwise_loss(r, ranks, v)
    # pairs (0,1) d=1, (0,2) d=2, (1,2) d=1 : (0.3132617 + 0.1269280 + 0.3132617) / 3 = 0.2511505
    close(loss, 0.2511505)
    close(st["accuracy"], 1.0)
    close(st["pairs"], 3.0)
    assert set(st) == {"accuracy", "pairs"}


def test_kwise_equals_mean_pairwise_k4():
    torch.manual_seed(0)
    N, K = 5, 4
    r = torch.randn(N, K)
    ranks = torch.stack([torch.randperm(K) for _ in range(N)])
    v = torch.ones(N, K, dtype=torch.bool)
    loss, st = kwise_loss(r, ranks, v)
    ref_loss, ref_acc, ref_pairs = loop_reference(r, ranks, v)
    close(loss, ref_loss, atol=1e-5)
    close(st["accuracy"], ref_acc)
    close(st["pairs"], N * 6)                             # C(4,2) = 6 pairs per prompt
    assert ref_pairs == N * 6
    # and per prompt it is pairwise_loss over its 6 (winner, loser) pairs
    for n in range(N):
        w, l_ = zip(*[(i, j) for i, j in itertools.permutations(range(K), 2) if ranks[n, i] < ranks[n, j]])
        one = kwise_loss(r[n:n + 1], ranks[n:n + 1], v[n:n + 1])[0]
        close(one, pairwise_loss(r[n, list(w)], r[n, list(l_)])[0], atol=1e-5)


def test_kwise_ties_masked():
    r = torch.tensor([[2.0, 1.0, 5.0]])
    ranks = torch.tensor([[0, 1, 1]])                     # responses 1 and 2 tied
    v = torch.ones(1, 3, dtype=torch.bool)
    loss, st = kwise_loss(r, ranks, v)
    # pairs (0,1) d=1 and (0,2) d=-3 only: (0.3132617 + 3.0485874) / 2 = 1.6809245
    close(loss, 1.6809245)
    close(st["pairs"], 2.0)
    close(st["accuracy"], 0.5)


def test_kwise_padding_masked():
    r = torch.tensor([[2.0, 1.0, float("nan"), 1e30]], requires_grad=True)
    ranks = torch.tensor([[0, 1, 0, 3]])
    v = torch.tensor([[T_, T_, F_, F_]])                  # only two real responses
    loss, st = kwise_loss(r, ranks, v, center_coef=0.1)
    # one pair d=1: 0.3132617 ; centering 0.1*(2^2 + 1^2)/2 = 0.25 ; total 0.5632617
    close(loss, 0.5632617)
    close(st["pairs"], 1.0)
    loss.backward()
    assert torch.isfinite(r.grad).all() and (r.grad[0, 2:] == 0).all()


def test_kwise_prompts_without_pairs_do_not_contribute():
    torch.manual_seed(1)
    r = torch.randn(4, 4)
    ranks = torch.stack([torch.randperm(4) for _ in range(4)])
    v = torch.ones(4, 4, dtype=torch.bool)
    v[1, 1:] = False                                     # one real response -> no pair
    ranks[3] = 2                                         # all tied -> no pair
    loss, st = kwise_loss(r, ranks, v)
    keep = torch.tensor([0, 2])
    close(loss, kwise_loss(r[keep], ranks[keep], v[keep])[0])
    close(st["pairs"], 12.0)                              # 6 + 6
    ref_loss, ref_acc, _ = loop_reference(r, ranks, v)
    close(loss, ref_loss, atol=1e-5)
    close(st["accuracy"], ref_acc)
    # mixed padding + ties compared to the loop
    v2 = torch.tensor([[T_, T_, T_, F_], [T_, F_, F_, F_], [T_, T_, T_, T_], [T_, T_, F_, T_]])
    ranks2 = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3], [3, 1, 1, 0], [2, 0, 1, 1]])
    loss2, st2 = kwise_loss(r, ranks2, v2)
    ref_loss2, ref_acc2, ref_pairs2 = loop_reference(r, ranks2, v2)
    close(loss2, ref_loss2, atol=1e-5)
    close(st2["accuracy"], ref_acc2)
    # row0: (0,2),(1,2) = 2 ; row1: 1 real -> 0 ; row2: 6 - 1 tie = 5 ; row3: 3 real, distinct = 3
    close(st2["pairs"], float(ref_pairs2))
    assert ref_pairs2 == 10


def test_kwise_no_pairs_at_all_is_zero_and_differentiable():
    r = torch.randn(2, 3, requires_grad=True)
    loss, st = kwise_loss(r, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    close(loss, 0.0)
    close(st["accuracy"], 0.0)
    loss.backward()
    assert (r.grad == 0).all()


def test_kwise_center():
    r = torch.tensor([[1.0, -1.0, 3.0], [0.5, 0.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    v = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    base = kwise_loss(r, ranks, v)[0]
    # mean r^2 over 5 valid responses: (1 + 1 + 9 + 0.25 + 0) / 5 = 2.25 ; 0.02*2.25 = 0.045
    close(kwise_loss(r, ranks, v, center_coef=0.02)[0] - base, 0.045)
