"""Small models and data shared by the engine tests."""

from __future__ import annotations

import torch

from funzero.models import GPT, GPTConfig

# Sizes chosen so that no group's numel divides evenly over 2 or 4 ranks: padding is exercised.
TINY = GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=24, fused=False)
GROUPS = [r"blocks\.(\d+)\."]


def tiny_gpt(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = TINY if not overrides else GPTConfig(**{**TINY.__dict__, **overrides})
    return GPT(cfg).to(dtype)


def batches(n: int, batch: int = 8, seq: int = 16, vocab: int = 67, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append((x, y))
    return out


def lm_loss(apply, batch):
    x, y = batch
    return apply(x, y)


def torch_reference(model: torch.nn.Module, data, *, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, clip=None, accumulate=1, decay=None):
    """Plain single-process PyTorch: the truth every stage and world size must reproduce.

    ``decay``: a regex; only matching parameters get weight decay (two param groups).
    """
    import re

    named = list(model.named_parameters())
    if decay is None:
        groups = [{"params": [p for _, p in named]}]
    else:
        groups = [
            {"params": [p for n, p in named if re.search(decay, n)]},
            {"params": [p for n, p in named if not re.search(decay, n)], "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for i in range(0, len(data), accumulate):
        opt.zero_grad()
        for x, y in data[i : i + accumulate]:
            (model(x, y) / accumulate).backward()
        if clip is not None:
            # optax's clip_by_global_norm: scale by max_norm / norm when norm >= max_norm
            # (torch.nn.utils.clip_grad_norm_ adds 1e-6 to the norm, a different function).
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
            if norm >= clip:
                for p in model.parameters():
                    p.grad.mul_(clip / norm)
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train_tiny(model: GPT, steps: int, **plan_kw):
    """``steps`` of funzero stage 2 with AdamW and bf16 on ``model``; returns ``(state, plan)``."""
    import funzero as fz
    from funzero import optim

    plan = fz.zero(2, groups=GROUPS, **plan_kw)
    tx = optim.adamw(1e-2)
    state = fz.init(model, tx, plan, precision=fz.bf16())
    step = fz.train_step(model, lm_loss, tx, plan)
    for b in batches(steps):
        state, _ = step(state, b)
    return state, plan
