"""linear_gelu and linear_qkv: layers whose forward is plain ops and whose backward runs one fused
Triton pass (interpreter) - against the plain layers, values and every gradient; the head-gradient
kernel on the layouts attention backends return; compiled (fullgraph), through the custom ops, and
in the GPT model."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import funzero.ops as fo  # noqa: E402
from tests._recorder import OpRecorder  # noqa: E402
from funzero.ops import _dispatch  # noqa: E402
from funzero.ops._gelu import _gelu_bwd_tiles  # noqa: E402
from funzero.ops._heads import _heads_grad, _plain  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

# (values and input gradients, weight and bias gradients) relative to each tensor's largest magnitude
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2.0**-7, 2.0**-6)}


def _close(got, want, rel):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(want.float().abs().max().item(), 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * scale)


def _plain_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def _grads(fn, inputs, dys):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    want = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, want, dys))


def _inputs(x_shape, H, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    C = x_shape[-1]
    x = (torch.randn(x_shape, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(H, C, generator=g) * C**-0.5).to(dtype).requires_grad_()
    b = (torch.randn(H, generator=g)).to(dtype).requires_grad_() if bias else None
    return x, w, b


GELU_CASES = [((5, 7), 13), ((3, 4, 20), 130), ((2, 33, 16), 1030)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape,H", GELU_CASES, ids=[f"{'x'.join(map(str, s))}-H{h}" for s, h in GELU_CASES])
def test_linear_gelu_matches_plain_layer(x_shape, H, dtype, bias):
    x, w, b = _inputs(x_shape, H, dtype, bias, seed=H)
    dy = torch.randn(*x_shape[:-1], H).to(dtype)
    inputs = (x, w, b)
    with fo.backend("triton"):
        y = fo.linear_gelu(*inputs)
        assert type(y.grad_fn).__name__ == "_LinearGeluBackward"  # the fused path ran
        got = _grads(fo.linear_gelu, inputs, dy)
    want = _grads(_plain_gelu, inputs, dy)
    rel_a, rel_w = TOL[dtype]
    for i, (g, w_) in enumerate(zip(got, want)):
        _close(g, w_, rel_a if i < 2 else rel_w)


@pytest.mark.parametrize("tile", [(2, 16, 1), (4, 64, 2), (1, 8, 1)])
def test_gelu_backward_tiles_of_any_shape(tile):
    """The GPU tile configurations (many partial rows, ragged last tiles) against torch's gelu_backward."""
    torch.manual_seed(0)
    z, dy = torch.randn(37, 70) * 3, torch.randn(37, 70)
    dz, db = _gelu_bwd_tiles(dy, z, True, tile=tile)
    want = torch.ops.aten.gelu_backward(dy, z, approximate="tanh")
    torch.testing.assert_close(dz, want, rtol=1e-5, atol=1e-5)  # |dz| up to ~3
    torch.testing.assert_close(db, want.sum(0), rtol=1e-5, atol=1e-5)
    dz2, empty = _gelu_bwd_tiles(dy, z, False, tile=tile)
    assert torch.equal(dz2, dz) and empty.numel() == 0


QKV_CASES = [(2, 37, 48, 3), (1, 5, 30, 3), (3, 1, 8, 1)]  # (B, T, C, n_head): hs 16, 10 (not a power of 2), 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("B,T,C,nh", QKV_CASES, ids=[f"B{b}T{t}C{c}h{h}" for b, t, c, h in QKV_CASES])
def test_linear_qkv_matches_plain_layer(B, T, C, nh, dtype, bias):
    """Through attention, so the head gradients arrive in the layout SDPA's backward gives them."""
    x, w, b = _inputs((B, T, C), 3 * C, dtype, bias, seed=T)
    dy = torch.randn(B, nh, T, C // nh).to(dtype)

    def attend(qkv_fn):
        return lambda x, w, b: F.scaled_dot_product_attention(*qkv_fn(x, w, b, nh), is_causal=True)

    inputs = (x, w, b)
    with fo.backend("triton"):
        q, k, v = fo.linear_qkv(x, w, b, nh)
        assert q.shape == (B, nh, T, C // nh) and type(q.grad_fn).__name__ == "_LinearQKVBackward"
        got = _grads(attend(fo.linear_qkv), inputs, dy)
    want = _grads(attend(_plain), inputs, dy)
    rel_a, rel_w = TOL[dtype]
    for i, (g, w_) in enumerate(zip(got, want)):
        _close(g, w_, rel_a if i < 2 else rel_w)


def _cat_heads(dq, dk, dv):
    B, NH, T, HS = dq.shape
    return torch.cat([t.transpose(1, 2).reshape(B, T, NH * HS) for t in (dq, dk, dv)], dim=-1).view(B * T, -1)


@pytest.mark.parametrize("block_t", [None, 4, 1])
def test_heads_grad_reads_any_layout(block_t):
    """q contiguous as (B, nh, T, hs), k as a (B, T, nh, hs) tensor transposed (flash attention's
    layout), v a slice of a wider buffer: the assembled gradient is the concatenation, bit for bit."""
    B, NH, T, HS = 2, 3, 11, 6
    torch.manual_seed(0)
    dq = torch.randn(B, NH, T, HS)
    dk = torch.randn(B, T, NH, HS).transpose(1, 2)
    dv = torch.randn(B, NH, T, 2 * HS)[..., 1:HS + 1]
    g, db = _heads_grad(dq, dk, dv, True, block_t=block_t)
    want = _cat_heads(dq, dk, dv)
    assert torch.equal(g, want)
    torch.testing.assert_close(db, want.sum(0), rtol=1e-6, atol=1e-6)
    g2, empty = _heads_grad(dq, dk, dv, False, block_t=block_t)
    assert torch.equal(g2, want) and empty.numel() == 0


def test_plain_ops_where_the_fused_backward_does_not_apply():
    """Autocast, no grad and the CPU reference backend take the plain layer."""
    x, w, b = _inputs((3, 8), 16, torch.float32, True, seed=1)
    x3 = x.detach().view(1, 3, 8).requires_grad_()
    w3, b3 = w.detach().repeat(3, 1)[:24, :].clone().requires_grad_(), torch.zeros(24, requires_grad=True)
    cases = []
    with fo.backend("triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cases += [fo.linear_gelu(x, w, b), fo.linear_qkv(x3, w3, b3, 2)[0]]
        with torch.no_grad():
            assert fo.linear_gelu(x, w, b).grad_fn is None
    with fo.backend("torch"):
        cases += [fo.linear_gelu(x, w, b), fo.linear_qkv(x3, w3, b3, 2)[0]]
    for y in cases:
        assert not type(y.grad_fn).__name__.startswith("_Linear"), type(y.grad_fn).__name__


def test_validation_names_the_shapes():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight must be \(H, C\).*\(2, 3, 8\).*\(16, 7\)"):
        fo.linear_gelu(x, torch.randn(16, 7))
    with pytest.raises(ValueError, match=r"bias must have shape \(H,\) = \(16,\).*\(15,\)"):
        fo.linear_gelu(x, torch.randn(16, 8), torch.randn(15))
    with pytest.raises(ValueError, match=r"weight \(3C, C_in\).*\(24, 7\)"):
        fo.linear_qkv(x, torch.randn(24, 7), None, 2)
    with pytest.raises(ValueError, match=r"n_head must divide C .* = 8; got n_head=3"):
        fo.linear_qkv(x, torch.randn(24, 8), None, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(3C,\) = \(24,\).*\(8,\)"):
        fo.linear_qkv(x, torch.randn(24, 8), torch.randn(8), 2)


def test_empty_batches():
    with fo.backend("triton"):
        x, w, b = _inputs((0, 8), 16, torch.float32, True, seed=2)
        dx, dw, db = torch.autograd.grad(fo.linear_gelu(x, w, b).sum(), (x, w, b))
        assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(16, 8)) and torch.equal(db, torch.zeros(16))
        x = torch.randn(2, 0, 8, requires_grad=True)
        w, b = torch.randn(24, 8, requires_grad=True), torch.randn(24, requires_grad=True)
        dx, dw, db = torch.autograd.grad(sum(t.sum() for t in fo.linear_qkv(x, w, b, 2)), (x, w, b))
        assert dx.shape == (2, 0, 8) and torch.equal(dw, torch.zeros(24, 8)) and torch.equal(db, torch.zeros(24))


def _block(x, w_qkv, b_qkv, w_fc, b_fc):
    B, T, C = x.shape
    y = F.scaled_dot_product_attention(*fo.linear_qkv(x, w_qkv, b_qkv, 2), is_causal=True)
    return fo.linear_gelu(y.transpose(1, 2).reshape(B, T, C), w_fc, b_fc).square().sum()


def _block_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 9, 16), (48, 16), (48,), (40, 16), (40,)]
    return [(torch.randn(s, generator=g) * 0.5).to(dtype).requires_grad_() for s in shapes]


def test_eager_fast_path_matches_custom_ops():
    """Eager backward calls the launchers directly; under a dispatch mode (as under tracing) the
    registered custom ops run instead, bit-identically."""
    inputs = _block_inputs(torch.bfloat16)
    with fo.backend("triton"):
        fast = torch.autograd.grad(_block(*inputs), inputs)
        rec = OpRecorder()
        with rec:
            via_ops = torch.autograd.grad(_block(*inputs), inputs)
    assert "funzero.gelu_tanh_bwd.default" in rec.ops and "funzero.heads_grad.default" in rec.ops
    for a, b in zip(fast, via_ops):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_to_one_graph(compiler):
    from torch._dynamo.testing import CompileCounterWithBackend

    inputs = _block_inputs()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    with fo.backend("triton"):
        got = torch.autograd.grad(torch.compile(_block, fullgraph=True, backend=counter)(*inputs), inputs)
        want = torch.autograd.grad(_block(*inputs), inputs)
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _graph_nodes(t):
    """The class names of every node of t's autograd graph."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
    return [type(n).__name__ for n in seen]


def test_gpt_config_rejects_two_kernels_for_one_layer():
    from funzero.models import GPTConfig

    with pytest.raises(ValueError, match="'norm' and 'resnorm'"):
        GPTConfig(kernels=("norm", "resnorm"))
    with pytest.raises(ValueError, match="'gelu' and 'mlp'"):
        GPTConfig(kernels=("gelu", "mlp"))


@pytest.mark.parametrize("kernels", [None, ("ce", "mlp", "qkv"), ("resnorm",)], ids=["default", "no-resnorm", "resnorm"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gpt_kernels_match_plain_model(kernels, bias):
    """The example GPT on its kernels on the Triton path: the loss and every parameter's gradient
    equal the plain model's. (Without biases resnorm has no projection bias to move and the blocks
    keep the plain norms.)"""
    from funzero.models import GPT, GPTConfig

    cfg = GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=24, bias=bias)
    if kernels is None:
        assert cfg.kernels == ("ce", "mlp", "qkv", "resnorm")
    else:
        cfg = GPTConfig(**{**cfg.__dict__, "kernels": kernels})
    torch.manual_seed(0)
    fused = GPT(cfg)
    plain = GPT(GPTConfig(**{**cfg.__dict__, "fused": False}))
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 67, (3, 16))
    tgt = torch.randint(0, 67, (3, 16))
    with fo.backend("triton"):
        loss = fused(idx, tgt)
    loss_ref = plain(idx, tgt)
    # 2 blocks x 2 forks when resnorm applies
    assert _graph_nodes(loss).count("_ResidualNormBackward") == (4 if cfg.uses("resnorm") and bias else 0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss, list(fused.parameters()))
    grads_ref = torch.autograd.grad(loss_ref, list(plain.parameters()))
    for (name, _), g, g_ref in zip(fused.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
