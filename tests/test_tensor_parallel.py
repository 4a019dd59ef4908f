"""Tensor parallelism (issue 23): rules over a (dp, tp) mesh, ZeRO over dp, against one process."""

from __future__ import annotations

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
    if kind == "gpt":
        ref = tiny_gpt(dtype=torch.float64, **GPT_KW)
        ref.loss_function = lambda logits, t: F.cross_entropy(logits, t)  # fp64, as the split one
        return torch_reference(ref, batches(STEPS, vocab=VOCAB), clip=clip)
    out = torch_reference(_Labels(tiny_llama()), batches(STEPS, vocab=VOCAB), clip=clip)
    return {k.removeprefix("inner."): v for k, v in out.items()}


def _model(kind: str):
    return tiny_gpt(dtype=torch.float64, **GPT_KW) if kind == "gpt" else tiny_llama()


def _train(kind, mesh, stage, clip=None, count=False):
    """STEPS of fz with tp on ``mesh`` at ZeRO ``stage`` over dp: the gathered parameters (and the
    first step's collective calls and elements when ``count``)."""
    model = _model(kind)
    fz.tensor_parallel(model, mesh, rules=kind if kind == "gpt" else "llama")
    plan = fz.zero(stage, mesh=mesh, axis="dp", groups=GROUPS if kind == "gpt" else [r"layers\.(\d+)\."])
    tx = fz.optim.adamw(1e-2, weight_decay=0.1)
    if clip is not None:
        tx = fz.optim.chain(fz.optim.clip_by_global_norm(clip), tx)
    state = fz.init(model, tx, plan, precision=fz.Precision(torch.float64))
    step = fz.train_step(model, lm_loss if kind == "gpt" else _hf_loss, tx, plan)
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
    for name, stage, clip in scenarios:
        full, counts = _train(kind, mesh, stage, clip, count=name == "count")
        out[name] = (full, counts) if rank == 0 else None
    return out


_SCENARIOS = [("count", 0, None), ("s1", 1, None), ("s2", 2, None), ("s3", 3, None),
              ("s1-clip", 1, CLIP), ("s3-clip", 3, CLIP)]


def _check(results, refs):
    for name, (got, _) in results.items():
        ref = refs["clip" if name.endswith("clip") else "plain"]
        assert got.keys() == ref.keys(), name
        for k in ref:
            assert got[k].shape == ref[k].shape, (name, k)
            assert _rel(got[k], ref[k]) < 1e-10, (name, k, _rel(got[k], ref[k]))


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
    refs = {"plain": _reference("llama"), "clip": _reference("llama", CLIP)}
    results = run_world(_world, 4, "llama", 2, 2, _SCENARIOS)[0]
    _check(results, refs)
    _check_counts(results["count"][1], num_blocks=2, local_batch=4, seq=16, hidden=32)


def test_gpt_tp4_equals_one_process():
    refs = {"plain": _reference("gpt"), "clip": _reference("gpt", CLIP)}
    results = run_world(_world, 4, "gpt", 1, 4, [("count", 0, None), ("s3-clip", 3, CLIP)])[0]
    _check(results, refs)
    _check_counts(results["count"][1], num_blocks=2, local_batch=8, seq=16, hidden=24)
