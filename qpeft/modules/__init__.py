"""nn.Modules over packed low-bit weights."""

from qpeft.modules.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
