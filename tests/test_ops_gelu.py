"""bias + GeLU(tanh): Triton kernels (interpreter) vs the torch reference, values and gradients.

Tolerances (relative to the largest reference magnitude, at least 1): fp32
1e-6 (tanh built from exp); bf16 within one bf16 ulp for values and x's
gradient (both round an fp32 result to nearest even, the fp32 results differ
by an fp32 ulp or so), 2**-7 for the bias gradient summed over rows.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from tests._recorder import OpRecorder  # noqa: E402
from funzero.ops import _dispatch  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

TOL = {torch.float32: (1e-6, 1e-6, 2e-6), torch.bfloat16: (2.0**-8, 2.0**-8, 2.0**-7)}  # y, dx, dbias


def _close(got, want, rel):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(want.float().abs().max().item(), 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * scale)


def _run(fn, x, b, dy):
    y = fn(x, b)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    return y.detach(), dx, db


CASES = [(shape, dtype) for shape in [(1, 1), (5, 7), (3, 4, 123), (37, 640), (1000003, 1)]
         for dtype in (torch.float32, torch.bfloat16)]
CASES.append(((1, 1000003), torch.bfloat16))  # one row, 1000003 columns: ragged last column tile


@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in CASES])
def test_bias_gelu_matches_reference(shape, dtype):
    torch.manual_seed(shape[-1])
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    b = torch.randn(shape[-1]).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    with fo.backend("triton"):
        got = _run(fo.bias_gelu, x, b, dy)
    want = _run(fo.reference.bias_gelu, x, b, dy)
    for g, w, rel in zip(got, want, TOL[dtype]):
        _close(g, w, rel)


def test_bias_gelu_extreme_inputs_stay_finite():
    """tanh from exp(-2|u|): no overflow for large |z|, exact limits gelu(z) -> z and -> 0."""
    x = torch.tensor([[-1e4, -30.0, -1e-6, 0.0, 1e-6, 30.0, 1e4]]).requires_grad_()
    b = torch.zeros(7, requires_grad=True)
    with fo.backend("triton"):
        y, dx, db = _run(fo.bias_gelu, x, b, torch.ones_like(x))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert y[0, 0] == 0 and y[0, 6] == 1e4 and dx[0, 0] == 0 and dx[0, 6] == 1
    torch.testing.assert_close(dx[0, 3], torch.tensor(0.5))
    torch.testing.assert_close(db, dx.sum(0))


def test_bias_gelu_formula_independent_of_reference():
    z = torch.linspace(-6, 6, 97)
    want = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    with fo.backend("triton"):
        y = fo.bias_gelu(z[None, :] - 1.0, torch.ones(97))
    torch.testing.assert_close(y[0], want, rtol=1e-6, atol=1e-6)


def test_bias_gelu_torch_compile_fullgraph():
    def f(x, b):
        return fo.bias_gelu(x, b).sum()

    x = torch.randn(6, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    torch._dynamo.reset()
    with fo.backend("triton"):
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, b)
        grads = torch.autograd.grad(loss, (x, b))
        loss_eager = f(x, b)
        grads_eager = torch.autograd.grad(loss_eager, (x, b))
    _close(loss.detach(), loss_eager.detach(), 1e-6)
    for g, w in zip(grads, grads_eager):
        _close(g, w, 1e-6)


def test_bias_gelu_validation():
    with pytest.raises(ValueError, match="bias must have shape"):
        fo.bias_gelu(torch.randn(3, 4), torch.randn(3))


def test_bias_gelu_zero_rows():
    for shape in ((0, 8), (2, 0, 8)):
        x = torch.empty(shape, requires_grad=True)
        b = torch.randn(8, requires_grad=True)
        with fo.backend("triton"):
            y, dx, db = _run(fo.bias_gelu, x, b, torch.empty(shape))
        assert y.shape == shape and dx.shape == shape and torch.equal(db, torch.zeros(8))


def test_bias_gelu_eager_fast_path_matches_custom_op():
    """Eager calls skip the custom-op dispatcher; under a dispatch mode (as under tracing) the custom
    op runs instead, bit-identically."""

    torch.manual_seed(0)
    x = (torch.randn(3, 5, 300) * 3).to(torch.bfloat16).requires_grad_()
    b = torch.randn(300).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(3, 5, 300).to(torch.bfloat16)
    with fo.backend("triton"):
        got = _run(fo.bias_gelu, x, b, dy)
        rec = OpRecorder()
        with rec:
            got_op = _run(fo.bias_gelu, x, b, dy)
    assert "funzero.bias_gelu_fwd.default" in rec.ops and "funzero.bias_gelu_bwd.default" in rec.ops
    for g, g_op in zip(got, got_op):
        assert torch.equal(g, g_op)
