"""Checks every kernel test of the Hugging Face pieces makes (linear-CE, swiglu, rope)."""

import torch

import funzero.ops as fo
from tests._recorder import OpRecorder


def close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, *, floor: float = 1.0) -> None:
    """Same dtype and shape, and within ``rel`` of the larger of ``floor`` and want's largest magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    scale = max(want.float().abs().max().item(), floor) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * scale)


def eager_matches_custom_op(run, *op_names: str) -> list[str]:
    """``run()`` (values and gradients) on the eager fast path and, under a dispatch mode (as under tracing),
    through the custom ops named: bit-identical. Returns the ops the second run dispatched."""
    with fo.backend("triton"):
        fast = run()
        recorder = OpRecorder()
        with recorder:
            via_op = run()
    for name in op_names:
        assert f"funzero.{name}.default" in recorder.ops, (name, sorted(set(recorder.ops)))
    for a, b in zip(fast, via_op, strict=True):
        assert torch.equal(a, b)
    return recorder.ops


def compiles_to_one_graph(fn, args, *, tol: float = 1e-5, backend: str = "aot_eager") -> None:
    """``torch.compile(fn, fullgraph=True)`` traces one graph whose value and gradients equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    with fo.backend("triton"):
        out = torch.compile(fn, fullgraph=True, backend=counter)(*args)
        got = (out.detach(), *torch.autograd.grad(out, leaves))
        out = fn(*args)
        want = (out.detach(), *torch.autograd.grad(out, leaves))
    assert counter.frame_count == 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
