"""bias + GeLU (tanh approximation), forward and backward in one pass each.

``y = gelu_tanh(x + bias)`` with the sum and the activation in fp32 (the
unfused bf16 chain would round ``x + bias`` to bf16 first). The backward
recomputes ``z = x + bias`` from the saved inputs instead of saving it, and
reduces the bias gradient like the norms do: per-program partial sums over a
run of row tiles, then a small ``sum(0)``.

tanh is built from ``exp(-2|u|)``, which never overflows: the interpreter
would turn numpy's overflow warning into a test error, and the GPU gains
nothing from libdevice here (the kernel is memory-bound).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import INTERPRET, cast_to, cdiv, configs, next_pow2, num_sms, tl, triton, use_triton

__all__ = ["bias_gelu", "bias_gelu_reference"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TILE = 16384 if INTERPRET else 4096  # elements per program tile (bigger under the interpreter: per-tile cost)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(u):
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.autotune(configs=configs([triton.Config({}, num_warps=w) for w in (8, 4, 16)]), key=["H"])
@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, b_ptr, y_ptr,  # x, y: (M, H) contiguous; b: (H,)
    M, H, K0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = x + b[None, :]
    y = 0.5 * z * (1.0 + _tanh(K0 * (z + 0.044715 * z * z * z)))
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=configs([triton.Config({}, num_warps=w) for w in (8, 4, 16)]), key=["H"])
@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr, x_ptr, b_ptr, dx_ptr, db_part_ptr,  # dy, x, dx: (M, H) contiguous; b: (H,); db_part: (G, H) fp32
    M, H, num_row_tiles, tiles_per_program,
    K0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = pid_m * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_row_tiles)
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = x + b[None, :]
        t = _tanh(K0 * (z + 0.044715 * z * z * z))
        # d/dz [0.5 z (1 + tanh(u))] = 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz
        du_dz = K0 * (1.0 + 3.0 * 0.044715 * z * z)
        dz = dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du_dz)
        tl.store(dx_ptr + offs, cast_to(dz, dx_ptr.dtype.element_ty), mask=mask)
        db_acc += dz  # masked lanes hold dy = 0
    tl.store(db_part_ptr + pid_m * H + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- launchers


def _tile_shape(M: int, H: int) -> tuple[int, int]:
    cap = _TILE if INTERPRET else 1024
    block_n = min(next_pow2(H), cap)
    # Prefer a column block that divides H (6400 = 25 * 256): no half-empty last column tile.
    for cand in (cap, cap // 2, cap // 4, cap // 8):
        if cand >= 128 and H % cand == 0:
            block_n = cand
            break
    block_m = max(1, min(next_pow2(M), _TILE // block_n))
    return block_m, block_n


def _bias_gelu_fwd_triton(x: Tensor, bias: Tensor) -> Tensor:
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()  # (M, H)
    M = x2.shape[0]
    y = torch.empty_like(x2)
    if x2.numel():
        block_m, block_n = _tile_shape(M, H)
        _bias_gelu_fwd_kernel[(cdiv(M, block_m), cdiv(H, block_n))](
            x2, bias, y, M, H, K0=_SQRT_2_OVER_PI, BLOCK_M=block_m, BLOCK_N=block_n)
    return y.view(x.shape)


def _bias_gelu_bwd_triton(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()  # (M, H)
    dy2 = dy.reshape(-1, H).contiguous()
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    block_m, block_n = _tile_shape(M, H)
    num_row_tiles = cdiv(M, block_m)
    col_tiles = cdiv(H, block_n)
    # Row groups: enough programs in total to fill the GPU a few times over.
    groups = max(1, min(num_row_tiles, cdiv(4 * num_sms(x.device), col_tiles)))
    tiles_per_program = cdiv(num_row_tiles, groups)
    groups = max(1, cdiv(num_row_tiles, tiles_per_program))
    db_part = torch.zeros((groups, H), dtype=torch.float32, device=x.device)
    if x2.numel():
        _bias_gelu_bwd_kernel[(groups, col_tiles)](
            dy2, x2, bias, dx, db_part, M, H, num_row_tiles, tiles_per_program,
            K0=_SQRT_2_OVER_PI, BLOCK_M=block_m, BLOCK_N=block_n)
    return dx.view(x.shape), db_part.sum(0).to(bias.dtype)


# --------------------------------------------------------------------------- torch reference


def bias_gelu_reference(x: Tensor, bias: Tensor) -> Tensor:
    """Torch reference of :func:`bias_gelu`: ``gelu_tanh(x + bias)`` in fp32, output in x's dtype."""
    return F.gelu(x.float() + bias.float(), approximate="tanh").to(x.dtype)


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("funzero::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: Tensor, bias: Tensor) -> Tensor:
    return _bias_gelu_fwd_triton(x, bias)


@_bias_gelu_fwd_op.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("funzero::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return _bias_gelu_bwd_triton(dy, x, bias)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.funzero.bias_gelu_bwd(dy, x, bias)
    return dx, dbias


torch.library.register_autograd("funzero::bias_gelu_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """``gelu_tanh(x + bias)``, fused, with the sum and activation in fp32.

    Args:
        x: (..., H) bf16/fp16/fp32 pre-activation (e.g. the output of a
            bias-free matmul).
        bias: (H,) bias added before the activation.

    Returns:
        (..., H) tensor in x's dtype. Differentiable in x and bias (the bias
        gradient is reduced in fp32 and returned in bias's dtype).

    Example:
        >>> y = bias_gelu(torch.randn(8, 6400), torch.zeros(6400))

    References:
        Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", 2016 (eq. for the tanh form).
    """
    if x.dim() < 1 or tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must have shape (H,) with H = x.shape[-1]; got {tuple(x.shape)=}, "
                         f"{tuple(bias.shape)=}")
    if not use_triton(x):
        return bias_gelu_reference(x, bias)
    return torch.ops.funzero.bias_gelu_fwd(x, bias)
