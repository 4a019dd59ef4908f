"""Torch references of every op in ``funzero.ops``, under the ops' own names.

They define the semantics the kernels are tested against, and they are what
the ops run on CPU tensors under the "auto" backend.
"""

from ._adamw import adamw_reference_ as adamw_
from ._adamw import nonfinite_reference_ as nonfinite_
from ._cross_entropy import cross_entropy_reference as cross_entropy
from ._gelu import bias_gelu_reference as bias_gelu
from ._linear_cross_entropy import linear_cross_entropy_reference as linear_cross_entropy
from ._norms import layer_norm_reference as layer_norm
from ._norms import rms_norm_reference as rms_norm
from ._quant import dequantize_int8_reference as dequantize_int8
from ._quant import quantize_int8_reference as quantize_int8
from ._rope import rope_reference as rope
from ._swiglu import swiglu_reference as swiglu

__all__ = ["adamw_", "bias_gelu", "cross_entropy", "dequantize_int8", "layer_norm", "linear_cross_entropy",
           "nonfinite_", "quantize_int8", "rms_norm", "rope", "swiglu"]
