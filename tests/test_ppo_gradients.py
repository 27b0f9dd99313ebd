"""PPO-ptx and the entropy bonus, checked through `loop.optimise` against gradients computed by
hand on a bigram policy whose logits are rows of a table (so every gradient has a closed form)."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

class Bigram(torch.nn.Module):
    """A linear "policy": the logits at a position are the row W[token] of a table, so the gradient
    of any loss on them has a closed form in W."""

    def __init__(self, W):
        super().__init__()
        self.W = torch.nn.Parameter(W.clone())

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        return SimpleNamespace(logits=self.W[input_ids[:, -logits_to_keep:]])  # HF's meaning: the last N, 0 = all


class ConstantCritic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, position_ids):
        return self.v * torch.ones(input_ids.shape)


V, TAU = 5, 0.7
W0 = torch.randn(V, V, generator=torch.Generator().manual_seed(3))
# 4 episodes, prompts left-padded with 0, responses of 3, 4, 1 and 2 valid tokens (pad 0 after)
QUERY = torch.tensor([[0, 1, 2], [3, 4, 1], [0, 0, 4], [2, 2, 3]])
RESPONSE = torch.tensor([[3, 1, 4, 0], [2, 2, 1, 3], [1, 0, 0, 0], [4, 3, 0, 0]])
RMASK = torch.arange(4).expand(4, 4) < torch.tensor([[3], [4], [1], [2]])
# ptx: (ids, labels) with the prompt part unlabelled, as load_ptx builds them
PTX = [([1, 2, 3, 4], [-100, -100, 3, 4]), ([4, 1, 1], [4, 1, 1]), ([2, 3, 1, 1, 2], [-100, 3, 1, 1, 2])]


def bigram_update(entropy_coef: float, ptx_coef: float) -> tuple[torch.Tensor, dict]:
    """One PPO minibatch step of `loop.optimise` on the bigram policy with plain SGD (lr 1) and no
    PPO signal (zero advantages, vf_coef 0): returns (W after - W before, the minibatch's metrics)."""
    from pipeline.runtime import batch_split, make_accelerator
    from stages.ppo.data import PtxData
    from stages.ppo.functional import FixedKLController
    from stages.ppo.loop import Trainer, optimise
    from stages.ppo.models import PPOModels
    from stages.ppo.rollout import Rollout

    cfg = SimpleNamespace(seed=0, epochs=1, batch=SimpleNamespace(rollout=4, size=4, micro=2),
                          micro_batches=partial(batch_split, 4, 2),
                          rollout=SimpleNamespace(temperature=TAU), optim=SimpleNamespace(max_grad_norm=1e9),
                          objective=SimpleNamespace(entropy_coef=entropy_coef, clip_eps=0.2, value_clip_eps=0.2,
                                                    vf_coef=0.0),
                          ptx=SimpleNamespace(coef=ptx_coef, batch_size=len(PTX)))
    policy, critic = Bigram(W0), ConstantCritic()
    opt_p, opt_c = torch.optim.SGD(policy.parameters(), lr=1.0), torch.optim.SGD(critic.parameters(), lr=1.0)
    const = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)  # noqa: E731
    models = PPOModels(policy=policy, value_model=critic, ref=None, reward=None,
                       tokenizer=SimpleNamespace(pad_token_id=0), reward_tokenizer=None)
    ptx = PtxData(PTX, pad_id=0, seed=0) if ptx_coef else None
    t = Trainer(cfg, make_accelerator(), models, opt_p, opt_c, const(opt_p), const(opt_c), FixedKLController(0.0),
                None, ptx)
    zeros = torch.zeros(4, 4)
    r = Rollout(prompts=[""] * 4, texts=[""] * 4, query_ids=QUERY, query_mask=QUERY != 0, response_ids=RESPONSE,
                response_mask=RMASK, last_index=RMASK.sum(1) - 1, has_stop=torch.ones(4, dtype=torch.bool),
                logprobs=zeros, ref_logprobs=zeros, values=zeros, scores=torch.zeros(4), rewards=zeros,
                advantages=zeros, returns=zeros)
    (metrics,) = optimise(t, r, 0)
    assert critic.v.item() == 0.0                       # vf_coef 0: the critic gets no gradient
    return policy.W.detach() - W0, metrics


def _softmax64(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def test_entropy_bonus_gradient_is_coef_times_the_hand_computed_one():
    """L = pg - c_H·mean_tokens H(softmax(z/τ)). For z = W[prev]/τ, dH/dz_v = -p_v (z_v - Σ_u p_u z_u)
    and dz/dW[prev] = 1/τ; with no PPO signal one SGD step (lr 1) moves W by +c_H·mean dH/dW."""
    seq = torch.cat([QUERY, RESPONSE], 1)
    grad, entropy, n = torch.zeros(V, V, dtype=torch.float64), 0.0, int(RMASK.sum())
    for b, t in RMASK.nonzero().tolist():
        prev = seq[b, QUERY.shape[1] - 1 + t]                # the token the response slot t is predicted from
        z = W0[prev].double() / TAU
        p = _softmax64(z)
        entropy += -(p * torch.log(p)).sum().item() / n
        grad[prev] += -p * (z - (p * z).sum()) / TAU / n     # d mean H / dW
    delta0, m0 = bigram_update(entropy_coef=0.0, ptx_coef=0.0)
    delta, m = bigram_update(entropy_coef=0.1, ptx_coef=0.0)
    assert delta0.abs().max() == 0.0 and grad.abs().max() > 1e-2   # nothing else moves W; the bonus does
    torch.testing.assert_close(delta.double(), 0.1 * grad, atol=1e-6, rtol=1e-4)
    assert m["ppo/entropy"] == pytest.approx(entropy, rel=1e-5) == m0["ppo/entropy"]
    assert m["ppo/loss"] == pytest.approx(-0.1 * entropy, rel=1e-5)


def test_ptx_gradient_is_coef_times_the_hand_computed_nll_gradient():
    """L_ptx = mean over labelled tokens of -log softmax(W[prev])[next] (no temperature), so
    dL/dW[prev] = (p - onehot(next)) / n; one SGD step (lr 1) moves W by -γ_ptx·dL/dW."""
    grad, nll = torch.zeros(V, V, dtype=torch.float64), 0.0
    pairs = [(ids[i], labels[i + 1]) for ids, labels in PTX for i in range(len(ids) - 1) if labels[i + 1] != -100]
    for prev, nxt in pairs:
        p = _softmax64(W0[prev].double())
        nll += -torch.log(p[nxt]).item() / len(pairs)
        grad[prev] += (p - torch.nn.functional.one_hot(torch.tensor(nxt), V)) / len(pairs)
    delta, m = bigram_update(entropy_coef=0.0, ptx_coef=0.5)
    torch.testing.assert_close(delta.double(), -0.5 * grad, atol=1e-6, rtol=1e-4)
    assert m["ppo/ptx_loss"] == pytest.approx(nll, rel=1e-5)
    assert m["ppo/loss"] == pytest.approx(0.5 * nll, rel=1e-5)
