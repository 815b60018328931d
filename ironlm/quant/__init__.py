"""Weight formats (int8 / int4 blocks, bf16), packing for the kernels, and QuantLinear."""

from ironlm.quant.formats import FORMATS, PlainWeight, dequantize, quantize, reference_linear
from ironlm.quant.linear import QuantLinear, bf16_rounds_activations, kernel_report, quantize_model

__all__ = ["FORMATS", "PlainWeight", "QuantLinear", "bf16_rounds_activations", "dequantize", "kernel_report", "quantize", "quantize_model", "reference_linear"]
