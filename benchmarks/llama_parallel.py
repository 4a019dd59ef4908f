"""The Llama systems of ``multi_gpu.py --model``: funzero with a second mesh axis (tensor,
sequence, or replicate x shard) against FSDP2 + tensor parallelism, FSDP2 HSDP and DeepSpeed
AutoTP / Ulysses, on a Hugging Face ``LlamaForCausalLM`` built on the meta device.
``multi_gpu.py`` times and tabulates; this module builds each system and says what it is.

System names (``--systems``, after ``--model tiny|1b|8b``):

  fz{k}-{eager|compile}        funzero ZeRO stage k over every rank (the reference of the loss column)
  fz{k}-{eager|compile}-tpN    ZeRO over dp = world/N, ``fz.tensor_parallel(rules="llama")`` over tp = N
  fz{k}-{eager|compile}-spN    Ulysses over sp = N, ZeRO over the flattened dp x sp axis
  fz{k}-{eager|compile}-hsdpN  ZeRO sharded over N ranks, replicated over world/N (``replicate=``)
  fsdp2                        ``fully_shard`` per decoder layer and on the root, over every rank
  fsdp2-tpN                    torchtitan's recipe: ``parallelize_module`` (Colwise/Rowwise plans) on
                               the tp dim of a 2-D ``init_device_mesh(("dp", "tp"))``, vocab-parallel
                               embedding, LM head sharded by vocabulary with ``loss_parallel``,
                               sequence parallelism of the norms, then ``fully_shard`` over dp
  fsdp2-tpN-nosp               the same without sequence parallelism (funzero's tp has none)
  fsdp2-hsdpN                  ``fully_shard`` over a 2-D ``("replicate", "shard")`` mesh (HSDP)
  fsdp2...-eager               any of these without compiling the decoder layers
  ds-zero{k}                   DeepSpeed ZeRO stage k over every rank
  ds-zero{k}-autotpN           DeepSpeed's training-time AutoTP (``tensor_parallel: {autotp_size: N}``)
                               under ZeRO stage k over dp = world/N
  ds-zero{k}-spN               DeepSpeed Ulysses for HF models (``UlyssesSPAttentionHF``), sp = N

FSDP2 compiles each decoder layer on a GPU and runs eager on the CPU (:func:`compile_layers`);
DeepSpeed runs eager, as in train_step.py.

Every system trains the same model from the same initial values on the same global batch: funzero
makes its parameters on the meta device group by group (``fz.init(seed=SEED)``); the FSDP2 systems
are parallelised and sharded on the meta device, given storage with ``to_empty`` and filled module
by module with the values ``fz.init`` gives (:func:`init_like_funzero`); DeepSpeed's engine and
AutoTP take a materialised model, so it is made whole on each rank (``fz.init_weights``) and split
by the engine. Each step's global batch is ``G = batch x world`` sequences of ``T`` random tokens
(seed 1234), the same on every rank; each system feeds every rank its piece of it (its dp rank's
rows; for sp, those rows' tokens of its sp rank). The loss of every system is the mean over the
global batch's ``G x (T - 1)`` next-token predictions, so losses agree across systems up to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

SEED = 0  # fz.init's seed, and the values every peer starts from
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1
GROUPS = [r"model\.layers\.(\d+)\."]

# Llama shapes: (LlamaConfig fields, sequences per GPU, tokens per sequence).
MODELS = {
    # 2 layers, GQA (4 heads, 2 KV heads): the CPU smoke run
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=False), 2, 32),
    # hf_models.py's llama-1b (886M): d 2048, 16 layers, 16/8 heads, MLP 5632, vocab 32000, untied
    "1b": (dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False), 4, 2048),
    # Llama-3-8B (8.03B): d 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256, untied
    "8b": (dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False), 1, 4096),
}

_NAME = re.compile(r"(?:fz(?P<fz>[0-3])-(?P<mode>eager|compile)|(?P<fsdp>fsdp2)|ds-zero(?P<ds>[0-3]))"
                   r"(?:-(?P<layout>tp|sp|hsdp|autotp)(?P<size>\d+))?(?P<nosp>-nosp)?(?P<eager>-eager)?")
_LAYOUTS = {"fz": ("tp", "sp", "hsdp"), "fsdp2": ("tp", "hsdp"), "ds": ("autotp", "sp")}


@dataclass(frozen=True)
class Spec:
    """What a system name says: ``family`` (fz, fsdp2, ds), ZeRO ``stage``, ``compiled``, the
    second axis: ``layout`` (dp, tp, sp, hsdp, autotp) of ``size`` ranks (1 for dp), and for FSDP2
    + TP whether torchtitan's sequence parallelism of the norms is on."""

    name: str
    family: str
    stage: int
    compiled: bool
    layout: str
    size: int
    sequence_parallel: bool = False  # FSDP2 + TP: the norms and residual stream sharded by tokens

    def mesh_shape(self, world: int) -> tuple[int, int]:
        """``(outer, inner)``: (dp, tp), (dp, sp) or (replicas, shard size); ``(world, 1)`` for dp."""
        if self.layout == "dp":
            return world, 1
        if self.size < 1 or world % self.size:
            raise ValueError(f"system {self.name!r}: {self.layout} size {self.size} does not divide the world of {world}")
        return world // self.size, self.size

    def layout_label(self, world: int) -> str:
        outer, inner = self.mesh_shape(world)
        return {"dp": f"dp{world}", "tp": f"dp{outer}xtp{inner}", "autotp": f"dp{outer}xtp{inner}",
                "sp": f"dp{outer}xsp{inner}", "hsdp": f"rep{outer}xshard{inner}"}[self.layout]


def parse(name: str) -> Spec:
    """The :class:`Spec` of a Llama system name; ``ValueError`` naming the grammar otherwise."""
    m = _NAME.fullmatch(name)
    family = None if m is None else ("fz" if m["fz"] else "fsdp2" if m["fsdp"] else "ds")
    if (m is None or (m["layout"] and m["layout"] not in _LAYOUTS[family])
            or (m["nosp"] and (family, m["layout"]) != ("fsdp2", "tp")) or (m["eager"] and family != "fsdp2")):
        raise ValueError(f"unknown Llama system {name!r}: fz<k>-<eager|compile>[-tpN|-spN|-hsdpN], "
                         "fsdp2[-tpN[-nosp]|-hsdpN][-eager] or ds-zero<k>[-autotpN|-spN]")
    stage = int(m["fz"] or m["ds"] or 3)  # FSDP2 shards like ZeRO-3
    # funzero: the whole step under fz.compile; FSDP2: each decoder layer compiled, on a GPU only
    # (see compile_layers), unless -eager; DeepSpeed: eager
    compiled = m["mode"] == "compile" if family == "fz" else family == "fsdp2" and not m["eager"]
    return Spec(name, family, stage, compiled, m["layout"] or "dp", int(m["size"] or 1),
                sequence_parallel=family == "fsdp2" and m["layout"] == "tp" and not m["nosp"])


def llama_config(model: str, seq: int):
    from transformers import LlamaConfig

    shape = MODELS[model][0]
    return LlamaConfig(**shape, max_position_embeddings=max(seq, 2048), use_cache=False, attn_implementation="sdpa",
                       bos_token_id=0, eos_token_id=0)


def meta_model(config) -> nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def flops_per_token(config, seq: int) -> float:
    """6N + 12 L d T (PaLM appendix B; N counts every parameter once, as hf_models.py)."""
    n = sum(p.numel() for p in meta_model(config).parameters())
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq


def shifted(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of ``ids`` (B, T), -100 at the last position: what HF's causal-LM loss
    compares the logits with when ``labels=ids``."""
    return F.pad(ids[:, 1:], (0, 1), value=-100)


def q_proj_shape(model: nn.Module) -> list[int]:
    """The tensor-parallel piece of layer 0's q_proj weight this rank computes with: its whole
    shape unsplit, (heads x head dim / tp, d) split. A DTensor's local piece; a DeepSpeed ZeRO-3
    parameter's ``ds_shape``. The smoke test reads it to see that a tp system did split."""
    w = model.model.layers[0].self_attn.q_proj.weight
    w = w.to_local() if hasattr(w, "to_local") else w
    return list(getattr(w, "ds_shape", w.shape))


# --- the initial values ---------------------------------------------------------------------------
def _meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s full shape (a DTensor's shape is its global one) and dtype."""
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


def init_like_funzero(model: nn.Module, *, seed: int = SEED, device) -> None:
    """Fill ``model``'s parameters and buffers, wherever and however they are split (plain tensors
    or DTensors, already given storage on ``device``), with the values ``fz.init(seed=seed)`` trains
    the unsplit model from.

    funzero seeds the initialisation of each module from ``(seed, module path)``. So each module
    here is made once at its full shape, alone, inside a chain of empty modules that gives it its
    path, and initialised by ``fz.init_weights``; this rank's piece of each value is then copied
    in (``distribute_tensor(..., src_data_rank=None)``: every rank made the whole value, nothing is
    sent; the first parameter split over two mesh dims is gathered back once and compared). One
    module's full values live at a time."""
    import funzero as fz
    from torch.distributed.tensor import DTensor, distribute_tensor

    own_init = model._init_weights  # what funzero calls: reset_parameters(), then the model's init
    checked = False

    for path, module in model.named_modules():
        params = {n: p for n, p in module._parameters.items() if p is not None}
        buffers = {n: b for n, b in module._buffers.items() if b is not None}
        if not params and not buffers:
            continue
        ghost = copy.copy(module)  # same class and attributes, no children, full-shape meta tensors
        ghost._modules = {}
        ghost._parameters = {n: None if p is None else nn.Parameter(_meta_like(p), requires_grad=p.requires_grad)
                             for n, p in module._parameters.items()}  # a None bias stays None
        ghost._buffers = {n: None if b is None else _meta_like(b) for n, b in module._buffers.items()}
        ghost._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        root = chain = nn.Module()
        parts = path.split(".") if path else []
        for part in parts[:-1]:
            chain.add_module(part, nn.Module())
            chain = getattr(chain, part)
        if parts:
            chain.add_module(parts[-1], ghost)
        else:
            root = ghost

        def init(m, ghost=ghost):
            if m is ghost:
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
                own_init(m)

        fz.init_weights(root, seed=seed, init_fn=init, device=device)
        with torch.no_grad():
            for n, dst in [*params.items(), *buffers.items()]:
                full = (ghost._parameters[n] if n in params else ghost._buffers[n]).detach()
                if not isinstance(dst, DTensor):
                    dst.copy_(full)
                    continue
                dst.copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None))
                if not checked and dst.device_mesh.ndim > 1:  # FSDP2 over TP's shards: a strided split
                    checked = True
                    if not torch.equal(dst.full_tensor(), full):
                        raise RuntimeError(f"{path}.{n}: distribute_tensor splits {dst.placements} otherwise than "
                                           "FSDP2 does on this torch; the peer would start from other values")


# --- funzero -------------------------------------------------------------------------------------
def funzero_system(spec: Spec, config, batches, device):
    """``(step(i) -> loss, notes)``: funzero's ZeRO stage ``spec.stage`` with the spec's second axis
    on the meta-built Llama. The loss is funzero's metric: the mean over the global batch."""
    import funzero as fz
    from shardspec import Mesh

    world = dist.get_world_size()
    outer, inner = spec.mesh_shape(world)
    model = meta_model(config)
    dev = device.type
    if spec.layout == "tp":
        mesh = Mesh.from_env(("dp", "tp"), (outer, inner), device_type=dev)
        fz.tensor_parallel(model, mesh, rules="llama")
        plan = fz.zero(spec.stage, mesh=mesh, axis="dp", groups=GROUPS, batch="local")
        rows = (mesh.rank("dp"), outer)
    elif spec.layout == "sp":
        mesh = Mesh.from_env(("dp", "sp"), (outer, inner), device_type=dev).flatten(("dp", "sp"), "dp_sp")
        fz.sequence_parallel(model, mesh, axis="sp")
        plan = fz.zero(spec.stage, mesh=mesh, axis="dp_sp", groups=GROUPS, batch="local")
        rows = None
    elif spec.layout == "hsdp":
        mesh = Mesh.from_env(("replicate", "shard"), (outer, inner), device_type=dev)
        plan = fz.zero(spec.stage, mesh=mesh, axis="shard", replicate="replicate", groups=GROUPS, batch="local")
        rows = (dist.get_rank(), world)  # every rank its own rows, numbered row-major as the mesh
    else:
        mesh = Mesh.from_env(("dp",), device_type=dev)
        plan = fz.zero(spec.stage, mesh=mesh, groups=GROUPS, batch="local")
        rows = (dist.get_rank(), world)
    tx = fz.optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    precision = fz.bf16() if dev == "cuda" else fz.fp32()
    notes = {"q_proj_local": q_proj_shape(model)}
    state = fz.init(model, tx, plan, precision=precision, seed=SEED)
    try:  # the memory model against the state it made (activations are not modelled for HF models)
        est = fz.estimate_memory(state.binding, tx=tx)
        notes.update(state_gib=fz.state_nbytes(state)["total"] / 2**30, estimate_state_gib=est.gpu_state / 2**30,
                     estimate_gpu_without_activations_gib=est.gpu / 2**30)
    except Exception as e:  # noqa: BLE001 - a missing estimate is a note, not a failed system
        notes["estimate"] = f"{type(e).__name__}: {e}"[:200]
    if rows is None:
        data = [fz.split_sequence(x, x, mesh) for x in batches]

        def loss_fn(apply, b):
            return apply(**b.hf_kwargs()).loss
    else:
        data = [piece(x, *rows) for x in batches]

        def loss_fn(apply, x):
            return apply(input_ids=x, labels=x).loss

    eager = fz.train_step(model, loss_fn, tx, plan)
    fn = fz.compile(eager) if spec.compiled else eager
    box = {"state": state}

    def step(i, f=fn):
        box["state"], metrics = f(box["state"], data[i])
        return metrics["loss"]  # the mean over every data-parallel rank's share

    step.eager = lambda i: step(i, eager)  # one uncompiled step: what the collective counter reads
    return step, notes


def piece(x: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Rows ``index``/``count`` of the global batch ``x``: one data-parallel rank's."""
    b = x.shape[0] // count
    return x[index * b:(index + 1) * b].contiguous()


# --- FSDP2 (+ tensor parallelism), torchtitan's way -------------------------------------------------
def _tp_plan(sequence_parallel: bool):
    """torchtitan's Llama plan on Hugging Face's module names: ``(root plan, per-layer plan)``.
    q/k/v and gate/up column-wise, o and down row-wise, the embedding split by vocabulary
    (row-wise), the LM head column-wise with its logits left sharded by vocabulary for
    ``loss_parallel``. With ``sequence_parallel`` (torchtitan's way) the norms and the residual
    stream between layers are sharded by tokens: the row-wise outputs are reduce-scattered, and
    each attention and MLP input all-gathered. Without it (``-nosp``: what funzero's tp does) they
    stay whole and the row-wise outputs are all-reduced."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    between = Shard(1) if sequence_parallel else Replicate()  # (B, T, d) between the blocks
    top = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
           "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)}
    layer = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
             "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=between),
             "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
             "mlp.down_proj": RowwiseParallel(output_layouts=between)}
    if sequence_parallel:
        top["model.norm"] = SequenceParallel()
        layer.update({"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                      # HF calls attention with hidden_states=..., the MLP positionally
                      "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                      desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                      "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))})
    return top, layer


def compile_layers(spec: Spec, device) -> bool:
    """FSDP2 compiles each decoder layer on a GPU (torchtitan's and multi_gpu.py's fsdp2 recipe)
    unless the name ends in ``-eager``; on the CPU, where the smoke run checks plumbing and
    numerics, not speed, it runs eager. (On torch 2.13's CPU, AOTAutograd of a tensor-parallel HF
    decoder layer trains differently from eager: the loss after one step 1.5e-5 away, ten times
    what a 1% learning-rate error moves; dynamo alone matches. Read ``vs ref`` of the GPU rows.)"""
    return spec.compiled and device.type == "cuda"


def fsdp2_system(spec: Spec, config, batches, device):
    """``(step(i) -> loss, notes)``: FSDP2 over dp (2-D for HSDP), with torch's tensor parallelism
    on a tp mesh dim for ``-tpN``. Parameters in fp32, compute in bf16 with fp32 gradient reduction
    on a GPU (fp32 throughout on the CPU); torch's AdamW (fused on a GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    world = dist.get_world_size()
    outer, inner = spec.mesh_shape(world)
    dev = device.type
    model = meta_model(config)
    if spec.layout == "tp":
        for what, count in (("attention heads", config.num_attention_heads), ("KV heads", config.num_key_value_heads)):
            if count % inner:  # HF's attention reshapes to (..., -1, head_dim): it would fail later, obscurely
                raise ValueError(f"{spec.name}: {count} {what} do not divide over {inner} tensor-parallel ranks")
        mesh = init_device_mesh(dev, (outer, inner), mesh_dim_names=("dp", "tp"))
        top, per_layer = _tp_plan(spec.sequence_parallel)
        parallelize_module(model, mesh["tp"], top)
        for layer in model.model.layers:
            parallelize_module(layer, mesh["tp"], per_layer)
        shard_mesh, rows = mesh["dp"], (mesh["dp"].get_local_rank(), outer)
    elif spec.layout == "hsdp":
        shard_mesh = init_device_mesh(dev, (outer, inner), mesh_dim_names=("replicate", "shard"))
        rows = (dist.get_rank(), world)
    else:
        shard_mesh, rows = init_device_mesh(dev, (world,), mesh_dim_names=("dp",)), (dist.get_rank(), world)
    notes = {"q_proj_local": q_proj_shape(model), "compiled_layers": compile_layers(spec, device)}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dev == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        if compile_layers(spec, device):
            layer.compile()
        fully_shard(layer, mesh=shard_mesh, mp_policy=mp)
    fully_shard(model, mesh=shard_mesh, mp_policy=mp)
    model.to_empty(device=device)  # each rank's shards only
    init_like_funzero(model, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=dev == "cuda")
    data = [(piece(x, *rows), shifted(piece(x, *rows))) for x in batches]
    positions = torch.arange(batches[0].shape[1], device=device).unsqueeze(0)
    vocab_split = spec.layout == "tp"

    def step(i):
        x, y = data[i]
        with loss_parallel() if vocab_split else contextlib.nullcontext():
            # (B, T, V), a DTensor sharded on V under tp. Positions given: under sequence
            # parallelism HF would number the local tokens only (its rotary sees T / tp of them)
            logits = model(input_ids=x, position_ids=positions).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        return loss.detach()

    return step, notes


# --- DeepSpeed -----------------------------------------------------------------------------------
def deepspeed_unavailable() -> str | None:
    """Why DeepSpeed cannot run here, or None."""
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same: no DeepSpeed rows
        return f"deepspeed is not importable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


def deepspeed_config(spec: Spec, micro_batch: int, device) -> dict:
    """``train_step.deepspeed_config``'s engine (bf16, overlapped contiguous gradients, torch's
    fused AdamW) with AutoTP's ``tensor_parallel: {autotp_size: N}``; fp32 and torch's unfused
    AdamW on the CPU."""
    import train_step as ts

    config = ts.deepspeed_config(spec.stage, micro_batch)
    config["optimizer"]["params"].update(lr=LR, betas=list(BETAS), eps=EPS, weight_decay=WD)
    if spec.layout == "autotp":
        config["tensor_parallel"] = {"autotp_size": spec.size}
    if device.type != "cuda":
        config["bf16"] = {"enabled": False}
        config["optimizer"]["params"]["fused"] = False
    return config


def deepspeed_system(spec: Spec, config, batches, device):
    """``(step(i) -> loss, notes)``: DeepSpeed ZeRO stage ``spec.stage``, with AutoTP for
    ``-autotpN``, on the Llama made whole on each rank (the engine and AutoTP split a
    materialised model)."""
    import deepspeed
    import funzero as fz

    world = dist.get_world_size()
    outer, _ = spec.mesh_shape(world)
    if device.type == "cpu":
        # DeepSpeed JIT-builds a shared-memory all-reduce for CPU ranks (~100 s of C++ on first
        # use); gloo does the same job here.
        # (by its module: the name deepspeed.comm.torch is also torch itself, re-exported)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    model = fz.init_weights(meta_model(config), seed=SEED, device=device)
    micro = batches[0].shape[0] // outer
    notes = {"built": "whole on each rank, then split by the engine"}
    if spec.layout == "sp":
        return _ulysses_system(spec, model, batches, device, micro, notes)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(spec, micro, device))
    # AutoTP groups consecutive ranks into a tp group ([0, 1], [2, 3], ...): dp rank = rank // tp
    rows = (dist.get_rank() // spec.size, outer) if spec.layout == "autotp" else (dist.get_rank(), world)
    data = [piece(x, *rows) for x in batches]

    def step(i):
        loss = engine(input_ids=data[i], labels=data[i]).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, {"q_proj_local": q_proj_shape(engine.module), **notes}


def _ulysses_system(spec: Spec, model, batches, device, micro: int, notes: dict):
    """DeepSpeed's Ulysses for Hugging Face models (ALST: ``UlyssesSPAttentionHF``, the same
    all-to-all as ``deepspeed.sequence.layer.DistributedAttention`` behind HF's attention
    interface): each sp group of consecutive ranks takes one dp rank's rows, each rank a chunk of
    their tokens with global ``position_ids`` and ``shift_labels``; the loss is the token-weighted
    mean over the sp group (ALST's recipe), so that the engine's gradient average over dp x sp is
    the global batch's."""
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")  # its groups need its comm
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]  # register_with_transformers overwrites it, process-wide
    T = batches[0].shape[1]
    mpu = UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", spec.size, micro, seq_length=T,
                                                          seq_length_is_variable=False)

    def close():  # let a later system in this process have SDPA and DeepSpeed's sp groups back
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        getattr(mpu, "_release_sequence_parallel_groups", lambda: None)()  # 0.19.8 refuses a second init

    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), mpu=mpu,
                                               config=deepspeed_config(spec, micro, device))
    except Exception:
        close()
        raise
    group, sp_rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
    chunk = T // spec.size
    mine = slice(sp_rank * chunk, (sp_rank + 1) * chunk)
    positions = torch.arange(T, device=device)[mine].unsqueeze(0)
    data = []
    for x in batches:
        rows = piece(x, dist.get_rank() // spec.size, x.shape[0] // micro)
        data.append((rows[:, mine].contiguous(), shifted(rows)[:, mine].contiguous()))

    def step(i):
        x, y = data[i]
        out = engine(input_ids=x, position_ids=positions.expand(x.shape[0], -1))
        summed = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
        both = torch.stack([summed.detach(), (y != -100).sum().to(summed.dtype)])
        dist.all_reduce(both, group=group)  # the sp group's summed loss and counted tokens
        # ALST backpropagates the group's token-weighted mean through a differentiable all-gather,
        # which hands every rank sp times its own part of the gradient; this is that gradient
        # without the collective (deprecated on torch 2.13). The engine's mean over the dp x sp
        # ranks divides the sp back out.
        engine.backward(summed * spec.size / both[1])
        engine.step()
        return both[0] / both[1]

    step.close = close
    return step, {"q_proj_local": q_proj_shape(engine.module), **notes}


def build(spec: Spec, config, batches, device):
    """``(step(i) -> loss, notes)`` of any Llama system."""
    return {"fz": funzero_system, "fsdp2": fsdp2_system, "ds": deepspeed_system}[spec.family](spec, config, batches, device)


def agreement(rows: list[dict]) -> None:
    """Set each Llama row's ``loss_vs_ref``: its last loss relative to the reference's (of the same
    model and shapes: the first funzero row over plain dp, else the first funzero row;
    ``ref_system``), and ``loss0_vs_ref`` for the first step's loss (before any update: the same
    initial values and data)."""
    refs: dict = {}
    for r in sorted((r for r in rows if r.get("family") == "llama" and "loss_last" in r and r["system"].startswith("fz")),
                    key=lambda r: r["layout"] != f"dp{r['world']}"):  # stable: plain dp first, then run order
        refs.setdefault(_shape_key(r), r)
    for r in rows:
        ref = refs.get(_shape_key(r)) if r.get("family") == "llama" and "loss_last" in r else None
        if ref is not None:
            r["ref_system"] = ref["system"]
            r["loss_vs_ref"] = r["loss_last"] / ref["loss_last"] - 1
            r["loss0_vs_ref"] = r["loss_first"] / ref["loss_first"] - 1


def _shape_key(r: dict) -> tuple:
    return r.get("model"), r.get("world"), r.get("global_batch"), r.get("seq"), r.get("steps")
