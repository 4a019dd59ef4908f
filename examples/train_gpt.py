"""Train a small GPT with ZeRO-3 on text that ships with Python itself: no downloads.

    python examples/train_gpt.py                 # 2 gloo ranks on CPU (or every GPU, NCCL)
    python examples/train_gpt.py --nproc 1 --stage 2 --steps 100

The corpus is the running interpreter's own standard library source, byte-level (vocab 256).
The script launches itself under torchrun when it is not already running under it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import sysconfig
import time

import torch

import funzero as fz
from funzero.models import GPT, GPTConfig


def corpus(max_bytes: int = 3_000_000) -> torch.Tensor:
    """The stdlib's top-level .py files, sorted by name, as one uint8 stream."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for f in sorted(root.glob("*.py")):
        b = f.read_bytes()
        chunks.append(b)
        size += len(b)
        if size >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def get_batch(data: torch.Tensor, batch: int, seq: int, g: torch.Generator):
    ix = torch.randint(len(data) - seq - 1, (batch,), generator=g)
    x = torch.stack([data[i : i + seq] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1 : i + seq + 1] for i in ix])  # (B, T)
    return x, y


def loss_fn(apply, batch):
    x, y = batch
    return apply(x, y)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, all GPUs on CUDA)")
    p.add_argument("--stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--compile", action="store_true", help="compile the step (fz.compile: torch.compile with funzero's inductor heuristics)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def launch(args) -> None:
    """Re-run this script under torchrun with ``args.nproc`` ranks."""
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    torchrun(["--standalone", f"--nproc-per-node={args.nproc}", __file__, *sys.argv[1:]])


def main(argv=None) -> None:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if cuda else 2
    if "LOCAL_RANK" not in os.environ and args.nproc > 1:
        return launch(args)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    from shardspec import Mesh

    mesh = Mesh.from_env(("dp",))
    rank, world = mesh.rank("dp"), mesh.size("dp")
    device = mesh.device
    torch.manual_seed(args.seed)
    cfg = GPTConfig(block_size=args.seq, vocab_size=256, n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    model = GPT(cfg).to(device)
    n_params = model.num_params()
    sched = fz.optim.warmup_cosine(args.lr, max(1, args.steps // 20), args.steps, end_value=args.lr / 10)
    tx = fz.optim.chain(
        fz.optim.clip_by_global_norm(1.0),
        fz.optim.adamw(sched, weight_decay=0.1, mask=r"(weight)$"),
    )
    plan = fz.zero(args.stage, mesh=mesh, groups=[r"blocks\.(\d+)\."])
    precision = fz.bf16() if cuda else fz.fp32()
    state = fz.init(model, tx, plan, precision=precision)
    step = fz.train_step(model, loss_fn, tx, plan)
    if args.compile:
        step = fz.compile(step)

    data = corpus()
    split = int(0.95 * len(data))
    train, val = data[:split].to(device), data[split:].to(device)
    g = torch.Generator().manual_seed(args.seed)  # same global batch on every rank
    if rank == 0:
        print(
            f"funzero demo: GPT {n_params / 1e6:.2f}M params, {len(data) / 1e6:.1f} MB of Python stdlib, "
            f"ZeRO-{args.stage} on {world} {'GPU' if cuda else 'CPU'} rank(s), {precision.param_dtype}"
        )
    from tqdm import tqdm

    losses = []
    t0, tokens = None, 0
    bar = tqdm(range(args.steps), disable=rank != 0, desc="train", unit="step", mininterval=3.0)
    for it in bar:
        batch = get_batch(train, args.batch, args.seq, g)
        state, metrics = step(state, batch)
        if it == 2:  # skip the warm-up steps (and compilation) in the throughput figure
            if cuda:
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        tokens += args.batch * args.seq
        if it % 10 == 0 or it == args.steps - 1:
            losses.append(metrics["loss"].item())  # the only host sync, every 10 steps
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0 if t0 else float("nan")

    # held-out loss with the trained parameters, gathered on every rank
    params = fz.gather_params(state, plan, dtype=torch.float32)
    ref = GPT(cfg).to(device)
    ref.load_state_dict(params, strict=False)
    ref.eval()
    with torch.no_grad():
        vx, vy = get_batch(val, 32, args.seq, torch.Generator().manual_seed(1))
        val_loss = ref(vx, vy).item()
    nbytes = fz.state_nbytes(state)
    if rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform over bytes: {torch.log(torch.tensor(256.0)):.3f}); held-out {val_loss:.3f}")
        print(f"throughput {tokens / elapsed:,.0f} tokens/s over {world} rank(s)")
        print(
            "per-rank state bytes: "
            + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in nbytes.items() if v)
            + f"  (full fp32 model states would be {16 * n_params / 1e6:.2f} MB)"
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
