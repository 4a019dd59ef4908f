"""funzero.ops: fused Triton kernels, each with a torch reference beside it.

Dispatch: CUDA tensors run the Triton kernels, CPU tensors the torch
references, unless :class:`backend` says otherwise ("triton" runs the kernels
on CPU tensors under ``TRITON_INTERPRET=1``; "torch" runs the references
everywhere). Every op is a ``torch.library`` custom op with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces it as one node.

The references are importable as ``funzero.ops.reference.<op>``. :func:`patch` swaps the
kernels into an instantiated Hugging Face model (Llama, Mistral, Qwen2, GPT-2).
"""

from . import reference
from ._adamw import adamw_, adamw_leaves_, nonfinite_
from ._cpu_adamw import host_threads
from ._cross_entropy import cross_entropy
from ._dispatch import backend, get_backend
from ._gelu import bias_gelu, linear_gelu
from ._heads import linear_qkv
from ._linear_cross_entropy import linear_cross_entropy
from ._norms import layer_norm, residual_norm, rms_norm
from ._patch import PatchReport, patch
from ._quant import dequantize_int8, quantize_int8
from ._rope import rope
from ._swiglu import swiglu

__all__ = [
    "adamw_",
    "adamw_leaves_",
    "backend",
    "bias_gelu",
    "cross_entropy",
    "dequantize_int8",
    "get_backend",
    "host_threads",
    "layer_norm",
    "linear_cross_entropy",
    "linear_gelu",
    "linear_qkv",
    "nonfinite_",
    "patch",
    "PatchReport",
    "quantize_int8",
    "reference",
    "residual_norm",
    "rms_norm",
    "rope",
    "swiglu",
]
