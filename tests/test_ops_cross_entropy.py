"""Cross-entropy: Triton kernels (interpreter) vs ``F.cross_entropy`` on fp32 logits.

Tolerances: the loss within 2e-6 relative (online log-sum-exp in a different
summation order); fp32 gradients within 1e-5 absolute (softmax probabilities
are at most 1; the lse of 50k terms carries ~1e-6 of rounding); bf16
gradients within one bf16 ulp of the largest gradient (2**-8).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _cross_entropy, _dispatch  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

GRAD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}


def _data(N, V, dtype, scale=4.0, seed=0):
    torch.manual_seed(seed + N * 7 + V)
    logits = (torch.randn(N, V) * scale).to(dtype)
    targets = torch.randint(0, V, (N,))
    if N > 2:
        targets[1] = -100
        targets[N - 1] = V - 1  # the last column: inside the ragged last chunk
    return logits, targets


def _loss_and_grad(fn, logits, targets, reduction, **kw):
    x = logits.clone().requires_grad_()
    loss = fn(x, targets, reduction=reduction, **kw)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("N,V", [(1, 1), (5, 7), (13, 1000), (6, 50304)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(N, V, dtype, reduction):
    logits, targets = _data(N, V, dtype)
    with fo.backend("triton"):
        loss, grad = _loss_and_grad(fo.cross_entropy, logits, targets, reduction)
    loss_ref, grad_ref = _loss_and_grad(fo.reference.cross_entropy, logits, targets, reduction)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=0, atol=GRAD_ATOL[dtype])
    if N > 2:
        assert (grad[1] == 0).all()  # the ignored row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_inplace_backward(dtype):
    """The gradient lands in the logits buffer itself, equal to the out-of-place one."""
    logits, targets = _data(9, 3000, dtype)
    with fo.backend("triton"):
        _, grad = _loss_and_grad(fo.cross_entropy, logits, targets, "mean")
        x = logits.clone().requires_grad_()
        h = x * 1.0  # a temporary, like lm_head's output
        version = h._version
        loss = fo.cross_entropy(h, targets, inplace_backward=True)
        loss.backward()
    assert torch.equal(h.detach(), grad)  # the logits buffer now holds the gradient
    assert h._version > version  # the mutation is declared (autograd can see it)
    assert torch.equal(x.grad, grad)


def test_cross_entropy_inplace_backward_detects_other_saved_users():
    """If a node that saved the logits runs its backward after ours, autograd refuses (no garbage)."""
    logits, targets = _data(4, 100, torch.float32)
    x = logits.clone().requires_grad_()
    with fo.backend("triton"):
        h = x * 1.0
        square = (h * h).sum()  # saves h; created first, so its backward runs after the loss's
        loss = square + fo.cross_entropy(h, targets, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    logits, _ = _data(3, 10, torch.float32)
    targets = torch.full((3,), -100)
    with fo.backend("triton"):
        loss, grad = _loss_and_grad(fo.cross_entropy, logits, targets, "mean")
    assert torch.isnan(loss) and torch.isnan(fo.reference.cross_entropy(logits, targets))
    loss_sum = None
    with fo.backend("triton"):
        loss_sum, grad_sum = _loss_and_grad(fo.cross_entropy, logits, targets, "sum")
    assert loss_sum == 0 and (grad_sum == 0).all()


def test_cross_entropy_custom_ignore_index_and_extreme_logits():
    """Large logits, a row whose whole first chunk is -inf (masked vocabulary), ignore_index=3."""
    V = 2 * _cross_entropy._BLOCK_V + 5
    logits, targets = _data(4, V, torch.float32, scale=1e3)
    logits[0, : _cross_entropy._BLOCK_V + 1] = float("-inf")
    targets[0] = V - 2
    targets[1] = 0
    targets[2] = 3
    with fo.backend("triton"):
        loss, grad = _loss_and_grad(fo.cross_entropy, logits, targets, "none", ignore_index=3)
    loss_ref, grad_ref = _loss_and_grad(fo.reference.cross_entropy, logits, targets, "none", ignore_index=3)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-5)
    assert loss[2] == 0 and torch.isfinite(loss).all()


def test_cross_entropy_out_of_range_target_is_nan_not_a_crash():
    logits, targets = _data(3, 50, torch.float32)
    targets[0], targets[2] = 50, -7
    with fo.backend("triton"):
        loss = fo.cross_entropy(logits, targets, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(loss[2]) and loss[1] == 0  # row 1 is ignored


def test_cross_entropy_strided_and_noncontiguous_grad():
    """Row-strided logits (a slice) and a per-row upstream gradient of any stride."""
    base, targets = _data(6, 130, torch.float32)
    logits = base[:, :120]
    targets = targets.clamp(max=119)
    targets[1] = -100
    up = torch.randn(12)[::2]  # stride 2
    with fo.backend("triton"):
        x = logits.clone().requires_grad_()
        fo.cross_entropy(x[:, :], targets, reduction="none").backward(up)
    y = logits.clone().requires_grad_()
    fo.reference.cross_entropy(y, targets, reduction="none").backward(up)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-6)


def test_cross_entropy_validation():
    with pytest.raises(ValueError, match="reduction"):
        fo.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="expected logits"):
        fo.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        fo.cross_entropy(torch.randn(2, 3), torch.zeros(2))


def test_cross_entropy_torch_compile_fullgraph():
    logits, targets = _data(5, 300, torch.float32)

    def f(x, t):
        return fo.cross_entropy(x, t) * 2.0

    torch._dynamo.reset()
    with fo.backend("triton"):
        x = logits.clone().requires_grad_()
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, targets)
        loss.backward()
        y = logits.clone().requires_grad_()
        loss_eager = f(y, targets)
        loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(x.grad, y.grad)
