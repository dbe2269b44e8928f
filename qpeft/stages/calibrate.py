"""`qpeft calibrate` as a library call: LQ-LoRA's empirical Fisher of the selected
matrices (row/column means, optionally the full diagonal; Guo et al. 2024 §3.2),
from N seeded windows of L tokens of the calibration text, written to a
.safetensors file and cached (`qpeft.calibration.cache`).

`CalibrationOptions` is the calibration data and how it is run; `qpeft decompose`
takes the same options for the statistics its method needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpeft.data.calibration import DEFAULT_SEQLEN, DEFAULT_SEQUENCES
from qpeft.errors import QpeftError
from qpeft.stages.checks import check_device, positive


@dataclass
class CalibrationOptions:
    """The calibration data and how it is run (LQ-LoRA's Fisher, the layer inputs' XᵀX)."""

    source: str = "wikitext2"  # its validation split, or a UTF-8 text file
    sequences: int = DEFAULT_SEQUENCES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    batch_size: int = 1
    dtype: str = "fp32"
    fisher_elementwise: bool = False  # keep the Fisher's full diagonal

    def check(self) -> None:
        positive("--calib-sequences", self.sequences)
        positive("--calib-seqlen", self.seqlen)
        positive("--calib-batch-size", self.batch_size)
        if self.seqlen < 2:
            raise QpeftError("--calib-seqlen must be at least 2 tokens")

    def sampling(self) -> tuple[str, int, int, int, int]:
        return self.source, self.sequences, self.seqlen, self.seed, self.batch_size

    def with_elementwise(self, elementwise: bool) -> CalibrationOptions:
        return dataclasses.replace(self, fisher_elementwise=elementwise)


@dataclass
class CalibrateRequest:
    """`qpeft calibrate`: the Fisher of the selected matrices, written to `out`."""

    model: str | None
    out: Path
    targets: str | None = None  # comma-separated patterns; None: the default set
    calib: CalibrationOptions = field(default_factory=CalibrationOptions)
    device: str = "cpu"


@dataclass
class CalibrateResult:
    stats: Any  # FisherStats
    cache_file: Path
    cache_hit: bool


def run_calibrate(request: CalibrateRequest) -> CalibrateResult:
    """Check the request, then compute (or reuse from the cache) and write the Fisher."""
    from qpeft.calibration.cache import calibrate
    from qpeft.data.calibration import calibration_text
    from qpeft.io.atomic import check_writable
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import parse_targets

    r, calib = request, request.calib
    calib.check()
    check_device(r.device)
    targets = parse_targets(r.targets, "--targets")
    if r.out.suffix != ".safetensors":
        raise QpeftError(f"--out should name a .safetensors file, got {r.out}")
    if r.out.exists():
        raise QpeftError(f"output file already exists: {r.out}")
    check_writable(r.out)
    calibration_text(calib.source)  # fail on bad data before loading the model
    stats, cached, hit = calibrate(
        resolve_model(r.model), targets, *calib.sampling(), r.device, calib.dtype, r.out, calib.fisher_elementwise
    )
    return CalibrateResult(stats, cached, hit)
