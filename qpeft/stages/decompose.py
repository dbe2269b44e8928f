"""`qpeft decompose` as a library call: W ≈ Q + ΔW per selected matrix by a registered
method (`qpeft.methods`), under a bit budget or one config.

Stages, each streaming the selected matrices one at a time from safetensors:

1. Calibration statistics (cached, `qpeft.calibration.cache`): LQ-LoRA's Fisher
   row/column means (optional), the layer inputs' XᵀX for GPTQ and QWHA.
2. Cost table (`qpeft.allocation.cost_table`): cost(matrix, config) for every matrix
   and candidate config, by the method's `costs`; resumable. A single config
   (`--config`) needs no table.
3. ILP (rank 0, `qpeft.allocation.ilp`): one config per matrix,
   Σ bits·numel ≤ budget·Σ numel.
4. Final split of each matrix under its config (the method's `split`), written as a
   qpeft checkpoint: Q as packed parts, the adapter (L1/L2, or the WHT positions and
   values) in bf16 under NAME.adapter., the rest of the model copied.

`run_decompose` checks the whole request before any slow step and raises
`QpeftError` with a one-line message naming the flag at fault.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qpeft
from qpeft.allocation.cost_table import (
    COST_TABLE_NAME,
    CostTable,
    DecomposeSettings,
    compute_cost_table,
    load_cost_table,
    method_settings,
    prepare_work_dir,
    save_cost_table,
    storage_bits_table,
    work_dir_for,
)
from qpeft.allocation.ilp import Allocation, Budget, check_budget, ilp_allocate, parse_budget, parse_ranks
from qpeft.distributed import ObjectSender, barrier, broadcast_object, rank_and_world, receive_object
from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_directory
from qpeft.io.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, dtype_name, stream_model, write_manifest
from qpeft.io.summary import HEATMAP_NAME, bits_heatmap, summarise, type_table
from qpeft.methods import DEFAULT_METHOD, Method, check_rank, method_plugin
from qpeft.models.resolve import copy_model_files
from qpeft.models.selection import Targets, parse_targets, targets_json, targets_text
from qpeft.models.skeleton import StoredModel, open_stored, resolve_targets
from qpeft.models.weights import SafetensorsWeights
from qpeft.quant import QuantConfig, dequantize, storage_bits
from qpeft.stages.calibrate import CalibrationOptions
from qpeft.stages.checks import check_config_holds, check_device

AdapterBits = Callable[[int, tuple[int, int]], int]  # a method's `MethodPlugin.adapter_bits`

# calibration results by manifest key (`Method.calibrations`) → heat-map label
CALIBRATION_LABELS = {"fisher": "Fisher", "grams": "activations"}


def _split_matrix(
    weight: torch.Tensor, config: QuantConfig, rank: int, method: Method, name: str, grid: Sequence[QuantConfig]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest entry of one matrix under its config and rank (`grid`: the cost
    table's configs), and its stored tensors (on the CPU) by checkpoint key."""
    w = weight.float()
    split = method.split(name, w, config, rank, grid)
    tensors = {f"{name}.{part}": value.cpu() for part, value in split.quantized.tensors().items()}
    adapter = {} if split.adapter is None else split.adapter.state_dict()
    tensors |= {f"{name}.adapter.{part}": value.detach().cpu() for part, value in adapter.items()}
    recon = dequantize(split.quantized)
    if split.adapter is not None:
        recon += split.adapter.delta_weight()  # as stored
    norm = float(torch.linalg.norm(w)) or 1.0
    entry: dict[str, Any] = {
        "config": config.name,
        "shape": list(w.shape),
        "bits": storage_bits(config, w.shape) / w.numel(),
        "adapter": None if split.adapter is None else split.adapter.spec(),
        "adapter_bits": sum(8 * t.numel() * t.element_size() for t in adapter.values()),
        "adapter_params": sum(t.numel() for t in adapter.values() if t.is_floating_point()),
        "rel_error": float(torch.linalg.norm(w - recon)) / norm,
    }
    return entry | split.report, tensors


def split_owners(weights: SafetensorsWeights, names: Sequence[str], world: int) -> dict[str, int]:
    """Which process splits each matrix: every world-th in the order rank 0 streams
    the weights, so that the others' results reach it in the order it writes them."""
    selected = {f"{n}.weight" for n in names}
    streamed = [key.removesuffix(".weight") for key in weights.stream_order() if key in selected]
    return {name: i % world for i, name in enumerate(streamed)}


@dataclass
class MatrixPlan:
    """The selected matrices: names, sizes and shapes, and the exact stored bits per
    parameter of every cost-table column (`storage_bits_table`; the adapter's
    included under a total budget)."""

    names: list[str]
    numel: list[int]
    shapes: dict[str, tuple[int, int]]
    bits: np.ndarray


def plan_matrices(
    model: StoredModel,
    targets: Targets | None,
    grid: Sequence[QuantConfig],
    budget: Budget | None,
    ranks: Sequence[int] = (0,),
    adapter_bits: AdapterBits | None = None,
) -> MatrixPlan:
    """`model`'s selected matrices and their stored bits; errors (before any slow
    stage) if the budget cannot be met or used whole (None: one uniform config). A
    total budget counts the adapter's bits (`adapter_bits`)."""
    shapes = model.linear(targets)
    names, numel = list(shapes), [rows * cols for rows, cols in shapes.values()]
    if budget is None and len(grid) != 1:
        raise QpeftError("give a bit budget, or a single config")
    if len(grid) == 1:
        check_config_holds(grid[0], shapes)
    for name, shape in shapes.items():
        if not any(config.holds(shape) for config in grid):
            raise QpeftError(f"no config of the grid can hold {name} ({shape[0]}×{shape[1]})")
    total = budget is not None and budget.total
    bits = storage_bits_table(grid, list(shapes.values()), ranks, adapter_bits if total else None)
    if budget is not None:
        if len(ranks) > 1:
            choices = "(config, rank) pairs"
        elif budget.total:
            choices = f"configs at rank {ranks[0]}"
        else:
            choices = "configs"
        check_budget(budget.bits, bits, numel, False, budget.name, choices)
    return MatrixPlan(names, numel, shapes, bits)


def decompose_model(
    model_dir: Path,
    out_dir: Path,
    budget: Budget | None,
    method: Method,
    targets: Targets | None,
    grid: Sequence[QuantConfig],
    ranks: Sequence[int],
    adapter_bits: AdapterBits,
    device: str = "cpu",
    resume: bool = False,
    costs_from: Path | None = None,
    source: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    unquantized_dtype: torch.dtype | None = None,
    task: str | None = None,
) -> dict[str, Any] | None:
    """Run stages 2–4 (the method holds its calibration) and write the checkpoint to
    `out_dir`; `budget` None with a one-config `grid` and one rank puts every matrix
    under that config and rank. With several `ranks` the ILP picks each matrix's
    (config, rank) pair under a total budget. `task`: the model's class (None:
    config.json's). Returns the manifest on rank 0, None on the other ranks."""
    targets = resolve_targets(model_dir, targets)
    from qpeft.calibration.cache import model_fingerprint

    rank_id, world = rank_and_world()
    started = time.perf_counter()
    model = open_stored(model_dir, task)
    weights = model.weights
    plan = plan_matrices(model, targets, grid, budget, ranks, adapter_bits)
    names, numel, bits = plan.names, plan.numel, plan.bits
    calibration = method_settings(method)
    costed = {k: v for k, v in calibration.items() if k not in method.split_only}
    settings = DecomposeSettings(
        model_fingerprint(model_dir), targets_json(targets), [c.name for c in grid], list(ranks), method.name, costed
    )
    work = work_dir_for(out_dir)
    uniform = budget is None  # one config and one rank for every matrix: nothing to allocate
    if uniform:
        table = CostTable(
            list(names), [], [grid[0].name], list(ranks), np.zeros((len(names), 1)), settings=settings.as_dict()
        )
    elif costs_from is not None:
        table = load_cost_table(costs_from, settings) if rank_id == 0 else None
    else:
        if rank_id == 0:
            prepare_work_dir(work, settings, resume)
        barrier()
        table = compute_cost_table(weights, names, numel, grid, settings, method, work, device)
    if rank_id == 0 and table.names != list(names):
        raise QpeftError("the cost table's matrices are not the selected ones")

    # rank 0 solves the allocation; every process then splits a share of the matrices
    solve_start = time.perf_counter()
    allocation = None
    if rank_id == 0 and uniform:
        average = float((bits[:, 0] * np.asarray(numel)).sum() / sum(numel))
        allocation = Allocation([0] * len(names), 0.0, average, len(names), "uniform")
    elif rank_id == 0:
        allocation = ilp_allocate(table.costs, bits, numel, budget.bits)
    solve_seconds = time.perf_counter() - solve_start
    choice = broadcast_object(None if allocation is None else allocation.choice, device)
    # column k of the table: rank ranks[k // C], config grid[k % C]
    chosen = {name: (grid[k % len(grid)], ranks[k // len(grid)]) for name, k in zip(names, choice, strict=True)}
    priced = () if uniform else grid  # the configs a table priced, whose path the split may rerun
    owners = split_owners(weights, names, world)

    write_start = time.perf_counter()
    if rank_id != 0:  # send each split to rank 0, in the order it writes them
        sender = ObjectSender(0, device)
        for name, owner in owners.items():
            if owner == rank_id:
                tensor = weights.tensor(f"{name}.weight").to(device)
                sender.send(_split_matrix(tensor, *chosen[name], method, name, priced))
        sender.close()
        return None
    received = dict.fromkeys(range(world), 0)  # objects taken from each rank so far
    table_cost = {
        name: float(table.costs[i, j]) for i, (name, j) in enumerate(zip(names, allocation.choice, strict=True))
    }
    selected = {f"{n}.weight": n for n in names}

    def split(name: str, tensor: torch.Tensor) -> dict[str, Any]:
        if owners[name] == 0:
            entry, tensors = _split_matrix(tensor.to(device), *chosen[name], method, name, priced)
        else:
            entry, tensors = receive_object(owners[name], received[owners[name]], device)
            received[owners[name]] += 1
        for key, value in tensors.items():
            writer.add(key, value)
        return entry | ({} if uniform else {"table_cost": table_cost[name]})

    with atomic_directory(out_dir) as tmp:
        copy_model_files(model_dir, tmp, model.architecture)
        writer = ShardWriter(tmp, max_shard_bytes)
        matrices = stream_model(weights, writer, selected, split, "write", unquantized_dtype)
        matrices = {n: matrices[n] for n in names}
        if not uniform:
            save_cost_table(tmp / COST_TABLE_NAME, table)
        budgets = {"budget": None, "total_budget": None}
        if budget is not None:
            budgets["total_budget" if budget.total else "budget"] = budget.bits
        written = [m.get("cost") for m in matrices.values()]
        summary = (
            summarise(matrices)
            | budgets
            | {
                # the cost of what was written, in the table's measure; the ILP's is the table's
                "objective": None if None in written else float(sum(written)),
                "ilp_objective": allocation.cost,
                "ilp_average_bits": allocation.average_bits,
                "ilp_variables": allocation.kept_variables,
            }
        )
        held = {key: value for key, value in method.calibrations().items() if value is not None}
        calib = next((CALIBRATION_LABELS.get(key, key) for key in held), "no calibration")
        target = grid[0].name if budget is None else budget.label
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, ranks))}"
        title = f"{source or model_dir}: {method.name}, {target}, {rank_text}, {calib}"
        bits_heatmap(matrices, tmp / HEATMAP_NAME, title)
        manifest = {
            "method": method.name,
            "base_model": {"path": str(model_dir), "source": source or str(model_dir), "fingerprint": settings.model},
            "task": model.task,
            "targets": targets_json(targets),
            "unquantized_dtype": dtype_name(unquantized_dtype),
            "settings": settings.as_dict()
            | budgets
            | {"grid_size": len(grid), "split": {k: calibration[k] for k in method.split_only}},
            **{key: getattr(value, "metadata", None) for key, value in method.calibrations().items()},
            "quantized": matrices,
            "summary": summary,
            "by_type": type_table(matrices),
            "weight_map": writer.weight_map,
            "provenance": _provenance(device, world)
            | {
                "cost_table_seconds": round(table.seconds, 2),
                "cost_table_resumed_matrices": table.resumed,
                "cost_table_from": str(costs_from) if costs_from else None,
                "ilp_seconds": round(solve_seconds, 2),
                "write_seconds": round(time.perf_counter() - write_start, 2),
                "seconds": round(time.perf_counter() - started, 2),
            },
        }
        write_manifest(tmp, manifest, writer)  # last: a directory without it is not a checkpoint
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _provenance(device: str, world: int) -> dict[str, Any]:
    import pulp
    import transformers

    return {
        "qpeft": qpeft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pulp": pulp.__version__,
        "python": platform.python_version(),
        "device": device,
        "processes": world,
    }


@dataclass
class DecomposeRequest:
    """`qpeft decompose`: W ≈ Q + ΔW per selected matrix by a registered method
    (`qpeft.methods`), under a bit budget of Q (`budget`) or of everything stored
    (`total_budget`), the ILP choosing over `configs` (and with `ranks`, over
    (config, rank) pairs), or under one `config`. `options` are the method's own (its
    `options` dataclass; None: its defaults)."""

    model: str | None
    out: Path
    method: str = DEFAULT_METHOD
    budget: str | float | None = None
    config: str | None = None
    rank: int | None = None  # None: the method's default_rank (unless `ranks`)
    options: Any = None
    total_budget: str | float | None = None
    ranks: str | Sequence[int] | None = None  # candidate ranks of the joint ILP
    calib: CalibrationOptions = field(default_factory=CalibrationOptions)
    configs: str | None = None  # the ILP's grid (default lqlora)
    targets: str | Sequence[str] | None = None  # `--targets` text or a recipe's list
    device: str = "cpu"
    seed: int = 0
    refine: str = "hull"
    resume: bool = False
    costs: Path | None = None
    unquantized_dtype: str = "source"
    task: str | None = None  # None: config.json's architectures

    def __post_init__(self) -> None:
        self.plugin = method_plugin(self.method)
        if self.rank is None and self.ranks is None:
            self.rank = self.plugin.default_rank
        if self.options is None:
            self.options = self.plugin.options()
        if not isinstance(self.options, self.plugin.options):
            raise QpeftError(f"--method {self.method} takes {self.plugin.options.__name__}, got {self.options!r}")

    def command(self) -> list[str]:
        """The `qpeft` command line that makes this request (the options a recipe sets)."""
        if self.budget is not None:
            how = ["--budget", str(self.budget)]
        elif self.total_budget is not None:
            how = ["--total-budget", str(self.total_budget)]
        else:
            how = ["--config", str(self.config)]
        if self.ranks is not None:
            how += ["--ranks", ",".join(map(str, parse_ranks(self.ranks)))]
        else:
            how += ["--rank", str(self.rank)]
        extra = ["--method", self.method, *self.plugin.command_flags(self.options)]
        targets = ["--targets", targets_text(parse_targets(self.targets, "--targets"))] if self.targets else []
        task = ["--task", self.task] if self.task else []
        model = self.model or "smollm2"
        return ["decompose", model, *how, "--out", str(self.out), *extra, *targets, *task]


def _check_decompose(request: DecomposeRequest) -> tuple[Budget | None, list[int]]:
    """The request's budget and candidate ranks, or a one-line error naming the flags at fault."""
    r = request
    given = [
        flag
        for flag, value in (("--budget", r.budget), ("--total-budget", r.total_budget), ("--config", r.config))
        if value is not None
    ]
    if len(given) != 1:
        raise QpeftError(
            f"give one of --budget, --total-budget and --config, not {' and '.join(given)}"
            if given
            else "give a bit budget (--budget or --total-budget), or a single config (--config)"
        )
    if r.ranks is not None and r.rank is not None:
        raise QpeftError("--rank gives every matrix one rank, --ranks lets the ILP choose each one's: give one of them")
    if r.rank is not None and r.rank < 0:
        raise QpeftError(f"--rank must be 0 or more, got {r.rank}")
    ranks = [r.rank] if r.ranks is None else parse_ranks(r.ranks)
    if len(ranks) > 1 and r.total_budget is None:
        raise QpeftError(
            "--ranks needs --total-budget: under --budget (bits of Q only) or --config the adapter's bits are "
            "not counted, and the largest rank would always win"
        )
    r.plugin.check(r)
    if r.config and r.configs:
        raise QpeftError(
            "--configs lists the ILP's candidates for a budget; --config puts every matrix under one config: "
            "give one of them"
        )
    if r.budget is not None:
        return Budget(parse_budget(r.budget)), ranks
    if r.total_budget is not None:
        return Budget(parse_budget(r.total_budget, "total budget"), total=True), ranks
    return None, ranks


def run_decompose(request: DecomposeRequest) -> dict[str, Any] | None:
    """Calibrate, cost, allocate and split; write the checkpoint. Returns its manifest
    on rank 0 of a torch.distributed run (every process calls this), None elsewhere."""
    from qpeft.calibration.activations import check_gram_memory
    from qpeft.data.calibration import calibration_text
    from qpeft.distributed import init_distributed
    from qpeft.io.atomic import check_output, remove_partials
    from qpeft.io.checkpoint import UNQUANTIZED_DTYPES
    from qpeft.models.resolve import resolve_model
    from qpeft.quant import parse_config, parse_grid

    r = request
    budget, ranks = _check_decompose(r)
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
    # fail before the slow stages
    plan = plan_matrices(open_stored(model_dir, r.task), targets, grid, budget, ranks, r.plugin.adapter_bits)
    names, shapes = plan.names, plan.shapes
    check_rank(r.plugin, max(ranks), shapes, "--rank" if r.ranks is None else "--ranks")
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
        ranks,
        r.plugin.adapter_bits,
        device,
        r.resume,
        r.costs,
        r.model or "smollm2",
        unquantized_dtype=UNQUANTIZED_DTYPES[r.unquantized_dtype],
        task=r.task,
    )
