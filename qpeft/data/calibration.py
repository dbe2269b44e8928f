"""Calibration batches: N windows of L tokens drawn (seeded) from a text.

The default text is WikiText-2's validation split: the test split is what
perplexity is reported on, so calibration never sees it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpeft.data import BUILTIN_NAMES, DATASETS, calibration_path
from qpeft.errors import QpeftError

DEFAULT_SEQUENCES = 32
DEFAULT_SEQLEN = 512


def calibration_text(source: str) -> tuple[str, str]:
    """(text, description) of a built-in text's calibration split ('wikitext2': its
    validation split; 'python-docs': its calib.txt) or of a UTF-8 text file."""
    if source in DATASETS:
        path, label = calibration_path(source)
        return path.read_text(encoding="utf-8"), label
    path = Path(source)
    if not path.is_file():
        raise QpeftError(f"calibration data {source!r} is neither a built-in text ({BUILTIN_NAMES}) nor a text file")
    try:
        return path.read_text(encoding="utf-8"), str(path.resolve())
    except UnicodeDecodeError as exc:
        raise QpeftError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def calibration_batches(token_ids: torch.Tensor, num_sequences: int, seqlen: int, seed: int) -> torch.Tensor:
    """(num_sequences, seqlen) windows of `token_ids` at seeded uniform random starts."""
    if num_sequences <= 0 or seqlen <= 1:
        raise QpeftError(f"need at least one sequence of 2+ tokens, got {num_sequences} × {seqlen}")
    if token_ids.numel() < seqlen:
        raise QpeftError(f"the calibration text has {token_ids.numel()} tokens, fewer than one sequence of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen + 1, (num_sequences,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])
