"""Bit-budget allocation: which quantization config each matrix gets."""

from qpeft.allocation.grid import lqlora_grid
from qpeft.allocation.ilp import Allocation, ilp_allocate, parse_budget

__all__ = ["Allocation", "ilp_allocate", "lqlora_grid", "parse_budget"]
