"""LayerNorm / RMSNorm: Triton kernels (interpreter) vs the torch references, values and gradients.

Tolerances (relative to the largest reference magnitude of each tensor, at least 1):
fp32 1e-5 (rsqrt and summation order differ); bf16 outputs within one bf16
ulp (2**-8 relative; both sides round an fp32 result to nearest even) and
bf16 gradients within 2**-7.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from tests._recorder import OpRecorder  # noqa: E402
from funzero.ops import _dispatch, _norms  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

SHAPES = [(1, 1), (5, 7), (3, 4, 123), (37, 1600), (2, 6400)]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0**-8, 2.0**-7)}  # (values, gradients)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    # At least 1: for D = 1 the exact weight gradient is 0 and torch returns rounding noise.
    scale = max(want.float().abs().max().item(), 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * scale)


def _inputs(shape, dtype, bias: bool):
    torch.manual_seed(sum(shape))
    D = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.randn(D) * 0.2 + 1).to(dtype).requires_grad_()
    b = (torch.randn(D) * 0.2).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(shape).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy):
    args = (x, w) if b is None else (x, w, b)
    y = fn(*args)
    grads = torch.autograd.grad(y, args, dy)
    return y.detach(), grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layer", "layer_nobias", "rms"])
def test_norm_matches_reference(shape, dtype, kind):
    x, w, b, dy = _inputs(shape, dtype, bias=kind == "layer")
    if kind == "rms":
        op, ref = (lambda x, w: fo.rms_norm(x, w)), fo.reference.rms_norm
    else:
        op, ref = fo.layer_norm, fo.reference.layer_norm
    with fo.backend("triton"):
        y, grads = _run(op, x, w, b, dy)
    y_ref, grads_ref = _run(ref, x, w, b, dy)
    tol_y, tol_g = TOL[dtype]
    _close(y, y_ref, tol_y)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, tol_g)


def test_norm_output_is_normalised():
    """Independent of the reference: zero mean / unit rms rows, affine applied."""
    x = torch.randn(9, 300) * 5 + 3
    with fo.backend("triton"):
        y = fo.layer_norm(x, torch.full((300,), 2.0), torch.full((300,), 1.0))
        r = fo.rms_norm(x, torch.ones(300))
    torch.testing.assert_close(y.mean(-1), torch.ones(9), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(-1, unbiased=False), torch.full((9,), 2.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(r.pow(2).mean(-1), torch.ones(9), rtol=1e-4, atol=0)


def test_norm_backward_partial_sums_cover_all_rows():
    """More row tiles than programs: each program reduces a run of tiles (no atomics)."""
    x, w, b, dy = _inputs((300, 129), torch.float32, bias=True)
    block_m, _ = _norms._tile_shape(300, 129)
    num_tiles = -(-300 // block_m)
    assert 300 % block_m and num_tiles > _norms._PROGRAMS_PER_SM * _dispatch.num_sms(x.device)  # ragged, > 1 tile/program
    with fo.backend("triton"):
        _, grads = _run(fo.layer_norm, x, w, b, dy)
    _, grads_ref = _run(fo.reference.layer_norm, x, w, b, dy)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 1e-5)


def test_norm_strided_rows():
    """A row-strided view (e.g. a slice of a wider buffer) runs without a copy."""
    base = torch.randn(6, 40)
    x = base[:, :32]  # row stride 40
    w, b = torch.randn(32), torch.randn(32)
    with fo.backend("triton"):
        y = fo.layer_norm(x, w, b)
    _close(y, fo.reference.layer_norm(x, w, b), 1e-5)


def test_norm_validation():
    with pytest.raises(ValueError, match="weight must have shape"):
        fo.layer_norm(torch.randn(2, 8), torch.ones(7))
    with fo.backend("triton"), pytest.raises(ValueError, match="at most"):
        fo.rms_norm(torch.randn(1, 70000), torch.ones(70000))


def test_norm_torch_compile_fullgraph():
    """The custom ops (fake impls + registered autograd) trace without graph breaks.

    The torch backend under inductor is covered by tests/test_ops_compile.py.
    """

    def f(x, w, b):
        return (fo.layer_norm(x, w, b) * fo.rms_norm(x, w)).float().sum()

    x, w, b, _ = _inputs((6, 48), torch.float32, bias=True)
    torch._dynamo.reset()
    with fo.backend("triton"):
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
        grads = torch.autograd.grad(loss, (x, w, b))
        loss_eager = f(x, w, b)
        grads_eager = torch.autograd.grad(loss_eager, (x, w, b))
    _close(loss.detach(), loss_eager.detach(), 1e-5)
    for g, g_ref in zip(grads, grads_eager):
        _close(g, g_ref, 1e-5)


def test_norm_zero_rows():
    for shape in ((0, 8), (2, 0, 8)):
        x, w, b, dy = _inputs(shape, torch.float32, bias=True)
        with fo.backend("triton"):
            y, grads = _run(fo.layer_norm, x, w, b, dy)
        assert y.shape == shape and grads[0].shape == shape
        assert torch.equal(grads[1], torch.zeros(8)) and torch.equal(grads[2], torch.zeros(8))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_eager_fast_path_matches_custom_op(kind):
    """Eager calls skip the custom-op dispatcher (``direct_call``); under any dispatch mode (as under
    tracing) the custom op runs instead, with bit-identical values and gradients."""
    x, w, b, dy = _inputs((5, 3, 40), torch.bfloat16, bias=kind == "layer")
    op = fo.layer_norm if kind == "layer" else (lambda x, w: fo.rms_norm(x, w))
    assert _dispatch.direct_call(x, w, b)
    with fo.backend("triton"):
        y, grads = _run(op, x, w, b, dy)
        recorder = OpRecorder()
        with recorder:
            assert not _dispatch.direct_call(x, w, b)
            y_op, grads_op = _run(op, x, w, b, dy)
    assert "funzero.norm_fwd.default" in recorder.ops and "funzero.norm_bwd.default" in recorder.ops
    assert torch.equal(y, y_op)
    for g, g_op in zip(grads, grads_op):
        assert torch.equal(g, g_op)
