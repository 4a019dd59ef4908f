"""A train step replayed as one CUDA graph: after recording, a step costs the host one replay.

The step stays a function of ``(state, batch)``; what the graph needs is fixed memory. The
update already writes the state's buffers in place (params, master, moments), so those buffers
are the graph's inputs and outputs at once. The few leaves a step returns anew (the step count,
the optimizer's count, the loss scale) are copied back into the incoming leaves at the end of the
recorded step, so every replay reads and writes the same memory. The batch is copied into the
buffers that were recorded; metrics are cloned out of the graph's memory, so they stay valid
after the next replay.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

__all__ = ["cuda_graph"]

_NS = "funzero"


def _leaves(tree: Any) -> tuple[list, list, Any]:
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace=_NS)
    return [".".join(map(str, p)) for p in paths], leaves, spec


def _check_placed(paths: list, leaves: list, device: torch.device) -> None:
    for path, x in zip(paths, leaves):
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(
                f"cuda_graph: state leaf {path!r} is on {x.device}, the step computes on {device}: a "
                "recorded step cannot include host or NVMe placement (offload) - use the plain step there"
            )


def _check_like(what: str, path: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(
            f"cuda_graph: {what} leaf {path or '<root>'!r} is {tuple(got.shape)} {got.dtype}; the step was "
            f"recorded with {tuple(want.shape)} {want.dtype}"
        )


def _alias_pattern(leaves: list) -> list[int]:
    """For each leaf, the index of the first leaf that is the same tensor (itself if none)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(x), i) if isinstance(x, torch.Tensor) else i for i, x in enumerate(leaves)]


class _Graphed:
    def __init__(self, step: Callable, warmup: int) -> None:
        if warmup < 1:
            raise ValueError(f"cuda_graph: warmup must be >= 1 (compilation and allocation happen there), got {warmup}")
        self.step = step
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.state = None  # the recorded state: its leaves are the graph's inputs
        self.state_leaves: list = []
        self.batch_leaves: list = []
        self.batch_alias: list[int] = []
        self.batch_spec = None
        self.metrics = None
        self.replay: Callable[[], None] | None = None

    # -- recording --------------------------------------------------------------------------
    def _body(self):
        """One step on the recorded buffers, then the new leaves copied into the incoming ones."""
        new_state, metrics = self.step(self.state, optree.tree_unflatten(self.batch_spec, self.batch_leaves))
        if hasattr(self.state, "donated_at"):
            self.state.donated_at = None  # the new leaves are copied back into it below: it lives on
        paths, new_leaves, spec = _leaves(new_state)
        if len(new_leaves) != len(self.state_leaves):
            raise ValueError(f"cuda_graph: the step returned a state of another structure ({spec})")
        for path, old, new in zip(paths, self.state_leaves, new_leaves):
            if not isinstance(old, torch.Tensor):
                if old is not new and old != new:
                    raise ValueError(f"cuda_graph: state leaf {path!r} is not a tensor and changed ({old!r} -> {new!r})")
                continue
            if new is old or (new.data_ptr() == old.data_ptr() and new.shape == old.shape):
                continue
            _check_like("returned state", path, new, old)
            old.copy_(new)
        return metrics

    def _record(self, state, batch) -> None:
        from funzero.optim._accumulate import MultiStepsState

        if isinstance(getattr(state, "opt_state", None), MultiStepsState):
            raise ValueError(
                "cuda_graph: opt_state is optim.multi_steps' state: whether a call applies the update is "
                "decided on the host from mini_step, and a recorded graph would replay one branch forever. "
                "Accumulate inside loss_fn, or use the plain step"
            )
        self.state = state
        paths, self.state_leaves, _ = _leaves(state)
        _, leaves, self.batch_spec = _leaves(batch)
        # One recorded buffer per distinct tensor: a batch that passes one tensor twice keeps
        # doing so (a compiled step guards on that aliasing and would recompile at recording).
        self.batch_alias = _alias_pattern(leaves)
        self.batch_leaves = []
        for i, (x, first) in enumerate(zip(leaves, self.batch_alias)):
            self.batch_leaves.append(self.batch_leaves[first] if first != i
                                     else x.clone() if isinstance(x, torch.Tensor) else x)
        device = next(x.device for x in self.state_leaves if isinstance(x, torch.Tensor))
        _check_placed(paths, self.state_leaves, device)
        if device.type != "cuda":
            # Nothing to record off the GPU: keep the protocol, re-run the body on the buffers.
            def replay():
                self.metrics = self._body()

            self.replay = replay
            return
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks, so the graph's pool can take them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.metrics = self._body()
        self.graph = graph
        self.replay = graph.replay

    # -- calls ------------------------------------------------------------------------------
    def _load_batch(self, batch) -> None:
        paths, leaves, spec = _leaves(batch)
        if spec != self.batch_spec:
            raise ValueError(f"cuda_graph: the batch's structure changed from the recorded one ({self.batch_spec} -> {spec})")
        for i, (path, first, now) in enumerate(zip(paths, self.batch_alias, _alias_pattern(leaves))):
            if first != i and now != first:
                raise ValueError(
                    f"cuda_graph: batch leaf {path!r} was recorded as the same tensor as leaf {paths[first]!r} "
                    "(one buffer); pass the same tensor there again, or record with distinct tensors"
                )
        for i, (path, dst, src) in enumerate(zip(paths, self.batch_leaves, leaves)):
            if self.batch_alias[i] != i:
                continue  # the same buffer as an earlier leaf, filled there
            if not isinstance(dst, torch.Tensor):
                if dst != src:
                    raise ValueError(f"cuda_graph: batch leaf {path or '<root>'!r} changed from {dst!r} to {src!r}")
                continue
            _check_like("batch", path, src, dst)
            dst.copy_(src, non_blocking=True)

    def _load_state(self, state) -> None:
        if state is self.state:
            return
        paths, leaves, _ = _leaves(state)
        if len(leaves) != len(self.state_leaves):
            raise ValueError("cuda_graph: the state's structure differs from the recorded one")
        for path, dst, src in zip(paths, self.state_leaves, leaves):
            if not isinstance(dst, torch.Tensor) or src is dst:
                continue
            _check_like("state", path, src, dst)
            dst.copy_(src)

    def __call__(self, state, batch):
        self.calls += 1
        if self.calls <= self.warmup:
            if not torch.cuda.is_available() or not any(
                isinstance(x, torch.Tensor) and x.is_cuda for x in optree.tree_leaves(state, namespace=_NS)
            ):
                return self.step(state, batch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(state, batch)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.replay is None:
            self._record(state, batch)
        else:
            self._load_state(state)
            self._load_batch(batch)
        self.replay()
        return self.state, optree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.metrics, namespace=_NS
        )


def cuda_graph(step: Callable, *, warmup: int = 3) -> Callable:
    """Run ``step(state, batch)`` as one recorded CUDA graph after ``warmup`` plain calls.

    The first ``warmup`` calls run ``step`` itself (on a side stream; compilation, autotuning
    and the allocator's growth happen there). The next call records one step on the state and
    batch it is given and replays it; later calls copy their batch into the recorded buffers and
    replay, with no Python of the step and no kernel launches on the host. ``step`` may be the
    plain or the compiled (``fz.compile`` / ``torch.compile``) function from :func:`train_step`.

    Each call returns the recorded state object, its buffers advanced in place, and the metrics
    copied out. Pass back the state it returned (any other state of the same structure is
    copied in first). Every batch must have the recorded shapes and dtypes.

    Off the GPU nothing is recorded: the same calls re-run the step on the recorded buffers (the
    protocol the CPU tests check against plain steps).

    Raises:
        ValueError: a state leaf placed off the compute device (offload cannot be recorded), an
            ``optim.multi_steps`` state (its branch is taken on the host), a
            batch or state leaf whose shape or dtype differs from the recorded one (named by its
            path), a batch that no longer passes one tensor where the recorded one did (one
            buffer was recorded for both leaves), or ``warmup < 1``.

    Example:
        >>> step = fz.cuda_graph(fz.compile(fz.train_step(model, loss_fn, tx, plan)))
        >>> for batch in loader:
        ...     state, metrics = step(state, batch)
    """
    return _Graphed(step, warmup)
