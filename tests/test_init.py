"""init from the meta device: each rank makes only what it holds, the same values at any world
size and stage, a group at a time; and the values it starts from agree across ranks."""

from __future__ import annotations

import resource

import pytest
import torch
from torch import nn

import funzero as fz
from funzero import optim
from funzero.models import GPT, GPTConfig
from tests._dist import run_world
from tests._models import GROUPS, TINY, batches, lm_loss

LLAMA_GROUPS = [r"model\.layers\.(\d+)\."]


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def _build(name: str, *, meta: bool):
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        if name == "gpt":
            return GPT(TINY)
        if name == "hf-gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        if name == "mistral":
            from transformers import MistralConfig, MistralForCausalLM

            return MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, intermediate_size=64, vocab_size=101,
                                                    max_position_embeddings=64))
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(_llama_config(tie_word_embeddings=name == "llama-tied"))


def _groups(name):
    return {"gpt": GROUPS, "hf-gpt2": [r"transformer\.h\.(\d+)\."]}.get(name, LLAMA_GROUPS)


def _meta_init(rank, world, name, stages, seed):
    out = {}
    for stage in stages:
        model = _build(name, meta=True)
        plan = fz.zero(stage, groups=_groups(name))
        state = fz.init(model, optim.sgd(0.1), plan, seed=seed)
        full = fz.gather_params(state, plan)
        bufs = {k: b.clone() for k, b in model.named_buffers()}
        out[stage] = (full, bufs) if rank == 0 else None
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,worlds", [("gpt", (1, 2)), ("llama", (1, 2)), ("llama-tied", (2,)), ("mistral", (2,)),
                                         ("hf-gpt2", (2,))])
def test_meta_init_equals_eager_init_of_the_same_seed_at_every_stage_and_world(name, worlds):
    """fz.init of a meta-device model makes the values fz.init_weights makes eagerly (module by
    module, seeded by the module path), bit for bit, whatever the stage or the world size."""
    ref_model = fz.init_weights(_build(name, meta=True), seed=7)
    ref = {k: v.detach() for k, v in ref_model.named_parameters()}
    ref_bufs = dict(ref_model.named_buffers())
    assert all(v.device.type == "cpu" for v in ref.values())
    other = dict(fz.init_weights(_build(name, meta=True), seed=8).named_parameters())
    assert not torch.equal(other[next(iter(ref))], ref[next(iter(ref))])  # the seed matters
    for world in worlds:
        got = run_world(_meta_init, world, name, (0, 1, 2, 3), 7)[0]
        for stage, (full, bufs) in got.items():
            assert full.keys() == ref.keys(), (world, stage)
            for k in ref:
                assert torch.equal(full[k], ref[k]), (name, world, stage, k)
            for k, b in ref_bufs.items():  # rotary frequencies made too, on the compute device
                assert torch.equal(bufs[k], b), (name, world, stage, k)


def test_tied_weights_stay_tied_and_are_made_once():
    model = fz.init_weights(_build("llama-tied", meta=True), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_meta_model_trains_like_its_eager_twin():
    """The made state is a working state: the same losses as the eager model with the same
    values (Llama with meta buffers: the rotary module's frequencies are made too)."""
    data = [(x, y) for x, y in batches(3, vocab=101)]

    def loss_fn(apply, b):
        return apply(input_ids=b[0], labels=b[1]).loss

    losses = []
    for meta in (True, False):
        model = _build("llama", meta=True)
        if not meta:
            model = fz.init_weights(model, seed=3)
        plan = fz.zero(2, groups=LLAMA_GROUPS)
        tx = optim.adamw(1e-2)
        state = fz.init(model, tx, plan, seed=3)
        step = fz.train_step(model, loss_fn, tx, plan)
        run = []
        for b in data:
            state, m = step(state, b)
            run.append(float(m["loss"]))
        losses.append(run)
    assert losses[0] == losses[1]
    assert all(torch.isfinite(torch.tensor(losses[0])))


def _peak_init(rank, world, cfg, stage):
    """Peak resident memory that init adds, the bytes this rank's state holds, the largest group."""
    import ctypes
    import gc

    # glibc raises its mmap threshold to the size of each large block freed, after which freed
    # blocks stay in the heap and in the RSS: pin it, so the peak is what init holds at once.
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    gc.collect()
    with torch.device("meta"):
        model = GPT(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = fz.zero(stage, groups=GROUPS)
    state = fz.init(model, optim.sgd(0.1), plan, seed=0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    group = max(lay.padded for lay in state.binding.layouts.values()) * 4
    total = sum(lay.padded for lay in state.binding.layouts.values()) * 4
    return after - before, fz.state_nbytes(state)["total"], group, total


def test_init_of_a_meta_model_never_holds_the_model():
    """A 110 MB model (fp32) at stage 3 on 2 ranks: each rank's peak during init stays within its
    state (half the model) plus about one group, where materialising the model would cost 110 MB."""
    cfg = GPTConfig(block_size=64, vocab_size=4096, n_layer=8, n_embd=512, n_head=8, fused=False)
    for added, state, group, total in run_world(_peak_init, 2, cfg, 3, fresh=True):  # RSS of its own, not a fork's
        assert total > 100e6 and state < 0.55 * total
        # one group made at a time (and its fp32 copy while it is cut), plus allocator slack
        assert added <= state + 2.5 * group + 16e6, (added, state, group, total)
        assert added < 0.8 * total, (added, total)


def _disagreeing(rank, world, stage):
    torch.manual_seed(rank)  # each rank builds other values
    model = GPT(TINY)
    mine = {k: v.detach().clone() for k, v in model.named_parameters()}
    plan = fz.zero(stage, groups=GROUPS)
    state = fz.init(model, optim.sgd(0.1), plan)
    return mine, fz.gather_params(state, plan)


@pytest.mark.parametrize("stage", [0, 3])
def test_values_a_module_holds_are_rank_0s_on_every_rank(stage):
    """Ranks that built their model with different seeds start from rank 0's values: replicated
    parameters cannot drift apart and a sharded model is not a patchwork of the ranks' models."""
    (mine0, got0), (mine1, got1) = run_world(_disagreeing, 2, stage)
    assert any(not torch.equal(mine0[k], mine1[k]) for k in mine0)
    for k in mine0:
        assert torch.equal(got0[k], mine0[k]) and torch.equal(got1[k], mine0[k]), k


def _disagreeing_tp(rank, world):
    from shardspec import Mesh

    from tests._models import tiny_gpt

    model = tiny_gpt(seed=rank, vocab_size=68)  # each rank builds other values (the norms' below)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln" in n:
                p.normal_()
    mesh = Mesh.from_env(("dp", "tp"), (2, 2))
    fz.tensor_parallel(model, mesh, rules="gpt")
    whole = {n for n, _ in model.named_parameters() if n not in fz.tp_layout(model).specs}
    plan = fz.zero(3, mesh=mesh, axis="dp", groups=GROUPS)
    state = fz.init(model, optim.sgd(0.1), plan)
    return whole, {k: v for k, v in fz.gather_params(state, plan).items() if k in whole}


def test_leaves_tensor_parallelism_does_not_split_are_rank_0s_on_every_tp_rank():
    """tp ranks whose modules hold other values: the leaves each holds whole (norms) start as
    tp rank 0's; before, init broadcast over dp only and the tp ranks trained on from different
    norms without a word."""
    out = run_world(_disagreeing_tp, 4)
    whole = out[0][0]
    assert any(".ln" in n for n in whole)
    for _, got in out[1:]:
        for k in whole:
            assert torch.equal(got[k], out[0][1][k]), k


class _NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 3))

    def forward(self, x):
        return x @ self.w


def test_a_module_without_an_initialiser_is_named_and_init_fn_fills_it():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), _NoInit())
    plan = fz.zero(0)
    with pytest.raises(ValueError, match="type _NoInit holds parameters on the meta device"):
        fz.init(model, optim.sgd(0.1), plan)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), _NoInit())

    def init_fn(m):
        for p in m.parameters(recurse=False):
            nn.init.constant_(p, 0.5)

    state = fz.init(model, optim.sgd(0.1), plan, init_fn=init_fn)
    full = fz.gather_params(state, plan)
    assert torch.equal(full["1.w"], torch.full((4, 3), 0.5)) and torch.equal(full["0.bias"], torch.full((4,), 0.5))


def _from_weights(rank, world, directory, stages):
    from transformers import LlamaForCausalLM

    out = {}
    for stage in stages:
        with torch.device("meta"):
            model = LlamaForCausalLM(_llama_config())
        plan = fz.zero(stage, groups=LLAMA_GROUPS)
        state = fz.init(model, optim.sgd(0.1), plan, weights=directory)
        full = fz.gather_params(state, plan)
        out[stage] = (full, {k: b.clone() for k, b in model.named_buffers()}) if rank == 0 else None
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shards", ["single", "sharded"])
def test_meta_init_from_hugging_face_weights_equals_eager_load(shards, tmp_path):
    """A model directory in Hugging Face layout (model.safetensors, or an index and its shards) read
    into a meta model, each rank the ranges it holds: the values of the eager model with those
    weights loaded, bit for bit, at every stage, one and two ranks."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    eager = LlamaForCausalLM(_llama_config())
    eager.save_pretrained(tmp_path, max_shard_size="20KB" if shards == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (shards == "sharded")
    want = {k: v.detach() for k, v in eager.named_parameters()}
    for world in (1, 2):
        for stage, (full, bufs) in run_world(_from_weights, world, str(tmp_path), (0, 1, 2, 3)).pop(0).items():
            assert full.keys() == want.keys()
            for k in want:
                assert torch.equal(full[k], want[k]), (shards, world, stage, k)
            for k, b in eager.named_buffers():
                assert torch.equal(bufs[k], b), k


def test_weights_that_do_not_fit_the_model_are_named(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(_llama_config()).save_pretrained(tmp_path)
    with torch.device("meta"):
        bigger = LlamaForCausalLM(_llama_config(intermediate_size=96))
    with pytest.raises(ValueError, match=r"shape \(64, 32\) in the source; the model's 'model.layers.0.mlp.gate_proj.weight' has shape \(96, 32\)"):
        fz.init(bigger, optim.sgd(0.1), fz.zero(3, groups=LLAMA_GROUPS), weights=str(tmp_path))
    with torch.device("meta"):
        deeper = LlamaForCausalLM(_llama_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"the weights have no 'model.layers.2"):
        fz.init(deeper, optim.sgd(0.1), fz.zero(3, groups=LLAMA_GROUPS), weights=str(tmp_path))
