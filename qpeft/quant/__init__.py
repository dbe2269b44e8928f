"""Quantization formats (`qpeft.quant.formats`) behind one interface, with exact bit
accounting; pure torch ops."""

from qpeft.quant.codebooks import dynamic_codebook, nf_codebook, uniform_codebook
from qpeft.quant.config import QuantConfig, bits_per_param, dequantize, quantize, simulate, storage_bits
from qpeft.quant.formats import FORMATS, GRIDS, PRESETS, parse_config, parse_grid
from qpeft.quant.formats.normalfloat import NFConfig
from qpeft.quant.tensor import QuantizedTensor

__all__ = [
    "FORMATS",
    "GRIDS",
    "PRESETS",
    "NFConfig",
    "QuantConfig",
    "QuantizedTensor",
    "bits_per_param",
    "dequantize",
    "dynamic_codebook",
    "nf_codebook",
    "parse_config",
    "parse_grid",
    "quantize",
    "simulate",
    "storage_bits",
    "uniform_codebook",
]
