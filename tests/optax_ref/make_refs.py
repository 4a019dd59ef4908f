"""Write ``refs.npz``: trajectories produced by optax itself, replayed by ``tests/test_optim_optax.py``.

Run with a virtual environment that has JAX (CPU) and optax, from the repository root::

    python3 -m venv .venv-optax && .venv-optax/bin/pip install jax optax numpy
    .venv-optax/bin/python tests/optax_ref/make_refs.py

For each tree kind (``_trees.py``) fixed random parameters and ``STEPS`` gradients are drawn
with numpy and stored; every case runs those gradients through an optax optimizer at fp32 and
stores the parameters after each step. Schedules store their values at counts
``0 .. SCHEDULE_COUNTS-1``. The test names each case the same way.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tests.optax_ref._trees import SCHEDULE_COUNTS, SEED, SHAPES, STEPS, build, get, matrices, numel, unflatten  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "refs.npz")


def optimizers(kind: str) -> dict:
    """case name -> optax transform (the test builds funzero's counterpart under the same name)."""
    mats = set(matrices(kind))
    mask_tree = build(kind, lambda p: p in mats)
    labels = build(kind, lambda p: "adam" if p in mats else "sgd")

    def mask_fn(params):
        return jax.tree.map(lambda x: x.ndim > 1, params)

    def label_fn(params):
        return jax.tree.map(lambda x: "adam" if x.ndim > 1 else "sgd", params)

    warm = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-3)
    return {
        "sgd": optax.sgd(0.1),
        "sgd_momentum": optax.sgd(0.05, momentum=0.9),
        "sgd_nesterov": optax.sgd(0.05, momentum=0.9, nesterov=True),
        "adam": optax.adam(1e-2),
        "adam_eps_root": optax.adam(1e-2, eps_root=1e-3),
        "adam_b2_0.9": optax.adam(1e-2, b2=0.9),
        "nadam": optax.nadam(1e-2),
        "adamw": optax.adamw(1e-2, weight_decay=0.1),
        "adamw_decay_1e-2": optax.adamw(1e-2, weight_decay=1e-2),
        "adamw_mask_tree": optax.adamw(1e-2, weight_decay=0.1, mask=mask_tree),
        "adamw_mask_callable": optax.adamw(1e-2, weight_decay=0.1, mask=mask_fn),
        "adamw_schedule": optax.adamw(warm, weight_decay=0.1),
        "nadamw": optax.nadamw(1e-2, weight_decay=0.1),
        "lion": optax.lion(1e-2, weight_decay=0.1, mask=mask_tree),
        "lamb": optax.lamb(1e-2, weight_decay=0.01),
        "lamb_mask_callable": optax.lamb(1e-2, weight_decay=0.1, mask=mask_fn),
        "adagrad": optax.adagrad(0.1),
        "rmsprop": optax.rmsprop(1e-2),
        "rmsprop_centered_momentum": optax.rmsprop(1e-2, centered=True, momentum=0.9),
        "rmsprop_debiased_nesterov": optax.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True, momentum=0.9, nesterov=True),
        "adafactor_factored": optax.adafactor(1e-2, min_dim_size_to_factor=3),
        "adafactor_default": optax.adafactor(1e-2),
        "adafactor_unfactored_momentum_decay": optax.adafactor(
            1e-2, factored=False, momentum=0.9, weight_decay_rate=1e-2, weight_decay_mask=mask_tree, clipping_threshold=0.5
        ),
        "radam": optax.radam(1e-2),
        "radam_b2_0.9_nesterov": optax.radam(1e-2, b2=0.9, nesterov=True),
        "adamax": optax.adamax(1e-2),
        "amsgrad": optax.amsgrad(1e-2),
        "clip": optax.chain(optax.clip(0.5), optax.sgd(0.1)),
        "clip_by_block_rms": optax.chain(optax.clip_by_block_rms(0.5), optax.sgd(0.1)),
        "clip_by_global_norm": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
        "ema": optax.chain(optax.ema(0.9), optax.sgd(0.1)),
        "apply_every": optax.chain(optax.apply_every(3), optax.sgd(0.1)),
        "multi_steps": optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=3).gradient_transformation(),
        "multi_steps_schedule": optax.MultiSteps(
            optax.adam(1e-2), every_k_schedule=lambda step: jnp.where(step < 2, 2, 3)
        ).gradient_transformation(),
        "masked_tree": optax.chain(optax.masked(optax.scale_by_adam(), mask_tree), optax.scale(-1e-2)),
        "masked_callable_global_norm": optax.chain(optax.masked(optax.clip_by_global_norm(1.0), mask_fn), optax.sgd(0.1)),
        "multi_transform": optax.multi_transform({"adam": optax.adam(1e-2), "sgd": optax.sgd(0.1)}, labels),
        "partition_callable": optax.partition({"adam": optax.adam(1e-2), "sgd": optax.sgd(0.1)}, label_fn),
        "add_decayed_weights_schedule": optax.chain(
            optax.add_decayed_weights(optax.exponential_decay(0.1, 2, 0.5)), optax.sgd(0.1)
        ),
        "inject_hyperparams": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1),
    }


def schedules() -> dict:
    return {
        "constant_schedule": optax.constant_schedule(0.3),
        "linear_schedule": optax.linear_schedule(1.0, 0.1, 8, transition_begin=3),
        "polynomial_schedule": optax.polynomial_schedule(1.0, 0.1, 2.0, 8, 2),
        "cosine_decay_schedule": optax.cosine_decay_schedule(1.0, 12, alpha=0.1, exponent=2.0),
        "exponential_decay": optax.exponential_decay(1.0, 4, 0.5, transition_begin=2),
        "exponential_decay_staircase_end": optax.exponential_decay(1.0, 3, 0.5, 1, staircase=True, end_value=0.2),
        "exponential_growth_end": optax.exponential_decay(0.1, 3, 2.0, end_value=1.0),
        "piecewise_constant_schedule": optax.piecewise_constant_schedule(1.0, {3: 0.5, 8: 0.1, 15: 2.0}),
        "join_schedules": optax.join_schedules([optax.constant_schedule(1.0), optax.linear_schedule(1.0, 0.0, 5)], [4]),
        "warmup_cosine_decay_schedule": optax.warmup_cosine_decay_schedule(0.0, 1.0, 4, 20, 0.1, exponent=1.5),
        "warmup_cosine_decay_schedule_no_warmup": optax.warmup_cosine_decay_schedule(0.1, 1.0, 0, 20),
        "warmup_exponential_decay_schedule": optax.warmup_exponential_decay_schedule(
            0.0, 1.0, 4, 3, 0.5, transition_begin=1, end_value=0.05
        ),
    }


def run(tx, kind: str, params0: np.ndarray, grads: np.ndarray) -> np.ndarray:
    def tree(vec):
        return unflatten(kind, vec, lambda piece, shape: jnp.asarray(piece.reshape(shape)))

    params = tree(params0)
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update(tree(g), state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.concatenate([np.asarray(get(params, p)).reshape(-1) for p in SHAPES[kind]]))
    return np.stack(out).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(SEED)
    arrays = {"meta/optax": np.array(optax.__version__), "meta/jax": np.array(jax.__version__)}
    for kind in SHAPES:
        params0 = rng.standard_normal(numel(kind)).astype(np.float32)
        grads = rng.standard_normal((STEPS, numel(kind))).astype(np.float32)
        arrays[f"{kind}/params0"], arrays[f"{kind}/grads"] = params0, grads
        for name, tx in optimizers(kind).items():
            arrays[f"{name}/{kind}"] = run(tx, kind, params0, grads)
    for name, s in schedules().items():
        arrays[f"sched/{name}"] = np.array([float(s(jnp.asarray(c, jnp.int32))) for c in range(SCHEDULE_COUNTS)], np.float32)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays to {OUT} ({os.path.getsize(OUT)} bytes) with optax {optax.__version__}")


if __name__ == "__main__":
    main()
