"""The attention's input projection split into heads, with a one-pass backward.

``q, k, v = linear_qkv(x, W, b, n_head)`` is ``x @ W.T + b`` split into three (B, T, C) blocks
and viewed as (B, nh, T, hs) heads, as attention wants them. Unfused, autograd's backward
concatenates the three head gradients into the (B, T, 3C) gradient of the projection (one pass
that reads and writes it) and then sums that over rows for the bias gradient (a second read).
Here one Triton pass reads each head gradient once, whatever its strides (cuDNN and flash
attention return different layouts), writes the (B*T, 3C) gradient and per-tile column sums of
it; a small launch adds the sums up. The matmuls of the backward are the same as unfused.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import INTERPRET, cdiv, direct_call, next_pow2, sum_partials, tl, triton, use_triton

__all__ = ["linear_qkv"]

_BLOCK_T = 128  # GPU: sequence positions per program (one head's hs columns each)
_NUM_WARPS = 4


@triton.jit
def _heads_grad_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_ptr,  # q, k, v: (B, nh, T, hs) any strides; out: (B*T, 3C); part: (P, 3C) fp32
    T, NH, HS, C, n_t_tiles,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    WANT_DB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_t_tiles + t tile: the row of part this program writes
    which_head = tl.program_id(1)  # which * NH + head, which = 0 (q), 1 (k), 2 (v)
    b = pid // n_t_tiles
    t0 = (pid % n_t_tiles) * BLOCK_T
    which = which_head // NH
    h = which_head % NH
    ts = t0 + tl.arange(0, BLOCK_T)
    ds = tl.arange(0, BLOCK_D)
    mask = (ts < T)[:, None] & (ds < HS)[None, :]
    if which == 0:
        src = q_ptr + b.to(tl.int64) * sq0 + h.to(tl.int64) * sq1 + ts[:, None].to(tl.int64) * sq2 + ds[None, :] * sq3
    elif which == 1:
        src = k_ptr + b.to(tl.int64) * sk0 + h.to(tl.int64) * sk1 + ts[:, None].to(tl.int64) * sk2 + ds[None, :] * sk3
    else:
        src = v_ptr + b.to(tl.int64) * sv0 + h.to(tl.int64) * sv1 + ts[:, None].to(tl.int64) * sv2 + ds[None, :] * sv3
    g = tl.load(src, mask=mask, other=0.0)
    cols = which * C + h * HS + ds  # columns of the (B*T, 3C) gradient
    rows = b.to(tl.int64) * T + ts
    tl.store(out_ptr + rows[:, None] * (3 * C) + cols[None, :], g, mask=mask)
    if WANT_DB:
        tl.store(part_ptr + pid.to(tl.int64) * (3 * C) + cols, tl.sum(g.to(tl.float32), axis=0), mask=ds < HS)


def _heads_grad(dq: Tensor, dk: Tensor, dv: Tensor, want_db: bool, *, block_t: Optional[int] = None,
                num_warps: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(B*T, 3C) gradient of the projection from the (B, nh, T, hs) head gradients, and its sum over
    rows (3C,) if ``want_db`` (else an empty tensor). Keyword arguments: benchmark sweeps."""
    B, NH, T, HS = dq.shape
    C = NH * HS
    out = dq.new_empty((B * T, 3 * C))
    block_d = next_pow2(HS)
    block_t = block_t or (max(1, min(next_pow2(T), 16384 // block_d)) if INTERPRET else _BLOCK_T)
    n_t_tiles = cdiv(T, block_t)
    parts = B * n_t_tiles
    part = dq.new_empty((1, parts, 3 * C) if want_db else (0,), dtype=torch.float32)
    if out.numel():
        _heads_grad_kernel[(parts, 3 * NH)](
            dq, dk, dv, out, part, T, NH, HS, C, n_t_tiles, *dq.stride(), *dk.stride(), *dv.stride(),
            WANT_DB=want_db, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps or _NUM_WARPS)
    if not want_db:
        return out, dq.new_empty((0,))
    (db,) = sum_partials(part, dq.dtype)  # no rows: no partial rows either, db = 0
    return out, db


@torch.library.custom_op("funzero::heads_grad", mutates_args=())
def _heads_grad_op(dq: Tensor, dk: Tensor, dv: Tensor, want_db: bool) -> tuple[Tensor, Tensor]:
    return _heads_grad(dq, dk, dv, want_db)


@_heads_grad_op.register_fake
def _(dq, dk, dv, want_db):
    B, NH, T, HS = dq.shape
    return dq.new_empty((B * T, 3 * NH * HS)), dq.new_empty((3 * NH * HS,) if want_db else (0,))


def _plain(x: Tensor, weight: Tensor, bias: Optional[Tensor], n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """The layer in plain ops: the projection, then views of its q, k and v blocks as heads."""
    B, T, _ = x.shape
    C = weight.shape[0] // 3
    qkv = F.linear(x, weight, bias)  # (B, T, 3C)
    # (B, nh, T, hs) each
    return tuple(t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))


class _LinearQKV(torch.autograd.Function):
    """Forward: the plain matmul and views. Backward: the head gradients assembled in one pass
    (with the bias sum), then the two matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias, n_head):
        ctx.save_for_backward(x, weight)
        ctx.want_db = bias is not None
        return _plain(x, weight, bias, n_head)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, weight = ctx.saved_tensors
        if direct_call(dq, dk, dv):
            g, db = _heads_grad(dq, dk, dv, ctx.want_db)
        else:
            g, db = torch.ops.funzero.heads_grad(dq, dk, dv, ctx.want_db)
        dx = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None  # g: (B*T, 3C)
        dw = g.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return dx, dw, db if ctx.want_db else None, None


def linear_qkv(x: Tensor, weight: Tensor, bias: Optional[Tensor], n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x @ weight.T + bias`` split into query, key and value heads, with a one-pass backward.

    Args:
        x: (B, T, C_in) input.
        weight: (3C, C_in), the fused q/k/v projection (``nn.Linear(C_in, 3 * C).weight``).
        bias: (3C,) or None.
        n_head: heads; C must be divisible by it.

    Returns:
        q, k, v, each (B, n_head, T, C // n_head): views of the projection, as attention takes
        them. Takes the fused backward on Triton tensors with autocast off; the plain ops otherwise
        (same values).

    Example:
        >>> q, k, v = linear_qkv(torch.randn(2, 8, 16), torch.randn(48, 16), None, n_head=4)
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] % 3:
        raise ValueError(f"linear_qkv takes x (B, T, C_in) and weight (3C, C_in); got {tuple(x.shape)=}, "
                         f"{tuple(weight.shape)=}")
    C = weight.shape[0] // 3
    if n_head < 1 or C % n_head:
        raise ValueError(f"n_head must divide C = weight.shape[0] // 3 = {C}; got {n_head=}")
    if bias is not None and tuple(bias.shape) != (3 * C,):
        raise ValueError(f"bias must have shape (3C,) = ({3 * C},); got {tuple(bias.shape)=}")
    if not use_triton(x) or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return _plain(x, weight, bias, n_head)
    return _LinearQKV.apply(x, weight, bias, n_head)
