"""Quantized weight formats: NF4 (bitsandbytes-compatible) tensors, kernels and checkpoint layout."""

from velotune.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["NF4Tensor", "dequantize_nf4", "quantize_nf4"]
