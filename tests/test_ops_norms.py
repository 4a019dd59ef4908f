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


# --------------------------------------------------------------------------- residual_norm


def _fork_inputs(shape, dtype, bias: bool, seed: int = 0):
    x, w, b, dy = _inputs(shape, dtype, bias)
    g = torch.Generator().manual_seed(seed)
    rb = torch.randn(shape[-1], generator=g).to(dtype).requires_grad_()
    dr = torch.randn(shape, generator=g).to(dtype)
    return (x, w, b, rb), (dr, dy)


def _plain_fork(x, w, b, rb):
    return x + rb, torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _fork_grads(fn, inputs, douts):
    outs = fn(*inputs)
    want = [t for t in inputs if t is not None]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, want, douts))


FORK_SHAPES = [(1, 1), (5, 7), (3, 4, 123), (300, 129), (37, 1600)]


@pytest.mark.parametrize("shape", FORK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_residual_norm_matches_plain_ops(shape, dtype, bias):
    """Both outputs and all four gradients against the plain ops in fp32 on the same inputs (torch's own
    bf16 LayerNorm backward is further from fp32 than the kernel: it was 1.5-2% off on the weight sums
    at (300, 129), the kernel 0.2%). (300, 129) gives the backward several row tiles per program."""
    inputs, douts = _fork_inputs(shape, dtype, bias, seed=shape[-1])
    with fo.backend("triton"):
        r, h = fo.residual_norm(*inputs)
        assert type(h.grad_fn).__name__ == "_ResidualNormBackward"  # the fused path ran
        got = _fork_grads(fo.residual_norm, inputs, douts)
    ref_in = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    want = _fork_grads(_plain_fork, ref_in, [d.float() for d in douts])
    tol_y, tol_g = TOL[dtype]
    for i, (g, w_) in enumerate(zip(got, want)):
        _close(g, w_.to(dtype), tol_y if i < 2 else tol_g)


def test_residual_norm_one_output_used():
    """Only the norm or only the residual feeds the loss: the other gradient is zero, as autograd's."""
    inputs, (dr, dy) = _fork_inputs((6, 40), torch.float32, True)
    for pick in (0, 1):
        with fo.backend("triton"):
            got = torch.autograd.grad((fo.residual_norm(*inputs)[pick] * (dr, dy)[pick]).sum(), inputs)
        want = torch.autograd.grad((_plain_fork(*inputs)[pick] * (dr, dy)[pick]).sum(), inputs,
                                   allow_unused=True, materialize_grads=True)
        for g, w_ in zip(got, want):
            _close(g, w_, 1e-5)


def test_residual_norm_fallbacks_are_the_plain_ops():
    inputs, _ = _fork_inputs((4, 24), torch.float32, True)
    r, h = fo.residual_norm(*inputs)  # CPU, default backend: torch
    assert type(h.grad_fn).__name__ == "NativeLayerNormBackward0"
    with fo.backend("triton"), torch.no_grad():
        r2, h2 = fo.residual_norm(*inputs)
    for a, b in zip((r, h), (r2, h2)):
        assert torch.equal(a.detach(), b)


def test_residual_norm_validation_names_the_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"residual_bias must have shape \(8,\).*got \(7,\)"):
        fo.residual_norm(x, torch.ones(8), None, torch.zeros(7))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\).*got \(9,\)"):
        fo.residual_norm(x, torch.ones(9), None, torch.zeros(8))
    with fo.backend("triton"), pytest.raises(ValueError, match="D=70000"):
        fo.residual_norm(torch.randn(1, 70000, requires_grad=True), torch.ones(70000), None, torch.zeros(70000))


def test_residual_norm_zero_rows():
    inputs, douts = _fork_inputs((2, 0, 8), torch.float32, True)
    with fo.backend("triton"):
        _, _, dx, dw, db, drb = _fork_grads(fo.residual_norm, inputs, douts)
    assert dx.shape == (2, 0, 8)
    for g in (dw, db, drb):
        assert torch.equal(g, torch.zeros(8))


def test_residual_norm_eager_fast_path_matches_custom_op():
    inputs, douts = _fork_inputs((5, 3, 40), torch.bfloat16, True)
    with fo.backend("triton"):
        fast = _fork_grads(fo.residual_norm, inputs, douts)
        recorder = OpRecorder()
        with recorder:
            via_op = _fork_grads(fo.residual_norm, inputs, douts)
    assert "funzero.residual_norm_bwd.default" in recorder.ops
    for a, b in zip(fast, via_op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_residual_norm_compiles_to_one_graph(compiler):
    """As in a pre-norm block: the fork, a bias-free projection of the norm, the residual add."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def block(x, w, b, rb, proj):
        r, h = fo.residual_norm(x, w, b, rb)
        return (r + h @ proj).square().sum()

    inputs, _ = _fork_inputs((3, 5, 24), torch.float32, True)
    proj = (torch.randn(24, 24) * 0.2).requires_grad_()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    with fo.backend("triton"):
        got = torch.autograd.grad(torch.compile(block, fullgraph=True, backend=counter)(*inputs, proj), (*inputs, proj))
        want = torch.autograd.grad(block(*inputs, proj), (*inputs, proj))
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [(2048, 2, 8), (4096, 1, 8), (64, 3, 4)], ids=["gpu-default", "two-rows", "small"])
def test_residual_norm_backward_gpu_tiles(config):
    """The GPU's tile configurations (one row or several per tile, several tiles per program, ragged
    rows) in the interpreter, against the plain ops' gradients in fp32."""
    tile, pps, warps = config
    inputs, (dr, dy) = _fork_inputs((301, 40), torch.float32, True)
    x, w, b, rb = inputs
    got = _norms._norm_bwd_triton(dy, x.detach(), w.detach(), None, None, False, True, dr=dr, eps=1e-5, tile=tile,
                                  programs_per_sm=pps, num_warps=warps)
    want = torch.autograd.grad(_plain_fork(*inputs), inputs, (dr, dy))
    for g, w_ in zip(got, want):
        _close(g, w_, 1e-5)


def test_residual_norm_mixed_dtypes():
    """A bf16 stream with an fp32 residual bias: the residual comes out fp32 (type promotion, as the
    plain ops), and every gradient in its input's dtype, close to the plain ops'."""
    inputs, (dr, dy) = _fork_inputs((7, 48), torch.bfloat16, True)
    x, w, b, rb = inputs
    rb32 = rb.detach().float().requires_grad_()
    with fo.backend("triton"):
        r, h = fo.residual_norm(x, w, b, rb32)
        got = torch.autograd.grad((r, h), (x, w, b, rb32), (dr.float(), dy))
    assert r.dtype == torch.float32 and h.dtype == torch.bfloat16
    want = torch.autograd.grad(_plain_fork(x, w, b, rb32), (x, w, b, rb32), (dr.float(), dy))
    for g, w_ in zip(got, want):
        assert g.dtype == w_.dtype
        _close(g.float(), w_.float(), 2.0**-6)
