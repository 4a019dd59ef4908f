"""Plans: a ZeRO stage is a preset of specs for (params, grads, opt_state), nothing more.

:data:`STAGES` is the one table that knows the stages. Everything else reads a plan's
:class:`StateSpecs`: whether parameters are gathered before compute, how a gradient is reduced
and when, what part of each buffer a rank holds. A second mesh axis is a new spec, not a new
branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from funzero._placement import kinds_named, parse_placement
from shardspec import FlatLayout, Mesh, Replicate, Shard, Spec, held_numel, is_sharded

__all__ = ["Plan", "STAGES", "StateSpecs", "zero"]

REDUCE_WHEN = ("backward", "step")


@dataclass(frozen=True)
class StateSpecs:
    """How each part of the training state lives across the data-parallel axis.

    Attributes:
        params: the parameters the model computes with. A sharded spec means each group is
            gathered just before its owner module runs (and again in backward).
        grads: a group's gradient once reduced: ``Shard`` is a reduce-scatter, ``Replicate`` an
            all-reduce. It is what the optimizer receives, so it is laid out like ``opt_state``.
        opt_state: the fp32 master and the optimizer's state.
        reduce: ``"backward"``: each group's gradient is reduced during backward, once per
            micro-batch; ``"step"``: backward keeps full local gradients and the step reduces
            them once per optimizer step.
    """

    params: Spec
    grads: Spec
    opt_state: Spec
    reduce: str = "backward"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCE_WHEN:
            raise ValueError(f"reduce must be one of {REDUCE_WHEN}, got reduce={self.reduce!r}")
        if self.grads != self.opt_state:
            raise ValueError(f"the optimizer receives gradients laid out like its state: grads={self.grads} "
                             f"differs from opt_state={self.opt_state}")
        if is_sharded(self.params) and not is_sharded(self.opt_state):
            raise ValueError(f"sharded params={self.params} need a sharded opt_state (got {self.opt_state}): "
                             "the update reads the master of the shard a rank holds")
        axes = {s.axis for s in (self.params, self.grads, self.opt_state)}
        if len(axes) != 1:
            raise ValueError(f"specs name axes {sorted(axes)}; one data-parallel axis is supported")

    @property
    def axis(self) -> str:
        return self.params.axis

    def held(self, part: str, layout: FlatLayout) -> int:
        """Elements of ``layout``'s buffer a rank holds of ``part`` (``params``, ``grads``,
        ``opt_state``)."""
        return held_numel(getattr(self, part), layout)

    def opt_view(self, params: torch.Tensor, layout: FlatLayout, rank: int) -> torch.Tensor:
        """The part of a group's params buffer that this rank's optimizer state covers: the whole
        buffer where both specs agree, this rank's shard of the full buffer where only the
        optimizer state is sharded."""
        if is_sharded(self.opt_state) and not is_sharded(self.params):
            return layout.shard(params, rank)
        return params

    @property
    def regather(self) -> bool:
        """Whether the updated shards are all-gathered into full parameters after the update."""
        return is_sharded(self.opt_state) and not is_sharded(self.params)


def _stage(params: type, grads: type, opt_state: type, reduce: str):
    return lambda axis: StateSpecs(params(axis), grads(axis), opt_state(axis), reduce)


# The ZeRO stages (Rajbhandari et al., 2020, sec. 5): which parts are partitioned, and whether
# gradients are reduced per micro-batch in backward or once per optimizer step.
STAGES = {
    0: _stage(Replicate, Replicate, Replicate, "backward"),  # data parallelism: all-reduce
    1: _stage(Replicate, Shard, Shard, "step"),  # P_os: one reduce-scatter per optimizer step
    2: _stage(Replicate, Shard, Shard, "backward"),  # P_os+g: reduce-scatter per group in backward
    3: _stage(Shard, Shard, Shard, "backward"),  # P_os+g+p: gather before use, reduce-scatter after
}


@dataclass(frozen=True)
class Plan:
    """What lives where: the output of :func:`zero`.

    Attributes:
        stage: the ZeRO stage the specs come from (a label: the code reads ``specs``).
        specs: :class:`StateSpecs` for params, grads and opt_state.
        mesh: the ranks; ``specs.axis`` is the data-parallel axis shards are split over.
        groups: group rules (see ``shardspec.assign_groups``); ``rest`` names the group of the
            leaves no rule matches (``None``: such a leaf is an error).
        placement: where state leaves live (``{"opt_state": "cpu"}``, or leaf-path rules),
            parsed (see ``funzero._placement``).
        batch: ``"global"``: the step receives the global batch and takes this rank's slice of
            dim 0 (JAX's global-array view; the default), ``"local"``: it receives its own slice.
    """

    stage: int
    mesh: Mesh
    specs: StateSpecs
    groups: Sequence | Mapping | None = None
    rest: str | None = "rest"
    placement: Mapping = field(default_factory=dict)
    batch: str = "global"
    leaf_align: int = 16
    shard_align: int = 64
    delayed_update: bool = False
    async_update: bool = False

    @property
    def axis(self) -> str:
        return self.specs.axis

    @property
    def num_shards(self) -> int:
        return self.mesh.size(self.axis)

    @property
    def rank(self) -> int:
        return self.mesh.rank(self.axis)


def _check_stage(stage) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage=}")
    return stage


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
        stage: 0, 1, 2 or 3 (an int).
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
            the numerics; off by default. See ``funzero._placement._host``.
        async_update: with optimizer state in host memory, the step returns while its host
            update still runs, and the next step's forward waits for each group's new
            parameters just before the group's owner module runs: the update overlaps the next
            forward. Exact (the same numbers as without it). A compiled step waits for the whole
            update at its start. The state's params, master and optimizer state are final only
            after :func:`funzero.sync` (which ``save_state`` and ``gather_params`` call) or after
            the next step. Off by default.

    Example:
        >>> plan = zero(3, groups=[r"blocks\\.(\\d+)\\."])
    """
    stage = _check_stage(stage)
    if batch not in ("global", "local"):
        raise ValueError(f"batch must be 'global' or 'local', got {batch=}")
    if mesh is None:
        mesh = Mesh.from_env((axis,))
    if axis not in mesh.axes:
        raise ValueError(f"axis {axis!r} is not an axis of {mesh}")
    specs = STAGES[stage](axis)
    placement = parse_placement(placement, specs, stage=stage)
    # The overlapped host updates need some optimizer state in host memory and none in a kind
    # whose updates write copies (NVMe files).
    kinds = kinds_named(placement, "opt_state")
    overlappable = any(k.offloaded for k in kinds) and not any(k.copies for k in kinds)
    if delayed_update and not overlappable:
        raise ValueError(
            f"delayed_update=True needs placement opt_state='cpu' (it overlaps the host update with "
            f"the next step), got placement={placement!r}"
        )
    if async_update and (not overlappable or delayed_update):
        raise ValueError(
            "async_update=True needs placement opt_state='cpu' (or rules with 'cpu' and no 'nvme:') "
            f"and no delayed_update (which is asynchronous already), got placement={placement!r}, "
            f"{delayed_update=}"
        )
    return Plan(stage, mesh, specs, groups, rest, placement, batch, leaf_align, shard_align, bool(delayed_update),
                bool(async_update))
