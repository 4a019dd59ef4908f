"""The parameter trees of the optax parity test, shared by the reference generator (JAX) and the
test (torch): pure Python, so either side builds the same structure from its own arrays.

A case runs on ``flat`` (a dict of three arrays) and on ``nested`` (dicts, a tuple, lists, a
NamedTuple and a ``None`` leaf, which optax and funzero both treat as an empty subtree).
Leaves are stored concatenated, flattened, in the order listed here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

SEED = 20260
STEPS = 10
SCHEDULE_COUNTS = 25


class Affine(NamedTuple):
    w: Any
    b: Any


SHAPES = {
    "flat": {"w": (6, 4), "b": (4,), "v": (9,)},
    "nested": {
        "enc.0.k": (3, 5),
        "enc.1.0": (5,),
        "enc.1.1": (2, 2),
        "dec.0.w": (4, 3),
        "dec.1": (3,),
        "aff.w": (2, 3),
        "aff.b": (3,),
    },
}


def numel(kind: str) -> int:
    return sum(math.prod(s) for s in SHAPES[kind].values())


def build(kind: str, leaf) -> Any:
    """The tree of ``kind`` with ``leaf(path)`` at each leaf."""
    if kind == "flat":
        return {p: leaf(p) for p in SHAPES["flat"]}
    return {
        "enc": ({"k": leaf("enc.0.k")}, [leaf("enc.1.0"), leaf("enc.1.1")]),
        "dec": [{"w": leaf("dec.0.w")}, leaf("dec.1")],
        "aff": Affine(leaf("aff.w"), leaf("aff.b")),
        "none": None,
    }


def get(tree: Any, path: str) -> Any:
    """The leaf at a dotted path (dict keys, sequence indices, NamedTuple fields)."""
    for k in path.split("."):
        if isinstance(tree, dict):
            tree = tree[k]
        elif hasattr(tree, "_fields"):
            tree = getattr(tree, k)
        else:
            tree = tree[int(k)]
    return tree


def unflatten(kind: str, vector, reshape) -> Any:
    """The tree of ``kind`` from one concatenated vector (``reshape(piece, shape)`` per leaf)."""
    pieces, pos = {}, 0
    for p, shape in SHAPES[kind].items():
        n = math.prod(shape)
        pieces[p] = reshape(vector[pos : pos + n], shape)
        pos += n
    return build(kind, pieces.__getitem__)


def matrices(kind: str) -> list[str]:
    """Paths of the leaves with more than one dimension (the ones that decay in the mask cases)."""
    return [p for p, s in SHAPES[kind].items() if len(s) > 1]
