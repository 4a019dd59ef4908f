"""funzero.losses.causal_lm against transformers' ForCausalLMLoss on full fp32 logits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

import funzero as fz  # noqa: E402
import funzero.ops as fo  # noqa: E402


def _data(B=2, T=5, H=8, V=37, dtype=torch.float32):
    g = torch.Generator().manual_seed(B * T + V)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    return hidden, weight, labels


def _hf(hidden, weight, labels, **kw):
    return ForCausalLMLoss(hidden.float() @ weight.float().t(), labels, weight.shape[0], **kw)


@pytest.mark.parametrize("kw", [{}, {"num_items_in_batch": 6}, {"num_items_in_batch": torch.tensor(3.0)},
                                {"ignore_index": 4}, {"shift_labels": "rolled"}], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_causal_lm_matches_hf(kw, backend):
    hidden, weight, labels = _data()
    if kw.get("ignore_index") == 4:
        labels = labels.clamp_min(0)
        labels[1, 3:] = 4
    if kw.get("shift_labels") == "rolled":
        kw = {"shift_labels": labels.roll(-1, 1)}
    with fo.backend(backend):
        got = fz.losses.causal_lm(hidden, weight, labels, chunk_size=3, **kw)
        got_grads = torch.autograd.grad(got, (hidden, weight))
    want = _hf(hidden, weight, labels, **kw)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_causal_lm_shifts_labels_left():
    """Position t is scored against label t + 1; the last position of each sequence against nothing."""
    hidden, weight, labels = _data(B=1, T=4)
    labels[:] = torch.tensor([[5, 6, 7, 8]])
    per_position = [fo.linear_cross_entropy(hidden[0, t:t + 1], weight, labels[0, t + 1:t + 2]) for t in range(3)]
    torch.testing.assert_close(fz.losses.causal_lm(hidden, weight, labels), torch.stack(per_position).mean())


def test_causal_lm_all_ignored_is_zero():
    hidden, weight, _ = _data()
    loss = fz.losses.causal_lm(hidden, weight, torch.full((2, 5), -100))
    assert loss == 0 and torch.autograd.grad(loss, hidden)[0].abs().sum() == 0


def test_causal_lm_validation():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match=r"hidden states \(B, T, H\).*\(10, 8\)"):
        fz.losses.causal_lm(hidden.reshape(10, 8), weight, labels)
    with pytest.raises(ValueError, match=r"labels \(B, T\) = \(2, 5\), got \(2, 4\)"):
        fz.losses.causal_lm(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match=r"shift_labels \(B, T\) = \(2, 5\)"):
        fz.losses.causal_lm(hidden, weight, labels, shift_labels=labels[:1])
