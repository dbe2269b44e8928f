"""Checks every stage makes of its request before any slow step."""

from __future__ import annotations

from qpeft.errors import QpeftError


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
