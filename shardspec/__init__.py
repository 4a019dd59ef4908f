"""shardspec: what lives where. Meshes, shard specs, group rules and flat layouts.

Knows nothing of training: no optimizers, losses or models. ``funzero`` builds on it.
"""

from shardspec._layout import FlatLayout, LeafSlot, build_layouts
from shardspec._mesh import Mesh
from shardspec._rules import GroupRule, assign_groups
from shardspec._spec import Replicate, Shard, Spec, held_numel, is_sharded
from shardspec._tree import leaf_paths, path_str

__all__ = [
    "FlatLayout",
    "GroupRule",
    "LeafSlot",
    "Mesh",
    "Replicate",
    "Shard",
    "Spec",
    "assign_groups",
    "build_layouts",
    "held_numel",
    "is_sharded",
    "leaf_paths",
    "path_str",
]
