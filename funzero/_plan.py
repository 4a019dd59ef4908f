"""Plans: a ZeRO stage is a preset of specs for (params, grads, opt_state), nothing more."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from funzero._precision import Precision
from shardspec import FlatLayout, Mesh, Replicate, Shard, Spec, assign_groups, build_layouts

__all__ = ["Plan", "zero"]


@dataclass(frozen=True)
class Plan:
    """What lives where: the output of :func:`zero`.

    Attributes:
        stage: the ZeRO stage (0-3) the specs come from.
        mesh: the ranks; ``axis`` is the data-parallel axis that shards are split over.
        groups: group rules (see ``shardspec.assign_groups``); ``rest`` names the group of the
            leaves no rule matches (``None``: such a leaf is an error).
        placement: where state leaves live (``{"opt_state": "cpu"}``, or leaf-path rules); see
            ``funzero._placement``.
        batch: ``"global"``: the step receives the global batch and takes this rank's slice of
            dim 0 (JAX's global-array view; the default), ``"local"``: it receives its own slice.
    """

    stage: int
    mesh: Mesh
    axis: str = "dp"
    groups: Sequence | Mapping | None = None
    rest: str | None = "rest"
    placement: Mapping[str, str] = field(default_factory=dict)
    batch: str = "global"
    leaf_align: int = 16
    shard_align: int = 64
    delayed_update: bool = False
    async_update: bool = False

    @property
    def num_shards(self) -> int:
        return self.mesh.size(self.axis)

    @property
    def rank(self) -> int:
        return self.mesh.rank(self.axis)

    # The stage as specs (DESIGN.md, "The one idea").
    @property
    def param_spec(self) -> Spec:
        return Shard(self.axis) if self.stage == 3 else Replicate()

    @property
    def grad_spec(self) -> Spec:
        return Shard(self.axis) if self.stage >= 2 else Replicate()

    @property
    def opt_spec(self) -> Spec:
        return Shard(self.axis) if self.stage >= 1 else Replicate()

    @property
    def reduce_in_backward(self) -> bool:
        """Stages 0, 2, 3 reduce each group's gradient during backward; stage 1 once per step."""
        return self.stage != 1

    @property
    def params_sharded(self) -> bool:
        return isinstance(self.param_spec, Shard)

    @property
    def grads_sharded(self) -> bool:
        return isinstance(self.grad_spec, Shard)

    @property
    def opt_sharded(self) -> bool:
        return isinstance(self.opt_spec, Shard)

    def opt_view(self, params: "torch.Tensor", layout: FlatLayout) -> "torch.Tensor":
        """The part of a group's params buffer that this rank's optimizer state covers.

        The whole buffer where both are full (stage 0) or both are this rank's shard (stage 3);
        this rank's shard of the full buffer where only the optimizer state is sharded (1, 2).
        """
        if self.opt_sharded and not self.params_sharded:
            return layout.shard(params, self.rank)
        return params


def zero(
    stage: int,
    *,
    mesh: Mesh | None = None,
    axis: str = "dp",
    groups: Sequence | Mapping | None = None,
    rest: str | None = "rest",
    placement: Mapping[str, str] | None = None,
    batch: str = "global",
    leaf_align: int = 16,
    shard_align: int = 64,
    delayed_update: bool = False,
    async_update: bool = False,
) -> Plan:
    """The plan for ZeRO ``stage`` on ``mesh``.

    ========  =============  =====================================  ===============
    stage     params held    gradient reduce                        opt_state held
    ========  =============  =====================================  ===============
    0         full           all-reduce per group, in backward      full
    1         full           one reduce-scatter per optimizer step  own shard
    2         full           reduce-scatter per group, in backward  own shard
    3         own shard      reduce-scatter per group, in backward  own shard
    ========  =============  =====================================  ===============

    Args:
        stage: 0, 1, 2 or 3.
        mesh: the ranks (default: ``Mesh.from_env((axis,))``).
        groups: rules grouping leaves into gather/reduce units, e.g. ``[r"blocks\\.(\\d+)\\."]``.
        rest: group of unmatched leaves, or ``None`` to require every leaf be matched.
        placement: offload: ``{"opt_state": "cpu"}``, ``{"opt_state": "nvme:/scratch", "params":
            "cpu"}``, or leaf-path rules ``{"opt_state": [(r"h\\.[0-7]\\.", "device"), ("", "cpu")]}``
            (see ``funzero._placement``).
        batch: ``"global"`` or ``"local"`` (see :class:`Plan`).
        delayed_update: with ``placement={"opt_state": "cpu"}``, ZeRO-Offload's one-step delayed
            parameter update: step t's host update overlaps step t+1's forward and backward, so
            each gradient is taken at the parameters from before the previous update. Changes
            the numerics; off by default. See ``funzero._offload``.
        async_update: with optimizer state in host memory, the step returns while its host
            update still runs, and the next step's forward waits for each group's new
            parameters just before the group's first module runs: the update overlaps the next
            forward. Exact (the same numbers as without it). Per-group waits need an eager step
            whose backward hands over per-leaf gradients (one rank without clipping, fp16 loss
            scaling or accumulation, or stage 2 on several ranks, no stage-3 gathers); other
            steps wait for the whole update at their start. A group is waited for when a
            module that holds one of its parameters (tied names included) starts its forward,
            so a model whose forward reads a module's parameter before that module runs must
            not use ``async_update``. The state's params, master and optimizer state are final
            only after :func:`funzero.sync` (which ``save_state`` and ``gather_params`` call) or
            after the next step. Off by default.

    Example:
        >>> plan = zero(3, groups=[r"blocks\\.(\\d+)\\."])
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage=}")
    if batch not in ("global", "local"):
        raise ValueError(f"batch must be 'global' or 'local', got {batch=}")
    if mesh is None:
        mesh = Mesh.from_env((axis,))
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of {mesh}")
    from funzero._placement import validate_placement

    placement = validate_placement(dict(placement or {}), stage)
    opt_where = placement.get("opt_state", "device")
    opt_where = [opt_where] if isinstance(opt_where, str) else [w for _, w in opt_where]
    if delayed_update and ("cpu" not in opt_where or any(w.startswith("nvme:") for w in opt_where)):
        raise ValueError(
            f"delayed_update=True needs placement opt_state='cpu' (it overlaps the host update with "
            f"the next step), got placement={placement!r}"
        )
    if async_update and ("cpu" not in opt_where or any(w.startswith("nvme:") for w in opt_where) or delayed_update):
        raise ValueError(
            "async_update=True needs placement opt_state='cpu' (or rules with 'cpu' and no 'nvme:') "
            f"and no delayed_update (which is asynchronous already), got placement={placement!r}, "
            f"{delayed_update=}"
        )
    return Plan(stage, mesh, axis, groups, rest, placement, batch, leaf_align, shard_align, bool(delayed_update),
                bool(async_update))


@dataclass(frozen=True)
class Binding:
    """A plan applied to one model's parameters: computed once, at ``init``, from shapes alone.

    Attributes:
        paths: trainable leaf paths (tied parameters appear once, under their first name).
        aliases: ``{path: [every module path that names the same parameter]}``.
        layouts: ``{group: FlatLayout}`` in the parameter dtype.
        owners: ``{group: module path}``: the smallest module containing all the group's leaves
            (where stage 3 gathers the group just in time).
        num_shards / rank: of the data-parallel axis.
    """

    paths: tuple[str, ...]
    aliases: Mapping[str, tuple[str, ...]]
    layouts: Mapping[str, FlatLayout]
    owners: Mapping[str, str]
    num_shards: int
    rank: int
    precision: Precision
    stage: int
    placement: "Placement"


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]  # module path of each leaf
    out = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            out.append(level[0])
        else:
            break
    return ".".join(out)


def bind(model: nn.Module, plan: Plan, precision: Precision) -> Binding:
    """Resolve ``plan`` against ``model``'s parameters (names, shapes, ties)."""
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
    from funzero._placement import Placement

    placement = Placement.resolve(dict(plan.placement), plan.mesh.device, rank=plan.rank, layouts=layouts)
    return Binding(paths, aliases, layouts, owners, plan.num_shards, plan.rank, precision, plan.stage, placement)


def param_count(model: nn.Module) -> int:
    """Trainable parameters, tied ones counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


