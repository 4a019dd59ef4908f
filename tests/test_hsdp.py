"""Hierarchical sharding (HSDP, ZeRO++'s hpZ idea) on 4 real gloo ranks: shard within the
``shard`` axis, replicate across ``replicate``.

One spawned world (the module fixture ``world``) runs every scenario that needs ranks: training
at every stage on 2 x 2, 1 x 4, 4 x 1 and flat meshes, collective counts, memory, bf16 and
offload, and a checkpoint saved at 2 x 2 and loaded at flat 1, 2 and 4 and back. The tests
read its results.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import funzero as fz
from funzero import optim, testing
from shardspec import Mesh
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt, torch_reference
from tests.test_checkpoint import _flat, _full, _tensors

STEPS = 4
LAYOUTS = [(2, 2), (1, 4), (4, 1)]  # (replicas, shards)
LLAMA_GROUPS = [r"m\.model\.layers\.(\d+)\."]


# --- helpers that run on every rank ---------------------------------------------------------
def _hsdp(stage, mesh, **kw):
    return fz.zero(stage, mesh=mesh, axis="shard", replicate="replicate", **kw)


def _meshes(world):
    """Every layout of the 4 ranks, as meshes inside one world; ``1`` and ``2``: flat data
    parallelism on one rank and on pairs of ranks (the ``dp`` axis of a (2, 2) device mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    out = {rs: Mesh.from_env(("replicate", "shard"), rs) for rs in LAYOUTS}
    out["flat"] = Mesh.from_env(("dp",))
    out[1] = Mesh(("dp",), (1,))
    out[2] = Mesh(("pair", "dp"), (world // 2, 2), device_mesh=init_device_mesh("cpu", (world // 2, 2),
                                                                                 mesh_dim_names=("pair", "dp")))
    return out


def _plan_for(layout, stage, mesh, **kw):
    return fz.zero(stage, mesh=mesh, **kw) if layout in ("flat", 1, 2) else _hsdp(stage, mesh, **kw)


class _Llama(torch.nn.Module):
    """A tiny HF LlamaForCausalLM called like the GPT (``model(x, y)`` is the loss), so one
    reference loop serves both."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                          use_cache=False)
        self.m = LlamaForCausalLM(cfg).to(dtype)

    def forward(self, x, y):
        return self.m(input_ids=x, labels=y).loss


def _train(make, plan, precision, data, tx=None):
    model = make()
    tx = tx or optim.adamw(1e-2, weight_decay=0.1, fused=False)
    state = fz.init(model, tx, plan, precision=precision)
    step = fz.train_step(model, lm_loss, tx, plan)
    for b in data:
        state, _ = step(state, b)
    return fz.gather_params(state, plan)


def _training(meshes, rank):
    """fp64 GPT at every stage and layout, fp64 Llama at every stage on 2 x 2; bf16 on 2 x 2 and
    flat, with the optimizer state on the host too."""
    data = batches(STEPS)
    gpt = lambda: tiny_gpt(dtype=torch.float64)  # noqa: E731
    fp64 = fz.Precision(torch.float64)
    out = {}
    for layout in [*LAYOUTS, "flat"]:
        for stage in (0, 1, 2, 3):
            plan = _plan_for(layout, stage, meshes[layout], groups=GROUPS)
            out[("gpt", layout, stage)] = _train(gpt, plan, fp64, data)
    for stage in (0, 1, 2, 3):
        plan = _hsdp(stage, meshes[(2, 2)], groups=LLAMA_GROUPS)
        out[("llama", (2, 2), stage)] = _train(_Llama, plan, fp64, data[:3])
    for layout, placement in (((2, 2), None), ((2, 2), {"opt_state": "cpu"}), ("flat", None)):
        plan = _plan_for(layout, 3, meshes[layout], groups=GROUPS, placement=placement)
        out[("bf16", layout, bool(placement))] = _train(tiny_gpt, plan, fz.bf16(), data)
    return out if rank == 0 else None


def _counts(meshes):
    """Collectives of one eager bf16 step per stage on 2 x 2, by (op, tag, axis): calls, elements
    and bytes; and stage 1 under accumulation (two micro-steps, one optimizer step)."""
    out = {}
    for stage in (0, 1, 2, 3):
        for k in (1, 2):
            if k == 2 and stage != 1:
                continue
            model = tiny_gpt()
            plan = _hsdp(stage, meshes[(2, 2)], groups=GROUPS)
            inner = optim.adamw(1e-2, fused=False)
            tx = optim.multi_steps(inner, k) if k > 1 else inner
            state = fz.init(model, tx, plan, precision=fz.bf16())
            step = fz.train_step(model, lm_loss, tx, plan)
            with fz.count_comm() as c:
                for b in batches(k):
                    state, _ = step(state, b)
            lays = state.binding.layouts.values()
            out[(stage, k)] = dict(
                padded=sum(lay.padded for lay in lays), groups=len(lays),
                by_axis={what: dict(c.by_axis[what]) for what in ("calls", "elements", "bytes")},
            )
    return out


def _memory(meshes):
    """What init allocates and what backward holds on 2 x 2, per stage and in one offload case."""
    out = {}
    for stage, placement in [(0, None), (1, None), (2, None), (3, None), (2, {"opt_state": "cpu"})]:
        model = tiny_gpt()
        plan = _hsdp(stage, meshes[(2, 2)], groups=GROUPS, placement=placement)
        tx = optim.adamw(1e-2, fused=False)
        state = fz.init(model, tx, plan, precision=fz.bf16())
        grads = testing.gradients(fz.train_step(model, lm_loss, tx, plan), state, batches(1)[0])
        est = fz.estimate_memory(state.binding, tx=tx)
        out[(stage, bool(placement))] = dict(
            state=fz.state_nbytes(state), grads=sum(g.numel() * g.element_size() for g in grads.values()),
            est_state=dict(est.state), est_grads=est.grads, binding_replicas=state.binding.num_replicas,
        )
    return out


def _make(stage, plan):
    model = tiny_gpt(dtype=torch.float64, seed=3)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1))
    return model, tx, fz.init(model, tx, plan, precision=fz.Precision(torch.float64))


def _checkpoints(meshes, rank, root):
    """Save at 2 x 2 (stage 3) after two steps; load into a fresh 2 x 2 and resume, and load at
    flat 1, 2 and 4 ranks (stages 1 and 3) and save again there; a 1-rank copy loads back into
    2 x 2 and resumes."""
    data = batches(4)
    plan = _hsdp(3, meshes[(2, 2)], groups=GROUPS)
    model, tx, state = _make(3, plan)
    step = fz.train_step(model, lm_loss, tx, plan)
    for b in data[:2]:
        state, _ = step(state, b)
    saved = _tensors(state)
    fz.save_state(state, plan, f"{root}/hsdp")
    for b in data[2:]:
        state, _ = step(state, b)
    want = _tensors(state)
    out = {"moved": not all(torch.equal(a, b) for a, b in zip(saved, want))}
    # Hugging Face-layout weights: one writer for the whole world, the files hold the state.
    written = fz.save_weights(state, plan, f"{root}/weights")
    full = fz.gather_params(state, plan)
    with fz.open_weights(f"{root}/weights") as src:
        out["weights"] = (written, all(torch.equal(src.read(k), v.reshape(-1)) for k, v in full.items()))

    def resume(src):
        model2, tx2, fresh = _make(3, plan)
        fresh = fz.load_state(fresh, plan, src)
        loaded = _tensors(fresh)
        step2 = fz.train_step(model2, lm_loss, tx2, plan)
        for b in data[2:]:
            fresh, _ = step2(fresh, b)
        return (all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True)),
                all(torch.equal(a, b) for a, b in zip(want, _tensors(fresh), strict=True)))

    out["resume 2x2"] = resume(f"{root}/hsdp")
    # Flat worlds: every rank alone (1), pairs (2), all four (4), at stages 1 and 3.
    for n, where in ((1, f"r{rank}"), (2, f"p{rank // 2}"), (4, "all")):
        mesh = meshes["flat"] if n == 4 else meshes[n]
        for stage in (1, 3):
            flat = fz.zero(stage, mesh=mesh, groups=GROUPS)
            _, _, fresh = _make(stage, flat)
            fresh = fz.load_state(fresh, flat, f"{root}/hsdp")
            fz.save_state(fresh, flat, f"{root}/flat{n}-s{stage}-{where}")
    # Back into 2 x 2 from what one rank saved alone.
    fz.wait_saves()
    out["resume from 1"] = resume(f"{root}/flat1-s3-r0")
    return out


def _everything(rank, world, root):
    meshes = _meshes(world)
    return dict(training=_training(meshes, rank), counts=_counts(meshes), memory=_memory(meshes),
                checkpoints=_checkpoints(meshes, rank, root))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    return run_world(_everything, 4, str(root), timeout=600), str(root)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --- training --------------------------------------------------------------------------------
def test_every_stage_and_layout_trains_like_one_process(world):
    """fp64: every (replicas, shards) layout at every stage lands within 1e-10 of plain
    single-process PyTorch (the GPT and an HF Llama); the 1 x 4 layout is flat data parallelism
    on the same group, bit for bit."""
    got = world[0][0]["training"]
    ref = torch_reference(tiny_gpt(dtype=torch.float64), batches(STEPS))
    for layout in [*LAYOUTS, "flat"]:
        for stage in (0, 1, 2, 3):
            params = got[("gpt", layout, stage)]
            assert params.keys() == ref.keys()
            for k in ref:
                assert _rel(params[k], ref[k]) < 1e-10, (layout, stage, k, _rel(params[k], ref[k]))
            if layout == (1, 4):
                flat = got[("gpt", "flat", stage)]
                assert all(torch.equal(params[k], flat[k]) for k in ref), stage
    ref = torch_reference(_Llama(), batches(STEPS)[:3])
    for stage in (0, 1, 2, 3):
        params = got[("llama", (2, 2), stage)]
        assert params.keys() == ref.keys()
        for k in ref:
            assert _rel(params[k], ref[k]) < 1e-10, ("llama", stage, k, _rel(params[k], ref[k]))


def test_bf16_and_offload_compose_with_hsdp(world):
    """bf16 stage 3 on 2 x 2 is flat 4-rank training to bf16 rounding; with the optimizer state
    on the host it is the same bits as on the device."""
    got = world[0][0]["training"]
    hsdp, hosted, flat = (got[("bf16", (2, 2), False)], got[("bf16", (2, 2), True)], got[("bf16", "flat", False)])
    for k in flat:
        assert torch.equal(hsdp[k], hosted[k]), k
        assert _rel(hsdp[k], flat[k]) < 1e-2, (k, _rel(hsdp[k], flat[k]))
    moved = [k for k in flat if not torch.equal(tiny_gpt().state_dict()[k], flat[k])]
    assert moved, "training changed nothing: the comparison above means nothing"


# --- collectives -----------------------------------------------------------------------------
def test_collective_counts_and_bytes_follow_the_formulas(world):
    """Per group and optimizer step on 2 replicas x 2 shards (P padded elements, G groups; bf16
    parameters, fp32 reduce; an all-reduce counts 2x its elements, a reduce-scatter or
    all-gather the full buffer):

    stage 0: one all-reduce of the gradient over replicate x shard (2P);
    stages 1-2: a reduce-scatter over shard (P), an all-reduce of the shard over replicate
    (2P/S: 1/S of the gradient crosses replicas), an all-gather of the updated params over
    shard (P); stage 3: the reduce as in 1-2 and two all-gathers (forward, backward; 2P).
    Every layout adds the loss and the non-finite flag, one scalar each over every rank.
    """
    counts = world[0][0]["counts"]
    S = 2
    for (stage, k), c in counts.items():
        for r in world[0]:
            assert r["counts"][(stage, k)] == c  # the same on every rank
        P, G = c["padded"], c["groups"]
        grad = {0: {("all_reduce", "grad", ("replicate", "shard")): (G, 2 * P)}}.get(stage, {
            ("reduce_scatter", "grad", "shard"): (G, P),
            ("all_reduce", "grad", ("replicate",)): (G, 2 * P // S),
        })
        gather = {0: {}, 1: {("all_gather", "param", "shard"): (G, P)}, 2: {("all_gather", "param", "shard"): (G, P)},
                  3: {("all_gather", "param", "shard"): (2 * G * k, 2 * P * k)}}[stage]
        metrics = {("all_reduce", "metrics", ("replicate", "shard")): (k + 1, 2 * (k + 1))}
        want = {**grad, **gather, **metrics}
        assert c["by_axis"]["calls"] == {key: n for key, (n, _) in want.items()}, (stage, k)
        assert c["by_axis"]["elements"] == {key: e for key, (_, e) in want.items()}, (stage, k)
        itemsize = {"grad": 4, "param": 2, "metrics": 4}
        assert c["by_axis"]["bytes"] == {key: e * itemsize[key[1]] for key, (_, e) in want.items()}, (stage, k)


# --- memory ----------------------------------------------------------------------------------
def test_estimate_equals_what_init_allocates_on_2x2(world):
    """Per-rank bytes on 2 x 2 are those of 2 shards: the estimate, from the binding and from
    bare arguments (num_shards=2, num_replicas=2), equals state_nbytes and the gradient bytes."""
    for r in world[0]:
        for (stage, offload), m in r["memory"].items():
            assert m["binding_replicas"] == 2
            assert m["state"] == m["est_state"], (stage, offload)
            assert m["grads"] == m["est_grads"], (stage, offload)
            kw = dict(stage=stage, num_shards=2, precision=fz.bf16(), tx=optim.adamw(1e-2, fused=False), groups=GROUPS,
                      placement={"opt_state": "cpu"} if offload else None)
            est = fz.estimate_memory(tiny_gpt(), num_replicas=2, **kw)
            assert dict(est.state) == m["state"] and est.grads == m["grads"], (stage, offload)
            assert dict(est.state) == dict(fz.estimate_memory(tiny_gpt(), **kw).state)  # as 2 flat shards


def test_one_shard_many_replicas_reduces_in_the_reduce_dtype():
    """4 x 1 holds what one rank holds, but its gradients are reduced (fp32 under bf16), not the
    one-rank bf16 leaves: the estimate follows the replicas, not only the shard count."""
    kw = dict(stage=2, precision=fz.bf16(), tx=optim.adamw(1e-2, fused=False), groups=GROUPS)
    one, four = fz.estimate_memory(tiny_gpt(), num_shards=1, **kw), fz.estimate_memory(tiny_gpt(), num_shards=1,
                                                                                       num_replicas=4, **kw)
    assert dict(one.state) == dict(four.state)
    assert four.grads == 2 * one.grads  # fp32 reduced vs bf16 local
    with pytest.raises(ValueError, match="num_replicas=0"):
        fz.estimate_memory(tiny_gpt(), num_shards=1, num_replicas=0, **kw)


def test_planner_cli_takes_replicate(capsys):
    from funzero.cli import main

    assert main(["estimate", "--params", "7B", "--gpus", "8", "--nodes", "2", "--replicate", "2", "--offload",
                 "none"]) == 0
    text = capsys.readouterr().out
    assert "sharded over 8 x 2 replicas" in text
    hsdp = fz.estimate_memory("7B", stage=3, num_shards=8, num_replicas=2, precision="bf16")
    assert f"{hsdp.gpu / 1e9:,.2f}" in text
    assert main(["plan", "--gpu-gb", "80", "--params", "7B", "--gpus", "4", "--replicate", "3"]) == 2
    assert "--replicate '3' does not divide the 4 ranks" in capsys.readouterr().err


# --- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_reshards_2x2_to_flat_worlds_and_back(world, tmp_path):
    """Saved at 2 x 2, every element is written once (the index's pieces tile each leaf); loaded
    at flat 1, 2 and 4 ranks (stages 1 and 3) and saved again, every tensor reads back bit for
    bit; a fresh 2 x 2 state resumes bit-exactly from the 2 x 2 save and from a 1-rank copy.
    ``save_weights`` from 2 x 2 writes files that hold the gathered parameters."""
    results, root = world
    for r in results:
        ck = r["checkpoints"]
        assert ck["moved"]
        assert ck["resume 2x2"] == (True, True)
        assert ck["resume from 1"] == (True, True)
        assert ck["weights"] == (results[0]["checkpoints"]["weights"][0], True) and ck["weights"][0]
    src = fz._checkpoint.latest_step(f"{root}/hsdp")
    with open(os.path.join(src, "funzero.json")) as f:
        index = json.load(f)
    for fqn, rec in index["entries"].items():
        numel = 1
        for s in rec["shape"]:
            numel *= s
        covered = sorted((lo, hi) for lo, hi, _ in rec["pieces"] if hi > lo)
        assert sum(hi - lo for lo, hi in covered) == numel, fqn  # once: not per replica
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), fqn
    want = _flat(_full(src, str(tmp_path / "hsdp.pt")))
    dirs = [f"flat{n}-s{s}-{w}" for s in (1, 3) for n, w in ((1, "r0"), (1, "r3"), (2, "p0"), (2, "p1"), (4, "all"))]
    for d in dirs:
        got = _flat(_full(fz._checkpoint.latest_step(f"{root}/{d}"), str(tmp_path / f"{d}.pt")))
        assert got.keys() == want.keys(), d
        for k in want:
            assert torch.equal(got[k], want[k]), (d, k)


# --- bad input -------------------------------------------------------------------------------
def test_bad_axes_raise_naming_the_value():
    mesh = Mesh(("replicate", "shard"), (1, 1))
    with pytest.raises(ValueError, match="'nodes' is not an axis of Mesh"):
        fz.zero(3, mesh=mesh, axis="shard", replicate="nodes")
    with pytest.raises(ValueError, match="'gpus' is not an axis of Mesh"):
        fz.zero(3, mesh=mesh, axis="gpus", replicate="replicate")
    with pytest.raises(ValueError, match="axis 'shard' cannot be both the shard axis and replicated"):
        fz.zero(2, mesh=mesh, axis="shard", replicate="shard")
    with pytest.raises(ValueError, match="replicate names an axis twice"):
        fz.zero(1, mesh=mesh, axis="shard", replicate=("replicate", "replicate"))
    with pytest.raises(ValueError, match="replicate must be a tuple of axis names"):
        fz.STAGES[0]("shard", [3])


def test_specs_say_where_each_gradient_is_reduced():
    """The table, read off the specs: what a gradient is all-reduced over after its
    reduce-scatter (if any), with and without replicas; one axis stays as before."""
    for stage in (0, 1, 2, 3):
        flat, hsdp = fz.STAGES[stage]("dp"), fz.STAGES[stage]("shard", ("replicate",))
        assert flat.replicate == () and flat.data_axes == ("dp",)
        assert hsdp.data_axes == ("replicate", "shard")
        sharded = stage > 0
        assert flat.replicated_axes("grads") == (() if sharded else ("dp",))
        assert hsdp.replicated_axes("grads") == (("replicate",) if sharded else ("replicate", "shard"))
    plan = _hsdp(3, Mesh(("replicate", "shard"), (1, 1)))
    assert (plan.num_replicas, plan.num_shards, plan.num_data_ranks, plan.data_rank) == (1, 1, 1, 0)


# --- compiled --------------------------------------------------------------------------------
def _plan_2x2(stage):
    return _hsdp(stage, Mesh.from_env(("replicate", "shard"), (2, 2)), groups=GROUPS)


@pytest.mark.slow
def test_compiled_hsdp_step_matches_eager():
    """Stages 1 and 3 on 2 x 2 under torch.compile: one graph, no break, eager's parameters."""
    from tests.test_compile import _compiled_vs_eager

    for stage, r in run_world(_compiled_vs_eager, 4, (1, 3), "aot_eager", _plan_2x2)[0].items():
        eager, _, _ = r[False]
        compiled, graphs, breaks = r[True]
        assert graphs == [1, 1, 1] and not breaks, (stage, graphs, list(breaks))
        for k, v in eager.items():
            assert _rel(compiled[k], v) < 1e-10, (stage, k, _rel(compiled[k], v))
