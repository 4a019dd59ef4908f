"""Migrating a DeepSpeed script to funzero: the config stays, three lines change.

The DeepSpeed version (the seeds' snippet; its ``initialize_engine`` is ``deepspeed.initialize``):

    import deepspeed
    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=CONFIG)
    for x, y in loader:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()

The funzero version (below, runnable on a CPU in seconds with a tiny GPT on the byte-level text
of Python's own standard library):

    import funzero as fz
    init = fz.initialize(model, CONFIG)           # plan, optimizer, state, step from the same config
    state = init.state
    for x, y in loader:
        state, metrics = init.step(state, (x, y))  # forward, backward and the update, one pure step

    python examples/migrate_deepspeed.py --steps 50
    torchrun --nproc-per-node 2 examples/migrate_deepspeed.py   # each rank its own micro-batch
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import funzero as fz
from funzero.models import GPT, GPTConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import corpus, get_batch  # noqa: E402  (the demo's data: no downloads)

# The seeds' config as it is: ZeRO-3, DeepSpeed's AdamW with its defaults (lr 1e-3, no decay,
# gradients clipped to norm 1.0).
CONFIG = {
    "train_batch_size": 256,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "AdamW"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--train-batch-size", type=int, default=CONFIG["train_batch_size"], help="override for quick runs")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.seq, vocab_size=256, n_layer=2, n_head=2, n_embd=32, fused=False))
    config = {**CONFIG, "train_batch_size": args.train_batch_size}
    init = fz.initialize(model, config)  # was: deepspeed.initialize(model=model, config=CONFIG)
    rank = init.plan.rank
    if rank == 0:
        print(f"ZeRO-{init.plan.stage}, groups {init.plan.groups}, micro-batch {init.micro_batch_size} "
              f"x {init.gradient_accumulation_steps} accumulation x {init.plan.num_shards} rank(s)")
    data = corpus(300_000)
    g = torch.Generator().manual_seed(1 + rank)  # each rank draws its own micro-batches, as under DeepSpeed
    state = init.state
    t0 = time.time()
    for i in range(args.steps):
        batch = get_batch(data, init.micro_batch_size, args.seq, g)
        state, metrics = init.step(state, batch)  # was: engine(x, y); engine.backward(loss); engine.step()
        if rank == 0 and (i % 10 == 0 or i == args.steps - 1):
            print(f"step {i:3d}  loss {float(metrics['loss']):.4f}  ({time.time() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
