"""Blockwise NormalFloat quantizers with exact bit accounting."""

from qpeft.quant.blockwise import QuantizedTensor, dequantize, dequantize_scales, quantize
from qpeft.quant.codebooks import dynamic_codebook, nf_codebook, uniform_codebook
from qpeft.quant.config import PRESETS, QuantConfig, bits_per_param, parse_config, storage_bits, storage_layout

__all__ = [
    "PRESETS",
    "QuantConfig",
    "QuantizedTensor",
    "bits_per_param",
    "dequantize",
    "dequantize_scales",
    "dynamic_codebook",
    "nf_codebook",
    "parse_config",
    "quantize",
    "storage_bits",
    "storage_layout",
    "uniform_codebook",
]
