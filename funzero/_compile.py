"""``fz.compile``: ``torch.compile`` with funzero's inductor heuristics.

Inductor turns a row reduction (a LayerNorm over the model width, say) into a *persistent*
kernel, which holds each row in registers and reads it once, only while the row has at most
1024 elements; wider rows get a looped kernel that reads them twice (statistics, then the
normalised output). At GPT-2 XL's width (1600) that second read is what separates the two: on
an H100 the residual add + LayerNorm forward of an 8192 x 1600 bf16 batch takes 35 us
persistent against 46 us looped inside the 1.5B step (benchmarks/NOTES.md). :func:`compile`
raises the limit for inner (row) reductions; every other choice stays inductor's.

Why a wrapper and not only an ``options=`` entry: inductor reads its ``inductor_choices_class``
option once per thread, at the first compile, and keeps that object; a later compile with a
different option would silently get the first one. The wrapper installs the heuristics around
each call of the compiled function (compiles happen inside calls) and restores what was there.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["compile"]

_DEFAULT_ROW = 2048  # measured at 1600 (H100); inductor's own limit is 1024


def compile(fn: Callable, *, max_persistent_row: int = _DEFAULT_ROW, **kwargs: Any) -> Callable:  # noqa: A001
    """``torch.compile(fn, **kwargs)`` with persistent row reductions up to ``max_persistent_row``
    elements (inductor stops at 1024).

    Rows of 1025 to 2048 elements (a LayerNorm or RMSNorm over a model width in that range)
    compile to one read of each row instead of two. Nothing global changes: the heuristics are
    active only while the returned function runs. With the default backend they are also passed
    as ``options``, so they are part of the compiled-graph cache's key.

    Args:
        fn: the function or module to compile (a :func:`funzero.train_step`, say).
        max_persistent_row: the widest row (elements) reduced by a persistent kernel; at least
            1024, inductor's own limit.
        **kwargs: passed to ``torch.compile`` (``options`` merged with funzero's).

    Returns:
        The compiled function.

    Example:
        >>> step = fz.compile(fz.train_step(model, loss_fn, tx, plan))
    """
    if isinstance(max_persistent_row, bool) or not isinstance(max_persistent_row, int) or max_persistent_row < 1024:
        raise ValueError(f"max_persistent_row must be an int >= 1024 (inductor's own limit), got {max_persistent_row!r}")
    from torch._inductor import config
    from torch._inductor.virtualized import V

    from funzero._inductor_choices import WideRows

    factory = functools.partial(WideRows, max_persistent_row)  # picklable, for the cache key
    if kwargs.get("backend", "inductor") == "inductor" and "mode" not in kwargs and hasattr(config, "inductor_choices_class"):
        kwargs["options"] = {"inductor_choices_class": factory, **(kwargs.get("options") or {})}
    compiled = torch.compile(fn, **kwargs)
    choices = factory()

    @functools.wraps(fn)
    def run(*args, **kw):
        with V.set_choices_handler(choices):
            return compiled(*args, **kw)

    return run
