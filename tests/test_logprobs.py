"""Token log-probabilities without a [B, L, V] float32 tensor (`pipeline.logprobs`): the same
values and gradients as a plain log-softmax, computed a slice at a time, and a probe that shows
no full-size float32 tensor is ever made."""
import pytest
import torch

from pipeline import logprobs as lp
from pipeline.memory import TensorProbe


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(lp, "CHUNK", 3 * 11)  # 3 tokens of an 11-token vocabulary per slice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_a_plain_log_softmax(small_chunks, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 11, generator=g) * 3).to(dtype).requires_grad_(True)
    index = torch.randint(0, 11, (2, 7), generator=g)
    weights = torch.randn(2, 7, generator=g)
    ours = lp.selective_log_softmax(logits, index)
    (ours * weights).sum().backward()
    grad_ours, logits.grad = logits.grad.clone(), None
    plain = torch.log_softmax(logits.float(), -1).gather(-1, index[..., None])[..., 0]
    (plain * weights).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_ours.float(), logits.grad.float(), atol=tol, rtol=tol)


def test_hand_computed_log_probs_and_nll():
    logits = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0]]]))          # p = (1/4, 3/4), (1/2, 1/2)
    out = lp.selective_log_softmax(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.log(torch.tensor([[0.75, 0.5]])))
    nll = lp.token_nll_sum(logits, torch.tensor([[1, -100]]))              # the second token is ignored
    assert nll.item() == pytest.approx(-torch.log(torch.tensor(0.75)).item())


def test_kl_and_entropy_slices_equal_the_full_computation(small_chunks):
    g = torch.Generator().manual_seed(1)
    z, zr = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    logp, logq = torch.log_softmax(z / 0.7, -1), torch.log_softmax(zr / 0.7, -1)
    torch.testing.assert_close(lp.sequence_kl_tokens(z, zr, 0.7), (logp.exp() * (logp - logq)).sum(-1))
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(lp.entropy_of_slices(z), -(logp.exp() * logp).sum(-1))


def test_no_full_float32_tensor_in_forward_or_backward(monkeypatch):
    """Logits [4, 64, 2048] in bf16: the plain log-softmax makes a float32 tensor of all 524k
    elements, the sliced one never more than a slice, forward and backward."""
    monkeypatch.setattr(lp, "CHUNK", 16 * 2048)
    B, T, V = 4, 64, 2048
    logits = torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, V, (B, T))
    with TensorProbe() as plain:
        torch.log_softmax(logits.float(), -1).gather(-1, index[..., None]).sum().backward()
    assert plain.largest_float32 == B * T * V
    logits.grad = None
    with TensorProbe() as sliced:
        lp.selective_log_softmax(logits, index).sum().backward()
    assert sliced.largest_float32 <= 16 * V
    assert sliced.peak_bytes < plain.peak_bytes / 2


def test_temperature_inside_the_slices_equals_dividing_the_logits(small_chunks):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 11, generator=g, requires_grad=True)
    index = torch.randint(0, 11, (2, 7), generator=g)
    ours = lp.selective_log_softmax(logits, index, 0.7)
    ours.sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    plain = torch.log_softmax(logits / 0.7, -1).gather(-1, index[..., None])[..., 0]
    plain.sum().backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(grad, logits.grad)
    z = logits.detach()
    torch.testing.assert_close(lp.entropy_of_slices(z, 0.7), lp.entropy_of_slices(z / 0.7))
