"""Mesh: named axes over torch.distributed process groups."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Mesh"]


def _default_device_type() -> str:
    """cpu for an initialised group whose backend has no GPU transport (gloo), else cuda if present."""
    if dist.is_initialized() and "nccl" not in str(dist.get_backend()).lower():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Mesh:
    """Named axes of ranks, e.g. ``("dp",)``; backed by a ``DeviceMesh`` when the world has > 1 rank.

    A one-rank world needs no process group at all: every axis has size 1 and collectives on it
    are the identity, so the same program runs under ``python`` and under ``torchrun``.

    Axes may be flattened into one named axis (:meth:`flatten`), e.g. ``"dp_sp"`` over ``("dp",
    "sp")``: it has the ranks of both, numbered row-major, and ``size``/``rank``/``group`` take its
    name like any other axis's.

    Example:
        >>> mesh = Mesh.from_env(("dp",))      # torchrun's world, or one process
        >>> mesh.size("dp"), mesh.rank("dp")
        (1, 0)
    """

    def __init__(
        self,
        axis_names: Sequence[str],
        shape: Sequence[int],
        *,
        device_type: str = "cpu",
        device_mesh: "dist.device_mesh.DeviceMesh | None" = None,
    ) -> None:
        axis_names, shape = tuple(axis_names), tuple(int(s) for s in shape)
        if len(axis_names) != len(shape):
            raise ValueError(f"{len(axis_names)} axis names {axis_names} for a shape of {shape}")
        if len(set(axis_names)) != len(axis_names):
            raise ValueError(f"axis names must be unique, got {axis_names}")
        if any(s < 1 for s in shape):
            raise ValueError(f"axis sizes must be >= 1, got {shape}")
        self.axis_names = axis_names
        self.shape = shape
        self.device_type = device_type
        self._mesh = device_mesh
        self._joint: dict = {}  # group_over's flattened groups, by axes
        self._flat: dict[str, tuple[str, ...]] = {}  # flatten's axes: name -> the axes it spans, in order

    @classmethod
    def from_env(
        cls,
        axis_names: Sequence[str] = ("dp",),
        shape: Sequence[int] | None = None,
        *,
        device_type: str | None = None,
        backend: str | None = None,
    ) -> "Mesh":
        """The mesh of the current world.

        Uses the initialised default process group if there is one; otherwise initialises it from
        torchrun's environment (``WORLD_SIZE`` > 1); otherwise returns a one-rank mesh.

        Args:
            axis_names: names of the axes, outermost first.
            shape: sizes of the axes; ``None`` puts the whole world on the last axis.
            device_type: ``"cuda"`` or ``"cpu"``; defaults to what an initialised default group
                runs on (cpu for a gloo-only group, even on a machine with GPUs), else to cuda when
                available.
            backend: process-group backend when one must be initialised (nccl on cuda, else gloo),
                with a collective timeout of ``FUNZERO_TIMEOUT_S`` seconds (default 600).
        """
        if device_type is None:
            device_type = _default_device_type()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_initialized() and world > 1:
            if device_type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # A rank that never arrives ends the others after this long, not torch's 30 minutes.
            timeout = datetime.timedelta(seconds=float(os.environ.get("FUNZERO_TIMEOUT_S", "600")))
            dist.init_process_group(backend or ("nccl" if device_type == "cuda" else "gloo"), timeout=timeout)
        if dist.is_initialized():
            world = dist.get_world_size()
        if shape is None:
            shape = (1,) * (len(axis_names) - 1) + (world,)
        if int(torch.tensor(shape).prod()) != world:
            raise ValueError(f"mesh shape {tuple(shape)} does not cover the world of {world} ranks")
        if world == 1:
            return cls(axis_names, shape, device_type=device_type)
        from torch.distributed.device_mesh import init_device_mesh

        dm = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(axis_names))
        mesh = cls(axis_names, shape, device_type=device_type, device_mesh=dm)
        mesh._inherit_timeout()
        return mesh

    def _inherit_timeout(self, groups=None) -> None:
        """Give each axis's group (or ``groups``) the world's collective timeout: groups the
        device mesh makes for an axis smaller than the world get torch's default (30 minutes)
        otherwise."""
        device = torch.device(self.device_type)
        try:
            timeout = dist.distributed_c10d._get_default_group()._get_backend(device).options._timeout
        except Exception:  # noqa: BLE001 - a backend that does not say keeps its groups' own
            return
        for group in groups if groups is not None else map(self.group, self.axis_names):
            if group is not None and group is not dist.distributed_c10d._get_default_group():
                group.set_timeout(timeout)

    def flatten(self, axes: Sequence[str], name: str) -> "Mesh":
        """This mesh with one more axis, ``name``, spanning ``axes`` (in mesh order) as one.

        Its ranks are numbered row-major over ``axes`` (the last one fastest), and its group holds
        every rank that shares this rank's coordinates on the other axes. Every rank must call it
        (making the group is a collective), as for :meth:`from_env`.

        Example:
            >>> mesh = Mesh.from_env(("dp", "sp"), (2, 2)).flatten(("dp", "sp"), "dp_sp")
            >>> mesh.size("dp_sp"), mesh.rank("dp_sp") == 2 * mesh.rank("dp") + mesh.rank("sp")
            (4, True)
        """
        axes = tuple(axes)
        for axis in axes:
            self._axis_index(axis)
        if len(axes) < 2 or sorted(axes, key=self.axis_names.index) != list(axes) or len(set(axes)) != len(axes):
            raise ValueError(f"flatten takes two or more axes of {self.axis_names} in mesh order, got {axes}")
        if name in self.axes:
            raise ValueError(f"axis name {name!r} is taken already; the mesh has axes {self.axes}")
        mesh = Mesh(self.axis_names, self.shape, device_type=self.device_type, device_mesh=self._mesh)
        mesh._flat = {**self._flat, name: axes}
        mesh._joint = self._joint  # groups made once, shared by the meshes flattened from this one
        if self._mesh is not None:
            mesh.group(name)  # made now, while every rank is here
        return mesh

    def spanned(self, axes: Sequence[str]) -> list[str]:
        """The mesh's own axes that ``axes`` cover: each flattened axis (:meth:`flatten`) replaced
        by the axes it spans, each name checked.

        Example:
            >>> Mesh(("dp", "sp"), (1, 1)).flatten(("dp", "sp"), "dp_sp").spanned(("dp_sp",))
            ['dp', 'sp']
        """
        out = []
        for a in axes:
            out.extend(self._flat[a] if a in self._flat else [self.axis_names[self._axis_index(a)]])
        return out

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis name ``size``/``rank``/``group`` take: the mesh's own, then flattened ones."""
        return self.axis_names + tuple(self._flat)

    # ---------------------------------------------------------------------------------------
    def _axis_index(self, axis: str) -> int:
        try:
            return self.axis_names.index(axis)
        except ValueError:
            raise ValueError(f"mesh has axes {self.axes}, not {axis!r}") from None

    def size(self, axis: str | None = None) -> int:
        """Ranks along ``axis`` (all ranks when ``axis`` is None)."""
        # Plain ints (math.prod), not a tensor's .item(): a compiled step branches on sizes, and
        # .item() would break its graph there.
        if axis is None:
            return math.prod(self.shape)
        if axis in self._flat:
            return math.prod([self.size(a) for a in self._flat[axis]])
        return self.shape[self._axis_index(axis)]

    def rank(self, axis: str) -> int:
        """This process's coordinate along ``axis``."""
        if axis in self._flat:
            rank = 0
            for a in self._flat[axis]:
                rank = rank * self.size(a) + self.rank(a)
            return rank
        i = self._axis_index(axis)
        if self.shape[i] == 1:
            return 0
        assert self._mesh is not None
        return self._mesh.get_local_rank(i)

    def group(self, axis: str) -> "dist.ProcessGroup | None":
        """The process group of ``axis``; ``None`` for an axis of size 1 (no communication)."""
        if axis in self._flat:
            return self.group_over(self._flat[axis])
        i = self._axis_index(axis)
        if self.shape[i] == 1:
            return None
        assert self._mesh is not None
        return self._mesh.get_group(i)

    def group_over(self, axes: Sequence[str]) -> "dist.ProcessGroup | None":
        """The process group of several axes taken as one (their ranks flattened in mesh order,
        outermost first): the ranks that share this process's coordinates on every other axis.

        Flattened axes (:meth:`flatten`) stand for the axes they span. ``None`` where those axes
        hold one rank; the axis's own group where only one of them has
        more than one rank. Made once per set of axes (a collective over the world the first
        time: every rank must ask for the same axes in the same order).

        Example:
            >>> mesh = Mesh(("replicate", "shard"), (1, 1))
            >>> mesh.group_over(("replicate", "shard")) is None
            True
        """
        named = {self._axis_index(a) for a in self.spanned(axes)}
        wide = tuple(a for i, a in enumerate(self.axis_names) if i in named and self.shape[i] > 1)
        if len(wide) <= 1:
            return self.group(wide[0]) if wide else None
        if wide not in self._joint:
            assert self._mesh is not None
            self._joint[wide] = self._mesh[wide]._flatten("_".join(wide)).get_group()
            self._inherit_timeout([self._joint[wide]])
        return self._joint[wide]

    @property
    def device(self) -> torch.device:
        """The local device ranks compute on."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    def __repr__(self) -> str:
        axes = [f"{n}={s}" for n, s in zip(self.axis_names, self.shape)]
        axes += [f"{n}={'x'.join(parts)}" for n, parts in self._flat.items()]
        return f"Mesh({', '.join(axes)}, device_type={self.device_type!r})"


@dataclass(frozen=True, eq=False)
class MeshAxis:
    """One named axis of a mesh: what a transform that lives on one axis (a tensor- or
    sequence-parallel split) holds, with this rank's place on it.

    Example:
        >>> ax = MeshAxis(Mesh(("dp", "tp"), (1, 1)), "tp")
        >>> ax.size, ax.rank
        (1, 0)
    """

    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        return self.mesh.size(self.axis)

    @property
    def rank(self) -> int:
        return self.mesh.rank(self.axis)
