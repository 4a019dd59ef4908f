"""Pytree plumbing for the transforms: leaf paths, the pieces of leaves a tree holds, and the
rules that select leaves (masks) or label them (``partition``).

Two kinds of tree reach a transform:

* **standalone**: any pytree (dicts, lists, tuples, NamedTuples; ``None`` is an empty subtree,
  as in optax). Each tensor is one leaf, and its path is its keys joined by dots:
  ``{"enc": [w, b]}`` has the leaves ``enc.0`` and ``enc.1``; a NamedTuple contributes its field
  names.
* **under the engine**: ``{group: flat buffer (or this rank's shard)}`` with a
  :class:`~funzero.optim.ShardInfo`. A model leaf is then a segment of a buffer and its path is
  the model's (``blocks.0.attn.c_attn.weight``, as ``named_parameters()`` spells it).

A mask (or a labels spec) is turned into a decision per leaf path here, once per call, so a
transform never cares which of the two kinds it was given.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import optree
import torch

__all__ = ["Pieces", "LeafRule", "by_path", "device_of", "flatten", "pieces"]

NS = "funzero"


def _short(x: Any) -> str:
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxdict, r.maxlist, r.maxtuple = 60, 60, 6, 6, 6
    return r.repr(x)


def _entry_name(e) -> str:
    field = getattr(e, "field", None)  # NamedTuple / dataclass entries carry the field name
    return str(field if field is not None else e.entry)


def flatten(tree) -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    """``(paths, leaves, spec)`` of ``tree``: ``None`` is an empty subtree, paths are dotted."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False, namespace=NS)
    paths = [".".join(_entry_name(e) for e in acc) for acc in spec.accessors()]
    return paths, leaves, spec


def device_of(tree) -> torch.device | None:
    """The device of the first tensor in ``tree`` (``None`` for a tree without tensors)."""
    for x in optree.tree_leaves(tree, none_is_leaf=False, namespace=NS):
        if isinstance(x, torch.Tensor):
            return x.device
    return None


class Pieces(NamedTuple):
    """The tensors of a tree and which model leaves each holds.

    Attributes:
        names: each tensor's name: its path (standalone) or its group (under the engine).
        leaves: the tensors.
        segments: per tensor, ``(model leaf path, start, stop)`` of each leaf piece in the tensor
            viewed flat; standalone, one segment covering the whole tensor.
        rebuild: ``rebuild(new tensors) -> tree`` of the same structure.
        align: ``align(other tree) -> other's tensors`` in the same order (state, params).
    """

    names: list[str]
    leaves: list[Any]
    segments: list[list[tuple[str, int, int]]]
    rebuild: Callable[[list], Any]
    align: Callable[[Any], list]


def pieces(tree, info=None) -> Pieces:
    if info is not None:  # the engine's {group: flat buffer}
        names = list(tree)
        return Pieces(
            names, [tree[k] for k in names], [info.segments(k) for k in names],
            lambda new: dict(zip(names, new)), lambda other: [other[k] for k in names],
        )
    names, leaves, spec = flatten(tree)
    segs = [[(n, 0, x.numel())] for n, x in zip(names, leaves)]
    return Pieces(names, leaves, segs, lambda new: optree.tree_unflatten(spec, list(new)), spec.flatten_up_to)


def model_leaves(info) -> dict[str, Any]:
    """``{leaf path: slot}`` of every leaf the engine's layouts hold."""
    return {s.path: s for lay in info.layouts.values() for s in lay.slots}


class by_path:  # noqa: N801 - reads as a function at the call site
    """Mark ``fn(path) -> value`` as a rule on leaf paths, for a ``mask`` (``value``: bool) or
    ``partition``'s ``param_labels`` (``value``: a label).

    A bare callable is optax's ``params -> pytree``; a predicate on path strings must be wrapped:
    ``optim.masked(tx, optim.by_path(lambda path: path.endswith("weight")))``. Paths are dotted
    (see :mod:`funzero.optim`): a standalone tree's keys, or the model's leaf paths under the
    engine.
    """

    def __init__(self, fn: Callable[[str], Any]):
        if not callable(fn):
            raise ValueError(f"by_path wraps a callable on leaf paths, got {fn=}")
        self.fn = fn

    def __call__(self, path: str) -> Any:
        return self.fn(path)

    def __repr__(self) -> str:
        return f"by_path({self.fn!r})"


def _is_bool(x) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return True
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool and x.numel() == 1


def _is_rules(spec) -> bool:
    return (
        isinstance(spec, (list, tuple)) and len(spec) > 0
        and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in spec)
    )


_MASK_KINDS = (
    "a mask is None, a pytree of bools shaped like the params (or a prefix of them), a callable "
    "params -> such a pytree, a regex or a list of regexes over leaf paths, or optim.by_path(fn)"
)
_LABEL_KINDS = (
    "param_labels is a pytree of labels shaped like the params (or a prefix of them), a callable "
    "params -> such a pytree, a list of (regex, label) rules, or optim.by_path(fn)"
)


class LeafRule:
    """A mask or a labels spec, classified when the transform is built and resolved per call.

    ``decide(tree, info)`` returns ``value_of(path)`` for the leaf paths of ``tree`` (standalone)
    or of the model (under the engine): a bool for a mask, a label for labels.

    How a pytree spec meets the leaves:

    * standalone, by structure first (optax's rule): the spec has the params' structure or is a
      prefix of it, a value at an inner node covering every leaf below; failing that, by path.
    * under the engine, by path: each model leaf takes the spec entry whose dotted path equals
      the leaf's path or is its nearest prefix (``{"blocks": False}`` covers ``blocks.0.*``; a
      dict keyed by full leaf paths works as it is). A leaf no entry covers, or an entry that
      covers no leaf, is an error naming it.

    A callable is called with the updates (standalone, as optax does) or, under the engine, with
    ``{leaf path: tensor on the meta device with the leaf's shape and dtype}`` (a callable that
    looks at shapes works unchanged; values are not available there).
    """

    def __init__(self, spec, *, where: str, kind: str = "mask"):
        self.where, self.kind, self.spec = where, kind, spec
        kinds = _MASK_KINDS if kind == "mask" else _LABEL_KINDS
        if spec is None:
            if kind != "mask":
                raise ValueError(f"{where}: {kinds}; got {spec=}")
            self.mode = "all"
        elif isinstance(spec, by_path):
            self.mode = "path"
        elif callable(spec) and not isinstance(spec, torch.Tensor):
            self.mode = "call"
        elif kind == "mask" and (
            isinstance(spec, str) or (isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec))
        ):
            self.mode = "regex"
            pats = [spec] if isinstance(spec, str) else list(spec)
            try:
                rx = [re.compile(p) for p in pats]
            except re.error as e:
                raise ValueError(f"{where}: mask regex is invalid ({e}), got mask={_short(spec)}") from None
            self.fn = lambda path: any(r.search(path) for r in rx)
        elif kind == "labels" and _is_rules(spec):
            self.mode = "rules"
            try:
                self.rules = [(re.compile(p), lab) for p, lab in spec]
            except re.error as e:
                raise ValueError(f"{where}: a label rule's regex is invalid ({e}), got param_labels={_short(spec)}") from None
        else:
            self.mode = "tree"
            self._check_tree(spec, lambda: f"{'mask' if kind == 'mask' else 'param_labels'}={_short(spec)}")

    # --- what a spec may hold -------------------------------------------------------------
    def _check_tree(self, spec, shown: Callable[[], str]) -> None:
        # Plain Python, and the message made only on failure: under the engine this runs inside
        # the (possibly compiled) step, on its first call.
        for _, leaf in _entries(spec):
            bad = not _is_bool(leaf) if self.kind == "mask" else (isinstance(leaf, torch.Tensor) or callable(leaf))
            if bad:
                kinds = _MASK_KINDS if self.kind == "mask" else _LABEL_KINDS
                raise ValueError(f"{self.where}: {kinds}; got {shown()} (its leaf {_short(leaf)} is a {type(leaf).__name__})")

    def labels(self) -> set | None:
        """The labels a static spec names (``None`` for a callable)."""
        if self.mode == "rules":
            return {lab for _, lab in self.rules}
        if self.mode == "tree":
            return {v for _, v in _entries(self.spec)}
        return None

    # --- per call ---------------------------------------------------------------------------
    def decide(self, tree, info=None) -> Callable[[str], Any]:
        if self.mode == "all":
            return lambda path: True
        if self.mode == "regex":
            return self.fn
        if self.mode == "path":
            return self._checked(self.spec)
        spec = self.spec
        if self.mode == "rules":
            if info is None and _prefix_of(spec, tree):
                return self._structural(spec, tree)  # it has the params' structure: a labels tree
            return self._first_rule
        if info is None:
            return self._structural(self._call(tree, None) if self.mode == "call" else spec, tree)
        # Under the engine the answer depends on the layouts alone. Eager steps resolve it once
        # per binding (the pipelined host update asks once per group); a compiled step resolves
        # it while tracing, once, and keeps no cache it would have to guard on (a recompile).
        if torch.compiler.is_compiling():
            return self._resolve(tree, info).__getitem__
        cached = getattr(self, "_resolved", None)
        if cached is None or cached[0] is not info.layouts:
            cached = self._resolved = (info.layouts, self._resolve(tree, info))
        return cached[1].__getitem__

    def _resolve(self, tree, info) -> dict:
        spec = self._call(tree, info) if self.mode == "call" else self.spec
        return self._by_path(spec, list(model_leaves(info)))

    def _checked(self, fn):
        if self.kind != "mask":
            return fn

        def keep(path):
            v = fn(path)
            if not _is_bool(v):
                raise ValueError(f"{self.where}: by_path mask must return a bool, got {v!r} for leaf {path!r}")
            return bool(v)

        return keep

    def _first_rule(self, path: str):
        for rx, lab in self.rules:
            if rx.search(path):
                return lab
        raise ValueError(f"{self.where}: leaf {path!r} is matched by no label rule")

    def _call(self, tree, info):
        what = "mask" if self.kind == "mask" else "param_labels"
        if info is None:
            arg = tree
            single = len(optree.tree_leaves(arg, none_is_leaf=False, namespace=NS)) == 1
        else:
            arg = {s.path: torch.empty(s.shape, dtype=lay.dtype, device="meta")
                   for lay in info.layouts.values() for s in lay.slots}
            single = len(arg) == 1
        try:
            out = self.spec(arg)
        except (TypeError, AttributeError, KeyError) as e:
            raise ValueError(f"{self.where}: {what}={_short(self.spec)} failed when called with the params tree ({e}); "
                             f"{_CALL_HINT.format(what=what)}") from e
        if not single and (out is None or not isinstance(out, (Mapping, list, tuple))):
            raise ValueError(f"{self.where}: {what}={_short(self.spec)} returned {_short(out)}, not a pytree over the "
                             f"params; {_CALL_HINT.format(what=what)}")
        self._check_tree(out, lambda: f"{what}({_short(self.spec)}) returning {_short(out)}")
        return out

    def _structural(self, spec, tree):
        """Standalone: by structure (optax), else by path."""
        paths, _, _ = flatten(tree)
        try:
            full = optree.tree_broadcast_prefix(spec, tree, none_is_leaf=False, namespace=NS)
        except ValueError as e:
            try:
                values = self._by_path(spec, paths)
            except ValueError as e2:
                what = "mask" if self.kind == "mask" else "param_labels"
                why = str(e).split("; dict:")[0].replace("\n", " ")  # optree's reason, without the tree
                raise ValueError(
                    f"{self.where}: {what}={_short(spec)} matches the params neither by structure ({why}) nor by "
                    f"leaf path ({e2})"
                ) from None
        else:
            values = dict(zip(paths, optree.tree_leaves(full, none_is_leaf=False, namespace=NS)))
            if self.kind == "mask":
                values = {k: bool(v) for k, v in values.items()}

        def value_of(path):
            try:
                return values[path]
            except KeyError:
                raise ValueError(f"{self.where}: leaf {path!r} is not among the leaves the spec was matched to") from None

        return value_of

    def _by_path(self, spec, paths: Sequence[str]) -> dict:
        """``{path: value}``: each path takes the entry at its path or its nearest prefix."""
        table = dict(_entries(spec))
        out, used = {}, set()
        for path in paths:
            e = path
            while e not in table and e:
                e = e.rpartition(".")[0]
            if e not in table:
                raise ValueError(f"{self.where}: no entry of {_short(spec)} covers leaf {path!r}")
            out[path] = bool(table[e]) if self.kind == "mask" else table[e]
            used.add(e)
        for e in table:
            if e not in used:
                raise ValueError(f"{self.where}: entry {e!r} of {_short(spec)} covers no leaf (leaves are e.g. {list(paths)[:3]})")
        return out


_CALL_HINT = "a callable {what} is optax's params -> pytree; a predicate on leaf paths is spelled optim.by_path(fn), or a regex"


def _entries(spec, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, leaf)`` of a spec tree (dicts, lists, tuples, NamedTuples; ``None`` holds
    nothing), named as :func:`flatten` names paths. Plain Python: traceable by torch.compile."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        items = spec.items()
    elif isinstance(spec, tuple) and hasattr(spec, "_fields"):
        items = zip(spec._fields, spec)
    elif isinstance(spec, (list, tuple)):
        items = enumerate(spec)
    else:
        return [(prefix, spec)]
    out = []
    for k, v in items:
        out += _entries(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _prefix_of(spec, tree) -> bool:
    try:
        optree.tree_broadcast_prefix(spec, tree, none_is_leaf=False, namespace=NS)
    except ValueError:
        return False
    return True
