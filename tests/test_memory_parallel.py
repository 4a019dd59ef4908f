"""The memory model under tensor and sequence parallelism (issue 23): per-rank bytes for a
(dp, tp, sp, replicas) layout against what ``init`` allocates and backward holds on real gloo
ranks, the activation formula against what autograd saves on tp and sp ranks, Llama-3-70B shapes
on the meta device, invariants, and errors that name the offending value.

One spawned 4-rank world serves the whole file (a module-scoped fixture): (dp=2, tp=2) at stages
1-3, tp=4, and (dp=2, sp=2) with ZeRO over the flattened dp x sp axis, on the same processes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funzero as fz
from funzero import estimate_memory, gpt_activations, testing
from funzero.models import GPT, GPTConfig
from shardspec import Mesh
from tests._dist import run_world
from tests._models import GROUPS, lm_loss

B, T = 4, 16
VOCAB = 64  # divides over 2 and 4 ranks
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, bos_token_id=0, eos_token_id=0, use_cache=False, tie_word_embeddings=False)
# Sizes that leave padding in the groups over 2 and 4 shards, heads that divide over 4 ranks.
GPT_CFG = dict(block_size=T, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=24)
LLAMA_3_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                   intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)


def _llama(device=None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA, **overrides})
    cfg._attn_implementation = "sdpa"
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(cfg)


def _gpt(device=None, **overrides):
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return GPT(GPTConfig(**{**GPT_CFG, "fused": False, **overrides}))


BUILD = {"llama": _llama, "gpt": _gpt}


def _tx():
    """AdamW without its fused pass: with one data-parallel rank (tp=4) the fused one takes the
    eager one-rank route, whose gradients are the unpadded leaves that ``estimate_memory``
    counts padded (the same TrainState either way)."""
    return fz.optim.adamw(1e-2, fused=False)

# (mesh, model, stage): every stage that shards on (dp=2, tp=2) and (dp=2, sp=2) for Llama, the
# fused-kernel GPT beside it, and tp=4.
CASES = [("tp2", "llama", s) for s in (1, 2, 3)] + [("tp2", "gpt", 3), ("tp4", "llama", 3), ("tp4", "gpt", 1)] + [
    ("sp2", "llama", s) for s in (1, 2, 3)] + [("sp2", "gpt", 2)]
LAYOUTS = {"tp2": dict(num_shards=2, tp=2), "tp4": dict(num_shards=1, tp=4), "sp2": dict(num_shards=4, sp=2)}


def _meshes():
    return {"tp2": Mesh.from_env(("dp", "tp"), (2, 2)), "tp4": Mesh.from_env(("dp", "tp"), (1, 4)),
            "sp2": Mesh.from_env(("dp", "sp"), (2, 2)).flatten(("dp", "sp"), "dp_sp")}


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def _state_and_grads(mesh: Mesh, where: str, kind: str, stage: int):
    """What the engine holds on this rank: TrainState bytes, gradient bytes after backward, and
    the estimate of the state's own binding."""
    model = BUILD[kind](fused=True) if kind == "gpt" else BUILD[kind]()
    x, y = _batch()
    if where == "sp2":
        fz.sequence_parallel(model, mesh, axis="sp")
        plan = fz.zero(stage, mesh=mesh, axis="dp_sp", batch="local", groups=fz.block_rules(model))
        batch = fz.split_sequence(x, y, mesh, shift=kind == "llama")
        loss = (lambda apply, b: apply(**b.hf_kwargs()).loss) if kind == "llama" else (
            lambda apply, b: b.cross_entropy(apply(b.input_ids)))
    else:
        fz.tensor_parallel(model, mesh, rules=kind)
        plan = fz.zero(stage, mesh=mesh, axis="dp", groups=fz.block_rules(model))
        batch = (x, y)
        loss = (lambda apply, b: apply(input_ids=b[0], labels=b[1]).loss) if kind == "llama" else lm_loss
    tx = _tx()
    # the module as split (or made sequence-parallel): its tp and sp sizes are read off it
    split = estimate_memory(model, stage=stage, num_shards=plan.num_shards, precision=fz.bf16(), tx=tx,
                            groups=plan.groups)
    try:
        estimate_memory(model, stage=stage, num_shards=plan.num_shards, tp=3, groups=plan.groups)
    except ValueError as e:
        contradiction = str(e)
    state = fz.init(model, tx, plan, precision=fz.bf16())
    grads = testing.gradients(fz.train_step(model, loss, tx, plan), state, batch)
    est = estimate_memory(state.binding, tx=tx)
    tensors = [t for g in grads.values() for t in (g.grads if isinstance(g, fz.optim.LeafGrads) else (g,))]
    return {"state": fz.state_nbytes(state), "grads": sum(t.numel() * t.element_size() for t in tensors),
            "binding": (dict(est.state), est.grads, est.tp, est.num_shards),
            "split": (dict(split.state), split.grads, split.tp, split.sp), "contradiction": contradiction}


def _saved_bytes(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, tgt)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


# (mesh, GPTConfig overrides): the plain and the fused-kernel GPT, a recomputed block, on tp and sp.
ACTIVATIONS = [("tp2", {}), ("tp2", {"fused": True}), ("tp2", {"recompute": 1}), ("tp4", {}),
               ("sp2", {}), ("sp2", {"fused": True}), ("sp2", {"recompute": 1})]


def _activations(mesh: Mesh, where: str, overrides: dict) -> int:
    model = _gpt(**overrides).float()
    x, y = (t[:2].clone() for t in _batch())
    if where == "sp2":
        fz.sequence_parallel(model, mesh, axis="sp")
        n, r = mesh.size("sp"), mesh.rank("sp")
        x, y = (t[:, r * T // n:(r + 1) * T // n].clone() for t in (x, y))  # this rank's tokens, own storage
    else:
        fz.tensor_parallel(model, mesh, rules="gpt")
    return _saved_bytes(model, x, y)


def _world(rank, world):
    meshes = _meshes()
    out = {"memory": {}, "activations": {}}
    for where, kind, stage in CASES:
        out["memory"][where, kind, stage] = _state_and_grads(meshes[where], where, kind, stage)
    for i, (where, overrides) in enumerate(ACTIVATIONS):
        out["activations"][i] = _activations(meshes[where], where, overrides)
    return out


@pytest.fixture(scope="module")
def world():
    """Every rank's measurements, from one spawned 4-rank world."""
    return run_world(_world, 4)


# --- against the engine ----------------------------------------------------------------------
def _meta_estimate(where: str, kind: str, stage: int, **kw):
    model = BUILD[kind]("meta", fused=True) if kind == "gpt" else BUILD[kind]("meta")
    return estimate_memory(model, stage=stage, precision=fz.bf16(), tx=_tx(),
                           groups=fz.block_rules(model), **LAYOUTS[where], **kw)


def test_meta_model_estimate_equals_what_init_allocates_on_every_rank(world):
    """An unsplit meta model, the layout given as numbers (tp= splits it by its preset's rules
    with no process group): TrainState bytes and the gradient bytes backward holds equal every
    rank's, to the byte, on (dp=2, tp=2), tp=4 and (dp=2, sp=2) at stages 1-3."""
    for where, kind, stage in CASES:
        est = _meta_estimate(where, kind, stage)
        assert est.num_gpus == 4 and est.tp == LAYOUTS[where].get("tp", 1) and est.sp == LAYOUTS[where].get("sp", 1)
        for rank, measured in enumerate(world):
            got = measured["memory"][where, kind, stage]
            case = (where, kind, stage, rank)
            assert dict(est.state) == got["state"], case
            assert est.grads == got["grads"], (case, est.grads, got["grads"])


def test_binding_and_split_module_estimates_equal_what_init_allocates(world):
    """``estimate_memory(state.binding)`` of a tp or sp state, and of the module as
    ``tensor_parallel`` / ``sequence_parallel`` left it, computed on each rank, are the state's
    own bytes; the tp size comes off the binding or the module's split (another tp is refused),
    the sp size off the module."""
    for where, kind, stage in CASES:
        for measured in world:
            got = measured["memory"][where, kind, stage]
            state, grads, tp, shards = got["binding"]
            assert state == got["state"] and grads == got["grads"], (where, kind, stage)
            assert (tp, shards) == (LAYOUTS[where].get("tp", 1), LAYOUTS[where]["num_shards"])
            state, grads, tp, sp = got["split"]
            assert state == got["state"] and grads == got["grads"], (where, kind, stage)
            assert (tp, sp) == (LAYOUTS[where].get("tp", 1), LAYOUTS[where].get("sp", 1))
            have = LAYOUTS[where].get("tp", 1)
            want = f"tp=3 contradicts the model's tensor-parallel split over {have} ranks" if have > 1 else (
                "does not divide over 3 ranks of axis 'tp'")  # an unsplit module is split: 32 wide
            assert want in got["contradiction"], got["contradiction"]


def test_sequence_parallel_model_states_follow_the_flattened_shards():
    """sp ranks hold different tokens, not different parameters: (dp=2, sp=2) holds what 4 plain
    shards hold, and a model made sequence-parallel says its sp size itself."""
    for stage in (1, 3):
        sp = _meta_estimate("sp2", "llama", stage)
        flat = estimate_memory(_llama("meta"), stage=stage, num_shards=4, precision=fz.bf16(),
                               tx=_tx(), groups=fz.block_rules(_llama("meta")))
        assert (dict(sp.state), sp.grads, sp.gpu) == (dict(flat.state), flat.grads, flat.gpu)
    model = fz.sequence_parallel(_gpt("meta"), Mesh(("dp", "sp"), (2, 2)).flatten(("dp", "sp"), "dp_sp"))
    assert estimate_memory(model, stage=3, num_shards=4, groups=GROUPS).sp == 2
    with pytest.raises(ValueError, match="sp=4 contradicts the model's sequence-parallel axis of 2 ranks"):
        estimate_memory(model, stage=3, num_shards=4, sp=4, groups=GROUPS)


def test_activation_formula_matches_what_autograd_saves_on_tp_and_sp_ranks(world):
    """fp32 on the CPU: the layers and the head, counted tensor by tensor (``_activations.py``),
    equal the storages autograd saves on each rank: GPT split over 2 and 4 tp ranks (plain and
    fused kernels, a recomputed block), exactly, and over 2 sp ranks (Ulysses), within the loss's
    per-row log-sum-exp as on one process (tests/test_memory.py)."""
    for i, (where, overrides) in enumerate(ACTIVATIONS):
        cfg = _gpt("meta", **overrides).cfg
        par = {"tp": int(where[-1])} if where.startswith("tp") else {"sp": int(where[-1])}
        est = gpt_activations(cfg, batch=2, seq=T, dtype=torch.float32, **par)
        for rank, measured in enumerate(world):
            got = measured["activations"][i]
            over = est.layers + est.head - got
            # On the CPU the model's own loss saves no per-row log-sum-exp (4 bytes a token of this
            # rank's); the vocab-parallel loss under tp is counted exactly.
            assert over == 0 if "tp" in par else 0 <= over <= 4 * 2 * T // par["sp"], (where, overrides, rank, over)


# --- Llama-3-70B on the meta device ------------------------------------------------------------
@pytest.fixture(scope="module")
def llama70b():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # shapes only: nothing of the 70B is allocated
        return LlamaForCausalLM(LlamaConfig(**LLAMA_3_70B))


def test_llama_3_70b_tp_slices_and_replicated_norms(llama70b):
    """A tp rank holds 1/tp of every projection, embedding and head, and every norm whole: its
    Ψ times tp, less the norms counted tp - 1 times too often, is the model's Ψ; at stage 3 the
    paper's 16Ψ/N per rank follows on that Ψ (padding aside)."""
    total = fz.param_count(llama70b)
    h, L = LLAMA_3_70B["hidden_size"], LLAMA_3_70B["num_hidden_layers"]
    norms = (2 * L + 1) * h
    for tp in (1, 2, 8):
        est = estimate_memory(llama70b, stage=3, num_shards=8, tp=tp, precision="bf16",
                              groups=fz.block_rules(llama70b))
        assert est.num_params * tp - (tp - 1) * norms == total
        assert 0 <= est.model_states["total"] - 8 - 16 * est.num_params / 8 <= 16 * (est.padded - est.num_params)
    # the count-only estimate splits every parameter: it agrees with the model within the norms
    count = estimate_memory(total, stage=3, num_shards=8, tp=8, precision="bf16", num_groups=L + 1)
    assert abs(count.num_params - math.ceil(total / 8)) == 0
    assert abs(count.model_states["total"] - est.model_states["total"]) < 16 * norms


def test_planner_splits_gpus_into_dp_tp_and_replicas(llama70b):
    """64 GPUs at tp=8: dp=8; the fastest fit at 80 GB is a stage with replicas where one fits,
    and the explanation names the layout and the rejected faster candidates."""
    c = fz.choose_stage(llama70b, gpus=64, tp=8, gpu_bytes=80e9, reserve_bytes=8e9, gpus_per_node=8,
                        precision="bf16", groups=fz.block_rules(llama70b))
    best = c.best
    assert best is not None and best.estimate.tp == 8
    assert best.estimate.num_shards * best.num_replicas == 8
    assert f"on dp 8 x tp 8, each group sharded over {best.estimate.num_shards} ranks" in c.why
    assert "stage 0/none needs GPU" in c.why and "more replicas first" in c.why
    order = [(c2.offload, c2.stage, -c2.num_replicas) for c2 in c.candidates]
    labels = ["none", "cpu", "cpu+params"]
    assert order == sorted(order, key=lambda o: (labels.index(o[0]), o[1], o[2]))
    assert [c2.num_replicas for c2 in c.candidates if c2.stage == 0] == [1]  # stage 0 shards nothing
    fixed = fz.choose_stage(llama70b, gpus=64, tp=8, num_replicas=1, gpu_bytes=80e9, reserve_bytes=8e9,
                            precision="bf16", groups=fz.block_rules(llama70b))
    assert {c2.num_replicas for c2 in fixed.candidates} == {1}
    with pytest.raises(ValueError, match=r"tp x sp = 8 x 3 = 24 does not divide gpus=64"):
        fz.choose_stage("70B", gpus=64, tp=8, sp=3, gpu_bytes=80e9)
    with pytest.raises(ValueError, match=r"num_replicas=3 does not divide dp = gpus / \(tp x sp\) = 8"):
        fz.choose_stage("70B", gpus=64, tp=8, num_replicas=3, gpu_bytes=80e9)


# --- invariants ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(psi=st.integers(10**4, 10**12), n=st.sampled_from([1, 2, 4, 8, 64, 512]), tp=st.sampled_from([1, 2, 4, 8]),
       stage=st.integers(0, 3), groups=st.integers(1, 96))
def test_per_gpu_bytes_never_grow_when_tp_or_dp_doubles(psi, n, tp, stage, groups):
    """Doubling tp never adds a byte per GPU at any stage; doubling dp never adds one at stages 0
    and 3, and at stages 1-2 (full parameters, and stage 1's full gradients) only what the wider
    shard padding adds to the full buffers."""
    groups = min(groups, psi)
    kw = dict(stage=stage, precision="bf16", num_groups=groups)
    base = estimate_memory(psi, num_shards=n, tp=tp, **kw)
    wider_tp = estimate_memory(psi, num_shards=n, tp=2 * tp, **kw)
    assert wider_tp.model_states["total"] <= base.model_states["total"]
    assert wider_tp.state["total"] <= base.state["total"] and wider_tp.gpu <= base.gpu
    wider_dp = estimate_memory(psi, num_shards=2 * n, tp=tp, **kw)
    full = {0: 16, 1: 4, 2: 2, 3: 0}[stage]  # bytes per padded element of the full buffers a rank holds
    slack = full * (wider_dp.padded - base.padded)
    assert wider_dp.model_states["total"] <= base.model_states["total"] + slack


def test_activations_shrink_with_tp_and_sp_and_reduce_to_one_rank():
    cfg = GPTConfig(n_layer=4, n_head=8, n_embd=512, vocab_size=1024, block_size=256)
    one = gpt_activations(cfg, batch=2, seq=256)
    assert gpt_activations(cfg, batch=2, seq=256, tp=1, sp=1) == one
    for tp, sp in ((2, 1), (4, 1), (1, 2), (1, 4), (2, 2)):
        a = gpt_activations(cfg, batch=2, seq=256, tp=tp, sp=sp)
        assert a.per_layer < one.per_layer and a.layers < one.layers and (a.tp, a.sp) == (tp, sp)
        assert (a.exchange > 0) == (sp > 1)
    s, b, h, e = 256, 2, 512, 2
    assert one.per_layer - gpt_activations(cfg, batch=2, seq=256, tp=2).per_layer == 6 * e * s * b * h + 2 * 8 * s * b
    assert gpt_activations(cfg, batch=2, seq=256, sp=4).per_layer == (17 * e * s * b * h // 4 + 4 * 8 * s * b // 4
                                                                      + 16 * s * b // 4)
    est = estimate_memory(fz.param_count(GPT(cfg)), stage=2, num_shards=4, sp=2,
                          activations=gpt_activations(cfg, batch=2, seq=256, sp=2))
    assert est.gpu >= est.activations.peak
    with pytest.raises(ValueError, match="tp=1 contradicts the activation estimate's tp 2"):
        estimate_memory("1B", stage=2, num_shards=4, activations=gpt_activations(cfg, batch=2, seq=256, tp=2))


# --- errors name the value -------------------------------------------------------------------
def test_sizes_that_do_not_divide_are_named():
    with pytest.raises(ValueError, match=r"n_head = 4 does not divide over 8 tensor-parallel ranks"):
        estimate_memory(_gpt("meta"), stage=3, num_shards=1, tp=8, groups=GROUPS)
    with pytest.raises(ValueError, match=r"leaf 'wte.weight' of shape \(66, 24\): dim 0 \(66\) does not divide over 4"):
        estimate_memory(_gpt("meta", vocab_size=66), stage=3, num_shards=1, tp=4, groups=GROUPS)  # 66 / 4
    with pytest.raises(ValueError, match=r"sp=3 does not divide num_shards=4"):
        estimate_memory("1B", stage=3, num_shards=4, sp=3)
    with pytest.raises(ValueError, match=r"sp=4 does not divide the 2 attention heads per tensor-parallel rank"):
        estimate_memory(_gpt("meta"), stage=3, num_shards=4, tp=2, sp=4, groups=GROUPS)
    with pytest.raises(ValueError, match=r"sp=2 does not divide the 3 KV heads"):
        estimate_memory(_llama("meta", num_attention_heads=6, num_key_value_heads=3, hidden_size=36), stage=2,
                        num_shards=2, sp=2)
    with pytest.raises(ValueError, match=r"tp=0"):
        estimate_memory("1B", stage=3, num_shards=4, tp=0)
    with pytest.raises(ValueError, match=r"tp_rules applies to a model"):
        estimate_memory("1B", stage=3, num_shards=4, tp=2, tp_rules="llama")
    with pytest.raises(ValueError, match=r"no tensor-parallel preset for a Linear"):
        estimate_memory(torch.nn.Linear(4, 4, device="meta"), stage=0, tp=2)
    with pytest.raises(ValueError, match=r"sp=2 does not divide seq = 15"):
        gpt_activations(GPTConfig(**GPT_CFG), batch=1, seq=15, sp=2)
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_head = 4"):
        gpt_activations(GPTConfig(**GPT_CFG), batch=1, tp=3)
