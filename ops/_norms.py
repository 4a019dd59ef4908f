"""LayerNorm and RMSNorm over the last dimension, forward and backward.

Statistics are always fp32, whatever the input dtype. Each forward program
normalises a (BLOCK_M, BLOCK_D) tile of whole rows; the backward saves only the
per-row mean and 1/std and recomputes x_hat.

Weight and bias gradients are reduced without atomics: a persistent grid of a
few programs per SM, each owning a contiguous run of rows, accumulates its
partial sums in registers and writes one row of a (1 to 3, programs, D) fp32
buffer; one small kernel (``sum_partials``) adds those rows up and casts.
Deterministic, no contention.

``residual_norm`` is a pre-norm branch's fork, ``(x + residual_bias, layer_norm(x))``: its
forward is plain ops (for inductor to fuse), its backward the same backward kernel with the
residual branch's gradient added to dx and summed into a third partial row, and the statistics
recomputed from the row instead of saved.

Host time matters as much as the kernels here (8192x1600 bf16 moves in ~20 us
on an H100, about what a Python launch costs there): no autotuner (num_warps
from the tile size), eager calls skip the custom-op dispatcher
(``direct_call``), and the backward is two launches.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import INTERPRET, cast_to, cdiv, direct_call, next_pow2, num_sms, sum_partials, tl, triton, use_triton

__all__ = ["layer_norm", "rms_norm", "residual_norm", "layer_norm_reference", "rms_norm_reference"]

_MAX_D = 65536  # one row must fit in a program's registers
_TILE = 4096  # elements per program tile: several rows when D is small
_PROGRAMS_PER_SM = 2  # backward: persistent programs per SM
# residual_norm's backward on a GPU: (tile, programs per SM, warps). One row per tile: its three
# gradient streams and three column sums need ~190 registers a thread at two rows (one 8-warp
# program per SM); at one row two fit. H100, 8192 x 1600 bf16: 52 us vs 63 at the norms' tile.
_RES_BWD = (2048, 2, 8)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,  # x, y: (M, D) rows; w, b: (D,); mean, rstd: (M,) fp32
    M, D, x_row_stride, y_row_stride, eps,
    RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_M,)
        x_hat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / D  # (BLOCK_M,)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        x_hat = xc * rstd[:, None]
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x_hat * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    tl.store(y_ptr + rows64 * y_row_stride + cols[None, :], cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr,  # dy, x: (M, D) rows; w: (D,); mean, rstd: (M,)
    dr_ptr,  # HAS_RES: the residual branch's gradient (M, D), added to dx and summed over rows
    dx_ptr, dw_part_ptr, db_part_ptr, dr_part_ptr,  # dx: (M, D); partial sums: (programs, D) fp32
    M, D, x_row_stride, dy_row_stride, dr_row_stride, dx_row_stride, num_tiles, tiles_per_program, eps,
    RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # SAVED: mean and rstd come from the forward; else they are recomputed from x (eps used).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dr_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = pid * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    lim = tl.minimum(M, last * BLOCK_M)  # end of this program's rows
    # Each iteration loads the next tile before it computes this one: the loads are
    # in flight during the row reductions (H100, 8192x1600 bf16: 46 -> 38 us).
    rows = first * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < lim
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x_next = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
    dy_next = tl.load(dy_ptr + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0)
    dr_next = dy_next
    if HAS_RES:
        dr_next = tl.load(dr_ptr + rows64 * dr_row_stride + cols[None, :], mask=mask, other=0.0)
    rstd_next = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean_next = rstd_next
    if SAVED:
        rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if not RMS:
            mean_next = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    for tile in range(first, last):
        x = x_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        dr = dr_next.to(tl.float32)
        rstd = rstd_next
        mean = mean_next
        tile_rows64 = rows64
        tile_mask = mask
        rows = (tile + 1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < lim  # all false after the last tile
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x_next = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
        dy_next = tl.load(dy_ptr + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            dr_next = tl.load(dr_ptr + rows64 * dr_row_stride + cols[None, :], mask=mask, other=0.0)
        if SAVED:
            rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            if not RMS:
                mean_next = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        else:  # the forward's statistics, from the row already in registers
            if RMS:
                rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            else:
                mean = tl.sum(x, axis=1) / D
                xc = tl.where(tile_mask, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        if RMS:
            x_hat = x * rstd[:, None]
        else:
            x_hat = tl.where(tile_mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        # dx = rstd * (w*dy - x_hat * mean(w*dy*x_hat) [- mean(w*dy) for LayerNorm]) [+ dr]
        c1 = tl.sum(x_hat * wdy, axis=1) / D
        if RMS:
            dx = (wdy - x_hat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / D
            dx = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_RES:
            dx += dr
            dr_acc += dr
        tl.store(dx_ptr + tile_rows64 * dx_row_stride + cols[None, :], cast_to(dx, dx_ptr.dtype.element_ty),
                 mask=tile_mask)
        dw_acc += dy * x_hat
        if HAS_BIAS:
            db_acc += dy
    tl.store(dw_part_ptr + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * D + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    if HAS_RES:
        tl.store(dr_part_ptr + pid * D + cols, tl.sum(dr_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launchers


def _check_width(D: int) -> None:
    if D > _MAX_D:
        raise ValueError(f"normalized dimension must be at most {_MAX_D} for the Triton kernel, got {D=}")


def _tile_shape(M: int, D: int, tile: int = _TILE) -> tuple[int, int]:
    _check_width(D)
    block_d = next_pow2(D)
    block_m = max(1, min(next_pow2(M), tile // block_d))
    return block_m, block_d


def _num_warps(block_m: int, block_d: int) -> int:
    # 16 fp32 values of a tile per thread (two 16-byte bf16 vectors): 8 warps for the 4096-element tile
    return max(1, min(16, block_m * block_d // 512))


def _rows(t: Tensor, D: int) -> Tensor:
    """(..., D) -> (M, D) with unit column stride (a view when possible)."""
    if t.dim() != 2:
        t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


def _norm_fwd_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool, *,
                     tile: int = _TILE, num_warps: Optional[int] = None):
    """y (..., D), mean (M,) or (0,), rstd (M,). ``tile`` and ``num_warps`` are for benchmark sweeps."""
    D = x.shape[-1]
    x2 = _rows(x, D)  # (M, D)
    M = x2.shape[0]
    # Allocations in the forms that cost the least host time (no views, no device parsing).
    y = torch.empty_like(x, memory_format=torch.contiguous_format)  # (..., D): rows of D
    mean = x.new_empty((0 if rms else M,), dtype=torch.float32)
    rstd = x.new_empty((M,), dtype=torch.float32)
    if M:
        block_m, block_d = _tile_shape(M, D, tile)
        _norm_fwd_kernel[(cdiv(M, block_m),)](
            x2, weight, bias, y, mean, rstd, M, D, x2.stride(0), D, eps,
            RMS=rms, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=num_warps or _num_warps(block_m, block_d))
    return y, mean, rstd


def _norm_bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, mean: Optional[Tensor], rstd: Optional[Tensor], rms: bool,
                     has_bias: bool, *, dr: Optional[Tensor] = None, eps: float = 0.0,
                     tile: int = _TILE, num_warps: Optional[int] = None, programs_per_sm: int = _PROGRAMS_PER_SM):
    """dx (..., D), dw (D,), db (D,) or (0,) [, dres (D,) if ``dr`` is given].

    ``rstd`` None: the statistics are recomputed from x with ``eps``. ``dr``: the gradient of a
    residual branch that shares x; it is added to dx and its sum over rows is returned as dres.
    The remaining keyword arguments are for benchmark sweeps."""
    D = x.shape[-1]
    x2, dy2 = _rows(x, D), _rows(dy, D)
    dr2 = _rows(dr, D) if dr is not None else dy2
    M = x2.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)  # (..., D): rows of D
    block_m, block_d = _tile_shape(M, D, tile)
    num_tiles = cdiv(M, block_m)
    # A persistent grid: enough programs to fill every SM, few enough that the
    # partial rows stay small (2 x 264 x 1600 fp32 = 3.4 MB, read back from L2).
    programs = max(1, min(num_tiles, programs_per_sm * num_sms(x.device)))
    tiles_per_program = max(1, cdiv(num_tiles, programs))  # 1 when M = 0
    programs = max(1, cdiv(num_tiles, tiles_per_program))
    has_res = dr is not None
    part = x.new_empty((1 + has_bias + has_res, programs, D), dtype=torch.float32)  # dw [, db] [, dres] rows
    if M:
        saved = rstd is not None
        _norm_bwd_kernel[(programs,)](  # part itself points at its dw rows
            dy2, x2, weight, mean if saved else x2, rstd if saved else x2, dr2, dx, part,
            part[1] if has_bias else part, part[-1], M, D, x2.stride(0), dy2.stride(0), dr2.stride(0), D,
            num_tiles, tiles_per_program, eps, RMS=rms, HAS_BIAS=has_bias, HAS_RES=has_res, SAVED=saved,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps or _num_warps(block_m, block_d))
    else:
        part.zero_()
    grads = sum_partials(part, weight.dtype)  # dw [, db] [, dres]: (D,) each
    db = grads[1] if has_bias else weight.new_empty((0,))
    return (dx, grads[0], db, grads[-1]) if has_res else (dx, grads[0], db)


# --------------------------------------------------------------------------- torch references


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Torch reference of :func:`layer_norm`: fp32 statistics, output in x's dtype."""
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Torch reference of :func:`rms_norm`: fp32 statistics, output in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("funzero::norm_fwd", mutates_args=())
def _norm_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                 rms: bool) -> tuple[Tensor, Tensor, Tensor]:  # y (..., D), mean (M,) or (0,), rstd (M,)
    return _norm_fwd_triton(x, weight, bias, eps, rms)


@_norm_fwd_op.register_fake
def _(x, weight, bias, eps, rms):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((0 if rms else M,), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op("funzero::norm_bwd", mutates_args=())
def _norm_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, rms: bool,
                 has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_bwd_triton(dy, x, weight, mean, rstd, rms, has_bias)


@_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, rms, has_bias):
    D = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty((D,)), weight.new_empty((D if has_bias else 0,))


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, _eps, rms = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_bias = bias is not None


def _norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.funzero.norm_bwd(dy, x, weight, mean, rstd, ctx.rms, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None, None


torch.library.register_autograd("funzero::norm_fwd", _norm_backward, setup_context=_norm_setup_context)


class _Norm(torch.autograd.Function):
    """The custom op's forward and backward without its dispatcher: eager calls (``direct_call``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        y, mean, rstd = _norm_fwd_triton(x, weight, bias, eps, rms)
        _norm_setup_context(ctx, (x, weight, bias, eps, rms), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _norm_bwd_triton(dy, x, weight, mean, rstd, ctx.rms, ctx.has_bias)
        return dx, dw, (db if ctx.has_bias else None), None, None


def _norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool) -> Tensor:
    if direct_call(x, weight, bias):
        return _Norm.apply(x, weight, bias, eps, rms)
    return torch.ops.funzero.norm_fwd(x, weight, bias, eps, rms)[0]


def _residual_norm_bwd(dy, dr, x, weight, eps, has_bias):
    """residual_norm's backward: dx, dw, db, dres (statistics recomputed from x)."""
    tile, pps, warps = (_TILE, _PROGRAMS_PER_SM, None) if INTERPRET else _RES_BWD
    return _norm_bwd_triton(dy, x, weight, None, None, False, has_bias, dr=dr, eps=eps, tile=tile,
                            programs_per_sm=pps, num_warps=warps)


@torch.library.custom_op("funzero::residual_norm_bwd", mutates_args=())
def _residual_norm_bwd_op(dy: Tensor, dr: Tensor, x: Tensor, weight: Tensor, eps: float,
                          has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _residual_norm_bwd(dy, dr, x, weight, eps, has_bias)


@_residual_norm_bwd_op.register_fake
def _(dy, dr, x, weight, eps, has_bias):
    D = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty((D,)),
            weight.new_empty((D if has_bias else 0,)), weight.new_empty((D,)))


class _ResidualNorm(torch.autograd.Function):
    """Forward: plain ops, for inductor to fuse (the bias add into the residual add downstream,
    the norm with whatever writes x). Backward: one pass over x and both incoming gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual_bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.has_bias, ctx.res_dtype = eps, bias is not None, residual_bias.dtype
        return x + residual_bias, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def backward(ctx, dr, dy):
        x, weight = ctx.saved_tensors
        if direct_call(dy, dr, x):
            dx, dw, db, dres = _residual_norm_bwd(dy, dr, x, weight, ctx.eps, ctx.has_bias)
        else:
            dx, dw, db, dres = torch.ops.funzero.residual_norm_bwd(dy, dr, x, weight, ctx.eps, ctx.has_bias)
        return dx, dw, (db if ctx.has_bias else None), dres.to(ctx.res_dtype), None


# --------------------------------------------------------------------------- public API


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (D,):
            raise ValueError(f"{name} must have shape ({D},) to match x's last dimension, got {tuple(t.shape)}")


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension, fp32 statistics.

    Args:
        x: (..., D) bf16/fp16/fp32 input.
        weight: (D,) scale.
        bias: optional (D,) shift.
        eps: added to the variance.

    Returns:
        (..., D) tensor in x's dtype. Differentiable in x, weight and bias.

    Example:
        >>> y = layer_norm(torch.randn(8, 1600), torch.ones(1600), torch.zeros(1600))

    References:
        Ba, Kiros & Hinton, "Layer Normalization", 2016.
    """
    _check(x, weight, bias)
    if not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps)
    return _norm(x, weight, bias, float(eps), False)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension, fp32 statistics.

    Args:
        x: (..., D) bf16/fp16/fp32 input.
        weight: (D,) scale.
        eps: added to the mean square.

    Returns:
        (..., D) tensor in x's dtype. Differentiable in x and weight.

    References:
        Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    _check(x, weight, None)
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    return _norm(x, weight, None, float(eps), True)


def residual_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual_bias: Tensor,
                  eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``(x + residual_bias, layer_norm(x))``: the fork at the head of a pre-norm residual branch.

    In a pre-norm block ``x + proj(f(layer_norm(x)))``, pass the output projection's bias here
    and call the projection without it: ``r, h = residual_norm(x, w, b, proj.bias)`` then
    ``r + F.linear(f(h), proj.weight)``, the same sum. The forward is the plain ops (under
    torch.compile the bias add fuses into the residual add). The backward is one Triton pass over
    x and the two incoming gradients: it writes x's gradient (the norm's plus the residual's) and
    the column sums of the norm's weight, its bias and ``residual_bias`` gradients. Unfused, the
    norm's backward reads x and its gradient twice (once for dx, once more for the weight and bias
    sums), and the projection's bias sum reads the residual gradient once more.

    Args:
        x: (..., D) input.
        weight, bias: (D,) the norm's scale and optional shift.
        residual_bias: (D,) added to the residual stream.
        eps: added to the variance.

    Returns:
        ``(x + residual_bias, layer_norm(x))``. Takes the fused backward on Triton tensors with
        autocast off; the plain ops otherwise (same values).

    Example:
        >>> r, h = residual_norm(torch.randn(8, 16), torch.ones(16), torch.zeros(16), torch.zeros(16))
    """
    _check(x, weight, bias)
    D = x.shape[-1]
    if tuple(residual_bias.shape) != (D,):
        raise ValueError(f"residual_bias must have shape ({D},) to match x's last dimension, "
                         f"got {tuple(residual_bias.shape)}")
    if not use_triton(x) or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return x + residual_bias, F.layer_norm(x, (D,), weight, bias, eps)
    _check_width(D)  # here, not first in backward: its forward is plain ops
    return _ResidualNorm.apply(x, weight, bias, residual_bias, float(eps))
