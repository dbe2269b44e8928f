"""The stages that make a checkpoint, as a library API: a typed request in, the
manifest out. `qpeft quantize` / `qpeft decompose` parse their flags into these
requests and print the result; `qpeft train` builds its base with the same calls.

Each stage checks its whole request before any slow step (bad values, an output
that exists or cannot be written, missing data, ranks the matrices cannot take) and
raises `QpeftError` with a one-line message that names the command-line flag of the
field at fault.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calib.batches import DEFAULT_SEQLEN, DEFAULT_SEQUENCES
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


def fisher(
    model_dir: Path,
    targets: tuple[str, ...],
    calib: CalibrationOptions,
    device: str,
    out: Path | None = None,
    activations: bool = False,
):
    """(FisherStats, cache file, cache hit) of the selected matrices (`out`: also
    written there; `activations`: the inputs' XᵀX cached in the same pass)."""
    from qpeft.pipeline.calibrate import calibrate

    return calibrate(
        model_dir,
        targets,
        *calib.sampling(),
        device,
        calib.dtype,
        out,
        calib.fisher_elementwise,
        activations,
    )


@dataclass
class QuantizeRequest:
    """`qpeft quantize`: every selected matrix under one config."""

    model: str | None
    out: Path
    config: str = "nf4"
    targets: str | None = None  # comma-separated patterns; None: the default set
    device: str = "cpu"
    unquantized_dtype: str = "source"

    def command(self) -> list[str]:
        """The `qpeft` command line that makes this request."""
        targets = ["--targets", self.targets] if self.targets else []
        return ["quantize", self.model or "smollm2", "--config", self.config, "--out", str(self.out), *targets]


def run_quantize(request: QuantizeRequest) -> dict[str, Any]:
    """Write the checkpoint; returns its manifest."""
    from qpeft.io.atomic import check_output
    from qpeft.io.checkpoint import UNQUANTIZED_DTYPES
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import parse_targets
    from qpeft.pipeline.quantize import quantize_model
    from qpeft.quant import parse_config

    config = parse_config(request.config)
    targets = parse_targets(request.targets, "--targets")
    check_device(request.device)
    check_output(request.out)  # before the slow steps, not only when writing starts
    model_dir = resolve_model(request.model)
    return quantize_model(
        model_dir,
        request.out,
        config,
        targets,
        request.device,
        source=request.model or "smollm2",
        unquantized_dtype=UNQUANTIZED_DTYPES[request.unquantized_dtype],
    )


@dataclass
class DecomposeRequest:
    """`qpeft decompose`: W ≈ Q + ΔW per selected matrix by a registered method
    (`qpeft.methods`), under a bit budget (the ILP over `configs`) or one `config`.
    `options` are the method's own (its `options` dataclass; None: its defaults)."""

    model: str | None
    out: Path
    method: str = "lqlora"
    budget: str | float | None = None
    config: str | None = None
    rank: int = 64
    options: Any = None
    calib: CalibrationOptions = field(default_factory=CalibrationOptions)
    configs: str | None = None  # the ILP's grid (default lqlora)
    targets: str | None = None
    device: str = "cpu"
    seed: int = 0
    refine: str = "hull"
    resume: bool = False
    costs: Path | None = None
    unquantized_dtype: str = "source"

    def __post_init__(self) -> None:
        from qpeft.methods import method_plugin

        self.plugin = method_plugin(self.method)
        if self.options is None:
            self.options = self.plugin.options()
        if not isinstance(self.options, self.plugin.options):
            raise QpeftError(f"--method {self.method} takes {self.plugin.options.__name__}, got {self.options!r}")

    def command(self) -> list[str]:
        """The `qpeft` command line that makes this request (the options a recipe sets)."""
        how = ["--budget", str(self.budget)] if self.budget is not None else ["--config", str(self.config)]
        extra = ["--method", self.method, *self.plugin.command_flags(self.options)]
        targets = ["--targets", self.targets] if self.targets else []
        model = self.model or "smollm2"
        return ["decompose", model, *how, "--rank", str(self.rank), "--out", str(self.out), *extra, *targets]


def _check_decompose(request: DecomposeRequest) -> None:
    r = request
    if r.rank < 0:
        raise QpeftError(f"--rank must be 0 or more, got {r.rank}")
    r.plugin.check(r)
    if r.config and r.configs:
        raise QpeftError(
            "--configs lists the ILP's candidates for --budget; --config puts every matrix under one config: "
            "give one of them"
        )


def run_decompose(request: DecomposeRequest) -> dict[str, Any] | None:
    """Calibrate, cost, allocate and split; write the checkpoint. Returns its manifest
    on rank 0 of a torch.distributed run (every process calls this), None elsewhere."""
    from calib.batches import calibration_text
    from qpeft.allocation.ilp import parse_budget
    from qpeft.calibration.activations import check_gram_memory
    from qpeft.distributed import init_distributed, rank_and_world
    from qpeft.io.atomic import check_output, remove_partials
    from qpeft.io.checkpoint import UNQUANTIZED_DTYPES
    from qpeft.methods import check_rank
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import parse_targets
    from qpeft.pipeline.decompose import decompose_model, plan_matrices
    from qpeft.quant import parse_config, parse_grid

    r = request
    budget = None if r.budget is None else parse_budget(r.budget)
    _check_decompose(r)
    grid = [parse_config(r.config)] if r.config else parse_grid(r.configs or "lqlora")
    targets = parse_targets(r.targets, "--targets")
    r.calib.check()
    check_device(r.device)
    check_output(r.out)
    if r.costs is not None and not r.costs.exists():
        raise QpeftError(f"--costs: {r.costs} does not exist")
    needs = r.plugin.needs(r)
    if needs.calibration_text:
        calibration_text(r.calib.source)
    device = init_distributed(r.device)
    model_dir = resolve_model(r.model)
    names, _, shapes = plan_matrices(model_dir, targets, grid, budget)  # fail before the slow stages
    check_rank(r.plugin, r.rank, shapes, "--rank")
    if r.resume and rank_and_world()[0] == 0:
        remove_partials(r.out)  # what a killed write left
    if needs.activations:
        in_features = {n: shapes[n][1] for n in names}
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        check_gram_memory(in_features, processes, needs.activations, needs.activations_hint)
    method = r.plugin.build(r, model_dir, targets, names, device)
    return decompose_model(
        model_dir,
        r.out,
        budget,
        method,
        targets,
        grid,
        device,
        r.resume,
        r.costs,
        r.model or "smollm2",
        unquantized_dtype=UNQUANTIZED_DTYPES[r.unquantized_dtype],
    )
