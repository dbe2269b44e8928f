"""Checks every stage makes of its request before any slow step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from qpeft.errors import QpeftError

if TYPE_CHECKING:
    from qpeft.quant import QuantConfig


def positive(flag: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise QpeftError(f"{flag} must be a positive integer, got {value}")


def check_device(device: str) -> None:
    """A torch device this machine has."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise QpeftError(f"unknown device {device!r} (use cpu or cuda)") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise QpeftError(f"--device {device}: CUDA is not available on this machine")


def check_config_holds(config: QuantConfig, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Every matrix of `shapes` (name → rows, cols) can take `config`; else the
    format's own reason, naming the first matrix that cannot."""
    for name, shape in shapes.items():
        if not config.holds(shape):
            try:
                config.storage_bits(shape)
            except QpeftError as exc:
                raise QpeftError(f"{name} ({shape[0]}×{shape[1]}): {exc}") from None
            raise QpeftError(f"{config.name} cannot hold {name} ({shape[0]}×{shape[1]})")
