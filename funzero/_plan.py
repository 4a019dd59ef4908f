"""Plans: a ZeRO stage is a preset of specs for (params, grads, opt_state), nothing more.

:data:`STAGES` is the one table that knows the stages. Everything else reads a plan's
:class:`StateSpecs`: whether parameters are gathered before compute, how a gradient is reduced
and when, what part of each buffer a rank holds. A second mesh axis is a new spec, not a new
branch: hierarchical sharding (HSDP) is specs that shard over one axis and name the axes
they are replicated over (``StateSpecs.replicate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from funzero._placement import kinds_named, parse_placement
from shardspec import FlatLayout, Mesh, Replicate, Shard, Spec, held_numel, is_sharded

__all__ = ["Plan", "STAGES", "StateSpecs", "zero"]

REDUCE_WHEN = ("backward", "step")


@dataclass(frozen=True)
class StateSpecs:
    """How each part of the training state lives across the data-parallel axes.

    Every part's spec names one axis, the *shard* axis; ``replicate`` names further data-parallel
    axes over which every part is replicated (hierarchical sharding: shard within a node,
    replicate across nodes). Each rank of the data-parallel world (``data_axes``) takes its own
    slice of the batch, so a gradient is averaged over all of them: reduce-scattered over the
    shard axis where its spec shards it, then all-reduced over the axes it is replicated over
    (:meth:`replicated_axes`).

    Attributes:
        params: the parameters the model computes with. A sharded spec means each group is
            gathered just before its owner module runs (and again in backward).
        grads: a group's gradient once reduced: ``Shard`` is a reduce-scatter, ``Replicate`` an
            all-reduce. It is what the optimizer receives, so it is laid out like ``opt_state``.
        opt_state: the fp32 master and the optimizer's state.
        reduce: ``"backward"``: each group's gradient is reduced during backward, once per
            micro-batch; ``"step"``: backward keeps full local gradients and the step reduces
            them once per optimizer step.
        replicate: further data-parallel axes every part is replicated over (``()``: one
            data-parallel axis, plain ZeRO).
    """

    params: Spec
    grads: Spec
    opt_state: Spec
    reduce: str = "backward"
    replicate: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reduce not in REDUCE_WHEN:
            raise ValueError(f"reduce must be one of {REDUCE_WHEN}, got reduce={self.reduce!r}")
        if self.grads != self.opt_state:
            raise ValueError(f"the optimizer receives gradients laid out like its state: grads={self.grads} "
                             f"differs from opt_state={self.opt_state}")
        if is_sharded(self.params) and not is_sharded(self.opt_state):
            raise ValueError(f"sharded params={self.params} need a sharded opt_state (got {self.opt_state}): "
                             "the update reads the master of the shard a rank holds")
        for name in ("params", "grads", "opt_state"):
            spec = getattr(self, name)
            if is_sharded(spec) and (spec.dim != 0 or spec.sections):
                raise ValueError(f"{name}={spec!r}: flat group buffers have one dimension; their specs split dim 0")
        axes = {s.axis for s in (self.params, self.grads, self.opt_state)}
        if len(axes) != 1:
            raise ValueError(f"specs name axes {sorted(axes)}; one data-parallel axis is supported")
        _check_replicate(self.replicate, self.axis)

    @property
    def data_axes(self) -> tuple[str, ...]:
        """Every data-parallel axis: the replicated ones, then the shard axis."""
        return (*self.replicate, self.axis)

    def replicated_axes(self, part: str) -> tuple[str, ...]:
        """The data-parallel axes over which ``part`` (``params``, ``grads``, ``opt_state``) is
        replicated: a gradient is all-reduced over these (after a reduce-scatter over the shard
        axis if its spec shards it)."""
        return self.replicate if is_sharded(getattr(self, part)) else self.data_axes

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


def _check_replicate(replicate, axis: str) -> None:
    if not isinstance(replicate, tuple) or not all(isinstance(a, str) for a in replicate):
        raise ValueError(f"replicate must be a tuple of axis names, got {replicate=}")
    if axis in replicate:
        raise ValueError(f"axis {axis!r} cannot be both the shard axis and replicated over ({replicate=})")
    if len(set(replicate)) != len(replicate):
        raise ValueError(f"replicate names an axis twice: {replicate=}")


def _stage(params: type, grads: type, opt_state: type, reduce: str):
    return lambda axis, replicate=(): StateSpecs(params(axis), grads(axis), opt_state(axis), reduce, tuple(replicate))


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
        mesh: the ranks; ``specs.axis`` is the data-parallel axis shards are split over,
            ``specs.replicate`` the data-parallel axes they are replicated over.
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
        """This process's rank on the shard axis (which shard it holds)."""
        return self.mesh.rank(self.axis)

    @property
    def data_axes(self) -> tuple[str, ...]:
        return self.specs.data_axes

    @property
    def num_replicas(self) -> int:
        """Copies of each shard: ranks over the replicated axes (1 without ``replicate``)."""
        return math.prod([self.mesh.size(a) for a in self.specs.replicate])  # a list: dynamo breaks on a generator

    @property
    def replica(self) -> int:
        """Which copy this process holds (row-major over the replicated axes)."""
        r = 0
        for a in self.specs.replicate:
            r = r * self.mesh.size(a) + self.mesh.rank(a)
        return r

    @property
    def num_data_ranks(self) -> int:
        """Ranks of the data-parallel world, each with its own slice of the batch."""
        return self.num_replicas * self.num_shards

    @property
    def data_rank(self) -> int:
        """This process's index in the data-parallel world (replica-major)."""
        return self.replica * self.num_shards + self.rank


def _check_stage(stage) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage=}")
    return stage


def _data_mesh(mesh: Mesh | None, axis: str, replicate: str | Sequence[str]) -> tuple[Mesh, tuple[str, ...]]:
    """The mesh (default: torchrun's world over ``(*replicate, axis)``) and the replicate axes as a
    tuple, each axis checked to be the mesh's."""
    replicate = (replicate,) if isinstance(replicate, str) else tuple(replicate)
    _check_replicate(replicate, axis)
    if mesh is None:
        mesh = Mesh.from_env((*replicate, axis))
    for a in (axis, *replicate):
        if a not in mesh.axes:
            raise ValueError(f"axis {a!r} is not an axis of {mesh}")
    return mesh, replicate


def _check_host_update(placement: Mapping, delayed_update: bool, async_update: bool) -> None:
    """The overlapped host updates need some optimizer state in host memory and none in a kind
    whose updates write copies (NVMe files); the async update excludes the delayed one."""
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


def zero(
    stage: int,
    *,
    mesh: Mesh | None = None,
    axis: str = "dp",
    replicate: str | Sequence[str] = (),
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

    Hierarchical sharding (HSDP; ZeRO++'s hpZ idea) shards over ``axis`` and replicates over
    the ``replicate`` axes, e.g. ``Mesh(("replicate", "shard"), (nodes, gpus_per_node))``: "own
    shard" is a shard of ``axis``, held alike by every replica, and each data-parallel rank
    (``replicate`` x ``axis``) takes its own slice of the batch:

    ========  =====================================================================  =============
    stage     gradient reduce                                                        params gather
    ========  =====================================================================  =============
    0         all-reduce over ``replicate`` x ``axis`` (one group of all of them)   none
    1, 2      reduce-scatter over ``axis``, then all-reduce of the shard over       all-gather
              ``replicate`` (1/S of the gradient crosses replicas)                  over ``axis``
              (stage 1 once per optimizer step)                                      after update
    3         as 1, 2, per group in backward                                         all-gather
                                                                                     over ``axis``
    ========  =====================================================================  =============

    Args:
        stage: 0, 1, 2 or 3 (an int).
        mesh: the ranks (default: ``Mesh.from_env((*replicate, axis))``: the whole world on
            ``axis``).
        axis: the mesh axis shards are split over.
        replicate: a mesh axis (or several) over which every part of the state is replicated
            (default: none). Per-rank memory follows ``axis``'s size alone.
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
        >>> hsdp = zero(3, mesh=Mesh(("replicate", "shard"), (1, 1)), axis="shard", replicate="replicate")
        >>> hsdp.specs.replicated_axes("grads"), hsdp.num_replicas
        (('replicate',), 1)
    """
    stage = _check_stage(stage)
    if batch not in ("global", "local"):
        raise ValueError(f"batch must be 'global' or 'local', got {batch=}")
    mesh, replicate = _data_mesh(mesh, axis, replicate)
    specs = STAGES[stage](axis, replicate)
    placement = parse_placement(placement, specs, stage=stage)
    _check_host_update(placement, delayed_update, async_update)
    return Plan(stage, mesh, specs, groups, rest, placement, batch, leaf_align, shard_align, bool(delayed_update),
                bool(async_update))
