"""The memory model against the engine: byte for byte on real gloo ranks, and its own invariants."""

from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funzero as fz
from funzero import choose_stage, estimate_memory, gpt_activations, layouts_for_num_params, parse_count, testing
from funzero.models import GPT, GPTConfig
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt

PRECISIONS = {"fp32": fz.fp32, "bf16": fz.bf16, "fp16": fz.fp16}
OPTIMIZERS = {
    "adamw": lambda: fz.optim.adamw(1e-2, weight_decay=0.1, fused=False),
    "adamw-fused": lambda: fz.optim.adamw(1e-2, weight_decay=0.1),
    "adamw-accumulate": lambda: fz.optim.multi_steps(fz.optim.adamw(1e-2, fused=False), 2),
    "lion": lambda: fz.optim.lion(1e-3),
    "sgd-momentum": lambda: fz.optim.sgd(1e-2, momentum=0.9),
}
# Every stage in every precision with AdamW, optimizers whose state has another shape, and state
# placed in NVMe files (on this CPU-only machine the one placement that leaves a visible trace).
CASES = [(stage, prec, "adamw", None) for stage in (0, 1, 2, 3) for prec in PRECISIONS] + [
    (1, "bf16", "adamw-accumulate", None),
    (3, "bf16", "adamw-accumulate", None),
    (2, "bf16", "lion", None),
    (3, "fp32", "sgd-momentum", None),
    (1, "bf16", "adamw-accumulate", {"opt_state": "nvme"}),
    (2, "fp32", "adamw", {"opt_state": "nvme"}),
    (3, "bf16", "adamw", {"opt_state": "nvme", "params": "nvme"}),
    # leaf-path rules: one group's optimizer state in files, the others in memory
    # (they need the per-group update: the fused AdamW and an fp32 master)
    (2, "bf16", "adamw-fused", {"opt_state": [(r"^blocks\.1\.", "nvme"), ("", "device")]}),
    (3, "fp16", "adamw-fused", {"opt_state": [(r"^blocks\.0\.", "cpu"), ("", "nvme")]}),
]


def _nvme(placement, root):
    if not placement:
        return None
    return {
        k: f"nvme:{root}" if isinstance(v, str) else [(rx, f"nvme:{root}" if w == "nvme" else w) for rx, w in v]
        for k, v in placement.items()
    }


def _meshes(world):
    """Data-parallel axes of 1, 2 and 4 ranks inside one 4-process world (one spawn, not three).

    One rank: the launcher-free mesh ``Mesh.from_env`` gives a one-process run. Two ranks: the
    ``dp`` axis of a (2, 2) device mesh, so each pair of processes shards between themselves.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from shardspec import Mesh

    pairs = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("pair", "dp"))
    return {
        1: Mesh(("dp",), (1,)),
        2: Mesh(("pair", "dp"), (world // 2, 2), device_mesh=pairs),
        world: Mesh.from_env(("dp",)),
    }


def _measure(rank, world, cases, tmpdir):
    """Bytes the engine really holds on this rank: TrainState, NVMe files, gradients."""
    out = {}
    for n, mesh in _meshes(world).items():
        for i, (stage, prec, opt, placement) in enumerate(cases):
            model = tiny_gpt()
            pl = _nvme(placement, f"{tmpdir}/n{n}r{rank}c{i}")
            plan = fz.zero(stage, mesh=mesh, groups=GROUPS, placement=pl)
            assert plan.num_shards == n
            tx = OPTIMIZERS[opt]()
            state = fz.init(model, tx, plan, precision=PRECISIONS[prec]())
            step = fz.train_step(model, lm_loss, tx, plan)
            grads = testing.gradients(step, state, batches(1)[0])
            files = [t for t in optree.tree_leaves(state, namespace="funzero") if isinstance(t, torch.Tensor)]
            rec = {
                "state": fz.state_nbytes(state),
                "grads": sum(g.numel() * g.element_size() for g in grads.values()),
                "files": sum(t.numel() * t.element_size() for t in files if testing.file_backed(t)),
            }
            del grads
            if stage == 3 and opt.startswith("adamw"):
                with fz.track_gathered() as live:
                    state, _ = step(state, batches(1)[0])
                rec["peak_gathered"] = live.peak
            out[(n, i)] = rec
    return out


def test_estimate_equals_the_bytes_the_engine_holds(tmp_path):
    """TrainState bytes per rank (state_nbytes), bytes in NVMe files and gradient bytes after
    backward, exactly, on data-parallel axes of 1, 2 and 4 gloo ranks.

    tiny_gpt's groups divide evenly over neither 2 nor 4 ranks, so padding is part of the count.
    """
    measured = run_world(_measure, 4, CASES, str(tmp_path))
    for n in (1, 2, 4):
        for i, (stage, prec, opt, placement) in enumerate(CASES):
            est = estimate_memory(
                tiny_gpt(), stage=stage, num_shards=n, precision=PRECISIONS[prec](),
                tx=OPTIMIZERS[opt](), groups=GROUPS, placement=_nvme(placement, "/unused"),
            )
            for rank, per_rank in enumerate(measured):
                got = per_rank[(n, i)]
                where = (n, rank, stage, prec, opt, placement)
                assert dict(est.state) == got["state"], where
                assert est.grads == got["grads"], (where, est.grads, got["grads"])
                assert est.nvme == 2 * got["files"], (where, est.nvme, got["files"])  # + the update's copies
                assert (got["files"] > 0) == bool(placement), where
                if "peak_gathered" in got and n > 1 and not placement:
                    # gather = the (1 + prefetch) largest groups: an upper bound on what was live
                    # (with host params on a CPU-only machine the "gathered" buffer is the state's
                    # own shard, alive anyway, so the count means nothing there)
                    assert got["peak_gathered"] <= 2, where
                    assert est.gather == sum(est.group_sizes[:2]) * est.precision.param_dtype.itemsize


def test_padding_is_counted_and_the_paper_accounting_holds_on_padded_sizes():
    model = tiny_gpt()
    for n in (1, 2, 4, 8):
        for stage in (0, 1, 2, 3):
            est = estimate_memory(model, stage=stage, num_shards=n, precision=fz.bf16(), groups=GROUPS)
            P, S = est.padded, est.padded // n
            assert est.padded > est.num_params  # leaf alignment + shard padding
            want = {0: 16 * P, 1: 4 * P + 12 * S, 2: 2 * P + 14 * S, 3: 16 * S}[stage]
            assert est.model_states["total"] - want == 8, (n, stage)  # + Adam's two int32 counts


@settings(max_examples=60, deadline=None)
@given(
    psi=st.integers(1, 10**13),
    n=st.integers(1, 4096),
    stage=st.integers(0, 3),
    groups=st.integers(1, 64),
)
def test_count_only_estimate_is_the_paper_formula_plus_padding(psi, n, stage, groups):
    groups = min(groups, psi)
    est = estimate_memory(psi, stage=stage, num_shards=n, precision="bf16", num_groups=groups)
    lays = layouts_for_num_params(psi, num_shards=n, num_groups=groups, dtype=torch.bfloat16)
    P = sum(lay.padded for lay in lays.values())
    assert est.num_params == psi and est.padded == P
    assert 0 <= P - psi < groups * n * 64  # shard padding only
    exact = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    got = est.model_states["total"] - 8
    assert exact <= got <= exact + 16 * (P - psi)


def test_binding_meta_module_and_real_module_agree():
    cfg = GPTConfig(block_size=32, vocab_size=101, n_layer=3, n_head=3, n_embd=48)
    real = GPT(cfg)
    with torch.device("meta"):
        meta = GPT(cfg)
    for stage in (0, 3):
        a = estimate_memory(real, stage=stage, num_shards=4, precision="bf16", groups=GROUPS)
        b = estimate_memory(meta, stage=stage, num_shards=4, precision="bf16", groups=GROUPS)
        assert a == b
        assert a.num_params == fz.param_count(real)  # tied lm_head counted once
    plan = fz.zero(2, groups=GROUPS)
    state = fz.init(GPT(cfg), fz.optim.adamw(1e-3), plan, precision=fz.bf16())
    from_binding = estimate_memory(state.binding)
    assert dict(from_binding.state) == fz.state_nbytes(state)
    assert from_binding == estimate_memory(GPT(cfg), plan=plan, precision=fz.bf16())
    offloaded = fz.init(GPT(cfg), fz.optim.adamw(1e-3), fz.zero(2, groups=GROUPS, placement={"opt_state": "cpu"}))
    assert estimate_memory(offloaded.binding).placement == {"params": "gpu", "opt_state": "cpu"}


def test_offload_moves_bytes_without_losing_any():
    model = tiny_gpt()
    kw = dict(num_shards=4, precision="bf16", groups=GROUPS)
    on_gpu = estimate_memory(model, stage=3, **kw)
    opt_cpu = estimate_memory(model, stage=3, placement={"opt_state": "cpu"}, **kw)
    all_cpu = estimate_memory(model, stage=3, placement={"opt_state": "cpu", "params": "cpu"}, **kw)
    nvme = estimate_memory(model, stage=3, placement={"opt_state": "nvme:/scratch"}, **kw)
    opt = on_gpu.state["master"] + on_gpu.state["opt_state"]
    params = on_gpu.state["params"]
    assert on_gpu.cpu == 0 and on_gpu.nvme == 0
    assert opt_cpu.gpu_state == on_gpu.gpu_state - opt
    # the update copies the gradients to the host and writes new params to a pinned copy
    assert opt_cpu.cpu == opt + on_gpu.grads + params
    assert all_cpu.cpu == opt + on_gpu.grads + params  # params live there: no staging copy
    assert all_cpu.gpu_state == on_gpu.gpu_state - opt - params
    assert nvme.nvme == 2 * (opt - 8) and nvme.cpu == 8 + on_gpu.grads + params  # Adam's counts in memory
    assert all_cpu.gpu < opt_cpu.gpu < on_gpu.gpu
    acc = estimate_memory(model, stage=2, tx=fz.optim.multi_steps(fz.optim.adamw(1e-3), 4), placement={"opt_state": "cpu"}, **kw)
    accumulator = (acc.padded // 4) * 4 + 4  # fp32 over this rank's shard (N=4) + its int32 counter
    assert acc.gpu_state == acc.state["params"] + acc.state["step"] + accumulator  # stays on the device


def test_gpu_peak_adds_the_transients():
    est = estimate_memory("7B", stage=3, num_shards=8, precision="bf16", num_groups=32)
    assert est.gpu == est.gpu_state + est.gather + est.grads + est.reduce
    assert est.gather == 2 * est.group_sizes[0] * 2  # two largest groups, bf16
    compiled = estimate_memory("7B", stage=3, num_shards=8, precision="bf16", num_groups=32, compiled=True)
    assert compiled.gather == est.gather  # compiled steps free each group after its forward too
    acts = gpt_activations(GPTConfig(n_layer=32, n_head=32, n_embd=4096), batch=1, seq=1024)
    with_acts = estimate_memory("7B", stage=3, num_shards=8, precision="bf16", num_groups=32, activations=acts)
    assert with_acts.gpu == est.gpu_state + est.gather + max(acts.peak, est.grads + est.reduce)


def _saved_bytes(model: GPT, batch: int, seq: int) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=g)
    tgt = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, tgt)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("fused,recompute", [(False, 0), (True, 0), (True, 2)])
def test_activation_formula_matches_what_autograd_saves(fused, recompute):
    """fp32 on the CPU, where SDPA runs a flash kernel too: within the loss's per-row lse. A
    recomputed block saves only its input."""
    cfg = GPTConfig(block_size=64, vocab_size=96, n_layer=3, n_head=4, n_embd=64, fused=fused, recompute=recompute)
    torch.manual_seed(0)
    got = _saved_bytes(GPT(cfg), 2, 64)
    est = gpt_activations(cfg, batch=2, seq=64, dtype=torch.float32)
    assert abs((est.layers + est.head) - got) <= 4 * 2 * 64, (est.layers + est.head, got)
    # a per-token error in the formula would be a multiple of s*b*h*L bytes: far outside this


def test_activation_estimate_shape_and_checkpointing():
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768)
    a = gpt_activations(cfg, batch=8, seq=1024)
    s, b, h = 1024, 8, 768
    assert a.per_layer == 32 * s * b * h + 4 * 12 * s * b + 16 * s * b
    assert a.layers == 12 * a.per_layer
    assert a.per_layer < 34 * s * b * h < a.korthikanti / 12  # no dropout masks, no (T, T) scores
    c = gpt_activations(cfg, batch=8, seq=1024, checkpoint=True)
    assert c.layers == 12 * 2 * s * b * h and c.peak < a.peak
    part = gpt_activations(GPTConfig(n_layer=12, n_head=12, n_embd=768, recompute=5), batch=8, seq=1024)
    assert part.layers == 5 * 2 * s * b * h + 7 * a.per_layer and c.peak < part.peak < a.peak
    assert not part.checkpoint and gpt_activations(GPTConfig(n_layer=12, n_head=12, n_embd=768, recompute=12),
                                                   batch=8, seq=1024) == c
    assert gpt_activations(cfg, batch=8, seq=1024, dtype=torch.float32).per_layer > a.per_layer


def test_choose_stage_prefers_no_offload_then_the_lowest_stage():
    roomy = choose_stage("1B", num_shards=8, gpu_bytes=80e9, precision="bf16")
    assert (roomy.best.stage, roomy.best.offload) == (0, "none")
    order = [(c.offload, c.stage) for c in roomy.candidates]
    assert order[:4] == [("none", 0), ("none", 1), ("none", 2), ("none", 3)]
    assert order[4:] == [("cpu", 1), ("cpu", 2), ("cpu", 3), ("cpu+params", 3)]
    tight = choose_stage("13B", num_shards=4, gpu_bytes=80e9, cpu_bytes=128e9, precision="bf16", reserve_bytes=8e9)
    assert (tight.best.stage, tight.best.offload) == (3, "none")
    assert "stage 2/none needs GPU" in tight.why
    host = choose_stage("13B", num_shards=1, gpu_bytes=80e9, cpu_bytes=512e9, precision="bf16")
    assert host.best.offload == "cpu" and host.best.fits
    none = choose_stage("1T", num_shards=4, gpu_bytes=8e9, cpu_bytes=16e9, precision="bf16")
    assert none.best is None and none.why.startswith("nothing fits")


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="'7Q'"):
        parse_count("7Q")
    with pytest.raises(ValueError, match="'-3B'"):
        parse_count("-3B")
    assert parse_count("1.5b") == 1_500_000_000 and parse_count("70B") == 70 * 10**9
    with pytest.raises(ValueError, match="stage=4"):
        estimate_memory("1B", stage=4)
    with pytest.raises(ValueError, match="num_shards=0"):
        estimate_memory("1B", stage=1, num_shards=0)
    with pytest.raises(ValueError, match="params='cpu' needs ZeRO stage 3"):
        estimate_memory("1B", stage=2, placement={"params": "cpu"})
    with pytest.raises(ValueError, match="'disk'"):
        estimate_memory("1B", stage=2, placement={"opt_state": "disk"})
    with pytest.raises(ValueError, match="'adafactor'"):
        estimate_memory("1B", stage=2, tx="adafactor")
    with pytest.raises(ValueError, match="gpu_bytes=0"):
        choose_stage("1B", num_shards=1, gpu_bytes=0)
    with pytest.raises(ValueError, match="batch=0"):
        gpt_activations(GPTConfig(), batch=0)


def test_gather_tracker_waits_out_a_backend_reference_but_counts_a_held_buffer():
    """A buffer the engine let go of but the collective backend still holds for a moment is not
    counted (gloo drops its reference from a worker thread); one still held after ``settle``
    (say, by autograd) is."""
    import threading

    from funzero.testing import GatherTracker

    t = GatherTracker(settle=0.5)
    box = {"a": torch.zeros(8)}
    t.add(box["a"])
    t.drop(box["a"])
    timer = threading.Timer(0.02, box.pop, args=("a",))  # the "backend" lets go 20 ms later
    timer.start()
    t.add(torch.zeros(8))
    timer.join()
    assert t.peak == 1 and t.gathers == 2

    held = torch.zeros(8)  # never let go
    t2 = GatherTracker(settle=0.01)
    t2.add(held)
    t2.drop(held)
    t2.add(torch.zeros(8))
    assert t2.peak == 2
