"""TrainState: everything that changes during training, as one pytree; and ``init``.

:func:`build_state` is the one description of what a rank holds: ``init`` runs it on the
model's values, the memory model (``_memory.py``) on meta tensors, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch import nn

from funzero._binding import Binding, bind
from funzero._collectives import all_gather
from funzero._placement import group_of_path
from funzero._plan import Plan
from funzero._precision import Precision, fp32
from funzero.optim import GradientTransformation
from shardspec import is_sharded

__all__ = ["TrainState", "binding_of", "build_state", "gather_params", "init", "state_nbytes", "sync"]

_BINDING_ATTR = "_funzero_binding"


@optree.register_pytree_node_class(namespace="funzero")
class TrainState:
    """The training state, a pytree (optree namespace ``"funzero"``).

    Attributes:
        step: () int64, optimizer steps taken.
        params: ``{group: (n,) param_dtype}``: the full flat buffer or this rank's shard of each
            group (as the plan's params spec says), in the dtype the model computes in.
        master: ``{group: (n,) fp32}``: the master weights the optimizer updates (this rank's
            part, as the opt_state spec says), or ``None`` when ``params`` are fp32.
        opt_state: the optimizer's state over the master (or param) buffers.
        scaler: loss-scaling state (fp16), or ``None``.
        binding: static (not a leaf): layouts, owners, specs, precision and placement, fixed at
            ``init``.
    """

    def __init__(self, step, params, master, opt_state, scaler, binding: Binding) -> None:
        self.step = step
        self.params = params
        self.master = master
        self.opt_state = opt_state
        self.scaler = scaler
        self.binding = binding
        self.donated_at = None  # the step count when a train step consumed this state (not a leaf)

    def check_alive(self, what: str) -> None:
        """Raise if a train step has consumed this state: its buffers belong to the state that
        step returned (they were updated in place)."""
        if self.donated_at is not None:
            raise ValueError(
                f"{what} got a TrainState that was donated to a train step at step {int(self.donated_at)}: "
                "the step updated its buffers in place; use the state that call returned"
            )

    def tree_flatten(self):
        return (self.step, self.params, self.master, self.opt_state, self.scaler), self.binding, (
            "step",
            "params",
            "master",
            "opt_state",
            "scaler",
        )

    @classmethod
    def tree_unflatten(cls, binding, children):
        return cls(*children, binding)

    def replace(self, **kw) -> "TrainState":
        f = {k: getattr(self, k) for k in ("step", "params", "master", "opt_state", "scaler")}
        f.update(kw)
        return TrainState(**f, binding=self.binding)

    def __repr__(self) -> str:
        b = self.binding
        return (
            f"TrainState(stage={b.stage}, groups={len(b.layouts)}, shards={b.num_shards}, "
            f"params={sum(lay.numel for lay in b.layouts.values())}, precision={b.precision})"
        )


def binding_of(model: nn.Module) -> Binding | None:
    """The binding of the last :func:`init` of ``model`` (the template knows what it is bound to,
    so a step built afterwards is ready before its first, possibly compiled, call)."""
    return model.__dict__.get(_BINDING_ATTR)


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in optree.tree_leaves(tree, namespace="funzero") if isinstance(x, torch.Tensor)]


def state_nbytes(state: TrainState, *, device: torch.device | str | None = None) -> dict[str, int]:
    """Bytes this rank holds in each part of the state (distinct storages counted once).

    Args:
        device: count only tensors on this device type (``"cuda"``, ``"cpu"``); None: all.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for part in ("params", "master", "opt_state", "scaler", "step"):
        n = 0
        for t in _leaves(getattr(state, part)):
            if device is not None and t.device.type != torch.device(device).type:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key in seen:
                continue
            seen.add(key)
            n += t.numel() * t.element_size()
        out[part] = n
    out["total"] = sum(out.values())
    return out


def _release(model: nn.Module, binding: Binding) -> None:
    """Replace the module's trainable parameters with meta tensors: the state owns them now."""
    for path, names in binding.aliases.items():
        mod_path, _, leaf = names[0].rpartition(".")
        old = model.get_submodule(mod_path)._parameters[leaf]
        ghost = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
        for name in names:
            mp, _, ln = name.rpartition(".")
            model.get_submodule(mp)._parameters[ln] = ghost


def build_state(b: Binding, tx: GradientTransformation, fill: Callable[[str, int, int, torch.dtype], torch.Tensor] | None,
                device: torch.device | str, *, place: bool = True) -> TrainState:
    """The initial state of binding ``b``: each group's leaves packed (in the master dtype, so the
    fp32 master is exact) into one flat buffer, of which each part keeps what its spec says.

    ``fill(group, lo, hi, dtype)`` gives the elements ``[lo, hi)`` of a group's flat buffer: only
    this rank's shard range where every part of the group is sharded, the whole buffer otherwise
    (one group at a time; ``funzero._materialize.Filler``). ``fill=None`` builds the state of meta
    tensors (shapes and dtypes only); ``place=False`` leaves every buffer where it was made instead
    of where the placement says.
    """
    precision, specs, pl = b.precision, b.specs, b.placement
    master_dtype = precision.opt_dtype
    out_params, out_master = {}, {}
    whole = not is_sharded(specs.params)  # replicated params need the whole buffer (sharded ones imply a sharded master)

    def put(key, t, name, g):
        return pl.place(key, t, name=name, g=g) if place else t

    for g, lay in b.layouts.items():
        lo, hi = (0, lay.padded) if whole else lay.shard_range(b.rank)
        if fill is None:
            made = torch.empty(hi - lo, dtype=master_dtype, device="meta")
        else:
            made = fill(g, lo, hi, master_dtype)
        full = made if hi - lo == lay.padded else None
        own = lay.shard(full, b.rank) if full is not None else made
        held = own if is_sharded(specs.params) else full
        out_params[g] = put("params", held.to(precision.param_dtype, copy=True), f"params.{g}", g)
        if precision.has_master:
            mine = own.clone() if is_sharded(specs.opt_state) else full
            out_master[g] = put("opt_state", mine, f"master.{g}", g)
        del full, own, held, made
    opt_target = out_master if precision.has_master else (
        {g: specs.opt_view(t, b.layouts[g], b.rank) for g, t in out_params.items()}
    )
    acc = tx.traits.accumulate
    if acc is not None:
        # The accumulator holds what backward produces (the full local gradient where the
        # reduce waits for the step, else gradients shaped like the optimizer's target), on the
        # compute device; only the inner state is placed.
        if specs.reduce == "step":
            grad_like = out_params
        else:
            grad_like = {g: torch.empty(t.shape, dtype=t.dtype, device=t.device if fill is None else device)
                         for g, t in opt_target.items()}
        opt_state = acc.init(opt_target, grad_like=grad_like)
        inner = acc.inner_state(opt_state)
        opt_state = acc.with_inner_state(opt_state, _place_tree(pl, inner, "opt") if place else inner)
    else:
        opt_state = tx.init(opt_target)
        opt_state = _place_tree(pl, opt_state, "opt") if place else opt_state
    scaler = None
    if precision.loss_scaling is not None:
        from funzero._scaler import init_scaler

        scaler = init_scaler(precision.loss_scaling, "meta" if fill is None else device)
    step = torch.zeros((), dtype=torch.int64, device="meta" if fill is None else device)
    return TrainState(step, out_params, out_master if precision.has_master else None, opt_state, scaler, b)


def init(
    model: nn.Module,
    tx: GradientTransformation,
    plan: Plan,
    *,
    precision: Precision | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    weights=None,
    init_fn: Callable[[nn.Module], Any] | None = None,
    seed: int = 0,
    release: bool = True,
) -> TrainState:
    """The initial training state of ``model`` under ``plan``.

    Each group's leaves are packed (in the master dtype, so the fp32 master is exact) into one
    flat buffer; each rank keeps what its plan's specs hold and drops the rest. Groups are made
    one at a time, so a model built under ``torch.device("meta")`` never exists whole: each rank
    makes only the range of each group it holds (the whole group where the specs replicate it).

    Where each parameter's initial value comes from, first match wins: ``params``; ``weights``;
    the module's own tensor when it is not on the meta device; otherwise it is made: the modules
    holding it get fresh storage on the compute device and ``init_fn(module)`` (else the Hugging
    Face model's ``_init_weights``, else ``reset_parameters()``) runs with the random generators
    seeded from ``(seed, module path)``. Made values depend on the seed and the module alone, not
    on the world size or stage; :func:`funzero.init_weights` makes the same values eagerly. Values
    taken from the module itself are rank 0's on every rank (a broadcast per group), so replicated
    parameters cannot start apart. Buffers on the meta device are made the same way.

    Args:
        model: any ``nn.Module``, on the meta device or not.
        tx: the optimizer; its state is built over the master (or param) buffers.
        plan: from :func:`funzero.zero`.
        precision: ``funzero.fp32()`` (default), ``bf16()`` or ``fp16()``.
        params: initial values by leaf path, overriding everything else.
        weights: a safetensors file, a Hugging Face model directory (``model.safetensors`` or a
            sharded ``model.safetensors.index.json``) or a ``save_state`` checkpoint directory;
            every rank reads only the ranges it holds. Keys are matched to the module's
            state-dict names (tied parameters load once); a missing, extra or mis-shaped tensor
            is an error naming it.
        init_fn: ``init_fn(module)`` initialises one module's own parameters in place.
        seed: the seed made values derive from.
        release: replace the module's parameters by meta tensors, so the module is a template
            and the state is the only owner of parameter memory (ZeRO's memory needs this).

    Returns:
        a :class:`TrainState` on ``plan.mesh.device``.
    """
    from funzero._materialize import Filler, module_init
    from funzero._step import as_transformation

    tx = as_transformation(tx)
    precision = _precision_of(precision)
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a funzero.Plan from funzero.zero(...), got {type(plan).__name__}")
    binding = bind(model, plan, precision)
    _agree(plan, binding, tx, model)  # the first collective of init: ranks that disagree stop here, all of them
    device = plan.mesh.device
    source, key_map = _open_weights(weights, model, binding)
    needs_init = init_fn is not None or any(
        t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    filler = Filler(model, binding, overrides=params, weights=source, key_map=key_map,
                    init=module_init(model, init_fn) if needs_init else None, seed=seed, device=device)
    _check_nvme_space(binding, tx)
    fill = filler.fill
    if plan.num_data_ranks > 1 and source is None:
        fill = _rank0_values(filler, plan, binding)
    try:
        state = build_state(binding, tx, fill, device)
        filler.finish()
    finally:
        if source is not None:
            source.close()
    if release:
        _release(model, binding)
    model.__dict__[_BINDING_ATTR] = binding
    return state


def _check_nvme_space(binding: Binding, tx: GradientTransformation) -> None:
    nvme = binding.placement.nvme()
    if nvme is not None:
        from funzero._memory import estimate_memory

        # The memory model's NVMe figure already counts the copy each update writes.
        nvme.check_space(estimate_memory(binding, tx=tx).nvme // 2)


def _fingerprint(plan: Plan, b: Binding, tx: GradientTransformation, model: nn.Module) -> list[tuple[str, str]]:
    """What every rank must agree on, item by item: the mesh, the plan's specs and options, the
    precision, the model's tensor-parallel split (rules, then each split leaf's spec and whole
    shape) and sequence-parallel axis, each group's leaves and shapes, and the optimizer state's
    structure. The model's parts come before the groups: where rules differ, so do the groups'
    shapes, and the rules are the cause to name."""
    from funzero._sequence import sequence_axis

    tp, sp = b.tp, sequence_axis(model)
    items = [
        ("the mesh", repr(plan.mesh)),
        ("the ZeRO stage", str(b.stage)),
        ("the specs", repr(b.specs)),
        ("the precision", repr(b.precision)),
        ("the batch convention", plan.batch),
        ("the tensor-parallel rules",
         "none" if tp is None else f"axis {tp.axis!r} of {tp.size} ranks, rules {list(tp.rules)}"),
        ("the tensor-parallel split leaves",
         "none" if tp is None else repr([(p, tp.specs[p], tp.shapes[p]) for p in sorted(tp.specs)])),
        ("the sequence-parallel axis", "none" if sp is None else f"axis {sp.axis!r} of {sp.size} ranks"),
        ("the groups", repr(list(b.layouts))),  # before the placement, which is listed per group
        # kinds, not spellings: each rank may keep its NVMe files in a directory of its own
        ("the placement", repr({k: {g: b.placement.kind(k, g) for g in b.layouts} for k in ("params", "opt_state")})),
        ("the host update modes", f"delayed_update={plan.delayed_update}, async_update={plan.async_update}"),
    ]
    for g, lay in b.layouts.items():
        items.append((f"group {g!r}", repr([(s.path, s.shape) for s in lay.slots])))
    meta = build_state(b, tx, None, "meta", place=False)
    paths, leaves, spec = optree.tree_flatten_with_path(meta.opt_state, namespace="funzero")
    shapes = [(p, tuple(t.shape), str(t.dtype)) for p, t in zip(paths, leaves) if isinstance(t, torch.Tensor)]
    items.append(("the optimizer state's structure", f"{spec}; {shapes}"))
    return items


def _agree(plan: Plan, b: Binding, tx: GradientTransformation, model: nn.Module) -> None:
    """Compare the fingerprint across every rank of the plan's mesh (one object all-gather): the
    data-parallel ranks, replicas included, and the tensor- and sequence-parallel ranks, whose
    collectives pair up with each other's as much as the data-parallel ones do. Any difference
    raises on every rank, naming the first item that differs."""
    mesh = plan.mesh
    group = mesh.group_over(mesh.axis_names)
    if group is None:
        return
    import torch.distributed as dist

    mine = _fingerprint(plan, b, tx, model)
    everyone: list = [None] * mesh.size()
    dist.all_gather_object(everyone, mine, group=group)
    for i, (name, desc) in enumerate(everyone[0]):
        for r, theirs in enumerate(everyone):
            if i >= len(theirs) or theirs[i] != (name, desc):
                other = theirs[i][1] if i < len(theirs) and theirs[i][0] == name else (theirs[i] if i < len(theirs) else "nothing")
                raise ValueError(f"ranks disagree on {name}: rank 0 has {desc}, rank {r} has {other}")
    for r, theirs in enumerate(everyone):
        if len(theirs) != len(everyone[0]):
            raise ValueError(f"ranks disagree on the number of groups: rank 0 has {len(b.layouts)}, rank {r} has others")


def _precision_of(precision) -> Precision:
    if precision is None:
        return fp32()
    if isinstance(precision, Precision):
        return precision
    hint = {torch.float32: "fz.fp32()", torch.bfloat16: "fz.bf16()", torch.float16: "fz.fp16()"}.get(precision)
    raise ValueError(
        f"precision must be a funzero.Precision (fz.fp32(), fz.bf16(), fz.fp16()), got {precision!r}"
        + (f": use {hint}" if hint else "")
    )


def _open_weights(weights, model: nn.Module, binding: Binding):
    """``(source, {leaf path: key})`` for ``init(weights=...)``, or ``(None, None)``."""
    if weights is None:
        return None, None
    from funzero._weights import map_keys, open_weights

    source = open_weights(weights)
    try:
        tp = binding.tp  # a tensor-parallel split reads its slices of the whole tensors
        shapes = {n: tuple(tp.shapes.get(n, p.shape) if tp is not None else p.shape) for n, p in model.named_parameters()}
        buffers = [n for n, _ in model.named_buffers()]
        key_map = map_keys(source, shapes, binding.aliases, skip=buffers)
    except BaseException:
        source.close()
        raise
    return source, key_map


def _rank0_values(filler, plan: Plan, b: Binding):
    """``fill`` where values the module holds (not made from a seed) are rank 0's on every rank:
    such a group is filled whole on rank 0 and broadcast, and each rank keeps its range."""
    from funzero._collectives import broadcast

    def fill(g: str, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        lay = b.layouts[g]
        if all(filler.needs_making(s.path) for s in lay.slots):
            return filler.fill(g, lo, hi, dtype)  # made from (seed, module): equal everywhere
        full = filler.fill(g, 0, lay.padded, dtype)
        full = broadcast(full, plan.mesh, plan.data_axes, tag="init")
        _tp_rank0_whole_leaves(full, lay, b.tp)
        return full[lo:hi]

    return fill


def _tp_rank0_whole_leaves(full: torch.Tensor, lay, tp) -> None:
    """The leaves of ``full`` (one group's buffer) that tp does not split, set to tp rank 0's, in
    place: every tp rank holds them whole and they must start alike (the split leaves are each
    rank's own slices and stay as they are)."""
    from funzero._collectives import broadcast

    if tp is None or tp.size == 1:
        return
    whole = [s for s in lay.slots if s.path not in tp.specs]
    if not whole:
        return
    got = broadcast(torch.cat([full[s.offset:s.offset + s.numel] for s in whole]), tp.mesh, tp.axis, tag="init")
    for s, piece in zip(whole, got.split([s.numel for s in whole])):
        full[s.offset:s.offset + s.numel] = piece


def _place_tree(pl, tree, prefix: str):
    """Every tensor leaf of an optimizer-state tree moved to where ``opt_state`` lives."""
    if not pl.offloaded("opt_state"):
        return tree
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace="funzero")
    del tree
    out = []
    for i, path in enumerate(paths):
        x = leaves[i]
        leaves[i] = None  # let each unplaced leaf go as soon as its placed copy exists
        g = group_of_path(path, pl.where["opt_state"])
        name = f"{prefix}." + ".".join(map(str, path))
        out.append(pl.place("opt_state", x, name=name, g=g) if isinstance(x, torch.Tensor) else x)
        del x
    return optree.tree_unflatten(spec, out)


def gather_params(state: TrainState, plan: Plan | None = None, *, dtype: torch.dtype | None = None,
                  to_rank: int | None = None, names: str = "leaves") -> dict[str, torch.Tensor]:
    """The full parameters ``{leaf path: tensor}``, gathered one group at a time (a collective
    where they are sharded); ``funzero.gather_weights`` with the same arguments.

    Args:
        plan: needed to gather shards across ranks (the plan the state was made with).
        dtype: cast to this dtype (default: the master dtype where there is one, so fp32
            training returns exact values; bf16 returns the fp32 master, gathered).
        to_rank: only this rank gets the tensors (the others get ``{}``); None: every rank.
        names: ``"leaves"`` (a tied parameter once) or ``"state_dict"`` (every name
            ``model.state_dict()`` lists, so ``model.load_state_dict`` takes the result).
    """
    from funzero._weights import gather_weights

    state.check_alive("gather_params")
    return gather_weights(state, plan, to_rank=to_rank, names=names, dtype=dtype)


@torch.compiler.disable  # host-side waiting: a graph break in a compiled step
def sync(state: TrainState) -> TrainState:
    """Wait for work a step left running (the delayed or async host update); returns ``state``.

    Needed only with ``zero(..., delayed_update=True)`` or ``async_update=True`` before reading
    ``state.params``, ``state.master`` or ``state.opt_state`` yourself; ``save_state`` and
    ``gather_params`` call it. Where replicated parameters are refreshed by an all-gather of the
    updated shards (stages 1-2 on several ranks), it is a collective: call it on every rank.
    """
    state.check_alive("sync")
    state.binding.placement.sync()
    return state
