"""nn.Modules over packed low-bit weights."""

from qpeft.modules.quant_linear import QuantLinear, quantized_layers

__all__ = ["QuantLinear", "quantized_layers"]
