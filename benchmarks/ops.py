"""funzero.ops on one GPU: correctness against the torch references, then time and memory
against the strongest torch baselines, side by side in one process.

    python benchmarks/ops.py                      # everything (~3-4 min on an H100)
    python benchmarks/ops.py --only adamw,ce      # sections: copy, adamw, norms, gelu, layers, ce, quant, attention
    python benchmarks/ops.py --out runs/ops       # JSON lands in --out (default $OUT, else runs/)
    python benchmarks/ops.py --smoke              # tiny shapes on the CPU, kernels interpreted: checks the script

Method (details in benchmarks/NOTES_ops.md): every section first checks the
Triton kernels against the references on fresh random data (PASS/FAIL), then
times with ``triton.testing.do_bench`` (median; it flushes L2 before each run,
so inputs that would fit in L2 are cold, as in training), and reads peak
memory with ``torch.cuda.max_memory_allocated``. Bandwidths count bytes that
must move (reads + writes) and are compared with a measured device-to-device
copy.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import funzero.ops as fo  # noqa: E402
from funzero.ops import _adamw  # noqa: E402

SECTIONS = ("copy", "adamw", "norms", "gelu", "layers", "ce", "quant", "attention")
T0 = time.time()
RESULTS: dict = {"checks": [], "timings": [], "notes": []}


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()``: do_bench on a GPU, a plain timer in --smoke."""
    if DEVICE.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn) -> tuple:
    """(peak allocated during fn, allocated before fn) in bytes; (None, None) off GPU."""
    if DEVICE.type != "cuda":
        fn()
        return None, None
    sync()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated(), before


def check(section: str, name: str, ok: bool, detail: str = "") -> bool:
    RESULTS["checks"].append({"section": section, "name": name, "pass": bool(ok), "detail": detail})
    log(f"  {'PASS' if ok else 'FAIL'}  {section}: {name} {detail}")
    return ok


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple:
    diff = (got.float() - want.float()).abs()
    bound = atol + rtol * want.float().abs()
    bad = ~(diff <= bound)
    return (not bool(bad.any())), f"max|diff|={diff.max().item():.3g} bad={int(bad.sum())}/{diff.numel()}"


def record(section: str, name: str, ms: float, **extra) -> None:
    row = {"section": section, "name": name, "ms": round(ms, 4), **extra}
    RESULTS["timings"].append(row)
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()]
    log(f"  {section:6s} {name:44s} {ms:9.3f} ms  " + "  ".join(parts))


def free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compiled(fn):
    """torch.compile'd baseline (inductor); eager in --smoke (no compiler needed on CI)."""
    return fn if SMOKE else torch.compile(fn)


# --------------------------------------------------------------------------- copy bandwidth


def bench_copy(cfg) -> None:
    log("copy: device-to-device bandwidth reference")
    n = cfg["copy_numel"]
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * src.element_size() / ms / 1e6  # read + write
    RESULTS["copy_gbps"] = gbps
    record("copy", f"copy_ {src.numel() * 4 / 2**30:.2f} GiB fp32", ms, gbps=gbps)
    del src, dst
    free()


def copy_gbps() -> float:
    return RESULTS.get("copy_gbps") or float("nan")


# --------------------------------------------------------------------------- AdamW


def gpt2_shapes(n_layer: int, n_embd: int, vocab: int, block: int) -> list:
    """Per-tensor parameter shapes of GPT-2 (lm_head tied to wte)."""
    shapes = [(vocab, n_embd), (block, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,),  # ln_1
                   (n_embd, 3 * n_embd), (3 * n_embd,),  # attn.c_attn
                   (n_embd, n_embd), (n_embd,),  # attn.c_proj
                   (n_embd,), (n_embd,),  # ln_2
                   (n_embd, 4 * n_embd), (4 * n_embd,),  # mlp.c_fc
                   (4 * n_embd, n_embd), (n_embd,)]  # mlp.c_proj
    return shapes + [(n_embd,), (n_embd,)]  # ln_f


HP = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def check_adamw(cfg) -> None:
    n = cfg["adamw_check_numel"]
    torch.manual_seed(0)
    p0 = torch.randn(n, device=DEVICE)
    grads = [torch.randn(n, device=DEVICE).to(torch.bfloat16) for _ in range(3)]
    ref = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False, fused=False)
    master, mu, nu = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    lr, step = torch.tensor(1e-2, device=DEVICE), torch.zeros((), device=DEVICE)
    for g in grads:
        ref.grad = g.float()
        opt.step()
        step += 1
        fo.adamw_(master, g, mu, nu, out, lr=lr, step=step, **HP)
    ok, detail = close(master, ref.detach(), 1e-6, 1e-7)
    check("adamw", f"master vs torch.optim.AdamW, 3 steps, n={n}", ok, detail)
    check("adamw", "bf16 copy == master.to(bf16) bit for bit", torch.equal(out, master.to(torch.bfloat16)))
    before = [t.clone() for t in (master, mu, nu, out)]
    bad = grads[0].clone()
    bad[n // 2] = float("inf")
    flag = torch.zeros((), device=DEVICE)
    fo.adamw_(master, bad, mu, nu, out, lr=lr, step=step, found_inf=flag, check_finite=True, **HP)
    untouched = all(torch.equal(a, b) for a, b in zip((master, mu, nu, out), before))
    check("adamw", "injected inf: flag set, outputs bit-identical", untouched and flag.item() == 1.0)
    scale = torch.tensor(0.5, device=DEVICE)
    m2, mu2, nu2 = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    fo.adamw_(m2, grads[0], mu2, nu2, lr=lr, step=1, grad_scale=scale, **HP)
    m3, mu3, nu3 = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    with fo.backend("torch"):
        fo.adamw_(m3, grads[0], mu3, nu3, lr=lr, step=1, grad_scale=scale, **HP)
    ok, detail = close(m2, m3, 1e-6, 1e-7)
    check("adamw", "grad_scale vs reference", ok, detail)
    # Per-leaf gradients (aligned leaves take the hinted kernel, an odd offset the plain one, a
    # ragged leaf the masked one) against the flat kernel on the packed gradient: bit for bit.
    sizes, offsets = [4096 * 3, 5000, 4096 * 2 + 7, 33], [0, 12288, 17296, 25500]
    leaf_g = [torch.randn(k, device=DEVICE).to(torch.bfloat16) for k in sizes]
    flat_g = torch.zeros(25536, dtype=torch.bfloat16, device=DEVICE)
    for a, g in zip(offsets, leaf_g):
        flat_g[a : a + g.numel()] = g
    p1 = torch.randn(25536, device=DEVICE)
    got = [p1.clone(), torch.zeros_like(p1), torch.zeros_like(p1), torch.zeros(25536, dtype=torch.bfloat16, device=DEVICE)]
    want = [t.clone() for t in got]
    for st in (1, 2):
        fo.adamw_leaves_(got[0], leaf_g, offsets, got[1], got[2], got[3], lr=lr, step=st, **HP)
        for a, g in zip(offsets, leaf_g):
            e = a + g.numel()
            fo.adamw_(want[0][a:e], flat_g[a:e], want[1][a:e], want[2][a:e], want[3][a:e], lr=lr, step=st, **HP)
    check("adamw", "adamw_leaves_ == adamw_ on the packed gradient, bit for bit",
          all(torch.equal(a, b) for a, b in zip(got, want)))
    del p0, grads, ref, opt, master, mu, nu, out, before, m2, mu2, nu2, m3, mu3, nu3, leaf_g, flat_g, p1, got, want
    free()


def bench_adamw(cfg) -> None:
    log("adamw: correctness")
    check_adamw(cfg)
    shapes = gpt2_shapes(*cfg["gpt2"])
    numels = [math.prod(s) for s in shapes]
    n = sum(numels)
    log(f"adamw: GPT-2 XL shapes, {len(shapes)} tensors, {n / 1e9:.3f} B params")
    lr = torch.tensor(3e-4, device=DEVICE)
    step = torch.tensor(10.0, device=DEVICE)

    # ---- ours: one flat shard (fp32 master/mu/nu, bf16 grad, bf16 param copy)
    master = torch.randn(n, device=DEVICE) * 0.02
    mu, nu = torch.zeros_like(master), torch.zeros_like(master)
    grad = (torch.randn(n, device=DEVICE) * 1e-3).to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    ours_bytes = 28 * n

    def ours(**launch):
        return lambda: _adamw._adamw_triton(master, grad, mu, nu, out, lr, 0.0, step, 0, HP["beta1"], HP["beta2"],
                                            HP["eps"], HP["weight_decay"], None, None, **launch)

    ms_ours = time_ms(lambda: fo.adamw_(master, grad, mu, nu, out, lr=lr, step=step, **HP))
    gbps = ours_bytes / ms_ours / 1e6
    record("adamw", "funzero adamw_ flat (default launch)", ms_ours, gbps=gbps, pct_copy=100 * gbps / copy_gbps())
    # ---- ours, per-leaf gradients (what the engine does on one rank): the same flat state, each
    # leaf's bf16 gradient read where it lies, against packing the flat gradient first (before)
    offsets, pos = [], 0
    for k in numels:
        offsets.append(pos)
        pos += -(-k // 16) * 16
    leaf_master = torch.randn(pos, device=DEVICE) * 0.02
    leaf_mu, leaf_nu = torch.zeros_like(leaf_master), torch.zeros_like(leaf_master)
    leaf_out = torch.empty(pos, dtype=torch.bfloat16, device=DEVICE)
    leaf_grads = [(torch.randn(k, device=DEVICE) * 1e-3).to(torch.bfloat16) for k in numels]
    ms_leaves = time_ms(lambda: fo.adamw_leaves_(leaf_master, leaf_grads, offsets, leaf_mu, leaf_nu, leaf_out,
                                                 lr=lr, step=step, **HP))
    record("adamw", "funzero adamw_leaves_ (per-leaf bf16 grads, no flat copy)", ms_leaves, gbps=ours_bytes / ms_leaves / 1e6,
           pct_copy=100 * ours_bytes / ms_leaves / 1e6 / copy_gbps())
    flat_g = torch.zeros(pos, dtype=torch.bfloat16, device=DEVICE)

    def packed():
        torch._foreach_copy_([flat_g[a : a + g.numel()] for a, g in zip(offsets, leaf_grads)], leaf_grads)
        fo.adamw_(leaf_master, flat_g, leaf_mu, leaf_nu, leaf_out, lr=lr, step=step, **HP)

    ms_packed = time_ms(packed)
    record("adamw", "pack per-leaf grads into a flat buffer + funzero adamw_ (before)", ms_packed,
           speedup_ours=ms_packed / ms_leaves)
    del leaf_master, leaf_mu, leaf_nu, leaf_out, leaf_grads, flat_g
    free()
    scale, flag = torch.tensor(1.0, device=DEVICE), torch.zeros((), device=DEVICE)
    ms = time_ms(lambda: fo.adamw_(master, grad, mu, nu, out, lr=lr, step=step, grad_scale=scale, found_inf=flag,
                                   **HP))
    record("adamw", "funzero adamw_ flat + grad_scale + found_inf", ms, gbps=ours_bytes / ms / 1e6)
    if not SMOKE:
        sweep = []
        for block, warps, per_sm in cfg["adamw_sweep"]:
            ms = time_ms(ours(block=block, num_warps=warps, programs_per_sm=per_sm))
            sweep.append({"block": block, "num_warps": warps, "programs_per_sm": per_sm, "ms": ms,
                          "gbps": ours_bytes / ms / 1e6})
            grid = f"{per_sm} programs/SM, persistent" if per_sm else "one tile per program"
            log(f"    sweep block={block:5d} warps={warps:2d} {grid:28s} {ms:.3f} ms "
                f"{ours_bytes / ms / 1e6:.0f} GB/s")
        best = min(sweep, key=lambda r: r["ms"])
        RESULTS["adamw_sweep"] = sweep
        record("adamw", f"funzero best of sweep (block={best['block']}, warps={best['num_warps']}, "
               f"per_sm={best['programs_per_sm']})", best["ms"], gbps=best["gbps"],
               pct_copy=100 * best["gbps"] / copy_gbps())

    # ---- torch's fused kernel on one flat buffer (fp32 grads: it needs the param dtype)
    grad32 = grad.float()
    steps = [step.clone()]
    ms_flat = time_ms(lambda: torch._fused_adamw_([master], [grad32], [mu], [nu], [], steps, lr=lr, amsgrad=False,
                                                  maximize=False, **_torch_hp()))
    record("adamw", "torch _fused_adamw_ on one flat buffer (fp32 grad)", ms_flat,
           gbps=28 * n / ms_flat / 1e6, speedup_ours=ms_flat / ms_ours)
    del master, mu, nu, grad, grad32, out
    free()

    # ---- torch fused over the per-tensor list (what torch.optim.AdamW(fused=True) runs)
    params = [torch.randn(s, device=DEVICE) * 0.02 for s in shapes]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    state_steps = [torch.tensor(10.0, device=DEVICE) for _ in params]
    grad_dtype = torch.bfloat16
    grads = [(torch.randn(s, device=DEVICE) * 1e-3).to(grad_dtype) for s in shapes]
    try:
        torch._fused_adamw_(params[:1], grads[:1], exp_avgs[:1], exp_avg_sqs[:1], [], state_steps[:1], lr=lr,
                            amsgrad=False, maximize=False, **_torch_hp())
    except RuntimeError as e:  # torch's fused kernel wants grads in the param dtype
        RESULTS["notes"].append(f"torch _fused_adamw_ rejects bf16 grads with fp32 params ({str(e)[:120]}); "
                                "its per-tensor baseline uses fp32 grads (same 28 bytes/param, no bf16 copy)")
        log("  note: torch fused AdamW needs fp32 grads; baseline uses fp32 grads")
        grad_dtype = torch.float32
        grads = [g.float() for g in grads]
        free()
    grad_size = torch.empty((), dtype=grad_dtype).element_size()
    torch_bytes = (4 + grad_size + 4 + 4 + 4 + 4 + 4) * n  # read p, g, m, v; write p, m, v
    ms_list = time_ms(lambda: torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], state_steps, lr=lr,
                                                  amsgrad=False, maximize=False, **_torch_hp()))
    record("adamw", f"torch _fused_adamw_ per-tensor list ({len(params)} tensors, {str(grad_dtype)[6:]} grads)",
           ms_list, gbps=torch_bytes / ms_list / 1e6, speedup_ours=ms_list / ms_ours)
    RESULTS["adamw_speedup_vs_torch_list"] = ms_list / ms_ours
    leaves = [torch.nn.Parameter(p) for p in params]
    for leaf, g in zip(leaves, grads):
        leaf.grad = g.to(leaf.dtype)
    del grads, exp_avgs, exp_avg_sqs
    free()
    opt = torch.optim.AdamW(leaves, lr=3e-4, betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], fused=True)
    opt.step()  # creates the state
    ms_step = time_ms(opt.step)
    record("adamw", "torch.optim.AdamW(fused=True).step()", ms_step, speedup_ours=ms_step / ms_ours)
    del opt, leaves, params
    free()


def _torch_hp() -> dict:
    return dict(beta1=HP["beta1"], beta2=HP["beta2"], weight_decay=HP["weight_decay"], eps=HP["eps"])


# --------------------------------------------------------------------------- norms


def close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float) -> tuple:
    """``close`` with the absolute bound ``rel`` times the larger of ``want``'s largest magnitude and 1."""
    return close(got, want, rel, rel * max(want.float().abs().max().item(), 1.0))


def _grads_close(section, name, got, want, rel) -> None:
    for label, g, w in zip(("out", "dx", "dw", "db"), got, want):
        ok, detail = close_scaled(g, w, rel)
        check(section, f"{name} {label}", ok, detail)


def _fwd_bwd(fn, inputs, dy):
    y = fn(*inputs)
    return (y.detach(), *torch.autograd.grad(y, inputs, dy))


def kernel_table(fn, grad_to_none=None, iters: int = 10) -> list:
    """[(kernel name, us per call)] of ``fn()``'s GPU kernels (profiler), longest first; [] off GPU."""
    if DEVICE.type != "cuda":
        return []
    from collections import defaultdict

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        sync()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            per[e.name] += e.time_range.elapsed_us() / iters
    return sorted(per.items(), key=lambda kv: -kv[1])


def kernel_ms(fn, grad_to_none=None, iters: int = 10):
    """GPU time of ``fn()``'s kernels (profiler, summed per call); None off GPU.

    do_bench of a norm or GeLU forward+backward is bound by host time on the H100
    machine (20-150 us kernels, ~0.5 ms of Python and autograd per call on either
    side), so this is printed beside it: the same work, with the host taken out.
    """
    return table_ms(kernel_table(fn, grad_to_none, iters))


def table_ms(table: list):
    """The summed GPU time (ms) of a ``kernel_table``; None for an empty one (off GPU)."""
    return sum(us for _, us in table) / 1e3 if table else None


def gpu_fields(gpu, io_bytes: int = 0) -> dict:
    """``record`` extras for a GPU kernel time (``kernel_ms``): none off GPU; GB/s when bytes are given."""
    if gpu is None:
        return {}
    return {"gpu_ms": round(gpu, 4), **({"gpu_gbps": io_bytes / gpu / 1e6} if io_bytes else {})}


def _time_fwd_bwd(section: str, name: str, who: str, fn, args, dy, fwd_bytes: int) -> None:
    """Forward alone (no_grad) and forward+backward producing every input's gradient, both sides alike."""
    with torch.no_grad():
        ms_f = time_ms(lambda: fn(*args))
        gpu_f = kernel_ms(lambda: fn(*args))
    ms_fb = time_ms(lambda: fn(*args).backward(dy), grad_to_none=list(args))
    gpu_fb = kernel_ms(lambda: fn(*args).backward(dy), grad_to_none=list(args))
    record(section, f"{name} fwd {who}", ms_f, gbps=fwd_bytes / ms_f / 1e6, **gpu_fields(gpu_f))
    record(section, f"{name} fwd+bwd {who}", ms_fb, **gpu_fields(gpu_fb))


def bench_norms(cfg) -> None:
    log("norms: correctness")
    rows, D = cfg["norm_check_shape"]
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 2.0**-7)):
        x = (torch.randn(rows, D, device=DEVICE) * 2 + 0.3).to(dtype).requires_grad_()
        w = (torch.randn(D, device=DEVICE) * 0.2 + 1).to(dtype).requires_grad_()
        b = (torch.randn(D, device=DEVICE) * 0.2).to(dtype).requires_grad_()
        dy = torch.randn(rows, D, device=DEVICE).to(dtype)
        _grads_close("norms", f"layer_norm {str(dtype)[6:]} ({rows}x{D})",
                     _fwd_bwd(fo.layer_norm, (x, w, b), dy), _fwd_bwd(fo.reference.layer_norm, (x, w, b), dy), rel)
        _grads_close("norms", f"rms_norm {str(dtype)[6:]} ({rows}x{D})",
                     _fwd_bwd(fo.rms_norm, (x, w), dy), _fwd_bwd(fo.reference.rms_norm, (x, w), dy), rel)
    free()

    M, D = cfg["norm_shape"]
    log(f"norms: time, bf16 ({M}x{D})")
    x = torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16)
    io_fwd = 2 * M * D * 2  # read x, write y (bf16)
    ln_torch = compiled(lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5))
    rms_eager = F.rms_norm if hasattr(F, "rms_norm") else None
    rms_torch = compiled(lambda x, w: rms_eager(x, (D,), w, 1e-6)) if rms_eager else \
        compiled(lambda x, w: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w)
    cases = (("layer_norm", fo.layer_norm, ln_torch, (x, w, b)), ("rms_norm", fo.rms_norm, rms_torch, (x, w)))
    for name, ours, theirs, args in cases:
        with torch.no_grad():
            theirs(*args)  # compile outside the timing
        for who, fn in (("funzero", ours), ("torch.compile", theirs)):
            _time_fwd_bwd("norms", name, who, fn, args, dy, io_fwd)
    del x, w, b, dy
    free()


# --------------------------------------------------------------------------- bias + GeLU


def bench_gelu(cfg) -> None:
    log("gelu: correctness")
    rows, H = cfg["gelu_check_shape"]
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 2.0**-7)):
        x = (torch.randn(rows, H, device=DEVICE) * 3).to(dtype).requires_grad_()
        bias = torch.randn(H, device=DEVICE).to(dtype).requires_grad_()
        dy = torch.randn(rows, H, device=DEVICE).to(dtype)
        _grads_close("gelu", f"bias_gelu {str(dtype)[6:]} ({rows}x{H})",
                     _fwd_bwd(fo.bias_gelu, (x, bias), dy), _fwd_bwd(fo.reference.bias_gelu, (x, bias), dy), rel)
    free()

    M, H = cfg["gelu_shape"]
    log(f"gelu: time, bf16 ({M}x{H})")
    x = torch.randn(M, H, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(H, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, H, device=DEVICE, dtype=torch.bfloat16)
    theirs = compiled(lambda x, b: F.gelu(x + b, approximate="tanh"))
    with torch.no_grad():
        theirs(x, bias)
    for who, fn in (("funzero", fo.bias_gelu), ("torch.compile", theirs)):
        _time_fwd_bwd("gelu", "bias_gelu", who, fn, (x, bias), dy, 2 * M * H * 2)
    del x, bias, dy
    free()


# --------------------------------------------------------------------------- layers: fused backward passes


def _peer_gelu_bwd(dy, z):
    """What inductor makes of the unfused MLP backward: GeLU's gradient, then its column sum."""
    dz = torch.ops.aten.gelu_backward(dy, z, approximate="tanh")
    return dz, dz.sum(0)


def _peer_heads_grad(dq, dk, dv):
    """Autograd's unfused qkv backward under inductor: concatenate the heads, then the column sum."""
    B, NH, T, HS = dq.shape
    g = torch.cat([t.transpose(1, 2).reshape(B, T, NH * HS) for t in (dq, dk, dv)], dim=-1).view(B * T, -1)
    return g, g.sum(0)


def _peer_resnorm_bwd(dy, dr, x, mean, rstd, w, b):
    """Inductor's unfused backward of a pre-norm fork: LayerNorm's backward from the saved statistics,
    the residual gradient added, and the column sum of it (the output projection's bias gradient)."""
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy, x, (x.shape[-1],), mean, rstd, w, b,
                                                           [True, True, True])
    return dx + dr, dw, db, dr.sum(0)


def _head_grads(B, NH, T, HS):
    """dq, dk, dv as causal SDPA's backward returns them (its layout), from a fused projection."""
    C = NH * HS
    qkv = torch.randn(B, T, 3 * C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.view(B, T, NH, HS).transpose(1, 2) for t in qkv.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.autograd.grad(y, (q, k, v), torch.randn_like(y))


def bench_layers(cfg) -> None:
    """The backward passes the model's ``mlp``, ``qkv`` and ``resnorm`` kernels fuse, alone (ours against
    inductor's code for the same unfused math) and with their layer around them (fwd+bwd under
    torch.compile, ours against the plain layer)."""
    from funzero.ops._gelu import _GRAD_TILE, _gelu_bwd_tiles
    from funzero.ops._heads import _BLOCK_T, _NUM_WARPS, _heads_grad
    from funzero.ops._norms import _RES_BWD, _norm_bwd_triton

    M, H = cfg["gelu_shape"]
    log(f"layers: GeLU backward with the bias sum, bf16 ({M}x{H})")
    z = (torch.randn(M, H, device=DEVICE) * 2).to(torch.bfloat16)
    dy = torch.randn(M, H, device=DEVICE, dtype=torch.bfloat16)
    peer = compiled(_peer_gelu_bwd)
    want = peer(dy, z)
    got = _gelu_bwd_tiles(dy, z, True)
    for label, g, w, rel in (("dz", got[0], want[0], 2.0**-8), ("db", got[1], want[1], 2.0**-7)):
        ok, detail = close_scaled(g, w, rel)
        check("layers", f"gelu backward {label}", ok, detail)
    io = 3 * M * H * 2  # read dy, z; write dz (bf16)
    for tile in cfg["gelu_tile_sweep"] or [_GRAD_TILE]:
        ms = time_ms(lambda: _gelu_bwd_tiles(dy, z, True, tile=tile))
        record("layers", f"gelu bwd funzero tile={tile}{' (default)' if tuple(tile) == _GRAD_TILE else ''}", ms,
               gbps=io / ms / 1e6)
    ms = time_ms(lambda: peer(dy, z))
    record("layers", "gelu bwd torch.compile (gelu_backward, sum)", ms, gbps=io / ms / 1e6)
    del z, dy, want, got
    free()

    for B, NH, T, HS in cfg["attention_shapes"]:
        shape = f"B={B} nh={NH} T={T} hs={HS}"
        log(f"layers: q/k/v gradient assembly with the bias sum, bf16 ({shape})")
        dq, dk, dv = _head_grads(B, NH, T, HS)
        peer = compiled(_peer_heads_grad)
        want = peer(dq, dk, dv)
        got = _heads_grad(dq, dk, dv, True)
        check("layers", f"heads grad g bit-equal ({shape}; strides {dq.stride()})", torch.equal(got[0], want[0]))
        ok, detail = close_scaled(got[1], want[1], 2.0**-7)
        check("layers", f"heads grad db ({shape})", ok, detail)
        io = 2 * 3 * B * T * NH * HS * 2
        for bt, warps in cfg["heads_sweep"] or [(_BLOCK_T, _NUM_WARPS)]:
            ms = time_ms(lambda: _heads_grad(dq, dk, dv, True, block_t=bt, num_warps=warps))
            default = " (default)" if (bt, warps) == (_BLOCK_T, _NUM_WARPS) else ""
            record("layers", f"heads grad funzero {shape} block_t={bt} warps={warps}{default}", ms, gbps=io / ms / 1e6)
        ms = time_ms(lambda: peer(dq, dk, dv))
        record("layers", f"heads grad torch.compile (cat, sum) {shape}", ms, gbps=io / ms / 1e6)
        del dq, dk, dv, want, got
        free()

    M, D = cfg["norm_shape"]
    log(f"layers: LayerNorm backward with the residual add and its bias sum, bf16 ({M}x{D})")
    x = (torch.randn(M, D, device=DEVICE) * 2 + 0.3).to(torch.bfloat16)
    w = (torch.randn(D, device=DEVICE) * 0.2 + 1).to(torch.bfloat16)
    b = (torch.randn(D, device=DEVICE) * 0.2).to(torch.bfloat16)
    dy, dr = (torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, (D,), w, b, 1e-5)  # as inductor saves them
    peer = compiled(_peer_resnorm_bwd)
    want = peer(dy, dr, x, mean, rstd, w, b)
    got = _norm_bwd_triton(dy, x, w, None, None, False, True, dr=dr, eps=1e-5)
    for label, g, wt in zip(("dx", "dw", "db", "dres"), got, want):
        rel = 2.0**-7
        ok, detail = close_scaled(g, wt, rel)
        check("layers", f"residual norm backward {label}", ok, detail)
    io = 4 * M * D * 2  # read dy, dr, x; write dx (bf16)
    for tile, pps, warps in cfg["resnorm_sweep"] or [_RES_BWD]:
        def ours(tile=tile, pps=pps, warps=warps):
            return _norm_bwd_triton(dy, x, w, None, None, False, True, dr=dr, eps=1e-5, tile=tile, programs_per_sm=pps,
                                    num_warps=warps)

        # A 26 MB pass is over in ~40 us, less than its Python launch: the GPU kernel time is the figure here.
        ms, gpu = time_ms(ours), kernel_ms(ours)
        default = " (default)" if (tile, pps, warps) == _RES_BWD else ""
        record("layers", f"residual norm bwd funzero tile={tile} programs/SM={pps} warps={warps}{default}", ms,
               **gpu_fields(gpu, io))
    # The same pass reading the forward's saved statistics instead of recomputing them (two fewer row reductions).
    tile, pps, warps = _RES_BWD
    saved = lambda: _norm_bwd_triton(dy, x, w, mean.view(-1), rstd.view(-1), False, True, dr=dr, tile=tile,  # noqa: E731
                                     programs_per_sm=pps, num_warps=warps)
    ok, detail = close_scaled(saved()[0], want[0], 2.0**-7)
    check("layers", "residual norm backward dx, saved statistics", ok, detail)
    ms, gpu = time_ms(saved), kernel_ms(saved)
    record("layers", "residual norm bwd funzero, saved statistics", ms, **gpu_fields(gpu, io))
    theirs = lambda: peer(dy, dr, x, mean, rstd, w, b)  # noqa: E731
    ms, gpu = time_ms(theirs), kernel_ms(theirs)
    record("layers", "residual norm bwd torch.compile (layer_norm_backward, add, sum)", ms, **gpu_fields(gpu, io))
    del x, w, b, dy, dr, mean, rstd, want, got
    free()

    # The forward side of the same fork, as inductor writes it in the compiled step: the residual
    # add (the branch's output and the previous bias) + LayerNorm, compiled by torch.compile and
    # by fz.compile (persistent row reductions up to 2048: one read of each row instead of two).
    import funzero as fz

    xp, branch = (torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    rb, w, b = (torch.randn(D, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))

    def add_norm(xp, branch, rb, w, b):
        xn = xp + rb + branch
        return xn, F.layer_norm(xn, (D,), w, b)

    io = 4 * M * D * 2  # read xp, branch; write x, y (bf16)
    outs = {}
    for who, comp in (("torch.compile", torch.compile), ("fz.compile", fz.compile)):
        torch._dynamo.reset()
        fn = add_norm if SMOKE else comp(add_norm)
        with torch.no_grad():
            outs[who] = fn(xp, branch, rb, w, b)
            run = lambda: fn(xp, branch, rb, w, b)  # noqa: E731
            ms, table = time_ms(run), kernel_table(run)
        gpu = table_ms(table)
        kinds = ", ".join(name[:40] for name, _ in table)
        record("layers", f"residual add + LayerNorm fwd {who} ({M}x{D}){' [' + kinds + ']' if kinds else ''}", ms,
               **gpu_fields(gpu, io))
    for label, g, wt in zip(("x", "y"), outs["fz.compile"], outs["torch.compile"]):
        ok, detail = close_scaled(g, wt, 2.0**-7)
        check("layers", f"residual add + LayerNorm fwd, fz.compile vs torch.compile: {label}", ok, detail)
    del xp, branch, rb, w, b, outs
    free()

    # The layers with their matmuls, fwd+bwd under torch.compile, as in the compiled train step.
    B, NH, T, HS = cfg["attention_shapes"][-1]
    C = NH * HS
    x = torch.randn(B, T, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w_fc = (torch.randn(4 * C, C, device=DEVICE) * 0.02).to(torch.bfloat16).requires_grad_()
    b_fc = torch.zeros(4 * C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w_qkv = (torch.randn(3 * C, C, device=DEVICE) * 0.02).to(torch.bfloat16).requires_grad_()
    b_qkv = torch.zeros(3 * C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    from funzero.ops._heads import _plain

    def attn(qkv_fn):
        def f(x, w, b):
            q, k, v = qkv_fn(x, w, b, NH)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        return f

    cases = (("mlp: linear + GeLU", fo.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
              (x, w_fc, b_fc), (B, T, 4 * C)),
             ("attention: qkv + SDPA", attn(fo.linear_qkv), attn(_plain), (x, w_qkv, b_qkv), (B, T, C)))
    for name, ours, theirs, args, out_shape in cases:
        g = torch.randn(out_shape, device=DEVICE, dtype=torch.bfloat16)
        for who, fn in (("funzero", compiled(ours)), ("torch.compile", compiled(theirs))):
            fn(*args).backward(g)  # compile outside the timing
            ms = time_ms(lambda: fn(*args).backward(g), grad_to_none=list(args))
            gpu = kernel_ms(lambda: fn(*args).backward(g), grad_to_none=list(args))
            record("layers", f"{name} fwd+bwd compiled, {who} ({B}x{T}x{C})", ms, **gpu_fields(gpu))
    del x, w_fc, b_fc, w_qkv, b_qkv
    free()

    # One whole GPT block (1.5B widths), fwd+bwd compiled, on the model's kernels with and without
    # resnorm: GPU kernel time, and where it goes.
    from funzero.models._gpt import Block, GPTConfig

    x = torch.randn(B, T, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, T, C, device=DEVICE, dtype=torch.bfloat16)
    for kernels in (("ce", "mlp", "qkv"), ("ce", "mlp", "qkv", "resnorm")):
        torch.manual_seed(0)
        block = Block(GPTConfig(n_layer=1, n_head=NH, n_embd=C, kernels=kernels)).to(DEVICE, torch.bfloat16)
        fn = compiled(block)
        params = list(block.parameters())
        fn(x).backward(g)
        step = lambda: fn(x).backward(g)  # noqa: E731
        table = kernel_table(step, grad_to_none=[x, *params])
        ms, gpu = time_ms(step, grad_to_none=[x, *params]), table_ms(table)
        name = "+".join(kernels)
        record("layers", f"GPT block fwd+bwd compiled, kernels {name} ({B}x{T}x{C})", ms, **gpu_fields(gpu))
        for kname, us in table[:14]:
            log(f"      {us:8.1f} us  {kname[:110]}")
        del block, fn, params
        free()
    del x, g
    free()


# --------------------------------------------------------------------------- attention


def bench_attention(cfg) -> None:
    """Causal F.scaled_dot_product_attention per backend (torch's flash attention 2, cuDNN,
    memory-efficient) at the GPT-2 shapes of train_step.py: which one GPTConfig.attention picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if DEVICE.type != "cuda":
        backends = {"math": SDPBackend.MATH}
    for B, H, T, D in cfg["attention_shapes"]:
        shape = f"B={B} H={H} T={T} hs={D}"
        q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dy = torch.randn(B, H, T, D, device=DEVICE, dtype=torch.bfloat16)
        flops = 4 * B * H * T * T * D / 2  # causal: half of QK^T and PV
        want = None
        for name, be in backends.items():
            def fn(q, k, v, be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                got = _fwd_bwd(fn, (q, k, v), dy)
            except RuntimeError as e:  # a backend that cannot run this shape says so
                RESULTS["notes"].append(f"attention {name} {shape}: {str(e)[:120]}")
                continue
            if want is None:
                want = got
            else:
                _grads_close("attention", f"{name} vs first backend ({shape})", got, want, 2.0**-6)
            _time_fwd_bwd("attention", f"sdpa {shape}", name, fn, (q, k, v), dy, 4 * B * H * T * D * 2)
            t = {r["name"]: r for r in RESULTS["timings"]}
            fb = t[f"sdpa {shape} fwd+bwd {name}"]
            fb["tflops"] = 3.5 * flops / fb["ms"] / 1e9  # backward ~2.5x the forward's matmul work
        del q, k, v, dy
        free()


# --------------------------------------------------------------------------- cross-entropy


def bench_ce(cfg) -> None:
    log("ce: correctness")
    N, V = cfg["ce_check_shape"]
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2.0**-8)):
        logits = (torch.randn(N, V, device=DEVICE) * 4).to(dtype)
        targets = torch.randint(0, V, (N,), device=DEVICE)
        targets[::7] = -100
        for reduction in ("mean", "none"):
            got_x = logits.clone().requires_grad_()
            got = fo.cross_entropy(got_x, targets, reduction=reduction)
            (got.sum() if reduction == "none" else got).backward()
            want_x = logits.clone().requires_grad_()
            want = fo.reference.cross_entropy(want_x, targets, reduction=reduction)
            (want.sum() if reduction == "none" else want).backward()
            ok, detail = close(got, want.detach(), 2e-6, 2e-6)
            check("ce", f"loss {str(dtype)[6:]} {reduction} ({N}x{V})", ok, detail)
            ok, detail = close(got_x.grad, want_x.grad, 0.0, atol)
            check("ce", f"grad {str(dtype)[6:]} {reduction}", ok, detail)
    free()

    N, V = cfg["ce_shape"]
    log(f"ce: time and peak memory, bf16 logits ({N}x{V})")
    logits = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    torch_ce = lambda x, t: F.cross_entropy(x.float(), t)  # noqa: E731
    torch_ce_c = compiled(torch_ce)
    torch_ce_c(logits, targets).backward()  # compile outside the timing
    logits.grad = None
    peaks = {}
    for who, fn in (("funzero", fo.cross_entropy), ("torch F.cross_entropy(x.float())", torch_ce),
                    ("torch.compile(F.cross_entropy(x.float()))", torch_ce_c)):
        ms_f = time_ms(lambda: fn(logits.detach(), targets))
        ms_fb = time_ms(lambda: fn(logits, targets).backward(), grad_to_none=[logits])
        logits.grad = None
        peak, before = peak_bytes(lambda: fn(logits, targets).backward())
        logits.grad = None
        peaks[who] = peak
        extra = {}
        if peak is not None:
            extra = dict(peak_gib=peak / 2**30, extra_gib=(peak - before) / 2**30)
        record("ce", f"fwd {who}", ms_f)
        record("ce", f"fwd+bwd {who}", ms_fb, **extra)
    if peaks.get("funzero"):
        RESULTS["ce_peak_ratio_vs_torch"] = peaks["funzero"] / peaks["torch F.cross_entropy(x.float())"]
    del logits
    free()

    # LM head + CE: the in-place gradient needs a non-leaf logits buffer.
    d_model = cfg["ce_lm_head_d"]
    h = (torch.randn(N, d_model, device=DEVICE) * 0.05).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(d_model, V, device=DEVICE) * 0.05).to(torch.bfloat16).requires_grad_()
    for who, fn in (("funzero inplace_backward", lambda x, t: fo.cross_entropy(x, t, inplace_backward=True)),
                    ("funzero", fo.cross_entropy), ("torch F.cross_entropy(x.float())", torch_ce)):
        run = lambda: fn(h @ W, targets).backward()  # noqa: E731
        ms = time_ms(run, grad_to_none=[h, W])
        h.grad = W.grad = None
        peak, before = peak_bytes(run)
        h.grad = W.grad = None
        extra = dict(peak_gib=peak / 2**30, extra_gib=(peak - before) / 2**30) if peak is not None else {}
        record("ce", f"lm_head({d_model}->{V}) + CE fwd+bwd, {who}", ms, **extra)
    del h, W
    free()


# --------------------------------------------------------------------------- int8 quantisation


def bench_quant(cfg) -> None:
    log("quant: correctness")
    n = cfg["quant_check_numel"]
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, device=DEVICE) * 3).to(dtype)
        for bs in (256, 100):
            q, s = fo.quantize_int8(x, bs)
            q_ref, s_ref = fo.reference.quantize_int8(x, bs)
            y = fo.dequantize_int8(q, s, bs, dtype=dtype)
            y_ref = fo.reference.dequantize_int8(q_ref, s_ref, bs, dtype=dtype)
            check("quant", f"{str(dtype)[6:]} n={n} block={bs}: q, scales, dequant bit-exact",
                  torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.equal(y, y_ref),
                  f"q mismatches={int((q != q_ref).sum())}")
    free()

    n = cfg["quant_numel"]
    log(f"quant: time, {n / 1e6:.0f} M elements, block 256")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, device=DEVICE).to(dtype)
        esz = x.element_size()
        moved = n * (esz + 1) + (n // 256) * 4
        ms = time_ms(lambda: fo.quantize_int8(x, 256))
        gbps = moved / ms / 1e6
        record("quant", f"quantize_int8 {str(dtype)[6:]}", ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps())
        q, s = fo.quantize_int8(x, 256)
        ms = time_ms(lambda: fo.dequantize_int8(q, s, 256, dtype=dtype))
        gbps = moved / ms / 1e6
        record("quant", f"dequantize_int8 -> {str(dtype)[6:]}", ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps())
        with fo.backend("torch"):
            ms_ref = time_ms(lambda: fo.quantize_int8(x, 256))
        record("quant", f"torch reference quantize {str(dtype)[6:]} (eager)", ms_ref)
        del x, q, s
        free()


# --------------------------------------------------------------------------- main


FULL = dict(
    copy_numel=1 << 30,  # 4 GiB fp32
    attention_shapes=[(16, 16, 1024, 64), (8, 25, 1024, 64)],  # GPT-2 350M B=16, 1.5B B=8
    gpt2=(48, 1600, 50304, 1024),
    adamw_check_numel=10_000_003,
    adamw_sweep=[(1024, 4, 0), (2048, 4, 0), (2048, 8, 0), (4096, 8, 0), (8192, 8, 0),
                 (2048, 4, 8), (4096, 4, 4), (4096, 8, 2), (4096, 8, 4), (8192, 16, 2)],
    norm_check_shape=(4097, 1600), norm_shape=(8 * 1024, 1600),
    gelu_check_shape=(1025, 6400), gelu_shape=(8 * 1024, 6400),
    gelu_tile_sweep=[(32, 128, 4), (16, 128, 2), (32, 64, 2), (64, 128, 8), (8, 512, 4)],
    heads_sweep=[(128, 4), (64, 4), (128, 8), (64, 2)],
    resnorm_sweep=[(2048, 2, 8), (4096, 2, 8), (4096, 1, 8), (2048, 3, 8), (2048, 4, 4), (2048, 2, 4)],
    ce_check_shape=(1031, 50304), ce_shape=(16 * 1024, 50304), ce_lm_head_d=1600,
    quant_check_numel=10_000_003, quant_numel=1 << 28,
)
SMALL = dict(  # --smoke: the script's logic on the CPU through the interpreter
    copy_numel=1 << 16, gpt2=(2, 64, 512, 64), adamw_check_numel=1003, adamw_sweep=[],
    norm_check_shape=(9, 160), norm_shape=(16, 160), gelu_check_shape=(9, 640), gelu_shape=(16, 640),
    gelu_tile_sweep=[], heads_sweep=[], resnorm_sweep=[],
    ce_check_shape=(7, 1000), ce_shape=(8, 1000), ce_lm_head_d=64, quant_check_numel=10_003, quant_numel=1 << 16,
    attention_shapes=[(2, 2, 64, 16)],
)


def summary() -> None:
    t = {r["name"]: r for r in RESULTS["timings"]}
    lines = []

    def ratio(a, b):
        return t[b]["ms"] / t[a]["ms"] if a in t and b in t else float("nan")

    ours = t.get("funzero adamw_ flat (default launch)")
    if ours:
        lines.append(f"adamw: {ours['ms']:.2f} ms, {ours['gbps']:.0f} GB/s = {ours['pct_copy']:.1f}% of copy "
                     f"(target >= 95%); {RESULTS.get('adamw_speedup_vs_torch_list', float('nan')):.2f}x torch fused "
                     "over the per-tensor list (target >= 1.35x)")
    for name in ("layer_norm", "rms_norm", "bias_gelu"):
        if f"{name} fwd+bwd funzero" in t:
            r = ratio(f"{name} fwd+bwd funzero", f"{name} fwd+bwd torch.compile")
            ours, peer = t[f"{name} fwd+bwd funzero"], t.get(f"{name} fwd+bwd torch.compile", {})
            gpu = (f"; GPU kernels alone {ours['gpu_ms'] * 1e3:.0f} vs {peer['gpu_ms'] * 1e3:.0f} us"
                   if "gpu_ms" in ours and "gpu_ms" in peer else "")
            lines.append(f"{name} fwd+bwd: {r:.2f}x the speed of torch.compile (target >= 1.0){gpu}")
    if "fwd+bwd funzero" in t:
        r = ratio("fwd+bwd funzero", "fwd+bwd torch F.cross_entropy(x.float())")
        lines.append(f"cross_entropy fwd+bwd: {r:.2f}x the speed of torch, peak memory "
                     f"{RESULTS.get('ce_peak_ratio_vs_torch', float('nan')):.2f}x torch's (targets: >= 1.0, <= 0.5)")
    for dtype in ("bfloat16", "float32"):
        q = t.get(f"quantize_int8 {dtype}")
        if q:
            lines.append(f"quantize_int8 {dtype}: {q['gbps']:.0f} GB/s = {q['pct_copy']:.1f}% of copy (target >= 80%)")
    failed = [c for c in RESULTS["checks"] if not c["pass"]]
    lines.append(f"correctness: {len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} checks passed"
                 + (": FAILED " + "; ".join(f"{c['section']}: {c['name']}" for c in failed) if failed else ""))
    RESULTS["summary"] = lines
    print("\n==== summary ====", flush=True)
    for line in lines:
        print(line, flush=True)


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs", help="directory for ops_bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if args.smoke:
        DEVICE = torch.device("cpu")
        fo.backend("triton")
        cfg = SMALL
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke)")
        DEVICE = torch.device("cuda")
        cfg = FULL
    import triton

    RESULTS["env"] = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu",
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if DEVICE.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "smoke": args.smoke, "sections": only,
    }
    log(f"env: {RESULTS['env']}")
    if "copy" not in only and any(s in only for s in ("adamw", "quant")):
        only = ["copy"] + only  # bandwidth percentages need the reference
    for section in SECTIONS:
        if section not in only:
            continue
        try:
            globals()[f"bench_{section}"](cfg)
        except Exception as e:  # keep going: one broken section must not hide the others
            RESULTS.setdefault("errors", []).append({"section": section, "error": repr(e)})
            log(f"ERROR in {section}: {e!r}")
            traceback.print_exc()
            free()
    summary()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ops_bench.json")
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)
    log(f"wrote {path}")
    failed = [c for c in RESULTS["checks"] if not c["pass"]]
    return 1 if failed or RESULTS.get("errors") else 0


DEVICE = torch.device("cpu")

if __name__ == "__main__":
    sys.exit(main())
