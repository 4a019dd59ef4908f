"""Fused linear + cross-entropy: the chunked Triton path (interpreter) vs full fp32 logits and F.cross_entropy.

Tolerances. fp32: losses within 1e-5 relative, gradients within 1e-5 of their largest reference
magnitude (summation order only). bf16, against the fp32 reference: the kernel path rounds the
logits to bf16 (as any bf16 LM head does), which moves each logit by up to 2**-9 of its size, so
a row's loss by up to 2**-8 of the largest |logit| (a bound; measured up to 2**-8.8) and the
softmax, hence the gradients, by about as much relative: gradients within 2**-8 * max|logit| of
their largest magnitude (measured up to 2**-9.8).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import optree  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _cross_entropy, _dispatch, _linear_cross_entropy  # noqa: E402
from tests._opcheck import close_rel, compiles_to_one_graph, eager_matches_custom_op  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0**-8, 2.0**-8)}  # (loss, gradients), see above


def _data(N, H, V, dtype, seed=0, ignored=(1,)):
    g = torch.Generator().manual_seed(seed + 31 * N + V)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5 * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        if i < N:
            labels[i] = -100
    if N > 2:
        labels[-1] = V - 1  # the last vocabulary column
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, dloss=None, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    dloss = torch.ones_like(loss) if dloss is None else dloss
    dh, dw = torch.autograd.grad(loss, (h, w), dloss)
    return loss.detach(), dh, dw


def _close(got, want, rel):
    close_rel(got, want, rel, floor=1e-30)


def _check_against_reference(hidden, weight, labels, dtype, dloss=None, **kw):
    with fo.backend("triton"):
        got = _loss_and_grads(fo.linear_cross_entropy, hidden, weight, labels, dloss, **kw)
    kw.pop("chunk_size", None)
    ref = _loss_and_grads(fo.reference.linear_cross_entropy, hidden, weight, labels, dloss, **kw)
    tol_loss, tol_grad = TOL[dtype]
    assert got[0].dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], ref[0], rtol=tol_loss, atol=tol_loss)
    else:  # a bound per row, so a sum's bound is the rows' sum
        max_logit = max((hidden.float() @ weight.float().t()).abs().max().item(), 1.0)
        rows = (labels != kw.get("ignore_index", -100)).sum().item() if kw.get("reduction") == "sum" else 1
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=tol_loss * max_logit * rows)
        tol_grad *= max_logit
    _close(got[1], ref[1], tol_grad)
    _close(got[2], ref[2], tol_grad)
    return got


# (N, H, V, chunk): N not a multiple of the chunk, V not a multiple of the kernel's block
# (the interpreter's block + 5), one chunk, one row, the default chunk.
CASES = [(1, 8, 7, None), (13, 16, 101, 4), (13, 16, 101, 13), (6, 8, _cross_entropy._BLOCK_V + 5, 4),
         (20, 12, 300, None)]


@pytest.mark.parametrize("N,H,V,chunk", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_reference(N, H, V, chunk, dtype, reduction):
    hidden, weight, labels = _data(N, H, V, dtype)
    dloss = None
    if reduction == "none":  # per-row incoming gradients: the backward's own chunked pass
        dloss = torch.randn(N, generator=torch.Generator().manual_seed(N))
    _, dh, _ = _check_against_reference(hidden, weight, labels, dtype, dloss, reduction=reduction, chunk_size=chunk)
    if N > 1:
        assert (dh[1] == 0).all()  # the ignored row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy_scales_by_the_incoming_gradient(dtype):
    """The gradients are made in the forward; the backward must still honour grad_output != 1."""
    hidden, weight, labels = _data(11, 8, 50, dtype)
    for reduction in ("mean", "sum"):
        dloss = torch.tensor(-2.75)
        _check_against_reference(hidden, weight, labels, dtype, dloss, reduction=reduction, chunk_size=3)


def test_linear_cross_entropy_ignored_chunks_and_custom_ignore_index():
    """A chunk whose every label is ignored adds nothing; the mean divides by the counted labels."""
    hidden, weight, labels = _data(12, 8, 40, torch.float32, ignored=())
    labels[4:8] = 7  # chunk_size 4: the second chunk is all ignored
    loss, dh, dw = _check_against_reference(hidden, weight, labels, torch.float32, ignore_index=7, chunk_size=4)
    assert (dh[4:8] == 0).all()
    keep = torch.cat([torch.arange(0, 4), torch.arange(8, 12)])
    with fo.backend("triton"):
        loss_kept = fo.linear_cross_entropy(hidden[keep], weight, labels[keep], ignore_index=7)
    torch.testing.assert_close(loss, loss_kept, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_all_ignored_is_zero_not_nan(reduction):
    hidden, weight, _ = _data(5, 8, 30, torch.float32)
    labels = torch.full((5,), -100)
    with fo.backend("triton"):
        loss, dh, dw = _loss_and_grads(fo.linear_cross_entropy, hidden, weight, labels, reduction=reduction,
                                       chunk_size=2)
    ref = _loss_and_grads(fo.reference.linear_cross_entropy, hidden, weight, labels, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all() and (dh == 0).all() and (dw == 0).all()
    assert torch.equal(loss, ref[0]) and (ref[1] == 0).all()  # the reference agrees (torch's own mean is NaN)


def test_linear_cross_entropy_no_rows():
    hidden, weight, labels = _data(0, 8, 30, torch.float32)
    with fo.backend("triton"):
        loss, dh, dw = _loss_and_grads(fo.linear_cross_entropy, hidden, weight, labels)
    assert loss == 0 and dh.shape == (0, 8) and torch.equal(dw, torch.zeros(30, 8))


class _LargestBuffer(TorchFunctionMode):
    """The largest storage behind any tensor that a torch call returns (views count their whole base)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.where = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.where = t.untyped_storage().nbytes(), (getattr(func, "__name__", func), t.shape)
        return out


def test_linear_cross_entropy_never_holds_the_full_logits():
    """With chunks of 16 rows out of 60, the largest buffer of forward + backward is one chunk's
    (16, V) logits; the reference path, measured the same way, makes the (60, V) ones."""
    N, H, V, chunk = 60, 4, 1000, 16
    hidden, weight, labels = _data(N, H, V, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    fused, ref = _LargestBuffer(), _LargestBuffer()
    with fo.backend("triton"), fused:
        assert _dispatch.direct_call(h, w)  # a torch-function mode leaves the eager path in place
        fo.linear_cross_entropy(h, w, labels, chunk_size=chunk).backward()
    with ref:
        fo.reference.linear_cross_entropy(h, w, labels).backward()
    assert fused.nbytes == chunk * V * 4, fused.where
    assert ref.nbytes >= N * V * 4, ref.where
    assert N * V * 4 >= 3 * fused.nbytes


def test_default_chunk_size_bounds_the_logits():
    assert _linear_cross_entropy.default_chunk_size(8192, 128256, torch.bfloat16) == 1024
    assert _linear_cross_entropy.default_chunk_size(16384, 151936, torch.bfloat16) == 512
    assert _linear_cross_entropy.default_chunk_size(100, 50304, torch.float32) == 100  # never more than N
    assert _linear_cross_entropy.default_chunk_size(7, 2**30, torch.float32) == 1
    for n, v, dt in [(8192, 128256, torch.bfloat16), (4096, 32000, torch.float32), (10**6, 50257, torch.float16)]:
        c = _linear_cross_entropy.default_chunk_size(n, v, dt)
        assert c * v * dt.itemsize <= 2**28 < 2 * c * v * dt.itemsize or c == n


def test_linear_cross_entropy_eager_fast_path_matches_custom_op():
    hidden, weight, labels = _data(9, 8, 64, torch.bfloat16)
    eager_matches_custom_op(lambda: _loss_and_grads(fo.linear_cross_entropy, hidden, weight, labels, chunk_size=4),
                            "linear_cross_entropy_fwd")


def test_linear_cross_entropy_only_computes_the_gradients_asked_for(monkeypatch):
    """A frozen head (weight without grad) skips the (V, H) sums; no_grad skips both gradients."""
    calls = []
    real = _linear_cross_entropy._lce_pass
    monkeypatch.setattr(_linear_cross_entropy, "_lce_pass", lambda *a: calls.append(a[-2:]) or real(*a))
    hidden, weight, labels = _data(6, 8, 20, torch.float32)
    with fo.backend("triton"):
        h = hidden.clone().requires_grad_()
        fo.linear_cross_entropy(h, weight, labels).backward()
        with torch.no_grad():
            fo.linear_cross_entropy(h, weight.clone().requires_grad_(), labels)
    assert calls == [(True, False), (False, False)]
    want = torch.autograd.grad(fo.reference.linear_cross_entropy(hidden.requires_grad_(), weight, labels), hidden)[0]
    _close(h.grad, want, 1e-5)


def test_linear_cross_entropy_reuses_the_cross_entropy_kernels(monkeypatch):
    seen = []
    for name in ("_ce_fwd_triton", "_ce_bwd_triton"):
        real = getattr(_cross_entropy, name)
        monkeypatch.setattr(_linear_cross_entropy, name, lambda *a, _r=real, _n=name: seen.append(_n) or _r(*a))
    hidden, weight, labels = _data(10, 8, 20, torch.float32)
    with fo.backend("triton"):
        _loss_and_grads(fo.linear_cross_entropy, hidden, weight, labels, chunk_size=4)
    assert seen == ["_ce_fwd_triton", "_ce_bwd_triton"] * 3  # three chunks


def test_linear_cross_entropy_validation():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        fo.linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match=r"weight \(V, H\).*\(10, 7\)"):
        fo.linear_cross_entropy(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match=r"labels \(N,\) = \(4,\).*\(5,\)"):
        fo.linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        fo.linear_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match="weight.dtype=torch.bfloat16"):
        fo.linear_cross_entropy(h, w.bfloat16(), y)
    with pytest.raises(ValueError, match="chunk_size=0"):
        fo.linear_cross_entropy(h, w, y, chunk_size=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_linear_cross_entropy_torch_compile_fullgraph(backend):
    """Both forms, the gradients-in-forward one (mean) and the second-pass one (none), in one graph; under
    inductor too (the peer's fused loss fails to compile there, see DESIGN.md)."""
    hidden, weight, labels = _data(7, 8, 40, torch.float32)

    def f(h, w, y):
        return fo.linear_cross_entropy(h, w, y, chunk_size=3) * 3.0 + fo.linear_cross_entropy(
            h, w, y, reduction="none", chunk_size=4).square().sum()

    compiles_to_one_graph(f, (hidden.requires_grad_(), weight.requires_grad_(), labels), tol=1e-6, backend=backend)
