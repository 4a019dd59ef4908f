"""Leaf paths for pytrees: the one naming scheme every rule and error message uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch

__all__ = ["leaf_paths", "path_str"]


def path_str(path: tuple[Any, ...]) -> str:
    """Join an optree accessor path into the dotted name used by rules and errors.

    ``("blocks", 0, "attn", "weight")`` becomes ``"blocks.0.attn.weight"``; a dict key that
    already contains dots (as ``nn.Module.named_parameters`` produces) is kept as it is.
    """
    return ".".join(str(p) for p in path)


def leaf_paths(tree: Any, *, namespace: str = "") -> dict[str, torch.Tensor]:
    """Flatten ``tree`` to an ordered ``{path: tensor}`` dict (tree order, which is module order).

    Raises:
        ValueError: a leaf is not a tensor, or two leaves flatten to the same path.
    """
    if isinstance(tree, Mapping) and all(isinstance(k, str) for k in tree):
        items = list(tree.items())
        if all(isinstance(v, torch.Tensor) for _, v in items):
            # The common case (named_parameters): keep insertion order, not optree's sorted order.
            return dict(items)
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=namespace)
    out: dict[str, torch.Tensor] = {}
    for p, leaf in zip(paths, leaves):
        name = path_str(p)
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(f"leaf {name!r} is a {type(leaf).__name__}, not a torch.Tensor")
        if name in out:
            raise ValueError(f"two leaves flatten to the same path {name!r}")
        out[name] = leaf
    return out
