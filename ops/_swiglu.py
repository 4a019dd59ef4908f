"""SwiGLU's gate, ``silu(gate) * up``, forward and backward in one pass each.

The forward reads ``gate`` and ``up`` once and writes the product; the backward reads ``gate``,
``up`` and the incoming gradient once and writes both input gradients, recomputing
``sigmoid(gate)`` instead of saving anything but the two inputs (autograd's unfused form saves
``silu(gate)`` too and makes two passes). All arithmetic is fp32 with one rounding per output.

``sigmoid(g)`` is built from ``e = exp(-|g|)``, which never overflows (under the interpreter an
overflow is a numpy warning, an error in the tests), with ``r = 1 / (1 + e)``:
``s = r`` or ``e r`` by the sign of g, and ``s (1 - s) = e r^2`` without cancellation. Then

    d silu(g) / dg = s + g s (1 - s).

Host time matters for an elementwise op (see ``_norms``): no autotuner, eager calls skip the
custom-op dispatcher (``direct_call``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import INTERPRET, cast_to, cdiv, direct_call, tl, triton, use_triton

__all__ = ["swiglu", "swiglu_reference"]

_BLOCK = 16384 if INTERPRET else 2048  # elements per program (the interpreter pays per program)
_NUM_WARPS = 8  # GPU: 8 elements per thread, one 16-byte bf16 vector per stream


# --------------------------------------------------------------------------- kernels


@triton.jit
def _sigmoid_parts(g):
    """(s, s * (1 - s)) for s = sigmoid(g), fp32, overflow-free."""
    e = tl.exp(-tl.abs(g))  # in (0, 1]
    r = 1.0 / (1.0 + e)
    return tl.where(g >= 0, r, e * r), e * r * r


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):  # all (n,) contiguous
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, _ = _sigmoid_parts(g)
    tl.store(y_ptr + offs, cast_to(g * s * u, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):  # all (n,) contiguous
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, s1ms = _sigmoid_parts(g)
    tl.store(dg_ptr + offs, cast_to(dy * u * (s + g * s1ms), dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, cast_to(dy * g * s, du_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _swiglu_fwd_triton(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return y


def _swiglu_bwd_triton(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return dg, du


# --------------------------------------------------------------------------- torch reference


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """Torch reference of :func:`swiglu`: ``silu(gate) * up`` in fp32, output in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("funzero::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
    return _swiglu_fwd_triton(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("funzero::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _swiglu_bwd_triton(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return torch.ops.funzero.swiglu_bwd(dy, *ctx.saved_tensors)


torch.library.register_autograd("funzero::swiglu_fwd", _backward, setup_context=_setup_context)


class _SwiGLU(torch.autograd.Function):
    """The custom op's forward and backward without its dispatcher: eager calls (``direct_call``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd_triton(gate, up)

    @staticmethod
    def backward(ctx, dy):
        return _swiglu_bwd_triton(dy, *ctx.saved_tensors)


# --------------------------------------------------------------------------- public API


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``: the gated activation of a SwiGLU MLP (Llama, Mistral, Qwen2).

    Args:
        gate: (...) bf16/fp16/fp32, the gate projection's output.
        up: the up projection's output, same shape and dtype as ``gate``.

    Returns:
        A contiguous tensor of gate's shape and dtype. Differentiable in both inputs; the backward
        recomputes the sigmoid from ``gate``.

    Example:
        >>> y = swiglu(torch.randn(4, 64), torch.randn(4, 64))

    References:
        Shazeer, "GLU Variants Improve Transformer", 2020 (eq. 6, SwiGLU with beta = 1).
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have one shape and dtype, got {tuple(gate.shape)=} {gate.dtype}, "
                         f"{tuple(up.shape)=} {up.dtype}")
    if not gate.dtype.is_floating_point:
        raise ValueError(f"swiglu needs floating-point inputs, got {gate.dtype=}")
    if not use_triton(gate):
        return swiglu_reference(gate, up)
    if direct_call(gate, up):
        return _SwiGLU.apply(gate, up)
    return torch.ops.funzero.swiglu_fwd(gate, up)
