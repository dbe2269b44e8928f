"""Bit-budget allocation: which quantization config each matrix gets."""

from qpeft.allocation.ilp import Allocation, ilp_allocate, parse_budget

__all__ = ["Allocation", "ilp_allocate", "parse_budget"]
