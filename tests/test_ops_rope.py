"""Rotary embedding: the Triton kernel (interpreter) vs HF's formula in fp32.

Tolerances, relative to the largest reference magnitude: fp32 1e-6; bf16 one rounding of an fp32
result (2**-8; both sides compute in fp32 and round once). The cos/sin used here are random, not
HF's duplicated halves, so the kernel's use of each half (and the backward's transpose) is seen.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _dispatch  # noqa: E402
from tests._opcheck import close_rel, compiles_to_one_graph, eager_matches_custom_op  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

TOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8}


def _inputs(B, NQ, NK, T, D, dtype, *, shared_batch=False, unsqueeze_dim=1, seed=0):
    """q, k as HF makes them: ``proj(x).view(B, T, heads, D)``, transposed to (B, heads, T, D) for
    unsqueeze_dim=1 (strided, not contiguous)."""
    g = torch.Generator().manual_seed(seed + B * 100 + T * 10 + D)
    q = torch.randn(B, T, NQ, D, generator=g).to(dtype)
    k = torch.randn(B, T, NK, D, generator=g).to(dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cb = 1 if shared_batch else B
    cos, sin = torch.randn(cb, T, D, generator=g).to(dtype), torch.randn(cb, T, D, generator=g).to(dtype)
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    return q.requires_grad_(), k.requires_grad_(), cos, sin, dq, dk


def _run(fn, q, k, cos, sin, dq, dk, **kw):
    qo, ko = fn(q, k, cos, sin, **kw)
    return (qo.detach(), ko.detach(), *torch.autograd.grad((qo, ko), (q, k), (dq, dk)))


CASES = [  # (B, NQ, NK, T, D): one of everything; GQA; a head size whose half (3) is no power of two
    (1, 1, 1, 1, 2), (2, 4, 2, 5, 8), (3, 6, 1, 7, 6), (1, 3, 3, 4, 64),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["heads-first", "shared-cos", "unsqueeze2"])
def test_rope_matches_reference(case, dtype, layout):
    B, NQ, NK, T, D = case
    dim = 2 if layout == "unsqueeze2" else 1
    q, k, cos, sin, dq, dk = _inputs(*case, dtype, shared_batch=layout == "shared-cos", unsqueeze_dim=dim)
    with fo.backend("triton"):
        got = _run(fo.rope, q, k, cos, sin, dq, dk, unsqueeze_dim=dim)
    # fp32 autograd of the reference, rounded once
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    want = _run(fo.reference.rope, q32, k32, cos.float(), sin.float(), dq.float(), dk.float(), unsqueeze_dim=dim)
    for a, b in zip(got, (t.to(dtype) for t in want)):
        close_rel(a, b, TOL[dtype])
    assert got[0].stride() == q.stride()  # outputs laid out like the inputs


def test_rope_reference_is_hf_apply_rotary_pos_emb():
    """The reference is HF's function (in fp32); on HF's own cos/sin the kernel agrees with both."""
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    rotary = modeling_llama.LlamaRotaryEmbedding(cfg)
    q, k, _, _, dq, dk = _inputs(2, 4, 2, 9, 8, torch.float32)
    cos, sin = rotary(q, torch.arange(3, 12).unsqueeze(0))  # (1, T, hd), positions 3..11
    hf = _run(modeling_llama.apply_rotary_pos_emb, q, k, cos, sin, dq, dk)
    ref = _run(fo.reference.rope, q, k, cos, sin, dq, dk)
    with fo.backend("triton"):
        got = _run(fo.rope, q, k, cos, sin, dq, dk)
    for a, b, c in zip(got, ref, hf):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_rope_falls_back_when_cos_needs_a_gradient():
    q, k, cos, sin, dq, dk = _inputs(1, 2, 2, 3, 4, torch.float32)
    cos.requires_grad_()
    with fo.backend("triton"):
        qo, ko = fo.rope(q, k, cos, sin)
    dcos = torch.autograd.grad((qo, ko), cos, (dq, dk))[0]
    want = torch.autograd.grad(fo.reference.rope(q, k, cos, sin), cos, (dq, dk))[0]
    torch.testing.assert_close(dcos, want)


def test_rope_eager_fast_path_matches_custom_op():
    q, k, cos, sin, dq, dk = _inputs(2, 4, 2, 5, 8, torch.bfloat16)
    ops = eager_matches_custom_op(lambda: _run(fo.rope, q, k, cos, sin, dq, dk), "rope")
    assert ops.count("funzero.rope.default") == 2  # forward, and backward (the same op, transposed)


def test_rope_torch_compile_fullgraph():
    def attn_in(q, k, cos, sin):
        qr, kr = fo.rope(q, k, cos, sin)
        return (qr @ kr.repeat_interleave(2, dim=1).transpose(-1, -2)).square().sum()

    q, k, cos, sin, _, _ = _inputs(2, 4, 2, 5, 8, torch.float32)
    compiles_to_one_graph(attn_in, (q, k, cos, sin))


def test_rope_validation_names_the_shapes():
    q, k, cos, sin = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="unsqueeze_dim=3"):
        fo.rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match=r"cos must be \(2 or 1, 5, 8\).*\(1, 5, 6\)"):
        fo.rope(q, k, torch.randn(1, 5, 6), sin)
    with pytest.raises(ValueError, match=r"k must match.*\(2, 2, 6, 8\)"):
        fo.rope(q, torch.randn(2, 2, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="even, got 7"):
        fo.rope(torch.randn(2, 4, 5, 7), torch.randn(2, 2, 5, 7), torch.randn(1, 5, 7), torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="4-D"):
        fo.rope(q[0], k, cos, sin)


@pytest.mark.slow
def test_swiglu_and_rope_kernels_compile_for_sm90():
    """The real Triton compiler (PTX + ptxas, no GPU) accepts both kernels of each; full tiles get 128-bit loads."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", "from tests._aot_variants import main; main()"], capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines() if line.startswith("ok")] == [
        "ok   _swiglu_fwd_kernel", "ok   _swiglu_bwd_kernel", "ok   _rope_kernel", "ok   _rope_kernel"], res.stdout
