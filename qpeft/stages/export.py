"""`qpeft export` as a library call: a qpeft checkpoint written for another runtime
(`qpeft.export`: transformers + bitsandbytes or HQQ + peft, merged weights, or a
peft adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpeft.errors import QpeftError


@dataclass
class ExportRequest:
    """`qpeft export`: `checkpoint` to `out` as `to` (`rank`: compress the adapters
    to this rank in the LoRA-form exports)."""

    checkpoint: Path
    to: str
    out: Path
    rank: int | None = None
    dtype: str | None = None
    requantize: bool = False  # re-quantize the matrices the format cannot hold as they are


def run_export(request: ExportRequest) -> dict[str, Any]:
    """Check the request, export; returns the report (also written as OUT/qpeft_export.json)."""
    from qpeft.export.formats import export_checkpoint
    from qpeft.io.atomic import check_output
    from qpeft.io.checkpoint import is_checkpoint

    r = request
    if not is_checkpoint(r.checkpoint):
        raise QpeftError(f"{r.checkpoint} is not a qpeft checkpoint (no qpeft_manifest.json)")
    check_output(r.out)
    return export_checkpoint(r.checkpoint, r.to, r.out, r.rank, r.dtype, r.requantize)
