"""Parameters that do not exist yet: a model built on the meta device, initialised module by module.

``init`` never materialises a model whole. It asks a :class:`Filler` for the elements ``[lo, hi)``
of one group's flat buffer at a time (the range this rank holds, or the whole group where the
specs replicate it) and drops what it made before the next group. A filler takes values from
the module's own tensors, from a weights file (``funzero._weights``), or makes them: the modules
that hold the group's parameters get fresh storage on the compute device and are initialised by
``init_fn(module)``, else the Hugging Face model's ``_init_weights(module)``, else the module's
own ``reset_parameters()``.

Determinism: each module is initialised with the random generators seeded from ``(seed, its
module path)`` (and the caller's generator state restored afterwards), so a parameter's initial
value depends on its module and the seed, never on the world size, the stage, the grouping or
the order in which groups are made. :func:`init_weights` applies the same recipe to a whole
model eagerly: the reference that sharded init equals bit for bit.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Filler", "init_weights", "module_init"]


def module_init(model: nn.Module, init_fn: Callable[[nn.Module], Any] | None = None) -> Callable[[nn.Module], None]:
    """The per-module initialiser: ``init_fn``; else the module's own ``reset_parameters()``
    followed by the model's ``_init_weights(module)`` (Hugging Face models and
    ``funzero.models.GPT`` have one), either where it exists. A module with parameters and
    neither is an error at the time it needs initialising."""
    from funzero._tp import full_shape_init

    return full_shape_init(model, init_fn if init_fn is not None else _own_init(model))


def _own_init(model: nn.Module) -> Callable[[nn.Module], None]:
    own = getattr(model, "_init_weights", None)
    own = own if callable(own) else None

    def init(module: nn.Module) -> None:
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        if own is not None:
            own(module)
        elif not callable(reset) and any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                f"module of type {type(module).__name__} holds parameters on the meta device and has no "
                "reset_parameters(); pass init_fn= (called on each module) or weights="
            )

    return init


def _seed(seed: int, path: str) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(path.encode())) % (2**63 - 1)


@contextlib.contextmanager
def _seeded(seed: int, path: str, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_seed(seed, path))
        yield


class _Tensors:
    """Where each parameter object of a model is referenced (tied names share one object)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.refs: dict[int, list[tuple[nn.Module, str]]] = {}
        for mp, mod in self.modules.items():
            for name, p in mod._parameters.items():
                if p is not None:
                    self.refs.setdefault(id(p), []).append((mod, name))

    def swap(self, old: torch.Tensor, new: nn.Parameter) -> None:
        """Every name of ``old`` now holds ``new`` (ties kept)."""
        refs = self.refs.pop(id(old))
        for mod, name in refs:
            mod._parameters[name] = new
        self.refs[id(new)] = refs


def _fresh(t: _Tensors, module: nn.Module, device: torch.device, made: dict) -> None:
    """Give ``module``'s own parameters and meta buffers fresh storage on ``device``; ``made``
    maps parameter ids already given storage (a tied parameter gets it once)."""
    for name, p in list(module._parameters.items()):
        if p is None or id(p) in made:
            continue
        new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        t.swap(p, new)
        made[id(new)] = new
    for name, b in list(module._buffers.items()):
        if b is not None and b.device.type == "meta":
            module._buffers[name] = torch.empty_like(b, device=device)


def _run_init(init: Callable, module: nn.Module, path: str, seed: int, device: torch.device) -> None:
    with _seeded(seed, path, device), torch.no_grad():
        init(module)


def init_weights(model: nn.Module, *, seed: int = 0, init_fn: Callable[[nn.Module], Any] | None = None,
                 device: torch.device | str | None = None) -> nn.Module:
    """Initialise every parameter and buffer of ``model`` in place the way ``funzero.init`` does
    for a meta-device model: module by module in ``model.modules()`` order, each with the random
    generators seeded from ``(seed, module path)``, into fresh storage on ``device`` (default:
    where the model's first parameter is, the CPU for a meta model). Ties are kept.

    Returns ``model``.

    Example:
        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(config)
        >>> fz.init_weights(model, seed=0)   # the values fz.init(model, ..., seed=0) trains from
    """
    if device is None:
        first = next(model.parameters(), None)
        device = torch.device("cpu") if first is None or first.device.type == "meta" else first.device
    device = torch.device(device)
    init = module_init(model, init_fn)
    t = _Tensors(model)
    made: dict = {}
    for path, module in model.named_modules():
        _fresh(t, module, device, made)
        _run_init(init, module, path, seed, device)
    return model


class Filler:
    """The elements ``[lo, hi)`` of a group's flat buffer, from wherever each leaf's value is.

    Args:
        model: the module (its parameters may be on the meta device).
        binding: the plan applied to it (layouts, aliases).
        overrides: ``{leaf path: tensor}`` taking precedence (``init(params=...)``).
        weights: a ``funzero._weights`` source and its ``{leaf path: key}`` map, or None.
        init: the per-module initialiser (see :func:`module_init`) and ``seed``.
        device: where values are made (the compute device).
    """

    def __init__(self, model: nn.Module, binding, *, overrides: Mapping | None, weights=None, key_map=None,
                 init: Callable | None, seed: int, device: torch.device) -> None:
        self.model, self.b, self.overrides = model, binding, dict(overrides or {})
        self.weights, self.key_map = weights, key_map
        self.init, self.seed, self.device = init, seed, device
        self.named = dict(model.named_parameters())
        self.tensors = _Tensors(model)
        self.order = [p for p, _ in model.named_modules()]

    def needs_making(self, path: str) -> bool:
        return path not in self.overrides and self.weights is None and self.named[path].device.type == "meta"

    def fill(self, g: str, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """``(hi - lo,)`` elements of group ``g``'s flat buffer in ``dtype`` on the device,
        zero where no leaf is (alignment padding)."""
        lay = self.b.layouts[g]
        out = torch.zeros(hi - lo, dtype=dtype, device=self.device)
        pieces = [(s, max(lo, s.offset) - s.offset, min(hi, s.offset + s.numel) - s.offset) for s in lay.slots]
        pieces = [(s, a, z) for s, a, z in pieces if a < z]
        made = self._make([s.path for s, _, _ in pieces if self.needs_making(s.path)])
        try:
            for s, a, z in pieces:
                dst = out[s.offset + a - lo : s.offset + z - lo]
                dst.copy_(self._read(s, a, z, made))
        finally:
            self._unmake(made)
        return out

    def _read(self, slot, a: int, z: int, made: dict) -> torch.Tensor:
        path = slot.path
        if path in self.overrides:
            return self.overrides[path].detach().reshape(-1)[a:z]
        if self.weights is not None:
            from funzero._tp import read_local

            return read_local(self.b.tp, self.weights, self.key_map[path], path, a, z)
        if path in made:
            return made[path].detach().reshape(-1)[a:z]
        return self.named[path].detach().reshape(-1)[a:z]

    # --- making values for meta parameters ------------------------------------------------------
    def _make(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        """Initialise the modules that hold ``paths`` (every alias's module, in model order, so a
        tied parameter ends as eager initialisation leaves it); ``{path: its value}``."""
        if not paths:
            return {}
        if self.init is None:
            raise ValueError(f"parameter {paths[0]!r} is on the meta device; pass weights=, init_fn= or params=")
        wanted = {a.rpartition(".")[0] for p in paths for a in self.b.aliases[p]}
        made_ids: dict = {}
        for mp in self.order:
            if mp in wanted:
                module = self.tensors.modules[mp]
                _fresh(self.tensors, module, self.device, made_ids)
                _run_init(self.init, module, mp, self.seed, self.device)
        named = dict(self.model.named_parameters())
        self.named = named
        return {p: named[p] for p in paths} | {"_made": list(made_ids.values())}

    def _unmake(self, made: dict) -> None:
        """Back to meta: what was made for one group is not kept."""
        for p in made.pop("_made", []):
            ghost = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            self.tensors.swap(p, ghost)
        made.clear()
        self.named = dict(self.model.named_parameters())

    def finish(self) -> None:
        """Buffers the model was built with on the meta device get their values (the template
        computes with them: rotary frequencies, say): from the weights where they hold them,
        else made like parameters."""
        for mp, module in self.model.named_modules():
            meta = [n for n, b in module._buffers.items() if b is not None and b.device.type == "meta"]
            if not meta:
                continue
            loaded = []
            for name in meta:
                key = f"{mp}.{name}" if mp else name
                b = module._buffers[name]
                module._buffers[name] = torch.empty_like(b, device=self.device)
                if self.weights is not None and key in self.weights:
                    module._buffers[name].copy_(self.weights.read(key).view(b.shape))
                    loaded.append(name)
            if len(loaded) == len(meta):
                continue
            if self.init is None:
                name = next(n for n in meta if n not in loaded)
                raise ValueError(f"buffer {mp + '.' + name if mp else name!r} is on the meta device; pass init_fn=")
            kept = {n: module._buffers[n].clone() for n in loaded}
            _run_init(self.init, module, mp, self.seed, self.device)
            for n, t in kept.items():  # what the weights hold wins over what init makes
                module._buffers[n].copy_(t)
