"""GPT-2, the nanoGPT way: short, shape comments, and funzero.ops' fused kernels where they pay.

References: Radford et al., 2019 ("Language Models are Unsupervised Multitask Learners");
Karpathy's nanoGPT for the layout of the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "gpt_config"]


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    fused: bool = True  # use funzero.ops kernels where `kernels` says (False: plain torch ops)
    # Which funzero.ops kernels the model calls (see _KERNELS). By default the cross-entropy (it
    # beats F.cross_entropy eager and compiled, in time and memory) and the three fused backward
    # passes, mlp, qkv and resnorm, whose forward stays plain ops for inductor to fuse (together
    # ~1.8% of the compiled GPT-2 1.5B step on an H100). The norm and bias+GeLU kernels lose to
    # inductor's fused code under torch.compile, so they are opt-in (benchmarks/NOTES.md).
    kernels: tuple[str, ...] = ("ce", "mlp", "qkv", "resnorm")
    # Activation checkpointing (Chen et al., 2016): the first `recompute` blocks keep only their
    # input during forward and run forward again in backward. Costs one block forward each and
    # frees that block's activations (~0.39 GiB per GPT-2 1.5B block at B=8, T=1024, bf16), memory
    # an offloaded step can spend on optimizer state kept on the GPU (benchmarks/NOTES.md).
    recompute: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.recompute <= self.n_layer:
            raise ValueError(f"recompute must be between 0 and n_layer={self.n_layer}, got {self.recompute=}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got {self.n_embd=}, {self.n_head=}")
        bad = set(self.kernels) - set(_KERNELS)
        if bad:
            raise ValueError(f"unknown kernels {sorted(bad)}; choose from {', '.join(map(repr, _KERNELS))}")
        if "gelu" in self.kernels and "mlp" in self.kernels:
            raise ValueError("kernels 'gelu' and 'mlp' both replace the MLP's activation; choose one")
        if "norm" in self.kernels and "resnorm" in self.kernels:
            raise ValueError("kernels 'norm' and 'resnorm' both replace the blocks' LayerNorms; choose one")

    def uses(self, kernel: str) -> bool:
        if kernel == "ce":
            return self.fused and ("ce" in self.kernels or "ce-inplace" in self.kernels)
        return self.fused and kernel in self.kernels


# ce: fused cross-entropy (ce-inplace: its gradient overwrites the logits); norm: Triton LayerNorm;
# gelu: Triton bias+GeLU after a bias-free matmul; mlp: linear_gelu (plain forward, one-pass
# backward with the bias gradient); qkv: linear_qkv (one-pass assembly of the q/k/v gradients);
# resnorm: residual_norm at the head of both residual branches (plain forward; one backward pass
# for the norm, the residual add and the output projection's bias, which moves to the residual).
_KERNELS = ("ce", "ce-inplace", "norm", "gelu", "mlp", "qkv", "resnorm")

_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A GPT-2 preset (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``) with overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; choose from {sorted(_PRESETS)}")
    return replace(GPTConfig(**_PRESETS[name]), **overrides)


def _ops():
    from funzero import ops

    return ops


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool, fused: bool) -> None:  # fused: cfg.uses("norm")
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.fused = fused

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.bias is not None:
            return _ops().layer_norm(x, self.weight, self.bias, 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    attention = staticmethod(F.scaled_dot_product_attention)  # funzero.sequence_parallel sets its own

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.init_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual projections
        self.n_head = cfg.n_head
        self.fused = cfg.uses("qkv")
        self.bias_outside = cfg.uses("resnorm") and cfg.bias  # c_proj's bias joins the residual (Block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused:  # the same values; its backward assembles the q/k/v gradients in one pass
            q, k, v = _ops().linear_qkv(x, self.c_attn.weight, self.c_attn.bias, self.n_head)
        else:
            width = self.c_attn.weight.shape[0] // 3  # C, or this rank's heads' share under tensor parallelism
            q, k, v = self.c_attn(x).split(width, dim=2)
            # (B, nh, T, hs)
            q, k, v = (t.view(B, T, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self.attention(q, k, v, is_causal=True)  # flash attention on GPU
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, C)
        return F.linear(y, self.c_proj.weight) if self.bias_outside else self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.init_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.fused = cfg.uses("gelu") and cfg.bias
        self.fused_bwd = cfg.uses("mlp")
        self.bias_outside = cfg.uses("resnorm") and cfg.bias  # c_proj's bias joins the residual (Block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            # The matmul without its bias, then bias + GeLU in one pass over the (B, T, 4C) tensor.
            h = _ops().bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias)
        elif self.fused_bwd:  # the same forward; its backward is one pass over the (B, T, 4C) tensor
            h = _ops().linear_gelu(x, self.c_fc.weight, self.c_fc.bias)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")
        return F.linear(h, self.c_proj.weight) if self.bias_outside else self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias, cfg.uses("norm"))
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias, cfg.uses("norm"))
        self.mlp = MLP(cfg)
        self.fork = cfg.uses("resnorm") and cfg.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fork:  # the same sums, the projections' biases added on the residual side
            r, h = _ops().residual_norm(x, self.ln_1.weight, self.ln_1.bias, self.attn.c_proj.bias)
            x = r + self.attn(h)
            r, h = _ops().residual_norm(x, self.ln_2.weight, self.ln_2.bias, self.mlp.c_proj.bias)
            return r + self.mlp(h)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. ``forward(idx)`` gives logits (B, T, V); ``forward(idx, targets)`` the mean loss."""

    # ``loss_function(logits (B*T, V), targets (B*T,))`` in place of the cross-entropy below, when
    # set (funzero.tensor_parallel sets the vocab-parallel one: the logits are a vocabulary slice).
    loss_function = None

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, cfg.uses("norm"))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (Press & Wolf, 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # Drawn a second time, as the first GPT here did, so that a seed gives the weights it
            # always gave (_init_weights alone, what funzero.init uses on a meta model, draws once).
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.recompute:  # one use of the rules any model takes (funzero.remat)
            from funzero._remat import remat

            remat(self, [(rf"blocks\.({'|'.join(map(str, range(cfg.recompute)))})", "full")])

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """One module's init (``funzero.init`` calls it module by module on a meta model)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=getattr(m, "init_std", 0.02))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        if self.loss_function is not None:
            return self.loss_function(logits.view(B * T, -1), targets.reshape(-1))
        if self.cfg.uses("ce"):
            # ce-inplace: the logits are a temporary nothing else reads, so their gradient may
            # overwrite them (saves one (B*T, V) buffer).
            inplace = "ce-inplace" in self.cfg.kernels
            return _ops().cross_entropy(logits.view(B * T, -1), targets.reshape(-1), inplace_backward=inplace)
        return F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N + 12 L d T (PaLM, Chowdhery et al. 2022, appendix B)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
