"""funzero.optim: optax-style gradient transformations that work unchanged under every ZeRO stage.

optax's protocol, names, argument order and defaults (0.2.x) over torch tensor pytrees: dicts,
lists, tuples, NamedTuples, with ``None`` an empty subtree. Under the engine the trees are
``{group: flat shard}`` and ``info`` (:class:`ShardInfo`) maps shards back to the model's leaves.

**Leaf paths.** A standalone tree's leaf path is its keys joined by dots (``{"enc": [w, b]}``:
``enc.0``, ``enc.1``; a NamedTuple gives its field names); under the engine it is the model's
(``blocks.0.attn.c_attn.weight``).

**Masks** (``masked``, ``add_decayed_weights``, ``adamw``, ``lion``, ``lamb``, adafactor's
``weight_decay_mask``) take optax's forms or funzero's, told apart by type:

* a pytree of bools shaped like the params, or a prefix of them (``{"w": True, "b": False}``);
  standalone it is matched by structure (optax's rule), failing that by path; under the engine
  by path: each leaf takes the entry whose dotted path equals its path or is its nearest prefix
  (``{"blocks": {"0": False}}`` or ``{"blocks.0": False}`` cover ``blocks.0.*``);
* a callable ``params -> pytree of bools`` (optax); under the engine it is called with
  ``{leaf path: meta tensor of the leaf's shape}``. A callable that returns a bare bool is an
  error: funzero's former path predicate ``Callable[[str], bool]`` is spelled ``by_path(fn)``;
* a regex or a list of regexes over leaf paths (funzero), or ``by_path(fn)``.

``partition`` (alias ``multi_transform``) labels leaves the same ways, with ``(regex, label)``
rules in place of regexes.

A mask's form is checked when the transform is built; its match to the leaves is made on the
first update (under the engine the leaves are known only then; a compiled step makes it while
tracing, once), and an error there names the leaf or entry that does not match.

**Defaults that differ from optax**: ``adamw(weight_decay=1e-2)`` (torch.optim.AdamW's; optax
1e-4). Step-dependent scalars (bias corrections) are fp64, not fp32. See
``funzero/optim/_transforms.py`` for the full list.
"""

from funzero.optim._accumulate import MultiSteps, MultiStepsState, multi_steps
from funzero.optim._inject import InjectHyperparamsState, inject_hyperparams
from funzero.optim._base import (
    Accumulate,
    EmptyState,
    FusedUpdate,
    GradientTransformation,
    Groupwise,
    LeafGrads,
    ShardInfo,
    Traits,
    apply_updates,
    chain,
    identity,
    map_state,
    named_chain,
    tree_map,
)
from funzero.optim._schedules import (
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_cosine,
    warmup_cosine_decay_schedule,
    warmup_exponential_decay_schedule,
    warmup_cosine_lr,
    warmup_decay_lr,
    warmup_lr,
)
from funzero.optim._transforms import (
    AddDecayedWeightsState,
    ApplyEvery,
    EmaState,
    FactoredState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByScheduleState,
    TraceState,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    add_decayed_weights,
    amsgrad,
    apply_every,
    clip,
    clip_by_block_rms,
    clip_by_global_norm,
    ema,
    global_norm,
    lamb,
    lion,
    masked,
    multi_transform,
    nadam,
    nadamw,
    partition,
    radam,
    rmsprop,
    scale,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_factored_rms,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_param_block_rms,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
    scale_by_schedule,
    scale_by_stddev,
    scale_by_trust_ratio,
    sgd,
    trace,
)
from funzero.optim._tree import by_path

__all__ = [
    "Accumulate",
    "AddDecayedWeightsState",
    "ApplyEvery",
    "EmaState",
    "EmptyState",
    "FactoredState",
    "FusedUpdate",
    "GradientTransformation",
    "Groupwise",
    "InjectHyperparamsState",
    "LeafGrads",
    "MultiSteps",
    "MultiStepsState",
    "Schedule",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ShardInfo",
    "TraceState",
    "Traits",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "amsgrad",
    "apply_every",
    "apply_updates",
    "by_path",
    "chain",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "ema",
    "exponential_decay",
    "global_norm",
    "identity",
    "inject_hyperparams",
    "join_schedules",
    "lamb",
    "linear_schedule",
    "lion",
    "map_state",
    "masked",
    "multi_steps",
    "multi_transform",
    "nadam",
    "nadamw",
    "named_chain",
    "partition",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "radam",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_param_block_rms",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_stddev",
    "scale_by_trust_ratio",
    "sgd",
    "trace",
    "tree_map",
    "warmup_cosine",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
    "warmup_cosine_lr",
    "warmup_decay_lr",
    "warmup_lr",
]
