"""Block-wise symmetric int8 quantisation (for compressed collectives).

Each run of ``block_size`` consecutive elements (of the flattened tensor) gets
one fp32 scale ``absmax / 127``; elements become ``round(x * 127 / absmax)``
in [-127, 127] (round half to even, like ``torch.round``). An all-zero block
has scale 0 and quantises to zeros. The last block may be partial.

The kernel and the torch reference compute the same fp32 operations in the
same order (IEEE division for the per-block factor, product, clamp, round), so
q and the scales agree bit for bit on any device.

Rounding uses the 1.5 * 2**23 trick: adding it pushes the fraction bits out of
an fp32 mantissa, so the hardware's round-to-nearest-even does the work. The
clamp sits between the product and the add on purpose: it keeps the compiler
from contracting ``x * inv + C`` into one FMA, which would round the exact
product instead of the fp32 product that torch rounds.
"""

import torch
from torch import Tensor

from ._dispatch import INTERPRET, cast_to, cdiv, next_pow2, tl, triton, use_triton

__all__ = ["quantize_int8", "dequantize_int8", "quantize_int8_reference", "dequantize_int8_reference"]

_TILE = 65536 if INTERPRET else 8192  # elements per program (rows of whole blocks)
_MAX_BLOCK = 65536
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


# --------------------------------------------------------------------------- kernels


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr,  # x, q: (n,) flat; scale: (blocks,) fp32, written
    n_valid, block_size,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    # One program quantises ROWS consecutive blocks, laid out as a (ROWS, BLOCK) tile.
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = blocks.to(tl.int64)[:, None] * block_size + cols[None, :]
    if MASKED:
        mask = (cols < block_size)[None, :] & (offs < n_valid)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        mask = None
        x = tl.load(x_ptr + offs, eviction_policy="evict_first").to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)  # (ROWS,)
    nonzero = absmax > 0
    safe = tl.where(nonzero, absmax, 1.0)
    inv = tl.where(nonzero, tl.div_rn(tl.full((ROWS,), 127.0, tl.float32), safe), 0.0)
    scale = tl.div_rn(absmax, tl.full((ROWS,), 127.0, tl.float32))
    v = tl.minimum(tl.maximum(x * inv[:, None], -127.0), 127.0)
    r = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    tl.store(q_ptr + offs, r.to(tl.int8), mask=mask)
    if MASKED:
        tl.store(scale_ptr + blocks, scale, mask=blocks.to(tl.int64) * block_size < n_valid)
    else:
        tl.store(scale_ptr + blocks, scale)


@triton.jit
def _dequantize_kernel(
    q_ptr, y_ptr, scale_ptr,  # q, y: (n,) flat; scale: (blocks,) fp32, read
    n_valid, block_size,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = blocks.to(tl.int64)[:, None] * block_size + cols[None, :]
    if MASKED:
        mask = (cols < block_size)[None, :] & (offs < n_valid)
        scale = tl.load(scale_ptr + blocks, mask=blocks.to(tl.int64) * block_size < n_valid, other=0.0)
        q = tl.load(q_ptr + offs, mask=mask, other=0, eviction_policy="evict_first")
    else:
        mask = None
        scale = tl.load(scale_ptr + blocks)
        q = tl.load(q_ptr + offs, eviction_policy="evict_first")
    y = q.to(tl.float32) * scale[:, None]
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _launch(kernel, src: Tensor, dst: Tensor, scales: Tensor, block_size: int) -> None:
    """Runs ``kernel`` from flat (n,) ``src`` to flat (n,) ``dst`` with per-block ``scales``.

    Whole tiles of power-of-two blocks run unmasked (vectorised); the ragged
    rest, and any block size that is not a power of two, runs masked.
    """
    n = src.numel()
    block = next_pow2(block_size)
    rows = max(1, _TILE // block)  # blocks per program
    num_warps = 8 if rows * block >= 4096 else 4
    tile = rows * block_size
    n_main = n - n % tile if block == block_size else 0
    if n_main:
        kernel[(n_main // tile,)](src, dst, scales, n_main, block_size, ROWS=rows, BLOCK=block, MASKED=False,
                                  num_warps=num_warps)
    if n > n_main:
        rest = n - n_main
        kernel[(cdiv(cdiv(rest, block_size), rows),)](
            src[n_main:], dst[n_main:], scales[n_main // block_size:], rest, block_size, ROWS=rows, BLOCK=block,
            MASKED=True, num_warps=num_warps)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _quantize_triton(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    flat = _flat(x)  # (n,)
    q = torch.empty(flat.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((cdiv(flat.numel(), block_size),), dtype=torch.float32, device=x.device)
    if flat.numel():
        _launch(_quantize_kernel, flat, q, scales, block_size)
    return q.view(x.shape), scales


def _dequantize_triton(q: Tensor, scales: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    flat = _flat(q)  # (n,)
    y = torch.empty(flat.shape, dtype=dtype, device=q.device)
    if flat.numel():
        _launch(_dequantize_kernel, flat, y, scales, block_size)
    return y.view(q.shape)


# --------------------------------------------------------------------------- torch references


def quantize_int8_reference(x: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`quantize_int8` (bit-identical results)."""
    n = x.numel()
    blocks = cdiv(n, block_size)
    xf = torch.nn.functional.pad(x.reshape(-1).float(), (0, blocks * block_size - n))
    xf = xf.view(blocks, block_size)  # (blocks, block_size), zero-padded
    absmax = xf.abs().amax(dim=1)  # (blocks,)
    nonzero = absmax > 0
    # Tensor / tensor only: 127.0 / t is reciprocal(t) * 127 and (on CUDA) t / 127.0 is
    # t * (1 / 127); both round twice and move half-way cases away from the kernel's.
    inv = torch.where(nonzero, torch.full_like(absmax, 127.0) / torch.where(nonzero, absmax, 1.0), 0.0)
    q = torch.round((xf * inv[:, None]).clamp(-127.0, 127.0)).to(torch.int8)
    return q.reshape(-1)[:n].view(x.shape), absmax / torch.full_like(absmax, 127.0)


def dequantize_int8_reference(q: Tensor, scales: Tensor, block_size: int = 256,
                              dtype: torch.dtype = torch.float32) -> Tensor:
    """Torch reference of :func:`dequantize_int8` (bit-identical results)."""
    n = q.numel()
    blocks = scales.numel()
    qf = torch.nn.functional.pad(q.reshape(-1).float(), (0, blocks * block_size - n)).view(blocks, block_size)
    return (qf * scales[:, None]).reshape(-1)[:n].to(dtype).view(q.shape)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("funzero::quantize_int8", mutates_args=())
def _quantize_op(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    return _quantize_triton(x, block_size)


@_quantize_op.register_fake
def _(x, block_size):
    return torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format), \
        x.new_empty((cdiv(x.numel(), block_size),), dtype=torch.float32)


@torch.library.custom_op("funzero::dequantize_int8", mutates_args=())
def _dequantize_op(q: Tensor, scales: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return _dequantize_triton(q, scales, block_size, dtype)


@_dequantize_op.register_fake
def _(q, scales, block_size, dtype):
    return torch.empty_like(q, dtype=dtype, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- public API


def _check_block_size(block_size: int) -> None:
    if not 1 <= block_size <= _MAX_BLOCK:
        raise ValueError(f"block_size must lie in [1, {_MAX_BLOCK}], got {block_size=}")


def quantize_int8(x: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantisation per block of the flattened tensor.

    Args:
        x: bf16/fp16/fp32 tensor of any shape and numel.
        block_size: elements per scale (the last block may be partial).

    Returns:
        ``(q, scales)``: q is int8 with x's shape, values in [-127, 127];
        scales is fp32 of shape (ceil(numel / block_size),), ``absmax / 127``.
        Not differentiable.

    Example:
        >>> q, s = quantize_int8(torch.randn(1000))
        >>> x_hat = dequantize_int8(q, s, 256, dtype=torch.float32)  # |x - x_hat| <= s / 2 per block
    """
    _check_block_size(block_size)
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype=}")
    if not use_triton(x):
        return quantize_int8_reference(x, block_size)
    return torch.ops.funzero.quantize_int8(x, int(block_size))


def dequantize_int8(q: Tensor, scales: Tensor, block_size: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_int8`: ``q * scale`` per block, in ``dtype``.

    Args:
        q: int8 tensor of any shape (as returned by :func:`quantize_int8`).
        scales: (ceil(numel / block_size),) fp32 scales.
        block_size: the block size used to quantise.
        dtype: output dtype (fp32, bf16 or fp16; bf16/fp16 rounded to nearest even).

    Returns:
        Tensor of q's shape in ``dtype``.
    """
    _check_block_size(block_size)
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype=}")
    if scales.dim() != 1 or scales.numel() != cdiv(q.numel(), block_size) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be fp32 of shape ({cdiv(q.numel(), block_size)},) for {q.numel()} elements "
                         f"in blocks of {block_size}, got {tuple(scales.shape)} {scales.dtype}")
    if not use_triton(q):
        return dequantize_int8_reference(q, scales, block_size, dtype)
    return torch.ops.funzero.dequantize_int8(q, scales.contiguous(), int(block_size), dtype)
