"""shardspec: what lives where. Meshes, shard specs, group rules and flat layouts.

Knows nothing of training: no optimizers, losses or models. ``funzero`` builds on it.
"""

from shardspec._layout import FlatLayout, LeafSlot, build_layouts
from shardspec._mesh import Mesh, MeshAxis
from shardspec._rules import GroupRule, assign_groups
from shardspec._spec import Replicate, Shard, Spec, held_numel, is_sharded
from shardspec._tree import leaf_paths, path_str

# tensor parallelism (issue 23): leaves split along any dim, section by section
from shardspec._rules import first_match
from shardspec._spec import check_split, join_shards, local_shape, shard_of

__all__ = [
    "FlatLayout",
    "GroupRule",
    "LeafSlot",
    "Mesh",
    "MeshAxis",
    "Replicate",
    "Shard",
    "Spec",
    "assign_groups",
    "build_layouts",
    "held_numel",
    "is_sharded",
    "leaf_paths",
    "path_str",
    # tensor parallelism (issue 23)
    "check_split",
    "first_match",
    "join_shards",
    "local_shape",
    "shard_of",
]
