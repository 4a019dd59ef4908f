"""Block int8 quantize / dequantize: Triton kernels (interpreter) vs the torch reference.

Kernel and reference perform the same fp32 operations (IEEE division for the
per-block factor, product, clamp, round half to even), so q, the scales and
the dequantized values must agree bit for bit.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _dispatch  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

CASES = [(n, bs) for n in (1, 5, 123, 256, 1000) for bs in (1, 100, 256)]
CASES += [(65536 * 2, 256), (65536 * 2 + 3, 256), (1000003, 256), (1000003, 100)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _data(n, dtype, block_size, seed=0):
    torch.manual_seed(seed + n)
    x = torch.randn(n) * 3
    if n > block_size + 3:
        x[block_size: 2 * block_size] = 0.0  # an all-zero block: scale 0, q 0
    return x.to(dtype)


@pytest.mark.parametrize("n,block_size", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_roundtrip_bit_exact(n, block_size, dtype):
    x = _data(n, dtype, block_size)
    with fo.backend("triton"):
        q, scales = fo.quantize_int8(x, block_size)
        y = fo.dequantize_int8(q, scales, block_size, dtype=dtype)
    q_ref, scales_ref = fo.reference.quantize_int8(x, block_size)
    y_ref = fo.reference.dequantize_int8(q_ref, scales_ref, block_size, dtype=dtype)
    assert q.dtype == torch.int8 and q.shape == x.shape and scales.dtype == torch.float32
    assert scales.shape == (-(-n // block_size),)
    assert torch.equal(q, q_ref)
    assert torch.equal(scales, scales_ref)
    assert torch.equal(y, y_ref) and y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_properties(dtype):
    """Independent of the reference: range, absmax -> +-127, error <= scale / 2, zero blocks."""
    block_size, n = 64, 64 * 9 + 17
    x = _data(n, dtype, block_size, seed=1)
    with fo.backend("triton"):
        q, scales = fo.quantize_int8(x, block_size)
        y = fo.dequantize_int8(q, scales, block_size, dtype=torch.float32)
    xf = x.float()
    pad = -(-n // block_size) * block_size - n
    blocks = torch.nn.functional.pad(xf, (0, pad)).view(-1, block_size)
    torch.testing.assert_close(scales, blocks.abs().amax(1) / 127, rtol=2e-7, atol=0)
    assert q.abs().max() == 127 and q.min() >= -127
    qb = torch.nn.functional.pad(q.float(), (0, pad)).view(-1, block_size)
    assert (qb.abs().amax(1)[scales > 0] == 127).all()
    assert scales[1] == 0 and (q[block_size: 2 * block_size] == 0).all()
    per_elem_scale = scales.repeat_interleave(block_size)[:n]
    # Half a step, plus the fp32 rounding of q * scale (an ulp of x; ties sit exactly at half).
    assert ((y - xf).abs() <= per_elem_scale * 0.5 + 2.0**-22 * xf.abs()).all()


def test_quantize_ties_round_half_to_even():
    """x * 127 / absmax lands exactly on .5 for these bf16 values: torch.round semantics."""
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5])  # absmax 127: factor exactly 1
    with fo.backend("triton"):
        q, _ = fo.quantize_int8(x, 8)
    assert q.tolist() == [127, 0, 2, 2, -2, 0]


def test_quantize_keeps_shape_and_handles_noncontiguous():
    x = torch.randn(7, 30)[:, ::2]  # (7, 15), not contiguous
    with fo.backend("triton"):
        q, s = fo.quantize_int8(x, 16)
        y = fo.dequantize_int8(q, s, 16, dtype=torch.float32)
    q_ref, s_ref = fo.reference.quantize_int8(x.contiguous(), 16)
    assert q.shape == (7, 15) and torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert y.shape == (7, 15)


def test_quantize_validation():
    with pytest.raises(ValueError, match="block_size"):
        fo.quantize_int8(torch.randn(4), 0)
    with pytest.raises(ValueError, match="floating-point"):
        fo.quantize_int8(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="scales must be fp32 of shape"):
        fo.dequantize_int8(torch.zeros(10, dtype=torch.int8), torch.zeros(2), 4)


def test_quantize_torch_compile_fullgraph():
    def f(x):
        q, s = fo.quantize_int8(x, 32)
        return fo.dequantize_int8(q, s, 32, dtype=torch.bfloat16)

    x = torch.randn(1000)
    torch._dynamo.reset()
    with fo.backend("triton"):
        y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(y, f(x))
