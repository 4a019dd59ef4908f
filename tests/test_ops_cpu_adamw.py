"""The host AdamW (a fused C pass, ``backend("auto")`` on CPU tensors) against torch.optim.AdamW.

Same tolerances as the Triton kernel's tests: 1e-6 relative plus 1e-7 absolute over several steps,
the bf16 copy bit for bit against torch's round-to-nearest-even cast.
"""

import platform
import threading

import pytest
import torch

import funzero.ops as fo
from funzero.ops import _cpu_adamw
from tests.test_ops_adamw import _run_torch_optim as _torch_optim

from tests.test_ops_adamw import ATOL, HP, RTOL



def test_the_host_kernel_builds_here():
    # CI has a C compiler (inductor needs one too); without it the torch reference would serve.
    assert _cpu_adamw.available()


def test_the_c_kernel_is_what_auto_runs_on_cpu(monkeypatch):
    calls = []
    real = _cpu_adamw.adamw_cpu_
    monkeypatch.setattr(_cpu_adamw, "adamw_cpu_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    m, g = torch.zeros(8), torch.ones(8)
    fo.adamw_(m, g, torch.zeros(8), torch.zeros(8), lr=1e-3, step=1, **HP)
    assert calls and m.ne(0).all()


@pytest.mark.parametrize("n", [1, 5, 123, 16384 + 7, 1000003])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float32])
def test_matches_torch_optim(n, grad_dtype, out_dtype):
    torch.manual_seed(n)
    p0 = torch.randn(n)
    grads = [torch.randn(n).to(grad_dtype) for _ in range(3)]
    ref_p, ref_m, ref_v = _torch_optim(p0, grads, lr=1e-2)
    master, mu, nu = p0.clone(), torch.zeros(n), torch.zeros(n)
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    for i, g in enumerate(grads):
        fo.adamw_(master, g, mu, nu, out, lr=torch.tensor(1e-2), step=torch.tensor(float(i + 1)), **HP)
    torch.testing.assert_close(master, ref_p, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(mu, ref_m, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(nu, ref_v, rtol=RTOL, atol=ATOL)
    if out is not None:
        assert torch.equal(out, master.to(out_dtype))


def test_grad_scale_and_skip():
    torch.manual_seed(0)
    n = 4099
    p0 = torch.randn(n)
    grads = [torch.randn(n).bfloat16() * 1024 for _ in range(2)]
    ref_p, _, _ = _torch_optim(p0, grads, lr=1e-2, grad_scale=1 / 1024)
    master, mu, nu = p0.clone(), torch.zeros(n), torch.zeros(n)
    scale = torch.tensor(1 / 1024)
    for i, g in enumerate(grads):
        fo.adamw_(master, g, mu, nu, lr=1e-2, step=i + 1, grad_scale=scale, **HP)
    torch.testing.assert_close(master, ref_p, rtol=RTOL, atol=ATOL)
    # a set flag writes nothing at all
    before = [t.clone() for t in (master, mu, nu)]
    out = torch.full((n,), 7.0, dtype=torch.bfloat16)
    fo.adamw_(master, grads[0], mu, nu, out, lr=1.0, step=3, found_inf=torch.tensor(1.0), **HP)
    assert all(torch.equal(a, b) for a, b in zip(before, (master, mu, nu))) and out.eq(7).all()


def test_nonfinite_gradient_gives_nan_where_torch_does():
    n = 64
    master, mu, nu = torch.randn(n), torch.zeros(n), torch.zeros(n)
    g = torch.randn(n)
    g[3], g[10] = float("nan"), float("inf")
    out = torch.empty(n, dtype=torch.bfloat16)
    fo.adamw_(master, g, mu, nu, out, lr=1e-2, step=1, **HP)
    ref = master.to(torch.bfloat16)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[~ref.isnan()], ref[~ref.isnan()])
    assert master[3].isnan() and master[10].isnan() and master.isnan().sum() == 2


def test_threads_do_not_change_the_result_and_are_per_thread():
    torch.manual_seed(1)
    n = 200_003
    runs = []
    for threads in (1, 2):
        gen = torch.Generator().manual_seed(5)
        master, mu, nu, g = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n), torch.randn(n, generator=gen)
        with fo.host_threads(threads):
            assert _cpu_adamw.current_threads() == threads
            fo.adamw_(master, g, mu, nu, lr=1e-3, step=1, **HP)
        runs.append(master)
    assert torch.equal(runs[0], runs[1])
    seen = []
    with fo.host_threads(1):
        t = threading.Thread(target=lambda: seen.append(_cpu_adamw.current_threads()))
        t.start()
        t.join()
    assert seen == [torch.get_num_threads()]  # another thread keeps its own setting
    with pytest.raises(ValueError, match="host_threads needs a positive int"):
        fo.host_threads(0)


def test_unsupported_dtypes_take_the_torch_reference():
    n = 33
    master, mu, nu = torch.randn(n), torch.zeros(n), torch.zeros(n)
    ref = [t.clone() for t in (master, mu, nu)]
    g = torch.randn(n).half()
    out = torch.empty(n, dtype=torch.float16)
    fo.adamw_(master, g, mu, nu, out, lr=1e-2, step=1, **HP)
    with fo.backend("torch"):
        fo.adamw_(ref[0], g, ref[1], ref[2], lr=1e-2, step=1, **HP)
    assert torch.equal(master, ref[0]) and torch.equal(out, master.half())


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _update_slices(n, offsets, grad_dtype, out_dtype, variant, threads, steps=2):
    """The kernel over views at element offsets (so pointers are not 64-byte aligned)."""
    gen = torch.Generator().manual_seed(n)
    om, og, omu, onu, oout = offsets

    def view(off, dtype, fill=None):
        buf = torch.empty(n + off, dtype=dtype) if fill is None else torch.full((n + off,), fill, dtype=dtype)
        return buf[off:]

    master = view(om, torch.float32)
    master.copy_(torch.randn(n, generator=gen))
    p0 = master.clone()
    mu, nu = view(omu, torch.float32, 0.0), view(onu, torch.float32, 0.0)
    out = None if out_dtype is None else view(oout, out_dtype, 0.0)
    grads = []
    for _ in range(steps):
        g = view(og, grad_dtype)
        g.copy_(torch.randn(n, generator=gen))
        grads.append(g)
    with fo.host_threads(threads), _cpu_adamw.host_variant(variant):
        for i, g in enumerate(grads):
            fo.adamw_(master, g, mu, nu, out, lr=1e-2, step=i + 1, **HP)
    return p0, grads, (master, mu, nu, out)


@pytest.mark.parametrize("n", [1, 7, 1000, 4099, 70001])
@pytest.mark.parametrize("offsets", [(0, 0, 0, 0, 0), (1, 3, 5, 2, 7), (16, 9, 16, 16, 3)])
@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                  (torch.bfloat16, None)])
def test_every_variant_gives_the_same_bits(monkeypatch, n, offsets, grad_dtype, out_dtype):
    # streaming stores and thread splits at every size, not only the large ones
    monkeypatch.setattr(_cpu_adamw, "_NT_MIN", 0)
    monkeypatch.setattr(_cpu_adamw, "_MIN_CHUNK", 64)
    p0, grads, ref = _update_slices(n, offsets, grad_dtype, out_dtype, _cpu_adamw.DEFAULT_VARIANT, 1)
    ref_p, ref_m, ref_v = _torch_optim(p0, grads, lr=1e-2)
    torch.testing.assert_close(ref[0], ref_p, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ref[1], ref_m, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ref[2], ref_v, rtol=RTOL, atol=ATOL)
    if out_dtype is not None:
        assert torch.equal(ref[3], ref[0].to(out_dtype))
    for variant in (*_cpu_adamw.VARIANTS, "tile100-pf1", "tile3k-dyn-ntall-pf"):
        for threads in (1, 3):
            _, _, got = _update_slices(n, offsets, grad_dtype, out_dtype, variant, threads)
            for a, b in zip(got, ref):
                assert (a is None and b is None) or torch.equal(_bits(a), _bits(b)), (variant, threads)


def test_variant_selection(monkeypatch):
    assert _cpu_adamw.DEFAULT_VARIANT in _cpu_adamw.VARIANTS
    assert _cpu_adamw.parse_variant("contig") == (0, 0, 0)
    assert _cpu_adamw.parse_variant("tile16k-dyn-ntout-pf8") == (16384, 5, 2048)
    for bad in ("", "contig-dyn", "tile0", "contig-nt", "rows"):
        with pytest.raises(ValueError, match="host AdamW variant"):
            _cpu_adamw.host_variant(bad)
    monkeypatch.setenv("FUNZERO_CPU_ADAMW_VARIANT", "tile16k")
    assert _cpu_adamw.current_variant() == "tile16k"
    with _cpu_adamw.host_variant("contig-pf"):
        assert _cpu_adamw.current_variant() == "contig-pf"
        seen = []
        t = threading.Thread(target=lambda: seen.append(_cpu_adamw.current_variant()))
        t.start()
        t.join()
        assert seen == ["tile16k"]  # per thread, like host_threads
    assert _cpu_adamw.current_variant() == "tile16k"
    monkeypatch.delenv("FUNZERO_CPU_ADAMW_VARIANT")
    assert _cpu_adamw.current_variant() == _cpu_adamw.DEFAULT_VARIANT
    assert _cpu_adamw.nt_bytes() in ((16, 32, 64) if platform.machine() in ("x86_64", "AMD64") else (0,))
