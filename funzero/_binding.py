"""A plan applied to one model: leaf paths, ties, layouts, owner modules, resolved placement."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from funzero._placement import Placement
from funzero._plan import Plan, StateSpecs
from funzero._precision import Precision
from funzero._sequence import check_sequence_plan
from funzero._tp import tp_layout
from shardspec import FlatLayout, assign_groups, build_layouts

__all__ = ["Binding", "bind", "param_count"]


@dataclass(frozen=True, eq=False)
class Binding:
    """A plan applied to one model's parameters: computed once, at ``init``, from shapes alone.

    The static part of a :class:`~funzero.TrainState` (its pytree aux data).

    Attributes:
        paths: trainable leaf paths (tied parameters appear once, under their first name).
        aliases: ``{path: (every module path that names the same parameter)}``.
        layouts: ``{group: FlatLayout}`` in the parameter dtype.
        owners: ``{group: module path}``: the smallest module containing all the group's leaves
            (where the group's parameters are handed to compute, just in time).
        num_shards / rank: of the data-parallel axis shards are split over.
        precision / specs / stage: of the plan (``stage`` a label for messages and checkpoints).
        placement: the plan's placement resolved against the groups (it also owns the host update).
        tp: the model's tensor-parallel split (``funzero._tp.TPLayout``), or None.
        num_replicas: copies of each shard, over the axes the specs replicate over (1: plain ZeRO).
    """

    paths: tuple[str, ...]
    aliases: Mapping[str, tuple[str, ...]]
    layouts: Mapping[str, FlatLayout]
    owners: Mapping[str, str]
    num_shards: int
    rank: int
    precision: Precision
    specs: StateSpecs
    stage: int
    placement: Placement
    tp: Any = None
    num_replicas: int = 1


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]  # module path of each leaf
    out = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            out.append(level[0])
        else:
            break
    return ".".join(out)


def bind(model: nn.Module, plan: Plan, precision: Precision, *, training: bool = True) -> Binding:
    """Resolve ``plan`` against ``model``'s parameters (names, shapes, ties).

    ``training=False`` (the memory model) resolves the placement without touching what it names
    (no NVMe directory is made).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    aliases = {n: tuple(by_id[id(p)]) for n, p in named}
    for n, p in named:
        if not p.dtype.is_floating_point:
            raise ValueError(f"parameter {n!r} has dtype {p.dtype}; only floating-point parameters train")
    paths = tuple(n for n, _ in named)
    groups = assign_groups(paths, plan.groups, rest=plan.rest)
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in named}
    layouts = build_layouts(
        shapes,
        groups,
        num_shards=plan.num_shards,
        dtype=precision.param_dtype,
        leaf_align=plan.leaf_align,
        shard_align=plan.shard_align,
    )
    owners = {g: _common_prefix([a for p in lay.paths for a in aliases[p]]) for g, lay in layouts.items()}
    check_sequence_plan(model, plan)
    b = from_layouts(plan, layouts, precision, paths=paths, aliases=aliases, owners=owners, training=training)
    return dataclasses.replace(b, tp=tp_layout(model))


def from_layouts(plan: Plan, layouts: Mapping[str, FlatLayout], precision: Precision, *, paths=(), aliases=None,
                 owners=None, training: bool = True) -> Binding:
    """A binding of ``plan`` for groups known only by their layouts (the memory model's view of
    a model it has only a parameter count of)."""
    placement = Placement(plan.placement, plan.mesh.device, rank=plan.rank, layouts=layouts, training=training)
    return Binding(tuple(paths), dict(aliases or {}), dict(layouts), dict(owners or {g: "" for g in layouts}),
                   plan.num_shards, plan.rank, precision, plan.specs, plan.stage, placement, num_replicas=plan.num_replicas)


def param_count(model: nn.Module) -> int:
    """Trainable parameters, tied ones counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
