"""The placement vocabulary, parsed and checked once, and resolved against a model's groups.

``placement={"opt_state": "cpu"}`` keeps the fp32 master and the optimizer's moments in host
memory (ZeRO-Offload); ``"nvme:/path"`` keeps them in files (ZeRO-Infinity);
``{"params": "cpu"}`` keeps sharded (stage-3) parameters in pinned host memory and gathers them
onto the device just in time. Values: ``"device"`` (default: the mesh's device), ``"cuda"``,
``"cpu"``, ``"nvme:<dir>"`` (``"nvme"`` without a directory only for memory estimates).

A value may also be a list of **leaf-path rules**, ``[(regex, where), ...]``, matched against the
parameters' leaf paths (``re.search``, first match wins)::

    placement={"opt_state": [(r"h\\.[0-7]\\.", "device"), ("", "cpu")]}

keeps the optimizer state of blocks 0-7 on the GPU and the rest on the host (DeepSpeed calls a
partial optimizer offload "Offload++"). State is stored per group (the plan's ``groups``), so a
rule places whole groups: every leaf of a group must land in the same place, every leaf must be
matched by some rule, and every rule must match some leaf; each mistake is a ``ValueError``
naming the leaf, group or rule. 0-d leaves (step counts) live in host memory when any group of
their part does.

This module is the only place a placement string is read: everything else asks the resolved
:class:`Placement` (which kind holds a group, whether it is offloaded, which memory tier).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from funzero._placement._device import Device
from funzero._placement._host import Cpu, HostUpdate
from funzero._placement._kind import Kind
from funzero._placement._nvme import Nvme
from shardspec import is_sharded

__all__ = ["KINDS", "PARTS", "Placement", "conflict", "group_of_path", "kinds_named", "parse_placement", "parse_where"]

KINDS: tuple[type[Kind], ...] = (Device, Cpu, Nvme)
PARTS = ("params", "opt_state")
# What each offloaded part needs of the plan's specs, in a user's words.
_NEEDS = {
    "opt_state": ("ZeRO stage >= 1 (a sharded optimizer state; stage 0 keeps a full optimizer "
                  "state on every rank; offloading it is what stage 1 with offload does)"),
    "params": "ZeRO stage 3 (sharded parameters; stages 0-2 compute with full parameters held on the device)",
}


def parse_where(text, *, key: str, training: bool = True) -> tuple[type[Kind], str]:
    """``(kind, argument)`` for one placement value.

    Raises:
        ValueError: naming ``text`` when no kind spells it so, or it is malformed.
    """
    if isinstance(text, str):
        for kind in KINDS:
            arg = kind.parse(text)
            if arg is not None:
                if training and kind is Nvme and not arg:
                    raise ValueError(f"placement {key}={text!r}: nvme needs a directory, e.g. 'nvme:/local/scratch'")
                return kind, arg
    raise ValueError(f"placement {text!r} is not one of 'device', 'cuda', 'cpu', 'nvme:<dir>'")


def kinds_named(placement: Mapping, key: str) -> list[type[Kind]]:
    """The kinds a (parsed) placement names for part ``key`` (``device`` when it names none)."""
    where = placement.get(key, "device")
    texts = [where] if isinstance(where, str) else [w for _, w in where]
    return [parse_where(w, key=key, training=False)[0] for w in texts]


def _rules(key: str, where) -> tuple[tuple[str, str], ...]:
    """``where`` as rules: a string is the one rule that matches everything."""
    if isinstance(where, str):
        return (("", where),)
    if isinstance(where, Mapping) or not isinstance(where, Sequence) or not where:
        raise ValueError(
            f"placement[{key!r}] must be a string or a non-empty list of (regex, where) rules, got {where!r}"
        )
    out = []
    for rule in where:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(x, str) for x in rule)):
            raise ValueError(f"placement[{key!r}] rule {rule!r} is not a (regex, where) pair of strings")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"placement[{key!r}] rule {rule[0]!r} is not a valid regex: {e}") from None
        out.append((rule[0], rule[1]))
    return tuple(out)


def conflict(placement: Mapping | None, specs, *, stage=None) -> str | None:
    """Why a (well-formed) ``placement`` cannot be used with ``specs``, or None if it can: an
    offloaded part must be sharded (the planner asks this rather than catching errors)."""
    for key, where in dict(placement or {}).items():
        texts = [where] if isinstance(where, str) else [w for _, w in where]
        for w in texts:
            kind, _ = parse_where(w, key=key, training=False)
            if kind.offloaded and not is_sharded(getattr(specs, key)):
                got = "" if stage is None else f", got stage={stage}"
                return f"placement {key}={w!r} needs {_NEEDS[key]}{got}"
    return None


def parse_placement(placement: Mapping | None, specs=None, *, stage=None, training: bool = True) -> dict:
    """Check a placement mapping against the plan's specs; return it normalised (rules as tuples).

    Args:
        specs: the plan's :class:`~funzero._plan.StateSpecs` (None: not checked against a plan).
        stage: the stage the specs come from, for messages.
        training: a placement to train with (``nvme`` needs its directory) rather than to estimate.

    Raises:
        ValueError: an unknown key, kind or malformed rule, or an offload the specs cannot do
            (naming the key and value).
    """
    out = {}
    for key, where in dict(placement or {}).items():
        if key not in PARTS:
            raise ValueError(f"placement key {key!r} is not one of {PARTS}")
        rules = _rules(key, where)
        for _, w in rules:
            parse_where(w, key=key, training=training)
        out[key] = where if isinstance(where, str) else rules
    why = None if specs is None else conflict(out, specs, stage=stage)
    if why is not None:
        raise ValueError(why)
    return out


def _resolve_groups(key: str, where, layouts: Mapping) -> dict[str, str]:
    """``{group: where}`` for one part of the state, from a string or leaf-path rules."""
    if isinstance(where, str):
        return {g: where for g in layouts}
    rules = [(re.compile(rx), w, rx) for rx, w in where]
    used = [False] * len(rules)
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for g, lay in layouts.items():
        for path in lay.paths:
            for i, (crx, w, _) in enumerate(rules):
                if crx.search(path):
                    used[i] = True
                    break
            else:
                raise ValueError(
                    f"placement[{key!r}]: leaf {path!r} is matched by no rule; end the rules with "
                    "a catch-all such as ('', 'cpu')"
                )
            if g in out and out[g] != w:
                raise ValueError(
                    f"placement[{key!r}] puts group {g!r} in two places: leaf {first[g]!r} on "
                    f"{out[g]!r}, leaf {path!r} on {w!r}; a group's state lives in one place "
                    "(change the rules, or the plan's groups=)"
                )
            out.setdefault(g, w)
            first.setdefault(g, path)
    for (_, _, rx), hit in zip(rules, used):
        if not hit:
            raise ValueError(f"placement[{key!r}] rule {rx!r} matches no leaf path (none an earlier rule did not take)")
    return out


def group_of_path(path: Sequence, groups: Mapping) -> str | None:
    """The group a state leaf belongs to: the last element of its tree path that names a group."""
    for part in reversed(tuple(path)):
        if isinstance(part, str) and part in groups:
            return part
    return None


class Placement:
    """A parsed placement resolved against the compute device and a model's groups.

    ``kind_of(key, g)`` is the :class:`~funzero._placement._kind.Kind` holding part ``key``
    (``"params"`` or ``"opt_state"``) of group ``g``; the other methods answer for a group, or,
    without one, for the part as a whole. It also owns the binding's host update
    (:attr:`host`), made on first use.
    """

    def __init__(self, rules: Mapping, compute: torch.device, *, rank: int = 0, layouts: Mapping, training: bool = True) -> None:
        self.rules = dict(rules)
        self.compute = compute
        self.where: dict[str, dict[str, str]] = {}
        self._of: dict[str, dict[str, Kind]] = {}
        made: dict[type, Kind] = {}
        for key in PARTS:
            self.where[key] = _resolve_groups(key, self.rules.get(key, "device"), layouts)
            self._of[key] = {}
            for g, w in self.where[key].items():
                cls, arg = parse_where(w, key=key, training=training)
                kind = cls(compute, rank=rank, arg=arg)  # cheap: resources come on first use
                if training:
                    kind.check(key)
                if cls in made and not made[cls].same(kind):
                    raise ValueError(f"all {cls.name} placements must use the same directory")
                self._of[key][g] = made.setdefault(cls, kind)
        self._host: HostUpdate | None = None

    # --- questions ----------------------------------------------------------------------------
    def kind_of(self, key: str, g: str) -> Kind:
        return self._of[key][g]

    def kinds(self, key: str) -> set[str]:
        """Every kind name (``device``, ``cpu``, ``nvme``) some group of ``key`` lives in."""
        return {k.name for k in self._of[key].values()}

    def kind(self, key: str, g: str | None = None) -> str:
        """The kind name of group ``g``; without ``g``, of the whole part (``mixed`` when rules
        put its groups in different kinds)."""
        if g is not None:
            return self._of[key][g].name
        names = self.kinds(key)
        return names.pop() if len(names) == 1 else "mixed"

    def offloaded(self, key: str, g: str | None = None) -> bool:
        """Whether group ``g`` (without ``g``: any group) of ``key`` lives outside device memory."""
        if g is not None:
            return self._of[key][g].offloaded
        return any(k.offloaded for k in self._of[key].values())

    def copies(self, key: str) -> bool:
        """Whether some group of ``key`` lives in a kind whose updates write copies (NVMe)."""
        return any(k.copies for k in self._of[key].values())

    def uniform(self, key: str) -> Kind | None:
        """The one kind holding every group of ``key``, or None under rules that mix kinds."""
        kinds = {id(k): k for k in self._of[key].values()}
        return next(iter(kinds.values())) if len(kinds) == 1 else None

    def shares(self, key: str, layouts: Mapping) -> dict[str, float]:
        """``{tier: share of the part's shard elements}`` (the memory model's split)."""
        total = sum(lay.shard_numel for lay in layouts.values())
        out: dict[str, float] = {}
        for g, lay in layouts.items():
            t = self._of[key][g].tier
            out[t] = out.get(t, 0.0) + lay.shard_numel / total
        return out

    def memory_device(self, key: str, g: str | None = None) -> torch.device:
        """Where tensors of ``key`` are allocated; 0-d leaves (``g`` None) are in host memory if
        any group of ``key`` is offloaded."""
        if g is None:
            return torch.device("cpu") if self.offloaded(key) else self.compute
        return self._of[key][g].memory_device()

    # --- buffers ------------------------------------------------------------------------------
    def place(self, key: str, t: torch.Tensor, *, name: str, g: str | None = None) -> torch.Tensor:
        """``t`` in a buffer where group ``g`` of ``key`` lives (0-d scalars stay in memory)."""
        if t.dim() == 0:
            return t.to(self.memory_device(key))
        if g is None:
            kind = self.uniform(key)
            if kind is None:
                raise ValueError(
                    f"state leaf {name!r} belongs to no group, so placement rules for {key!r} cannot "
                    "place it; use one place for the whole part"
                )
        else:
            kind = self._of[key][g]
        return kind.place(key, t, name=name)

    def holds(self, key: str, t: torch.Tensor, g: str | None = None) -> bool:
        """Whether tensor ``t`` of group ``g`` is where ``key`` says (checked leaf by leaf in tests)."""
        if t.dim() == 0:
            return t.device.type in ("cpu", self.compute.type)
        return self._of[key][g].holds(key, t)

    def nvme(self) -> Nvme | None:
        """The NVMe kind of this placement, if any part uses one."""
        for per in self._of.values():
            for k in per.values():
                if isinstance(k, Nvme):
                    return k
        return None

    # --- the host update ------------------------------------------------------------------------
    @property
    def host(self) -> HostUpdate:
        if self._host is None:
            self._host = HostUpdate(self.compute)
        return self._host

    def before_use(self, g: str) -> None:
        """Group ``g``'s parameters are about to be used: wait for an async update of them."""
        if self._host is not None and self._host.ahead is not None:
            self._host.wait_group(g)

    def sync(self) -> None:
        """Finish a delayed or async host update."""
        if self._host is not None:
            self._host.sync()

    @property
    def pending(self) -> bool:
        return self._host is not None and self._host.pending
