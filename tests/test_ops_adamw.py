"""Fused AdamW and the non-finite pre-pass: the real Triton kernels (interpreter) vs torch.

Tolerances: the fp32 master, mu and nu agree with ``torch.optim.AdamW`` to
1e-6 relative plus 1e-7 absolute (an ulp of an O(1) weight: the kernel may
contract multiply-adds into FMAs, torch does its own rounding), over several
steps. The low-precision copy is compared bit for bit with torch's cast.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _adamw, _dispatch  # noqa: E402

if not _dispatch.INTERPRET:  # pragma: no cover - a setup error, not a test outcome
    raise RuntimeError("tests/test_ops_*.py need TRITON_INTERPRET=1 before funzero.ops is imported")

HP = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
RTOL, ATOL = 1e-6, 1e-7


def _run_torch_optim(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, grad_scale: float = 1.0):
    p = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=lr, betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False, fused=False)
    for g in grads:
        p.grad = g.float() * grad_scale
        opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


@pytest.mark.parametrize("n", [1, 5, 123, 16384 * 2, 1000003])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_torch_optim(n, grad_dtype):
    torch.manual_seed(n)
    steps = 2 if n > 100000 else 4
    p0 = torch.randn(n)
    grads = [torch.randn(n).to(grad_dtype) for _ in range(steps)]
    ref_p, ref_m, ref_v = _run_torch_optim(p0, grads, lr=1e-2)

    master, mu, nu = p0.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    lr, step = torch.tensor(1e-2), torch.tensor(0.0)
    with fo.backend("triton"):
        for g in grads:
            step += 1
            fo.adamw_(master, g, mu, nu, out, lr=lr, step=step, **HP)
    torch.testing.assert_close(master, ref_p, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(mu, ref_m, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(nu, ref_v, rtol=RTOL, atol=ATOL)
    assert torch.equal(out, master.to(torch.bfloat16))  # RNE, bit for bit
    assert not torch.equal(master, p0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adamw_scalar_forms_and_fp16_copy(backend):
    """Python-float lr, integer step (tensor or int), fp16 param_out."""
    n = 777
    torch.manual_seed(0)
    p0, g = torch.randn(n), torch.randn(n)
    ref_p, _, _ = _run_torch_optim(p0, [g, g * 0.5], lr=3e-3)
    master, mu, nu = p0.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.float16)
    with fo.backend(backend):
        fo.adamw_(master, g, mu, nu, out, lr=3e-3, step=torch.tensor(1, dtype=torch.int64), **HP)
        fo.adamw_(master, g * 0.5, mu, nu, out, lr=3e-3, step=2, **HP)
    torch.testing.assert_close(master, ref_p, rtol=RTOL, atol=ATOL)
    assert torch.equal(out, master.to(torch.float16))


@pytest.mark.parametrize("step", [1, 2, 10, 1000, 123457])
def test_adamw_bias_correction_late_steps(step):
    """fp64 bias correction: the kernel agrees with torch's fused CPU kernel at any step."""
    n = 300
    torch.manual_seed(step)
    master, g = torch.randn(n), torch.randn(n)
    mu, nu = torch.randn(n) * 0.1, torch.rand(n) * 0.01
    ref = [t.clone() for t in (master, mu, nu)]
    with fo.backend("triton"):
        fo.adamw_(master, g, mu, nu, lr=torch.tensor(1e-3), step=torch.tensor(float(step)), **HP)
    fo.reference.adamw_(*ref[:1], g, *ref[1:], lr=1e-3, step=torch.tensor(float(step)), **HP)
    for got, want in zip((master, mu, nu), ref):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_adamw_grad_scale(backend, grad_dtype):
    n = 1000
    torch.manual_seed(1)
    p0 = torch.randn(n)
    grads = [(torch.randn(n) * 64).to(grad_dtype) for _ in range(3)]
    ref_p, ref_m, ref_v = _run_torch_optim(p0, grads, lr=1e-2, grad_scale=1 / 64)
    master, mu, nu = p0.clone(), torch.zeros(n), torch.zeros(n)
    scale = torch.tensor(1 / 64)
    kept = [g.clone() for g in grads]
    with fo.backend(backend):
        for i, g in enumerate(grads):
            fo.adamw_(master, g, mu, nu, lr=1e-2, step=torch.tensor(float(i + 1)), grad_scale=scale, **HP)
    torch.testing.assert_close(master, ref_p, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(mu, ref_m, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(nu, ref_v, rtol=RTOL, atol=ATOL)
    for g, k in zip(grads, kept):  # gradients are read, never written
        assert torch.equal(g, k)


def _garbage_state(n: int):
    torch.manual_seed(3)
    master, mu, nu = torch.randn(n), torch.randn(n), torch.rand(n)
    out = torch.randn(n).to(torch.bfloat16)  # deliberately not master's cast: must stay as is
    return master, mu, nu, out


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n", [5, 40000])
def test_adamw_found_inf_set_writes_nothing(backend, n):
    master, mu, nu, out = _garbage_state(n)
    before = [t.clone() for t in (master, mu, nu, out)]
    flag = torch.tensor(1.0)
    with fo.backend(backend):
        fo.adamw_(master, torch.randn(n), mu, nu, out, lr=1.0, step=1, found_inf=flag, **HP)
    for got, want in zip((master, mu, nu, out), before):
        assert torch.equal(got, want)
    assert flag.item() == 1.0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 16384 + 5, 40000 - 1])
def test_adamw_injected_nonfinite_leaves_outputs_untouched(backend, bad, where):
    n = 40000  # two full 16384-element tiles (unmasked) and a masked tail
    master, mu, nu, out = _garbage_state(n)
    before = [t.clone() for t in (master, mu, nu, out)]
    grad = torch.randn(n).to(torch.bfloat16)
    grad[where] = bad
    flag = torch.zeros(())
    with fo.backend(backend):
        fo.adamw_(master, grad, mu, nu, out, lr=1e-2, step=torch.tensor(1.0), found_inf=flag,
                  check_finite=True, **HP)
    assert flag.item() == 1.0
    for got, want in zip((master, mu, nu, out), before):
        assert torch.equal(got, want)


def test_adamw_check_finite_without_flag():
    n = 100
    master, mu, nu, out = _garbage_state(n)
    before = master.clone()
    grad = torch.randn(n)
    grad[7] = float("nan")
    with fo.backend("triton"):
        fo.adamw_(master, grad, mu, nu, out, lr=1e-2, step=1, check_finite=True, **HP)
    assert torch.equal(master, before)
    grad[7] = 0.0
    with fo.backend("triton"):
        fo.adamw_(master, grad, mu, nu, out, lr=1e-2, step=1, check_finite=True, **HP)
    assert not torch.equal(master, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 123, 65536 * 3, 1000003])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nonfinite(dtype, n, backend):
    x = torch.randn(n).to(dtype)
    y = torch.randn(7, 3).to(dtype)
    flag = torch.zeros(())
    with fo.backend(backend):
        fo.nonfinite_([x, y], flag)
        assert flag.item() == 0.0
        x[n - 1] = float("inf")  # the last element: inside the masked tail or the last full tile
        fo.nonfinite_([y, x], flag)
        assert flag.item() == 1.0
        x[n - 1] = 0.0
        fo.nonfinite_([x, y], flag)
        assert flag.item() == 1.0  # flags accumulate, never cleared
        flag.zero_()
        y[2, 1] = float("nan")
        fo.nonfinite_([x, y], flag)
        assert flag.item() == 1.0


def test_nonfinite_large_finite_values_are_finite():
    x = torch.tensor([3.0e38, -3.0e38, 65504.0, 1e-45])
    flag = torch.zeros(())
    with fo.backend("triton"):
        fo.nonfinite_([x, torch.tensor([65504.0, -65504.0, 6e-8], dtype=torch.float16)], flag)
    assert flag.item() == 0.0


def test_adamw_validation():
    n = 8
    m, g, mu, nu = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    with pytest.raises(ValueError, match="master, mu, nu must be fp32"):
        fo.adamw_(m.double(), g, mu, nu, lr=1e-3, step=1, **HP)
    with pytest.raises(ValueError, match="grad must be a contiguous 1-D tensor of 8"):
        fo.adamw_(m, torch.zeros(9), mu, nu, lr=1e-3, step=1, **HP)
    with pytest.raises(ValueError, match="betas"):
        fo.adamw_(m, g, mu, nu, lr=1e-3, step=1, beta1=1.0, beta2=0.9, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="lr must be a 0-d tensor"):
        fo.adamw_(m, g, mu, nu, lr=torch.tensor([1e-3]), step=1, **HP)


def test_adamw_torch_compile_no_recompile():
    """Traces as one opaque node (fullgraph) on both backends; a new lr/step value never recompiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step_fn(master, grad, mu, nu, out, lr, step):
        step += 1
        fo.adamw_(master, grad, mu, nu, out, lr=lr, step=step, **HP)

    n = 300
    torch.manual_seed(0)
    grads = [torch.randn(n).bfloat16() for _ in range(3)]
    results = {}
    for backend, compiler in (("torch", "inductor"), ("triton", "aot_eager")):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(compiler)
        compiled = torch.compile(step_fn, fullgraph=True, backend=counter)
        state = [torch.linspace(-1, 1, n), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)]
        step = torch.tensor(0.0)
        with fo.backend(backend):
            for i, g in enumerate(grads):
                compiled(state[0], g, state[1], state[2], state[3], torch.tensor(1e-2 / (i + 1)), step)
        assert counter.frame_count == 1, f"{backend}: recompiled ({counter.frame_count} frames)"
        assert step.item() == 3.0
        results[backend] = state
    eager = [torch.linspace(-1, 1, n), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)]
    for i, g in enumerate(grads):
        _adamw.adamw_reference_(eager[0], g, eager[1], eager[2], eager[3], lr=torch.tensor(1e-2 / (i + 1)),
                                step=torch.tensor(float(i + 1)), **HP)
    for backend, state in results.items():
        for got, want in zip(state, eager):
            torch.testing.assert_close(got.float(), want.float(), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- per-leaf gradients


def _leaf_layout(shapes, align=16):
    """Offsets of leaves packed with ``align`` padding, like shardspec's FlatLayout."""
    offsets, pos = [], 0
    for s in shapes:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += torch.Size(s).numel()
    return offsets, -(-pos // 64) * 64


# Shapes chosen so that the interpreter's tile (16384) is crossed: whole tiles, ragged last
# tiles, leaves smaller than one tile, and a misaligned start (the unhinted kernel).
LEAF_SHAPES = [(130, 257), (7,), (16384,), (3, 5), (40000,)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("extras", ["plain", "scale+flag"])
def test_adamw_leaves_equals_flat_bit_for_bit(backend, extras):
    """Reading each leaf where it lies == the flat kernel on the scattered gradient, bit for bit
    (master, moments, bf16 copy), with a per-leaf weight decay; padding is left untouched."""
    torch.manual_seed(1)
    offsets, n = _leaf_layout(LEAF_SHAPES)
    grads = [torch.randn(s).bfloat16() for s in LEAF_SHAPES]
    decays = [0.1, 0.0, 0.1, 0.0, 0.05]
    flat_grad = torch.zeros(n, dtype=torch.bfloat16)
    for g, a in zip(grads, offsets):
        flat_grad[a : a + g.numel()] = g.reshape(-1)
    p0 = torch.randn(n)
    kw = {}
    if extras == "scale+flag":
        kw = dict(grad_scale=torch.tensor(0.5), found_inf=torch.tensor(0.0))
    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8)
    flat = [p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)]
    leaves = [p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)]
    with fo.backend(backend):
        for step in (1, 2):
            for g, a, wd in zip(grads, offsets, decays):
                e = a + g.numel()
                fo.adamw_(flat[0][a:e], flat_grad[a:e], flat[1][a:e], flat[2][a:e], flat[3][a:e], lr=torch.tensor(1e-2),
                          step=torch.tensor(float(step)), weight_decay=wd, **hp, **kw)
            fo.adamw_leaves_(leaves[0], grads, offsets, leaves[1], leaves[2], leaves[3], lr=torch.tensor(1e-2),
                             step=torch.tensor(float(step)), weight_decay=decays, **hp, **kw)
    for a, b in zip(flat, leaves):
        assert torch.equal(a, b)
    covered = torch.zeros(n, dtype=torch.bool)
    for g, a in zip(grads, offsets):
        covered[a : a + g.numel()] = True
    assert torch.equal(leaves[0][~covered], p0[~covered])  # padding untouched
    assert not torch.equal(leaves[0][covered], p0[covered])


def test_adamw_leaves_misaligned_and_noncontiguous():
    """A leaf at an offset that is not a multiple of 16 (unhinted kernel) and a transposed
    gradient (per-leaf path) give the flat result too."""
    torch.manual_seed(2)
    g1 = torch.randn(20000).bfloat16()
    g2 = torch.randn(64, 40).bfloat16().t()  # not contiguous
    offsets, n = [3, 20011], 23000
    flat_grad = torch.zeros(n, dtype=torch.bfloat16)
    flat_grad[3:20003] = g1
    flat_grad[20011:22571] = g2.reshape(-1)
    p0 = torch.randn(n)
    hp = dict(lr=1e-2, step=1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ref = [p0.clone(), torch.zeros(n), torch.zeros(n)]
    got = [p0.clone(), torch.zeros(n), torch.zeros(n)]
    with fo.backend("triton"):
        for a, e in ((3, 20003), (20011, 22571)):
            fo.adamw_(ref[0][a:e], flat_grad[a:e], ref[1][a:e], ref[2][a:e], **hp)
        fo.adamw_leaves_(got[0], [g1, g2], offsets, got[1], got[2], **hp)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_adamw_leaves_address_tables_are_reused():
    """The second call with the same gradient buffers finds its address table (no new one)."""
    from funzero.ops._adamw import _LEAF_TABLES

    shapes = [(101,), (3, 11)]  # a layout no other test uses
    offsets, n = _leaf_layout(shapes)
    grads = [torch.randn(s).bfloat16() for s in shapes]
    master, mu, nu = torch.randn(n), torch.zeros(n), torch.zeros(n)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    with fo.backend("triton"):
        fo.adamw_leaves_(master, grads, offsets, mu, nu, step=1, **hp)
        tabs = next(t for k, t in _LEAF_TABLES.items() if k[0] == tuple(offsets))
        first = dict(tabs.addresses)
        fo.adamw_leaves_(master, grads, offsets, mu, nu, step=2, **hp)
        assert tabs.addresses.keys() == first.keys()
        assert all(tabs.addresses[k][0] is first[k][0] for k in first)
        other = [g.clone() for g in grads]  # new buffers: a new table, the old one kept
        fo.adamw_leaves_(master, other, offsets, mu, nu, step=3, **hp)
        assert len(tabs.addresses) == len(first) + 1


def test_adamw_leaves_validation():
    m, mu, nu = torch.zeros(40), torch.zeros(40), torch.zeros(40)
    hp = dict(lr=1e-3, step=1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    a, b = torch.zeros(16), torch.zeros(16)
    with pytest.raises(ValueError, match=r"gradient 1 \(offset 8, 16 elements\) overlaps"):
        fo.adamw_leaves_(m, [a, b], [0, 8], mu, nu, **hp)
    with pytest.raises(ValueError, match=r"gradient 0 \(offset 32, 16 elements\) .* runs past the 40"):
        fo.adamw_leaves_(m, [a], [32], mu, nu, **hp)
    with pytest.raises(ValueError, match="2 gradients but 1 offsets"):
        fo.adamw_leaves_(m, [a, b], [0], mu, nu, **hp)
    with pytest.raises(ValueError, match="2 gradients but 3 weight decays"):
        fo.adamw_leaves_(m, [a, b], [0, 16], mu, nu, **{**hp, "weight_decay": [0.1, 0.1, 0.1]})
    with pytest.raises(ValueError, match=r"gradient 1 is torch.bfloat16, expected .* like gradient 0"):
        fo.adamw_leaves_(m, [a, b.bfloat16()], [0, 16], mu, nu, **hp)
