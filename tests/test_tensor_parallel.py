"""Tensor parallelism (issue 23): rules over a (dp, tp) mesh, ZeRO over dp, against one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funzero as fz
from funzero.losses import vocab_parallel_cross_entropy
from shardspec import Mesh, Replicate, Shard, check_split, join_shards, shard_of
from tests._dist import run_world
from tests._models import GROUPS, batches, lm_loss, tiny_gpt, torch_reference

STEPS = 4
VOCAB = 68  # divides over 2 and 4 ranks (tests/_models.TINY's 67 does not)
GPT_KW = dict(vocab_size=VOCAB, n_head=4)  # heads divide over 4
CLIP = 0.05  # below the tiny models' gradient norms: every step clips


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tiny_llama(*, tied: bool = False, kv_heads: int = 2, dtype=torch.float64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0, use_cache=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.loss_function = _plain_hf_loss  # HF's own casts the logits to fp32; the fp64 comparison keeps fp64
    return model


def tiny_gpt2(dtype=torch.float64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    model = GPT2LMHeadModel(cfg).to(dtype)
    model.loss_function = _plain_hf_loss
    return model


def _plain_hf_loss(logits, labels, vocab_size=None, ignore_index=-100, **_):
    shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=ignore_index)


class _Labels(nn.Module):
    """``model(x, y)`` for a Hugging Face model (what ``torch_reference`` calls)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, y):
        return self.inner(input_ids=x, labels=y).loss


def _hf_loss(apply, b):
    return apply(input_ids=b[0], labels=b[1]).loss


def _reference(kind: str, clip=None):
    if kind in ("gpt", "gpt-fused"):
        ref = _model(kind)
        ref.loss_function = lambda logits, t: F.cross_entropy(logits, t)  # fp64, as the split one
        return torch_reference(ref, batches(STEPS, vocab=VOCAB), clip=clip)
    out = torch_reference(_Labels(_model(kind)), batches(STEPS, vocab=VOCAB), clip=clip)
    return {k.removeprefix("inner."): v for k, v in out.items()}


def _model(kind: str):
    """``gpt``: the plain GPT; ``gpt-fused``: with its default kernels (their torch references on the
    CPU), whose fused q/k/v, MLP and residual-norm paths call the projections' weights directly and
    add c_proj's bias on the residual side (the ``region`` rules); ``llama``: HF Llama."""
    if kind == "gpt-fused":
        return tiny_gpt(dtype=torch.float64, fused=True, **GPT_KW)
    if kind == "gpt2":
        return tiny_gpt2()
    if kind == "llama-patched":  # funzero.ops' RMSNorm, SwiGLU and rope inside the split model
        from funzero import ops

        model = tiny_llama()
        ops.patch(model, kernels=("rmsnorm", "swiglu", "rope"))
        return model
    return tiny_gpt(dtype=torch.float64, **GPT_KW) if kind == "gpt" else tiny_llama()


def _tx(name):
    """The optimizer of a scenario: AdamW after clipping by the global norm (``clip``), by each
    leaf's RMS (``block_rms``: per-leaf statistics), or LAMB (per-leaf trust ratios)."""
    adamw = fz.optim.adamw(1e-2, weight_decay=0.1)
    return {None: adamw, "clip": fz.optim.chain(fz.optim.clip_by_global_norm(CLIP), adamw),
            "block_rms": fz.optim.chain(fz.optim.clip_by_block_rms(1e-3), adamw),
            "lamb": fz.optim.lamb(1e-2, weight_decay=0.1)}[name]


def _train(kind, mesh, stage, tx_name=None, count=False):
    """STEPS of fz with tp on ``mesh`` at ZeRO ``stage`` over dp: the gathered parameters (and the
    first step's collective calls and elements when ``count``)."""
    model = _model(kind)
    gpt = kind in ("gpt", "gpt-fused")
    fz.tensor_parallel(model, mesh, rules="gpt" if gpt else kind.removesuffix("-patched"))
    plan = fz.zero(stage, mesh=mesh, axis="dp", groups=GROUPS if gpt else [r"(layers|h)\.(\d+)\."])
    tx = _tx(tx_name)
    state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
    step = fz.train_step(model, lm_loss if gpt else _hf_loss, tx, plan)
    counts = None
    for i, b in enumerate(batches(STEPS, vocab=VOCAB)):
        if count and i == 0:
            with fz.count_comm() as c:
                state, _ = step(state, b)
            counts = {"calls": dict(c.calls), "elements": dict(c.elements)}
        else:
            state, _ = step(state, b)
    full = {k: v.clone() for k, v in fz.gather_params(state, plan).items()}
    return full, counts


def _world(rank, world, kind, dp, tp, scenarios):
    mesh = Mesh.from_env(("dp", "tp"), (dp, tp))
    out = {}
    for name, stage, tx_name, *model_kind in scenarios:
        full, counts = _train(model_kind[0] if model_kind else kind, mesh, stage, tx_name, count=name == "count")
        out[name] = (full, counts) if rank == 0 else None
    return out


_SCENARIOS = [("count", 0, None), ("s1", 1, None), ("s2", 2, None), ("s3", 3, None),
              ("s1-clip", 1, "clip"), ("s3-clip", 3, "clip")]


def _check(results, refs):
    """``refs``: the truth by the part of each scenario's name after its first dash (none: plain)."""
    for name, (got, _) in results.items():
        ref = refs[name.partition("-")[2] or "plain"]
        # funzero.ops' kernels round some steps in fp32 even on fp64 inputs: two dp ranks' half
        # batches then sum to ~5e-9 from one process (a sharding bug moves weights by 1e-2)
        tol = 1e-7 if name.endswith("patched") else 1e-10
        assert got.keys() == ref.keys(), name
        for k in ref:
            assert got[k].shape == ref[k].shape, (name, k)
            assert _rel(got[k], ref[k]) < tol, (name, k, _rel(got[k], ref[k]))


def _check_counts(counts, *, num_blocks, local_batch, seq, hidden):
    """Megatron's count per step: forward, one all-reduce per block half (the row-wise outputs)
    and one for the vocab-parallel embedding; backward, one per block half (the column-wise
    inputs) and one for the LM head's input; the loss, two (max; sum of exps with the target)."""
    calls, elements = counts["calls"], counts["elements"]
    act = local_batch * seq * hidden  # one (B, T, C) activation
    tokens = local_batch * seq
    assert calls[("all_reduce", "tp_fwd")] == 2 * num_blocks + 1
    assert calls[("all_reduce", "tp_bwd")] == 2 * num_blocks + 1
    assert calls[("all_reduce", "tp_loss")] == 2
    assert elements[("all_reduce", "tp_fwd")] == (2 * num_blocks + 1) * 2 * act  # an all-reduce counts 2P
    assert elements[("all_reduce", "tp_bwd")] == (2 * num_blocks + 1) * 2 * act
    assert elements[("all_reduce", "tp_loss")] == 2 * (tokens + 2 * tokens)


def test_gpt_dp2_tp2_every_stage_and_clipping_equal_one_process():
    refs = {"plain": _reference("gpt"), "clip": _reference("gpt", CLIP)}
    results = run_world(_world, 4, "gpt", 2, 2, _SCENARIOS)[0]
    _check(results, refs)
    _check_counts(results["count"][1], num_blocks=2, local_batch=4, seq=16, hidden=24)


def test_llama_dp2_tp2_every_stage_and_clipping_equal_one_process():
    refs = {"plain": _reference("llama"), "clip": _reference("llama", CLIP), "gpt2": _reference("gpt2"),
            "patched": _reference("llama-patched")}
    results = run_world(_world, 4, "llama", 2, 2, _SCENARIOS + [("s3-gpt2", 3, None, "gpt2"),
                                                                ("s2-patched", 2, None, "llama-patched")])[0]
    _check(results, refs)
    _check_counts(results["count"][1], num_blocks=2, local_batch=4, seq=16, hidden=32)


def test_gpt_tp4_equals_one_process():
    refs = {"plain": _reference("gpt"), "clip": _reference("gpt", CLIP)}
    one = Mesh.from_env(("dp", "tp"), (1, 1))  # fz on one rank, this process: the per-leaf statistics' truth
    refs.update({name: _train("gpt", one, 0, name)[0] for name in ("block_rms", "lamb")})
    refs["fused"] = _reference("gpt-fused")
    results = run_world(_world, 4, "gpt", 1, 4, [("count", 0, None), ("s3-clip", 3, "clip"),
                                                  ("s2-block_rms", 2, "block_rms"), ("s1-lamb", 1, "lamb"),
                                                  ("s3-fused", 3, None, "gpt-fused")])[0]
    _check(results, refs)
    _check_counts(results["count"][1], num_blocks=2, local_batch=8, seq=16, hidden=24)


# --- made on the meta device, written out whole, tied heads (one world of 2 tp ranks) --------------
def _meta(kind: str, tied: bool = False):
    with torch.device("meta"):
        if kind == "gpt":
            from funzero.models import GPT, GPTConfig
            from tests._models import TINY

            return GPT(GPTConfig(**{**TINY.__dict__, **GPT_KW}))
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
                                            use_cache=False))


def _tp2_world(rank, world, directory):
    mesh = Mesh.from_env(("dp", "tp"), (1, 2))
    out = {}
    for kind in ("gpt", "llama"):  # init on meta: each split module made whole, then sliced
        model = fz.tensor_parallel(_meta(kind), mesh, rules=kind)
        plan = fz.zero(3, mesh=mesh, axis="dp")
        state = fz.init(model, fz.optim.adamw(1e-2), plan, seed=3)
        out[f"meta-{kind}"] = fz.gather_params(state, plan)
    model = tiny_llama(tied=True)  # a tied LM head: the embedding's vocab split, shared
    fz.tensor_parallel(model, mesh, rules="llama")
    plan = fz.zero(2, mesh=mesh, axis="dp")
    tx = fz.optim.adamw(1e-2, weight_decay=0.1)
    state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
    step = fz.train_step(model, _hf_loss, tx, plan)
    for b in batches(STEPS, vocab=VOCAB):
        state, _ = step(state, b)
    out["tied"] = fz.gather_params(state, plan)
    out["written"] = fz.save_weights(state, plan, directory, dtype=torch.float32, config=model.config)
    out["saved"] = fz.save_state(state, plan, directory + "/ckpt")  # tests/test_checkpoint_parallel.py reshards it
    # Each rank reads its slices of what was written whole: a Llama's rows (dim 0), then a GPT's
    # dim-1 and fused q/k/v splits (read whole, then sliced).
    model = fz.tensor_parallel(_meta("llama", tied=True), mesh, rules="llama")
    out["reloaded-llama"] = fz.gather_params(fz.init(model, fz.optim.adamw(1e-2), plan, weights=directory), plan)
    made = fz.init(fz.tensor_parallel(_meta("gpt"), mesh, rules="gpt"), fz.optim.adamw(1e-2), plan, seed=5)
    out["gpt-made"] = fz.gather_params(made, plan)
    fz.save_weights(made, plan, directory + "/gpt")
    model = fz.tensor_parallel(_meta("gpt"), mesh, rules="gpt")
    out["reloaded-gpt"] = fz.gather_params(fz.init(model, fz.optim.adamw(1e-2), plan, weights=directory + "/gpt"), plan)
    # A non-finite loss on one tp rank only: every rank skips the step (else the tp ranks drift apart).
    def poisoned(apply, b):
        loss = lm_loss(apply, b)
        return loss + float("nan") if mesh.rank("tp") == 1 else loss

    step = fz.train_step(model, poisoned, fz.optim.adamw(1e-2), plan)
    _, metrics = step(fz.init(model, fz.optim.adamw(1e-2), plan, seed=5), batches(1, vocab=VOCAB)[0])
    skipped = [None, None]
    torch.distributed.all_gather_object(skipped, bool(metrics["skipped"]))
    out["skipped"] = skipped
    return out if rank == 0 else None


def test_tp_made_on_meta_written_whole_and_tied_heads(tmp_path):
    from transformers import LlamaForCausalLM

    got = run_world(_tp2_world, 2, str(tmp_path))[0]
    for kind in ("gpt", "llama"):  # the slices of what the unsplit model is made with, bit for bit
        want = dict(fz.init_weights(_meta(kind), seed=3).named_parameters())
        assert got[f"meta-{kind}"].keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[f"meta-{kind}"][k], v), (kind, k)
    ref = _reference_tied()
    assert os.path.isdir(got["saved"])
    assert got["tied"].keys() == ref.keys()
    for k in ref:
        assert _rel(got["tied"][k], ref[k]) < 1e-10, (k, _rel(got["tied"][k], ref[k]))
    assert "model.safetensors" in got["written"]
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    for k, v in got["tied"].items():
        assert torch.equal(loaded[k], v.float()), k
    assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])
    for k, v in got["tied"].items():  # fz.init(weights=...) of a split model: its slices of the whole
        assert torch.equal(got["reloaded-llama"][k], v.float()), k
    assert got["gpt-made"].keys() == got["reloaded-gpt"].keys()
    for k, v in got["gpt-made"].items():
        assert torch.equal(got["reloaded-gpt"][k], v), k
    assert got["skipped"] == [True, True]


def _reference_tied():
    out = torch_reference(_Labels(tiny_llama(tied=True)), batches(STEPS, vocab=VOCAB))
    return {k.removeprefix("inner."): v for k, v in out.items()}


# --- rules that cannot apply --------------------------------------------------------------------
def _mesh(tp: int, axes=("dp", "tp")) -> Mesh:
    return Mesh(axes, (1, tp)[-len(axes):])  # sizes only: every error comes before a collective


@pytest.mark.parametrize("build, rules, tp, message", [
    (lambda: tiny_gpt(), "gpt", 2,
     r"leaf 'wte.weight' of shape \(67, 24\): dim 0 \(67\) does not divide over 2 ranks of axis 'tp'"),
    (lambda: tiny_gpt(vocab_size=VOCAB, n_head=2), "gpt", 4,
     r"module 'blocks.0.attn': n_head = 2 does not divide over 4 tensor-parallel ranks"),
    (lambda: tiny_llama(kv_heads=2), "llama", 4,
     r"module 'model.layers.0.self_attn': config.num_key_value_heads = 2 does not divide over 4"),
    (lambda: tiny_llama(), [(r"self_attn\.q_proj$", "colwise"), (r"nothing$", "rowwise")], 2,
     r"tensor-parallel rule 'nothing\$' matches nothing"),
    (lambda: tiny_gpt(vocab_size=VOCAB), [(r"attn\.c_attn$", "split_out", 5)], 2,
     r"leaf 'blocks.0.attn.c_attn.weight' of shape \(72, 24\): dim 0 \(72\) is not 5 equal sections"),
    (lambda: tiny_gpt(vocab_size=VOCAB), [(r"^wte$", "rowwise")], 2,
     r"module 'wte' is a Embedding: style 'rowwise' splits nn.Linear"),
    (lambda: tiny_gpt(vocab_size=VOCAB), [(r"^wte$", "sideways")], 2, r"style must be one of .* got 'sideways'"),
    (lambda: tiny_gpt(vocab_size=VOCAB), "llama3", 2, r"unknown tensor-parallel preset 'llama3'"),
], ids=["split-dim", "heads", "kv-heads", "matches-nothing", "sections", "wrong-module", "style", "preset"])
def test_bad_rules_raise_naming_the_leaf_and_the_numbers(build, rules, tp, message):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fz.tensor_parallel(model, _mesh(tp), rules=rules)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was split half-way
    assert fz.tp_layout(model) is None


def test_an_axis_the_mesh_lacks_is_named():
    with pytest.raises(ValueError, match=r"tensor-parallel axis 'tp' is not an axis of Mesh\(dp=1"):
        fz.tensor_parallel(tiny_gpt(vocab_size=VOCAB), _mesh(1, ("dp",)), rules="gpt")


def test_flat_specs_keep_dim_0_and_leaf_specs_split_any_dim():
    full = torch.arange(6 * 4).view(6, 4)
    for spec in (Shard("tp", 0), Shard("tp", 1), Shard("tp", 0, (2, 4)), Replicate("tp")):
        parts = [shard_of(full, spec, r, 2) for r in range(2)]
        assert torch.equal(join_shards(parts, spec), full), spec
    assert shard_of(full, Shard("tp", 0, (2, 4)), 1, 2)[:, 0].tolist() == [4, 16, 20]  # row 1 of (0,1), rows 4,5 of 2..5
    with pytest.raises(ValueError, match=r"leaf 'w' of shape \(6, 4\): section 0 \(3\) of dim 0 does not divide over 2"):
        check_split("w", (6, 4), Shard("tp", 0, (3, 3)), 2)
    with pytest.raises(ValueError, match=r"leaf 'w' of shape \(6, 4\) has no dim 2"):
        check_split("w", (6, 4), Shard("tp", 2), 2)


def test_vocab_parallel_cross_entropy_on_one_rank_is_cross_entropy():
    logits = torch.randn(5, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (5, 7))
    labels[0, :3] = -100
    got = vocab_parallel_cross_entropy(logits, labels, _mesh(1), "tp")
    want = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert torch.allclose(got, want, rtol=1e-12)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


# --- compiled ---------------------------------------------------------------------------------------
def _compiled_world(rank, world):
    from torch._dynamo.utils import counters

    mesh = Mesh.from_env(("dp", "tp"), (2, 2))
    out = {}
    for compiled in (False, True):
        model = _model("gpt")
        fz.tensor_parallel(model, mesh, rules="gpt")
        plan = fz.zero(3, mesh=mesh, axis="dp", groups=GROUPS)
        tx = _tx("clip")
        state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
        step = fz.train_step(model, lm_loss, tx, plan)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            step = torch.compile(step, backend="aot_eager")
        for b in batches(2, vocab=VOCAB):
            state, _ = step(state, b)
        out[compiled] = (fz.gather_params(state, plan), dict(counters["graph_break"]) if compiled else {})
    return out if rank == 0 else None


@pytest.mark.slow
def test_compiled_stage3_with_tp_matches_eager_without_graph_breaks():
    """The tp collectives' backward is one backward region with the groups' reduces (the compiled
    stage-3 step's re-gather pass refuses disjoint ones)."""
    out = run_world(_compiled_world, 4)[0]
    (eager, _), (compiled, breaks) = out[False], out[True]
    assert not breaks, breaks
    for k, v in eager.items():
        assert _rel(compiled[k], v) < 1e-10, k


# --- the README's snippet -------------------------------------------------------------------------
def _readme_world(rank, world, code):
    model = tiny_llama(dtype=torch.float32)
    unsplit = tiny_llama(dtype=torch.float32)
    scope = {"model": model}
    exec(compile(code, "README.md", "exec"), scope)
    b = batches(1, vocab=VOCAB)[0]
    state, metrics = scope["step"](scope["state"], b)
    lo = rank // 2 * 4  # this dp rank's half of the batch of 8 (global rank = 2 dp + tp)
    want = unsplit(input_ids=b[0][lo:lo + 4], labels=b[1][lo:lo + 4]).loss
    return float(metrics["loss"]), int(state.step), scope["plan"].stage, float(want)


@pytest.mark.slow
def test_readme_tensor_parallel_snippet_runs_as_written():
    from tests.test_readme import _snippets

    (code,) = _snippets("Tensor parallelism")
    results = run_world(_readme_world, 4, code)
    dp_mean = sum(r[3] for r in results[::2]) / 2  # the step's loss: the mean over the dp ranks
    for loss, steps, stage, _ in results:
        assert steps == 1 and stage == 3
        assert abs(loss - dp_mean) < 2e-2 * dp_mean  # bf16 compute against the fp32 unsplit model
