"""SwiGLU: the Triton kernels (interpreter) vs ``silu(gate) * up`` in fp32.

Tolerances, relative to the largest reference magnitude: fp32 1e-6 (exp and division round
differently); bf16 outputs and gradients within one bf16 rounding of an fp32 result (2**-8:
both sides compute in fp32 and round once).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _dispatch, _swiglu  # noqa: E402
from tests._opcheck import close_rel, compiles_to_one_graph, eager_matches_custom_op  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

TOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return gate, up, dy


def _run(fn, gate, up, dy):
    y = fn(gate, up)
    return (y.detach(), *torch.autograd.grad(y, (gate, up), dy))


# (1,), odd sizes, one program's block + 3 (a ragged second program), a (B, T, I) MLP shape
SHAPES = [(1,), (5, 7), (3, 4, 123), (_swiglu._BLOCK + 3,), (2, 9, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_matches_reference(shape, dtype):
    gate, up, dy = _inputs(shape, dtype)
    with fo.backend("triton"):
        got = _run(fo.swiglu, gate, up, dy)
    # the reference's own backward in fp32, rounded once (torch's bf16 backward rounds in between)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    want = [t.to(dtype) for t in _run(fo.reference.swiglu, g32, u32, dy.float())]
    for a, b in zip(got, want):
        close_rel(a, b, TOL[dtype])


def test_swiglu_extreme_gates_stay_finite():
    """Gates of +-1e4 (exp overflows in a naive sigmoid): silu -> g or -0, its slope -> 1 or 0."""
    gate = torch.tensor([-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4], requires_grad=True)
    up = torch.ones(7, requires_grad=True)
    with fo.backend("triton"):
        y, dg, du = _run(fo.swiglu, gate, up, torch.ones(7))
    want = _run(lambda g, u: F.silu(g) * u, gate, up, torch.ones(7))
    for a, b in zip((y, dg, du), want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_swiglu_noncontiguous_inputs():
    base = torch.randn(6, 20)
    gate, up = base[:, :8], base[:, 10:18]  # row stride 20
    with fo.backend("triton"):
        y = fo.swiglu(gate, up)
    close_rel(y, fo.reference.swiglu(gate, up), 1e-6)
    assert y.is_contiguous()


def test_swiglu_eager_fast_path_matches_custom_op():
    gate, up, dy = _inputs((4, 33), torch.bfloat16)
    eager_matches_custom_op(lambda: _run(fo.swiglu, gate, up, dy), "swiglu_fwd", "swiglu_bwd")


def test_swiglu_torch_compile_fullgraph():
    def mlp(x, wg, wu, wd):
        return (fo.swiglu(x @ wg, x @ wu) @ wd).square().sum()

    g = torch.Generator().manual_seed(0)
    shapes = ((5, 8), (8, 24), (8, 24), (24, 8))
    compiles_to_one_graph(mlp, [torch.randn(s, generator=g).requires_grad_() for s in shapes])


def test_swiglu_validation():
    with pytest.raises(ValueError, match=r"one shape and dtype.*\(2, 3\).*\(2, 4\)"):
        fo.swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="bfloat16"):
        fo.swiglu(torch.randn(2, 3), torch.randn(2, 3).bfloat16())
    with pytest.raises(ValueError, match="floating-point"):
        fo.swiglu(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))


def test_swiglu_empty():
    gate, up, dy = _inputs((0, 5), torch.float32)
    with fo.backend("triton"):
        y, dg, du = _run(fo.swiglu, gate, up, dy)
    assert y.shape == dg.shape == du.shape == (0, 5)
