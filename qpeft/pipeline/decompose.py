"""Decomposition of a model under a bit budget: W ≈ Q + ΔW per selected matrix, by
LQ-LoRA (Guo et al. 2024) or QWHA (`qpeft.methods`).

Stages, each streaming the selected matrices one at a time from safetensors:

1. Calibration statistics (cached): the Fisher's row/column means for LQ-LoRA
   (optional), the input Gram matrices XᵀX for QWHA.
2. Cost table: cost(matrix, config) for every matrix and candidate config (the
   method's `costs`). Rows are appended to `OUT.work/costs-RANK.jsonl` as they
   finish, so `--resume` after a crash skips finished matrices. Under
   torch.distributed (torchrun / accelerate launch) rank k takes matrices k, k+W, ...
   A single config (`--config`) needs no table.
3. ILP (rank 0): one config per matrix, Σ bits·numel ≤ budget·Σ numel.
4. Final split of each matrix under its config (the method's `split`), written as a
   qpeft checkpoint: Q as packed parts, the adapter (L1/L2, or the WHT positions and
   values) in bf16 under NAME.adapter., the rest of the model copied.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import qpeft
from qpeft.allocation.ilp import Allocation, check_budget, ilp_allocate
from qpeft.calibration.activations import InputGrams
from qpeft.calibration.fisher import FisherStats
from qpeft.distributed import ObjectSender, barrier, broadcast_object, rank_and_world, receive_object
from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_directory, atomic_file
from qpeft.io.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, dtype_name, stream_model, write_manifest
from qpeft.methods import Method
from qpeft.models.loading import stored_linear
from qpeft.models.resolve import copy_model_files
from qpeft.models.weights import SafetensorsWeights
from qpeft.quant import PRESETS, QuantConfig, dequantize, storage_bits

# calibration results by manifest key (`Method.calibrations`) → heat-map label
CALIBRATION_LABELS = {"fisher": "Fisher", "grams": "activations"}
COST_TABLE_NAME = "cost_table.json"
HEATMAP_NAME = "bits_heatmap.png"


@dataclass
class DecomposeSettings:
    """Everything that determines the cost table (checked on --resume / --costs)."""

    model: str  # fingerprint of the model's weights
    targets: list[str]
    grid: list[str]  # config names
    method: str
    method_settings: dict[str, Any]  # the method's own, its calibration's identity included

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def method_settings(method: Method) -> dict[str, Any]:
    """A method's parameters and its calibration's settings (not how long or where
    the calibration ran): all but its `split_only` ones change its costs. Private
    fields (a leading underscore: caches) are not settings."""
    out: dict[str, Any] = {}
    for key, value in method.__dict__.items():
        if key.startswith("_"):
            continue
        if isinstance(value, FisherStats | InputGrams):
            value = {k: v for k, v in value.metadata.items() if k not in ("seconds", "device", "processes")}
        out[key] = value
    return out


@dataclass
class CostTable:
    names: list[str]
    shapes: list[tuple[int, int]]
    configs: list[str]
    costs: np.ndarray  # matrices × configs
    seconds: float = 0.0
    resumed: int = 0  # matrices found finished in the work directory
    settings: dict[str, Any] = field(default_factory=dict)


def work_dir_for(out: Path) -> Path:
    return Path(f"{out}.work")


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Finished rows of a cost shard; a torn last line (crash mid-write) is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["name"]] = row
    return rows


def drop_torn_line(path: Path) -> None:
    """Cut a cost shard back to its last whole line, so that rows appended on resume
    start on a line of their own (a crash mid-write leaves a torn last line)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def prepare_work_dir(work: Path, settings: DecomposeSettings, resume: bool) -> None:
    """Create the work directory, or check that the one being resumed matches."""
    settings_file = work / "settings.json"
    if work.exists() and not resume:
        done = sum(len(_read_rows(p)) for p in work.glob("costs-*.jsonl"))
        raise QpeftError(
            f"{work} holds an interrupted run ({done} matrices costed): pass --resume to continue it, or remove it"
        )
    if work.exists():
        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QpeftError(f"cannot resume from {work}: {exc}") from exc
        current = settings.as_dict()
        changed = sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))
        if changed:
            raise QpeftError(f"cannot resume from {work}: the run was started with other {', '.join(changed)}")
        return
    work.mkdir(parents=True)
    with atomic_file(settings_file) as tmp:
        tmp.write_text(json.dumps(settings.as_dict(), indent=1))


class SharedCounter:
    """0, 1, 2, … handed out once each to whichever process asks next: a counter file
    in the run's work directory (shared by the processes), under a file lock. Rank 0
    resets it; every process must construct it (a barrier)."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        self.path, self.lock = path, FileLock(f"{path}.lock")
        if rank_and_world()[0] == 0:
            path.write_text("0")
        barrier()

    def next(self) -> int:
        with self.lock:
            value = int(self.path.read_text())
            self.path.write_text(str(value + 1))
        return value


def compute_cost_table(
    model_dir: Path,
    names: Sequence[str],
    numel: Sequence[int],
    grid: Sequence[QuantConfig],
    settings: DecomposeSettings,
    method: Method,
    work: Path,
    device: str,
) -> CostTable | None:
    """This rank's share of the cost table, appended row by row to the work directory;
    rank 0 returns the whole table once every rank has finished (others None).

    The matrices not yet costed are taken largest first, each by whichever process is
    free (`SharedCounter`), so that the processes finish together however long each
    matrix takes (with shares fixed in advance by size, one of two processes finished
    1.6–26.1 s after the other in four SmolLM2 runs; 0.7 s with the counter)."""
    rank, _ = rank_and_world()
    start = time.perf_counter()
    shard = work / f"costs-{rank}.jsonl"
    drop_torn_line(shard)
    finished = {}
    for path in work.glob("costs-*.jsonl"):
        finished |= _read_rows(path)
    size = dict(zip(names, numel, strict=True))
    todo = sorted((n for n in names if n not in finished), key=lambda n: -size[n])
    counter = SharedCounter(work / "cost-table-next")
    weights = SafetensorsWeights(model_dir)
    done = len(names) - len(todo)
    with (
        shard.open("a") as out,
        tqdm(total=len(names), initial=done, desc="cost table", unit="matrix", disable=rank != 0) as bar,
    ):
        while (index := counter.next()) < len(todo):
            name = todo[index]
            w = weights.tensor(f"{name}.weight").to(device).float()
            costs = method.costs(name, w, grid)
            out.write(json.dumps({"name": name, "shape": list(w.shape), "costs": costs.tolist()}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(done + index + 1 - bar.n)  # the matrices handed out so far, by any process
        bar.update(len(names) - bar.n)  # none left to hand out
    barrier()
    if rank != 0:
        return None
    rows = {}
    for path in work.glob("costs-*.jsonl"):
        rows |= _read_rows(path)
    missing = [n for n in names if n not in rows]
    if missing:
        raise QpeftError(f"the cost table lacks {len(missing)} matrices, e.g. {missing[0]}")
    return CostTable(
        list(names),
        [tuple(rows[n]["shape"]) for n in names],
        [c.name for c in grid],
        np.array([rows[n]["costs"] for n in names]),
        time.perf_counter() - start,
        sum(n in finished for n in names),
        settings.as_dict(),
    )


def save_cost_table(path: Path, table: CostTable) -> None:
    body = {
        "settings": table.settings,
        "configs": table.configs,
        "matrices": [
            {"name": n, "shape": list(s), "costs": c.tolist()}
            for n, s, c in zip(table.names, table.shapes, table.costs, strict=True)
        ],
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(body))


def load_cost_table(path: Path, settings: DecomposeSettings) -> CostTable:
    """A finished cost table (a checkpoint's cost_table.json, or the checkpoint
    directory), checked against the current settings."""
    path = Path(path)
    if path.is_dir():
        path = path / COST_TABLE_NAME
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QpeftError(f"cannot read the cost table {path}: {exc}") from exc
    current = settings.as_dict()
    changed = sorted(k for k in current if current[k] != body["settings"].get(k))
    if changed:
        raise QpeftError(f"the cost table {path} was computed with other {', '.join(changed)}")
    rows = body["matrices"]
    return CostTable(
        [r["name"] for r in rows],
        [tuple(r["shape"]) for r in rows],
        body["configs"],
        np.array([r["costs"] for r in rows]),
        settings=body["settings"],
    )


def storage_bits_table(grid: Sequence[QuantConfig], shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Exact stored bits per parameter (padding and offsets included), matrices × configs."""
    return np.array([[storage_bits(c, shape) / (shape[0] * shape[1]) for c in grid] for shape in shapes])


def lowrank_bits(rank: int, shape: tuple[int, int], nf8: bool) -> int:
    """Bits of L1 (d_out × r) and L2 (r × d_in): bf16, or NF8 (nf8-b64-s8x256-fp32)."""
    rows, cols = shape
    if rank == 0:
        return 0
    if nf8:
        return storage_bits(PRESETS["nf8"], (rows, rank)) + storage_bits(PRESETS["nf8"], (rank, cols))
    return 16 * rank * (rows + cols)


def _split_matrix(
    weight: torch.Tensor, config: QuantConfig, method: Method, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest entry of one matrix under its config, and its stored tensors (on
    the CPU) by checkpoint key."""
    w = weight.float()
    split = method.split(name, w, config)
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


def summarise(matrices: dict[str, Any]) -> dict[str, float]:
    numel = sum(m["shape"][0] * m["shape"][1] for m in matrices.values())
    q_bits = sum(m["bits"] * m["shape"][0] * m["shape"][1] for m in matrices.values())
    adapter = sum(m["adapter_bits"] for m in matrices.values())
    summary = {
        "matrices": len(matrices),
        "params": numel,
        "bits_per_param": q_bits / numel,
        "bits_with_adapter": (q_bits + adapter) / numel,
        "adapter_params": sum(m["adapter_params"] for m in matrices.values()),
    }
    if any((m["adapter"] or {}).get("kind") == "lowrank" for m in matrices.values()):
        nf8 = sum(lowrank_bits(m["rank"], tuple(m["shape"]), True) for m in matrices.values())
        summary["bits_with_lowrank_nf8"] = (q_bits + nf8) / numel
    return summary


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    parts = [p for p in name.split(".") if p.isdigit()]
    return int(parts[0]) if parts else None


def type_table(matrices: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer type: matrices, the most used configs, mean bits, mean errors."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for name, entry in matrices.items():
        by_type.setdefault(layer_type(name), []).append(entry)
    rows = []
    for kind, entries in by_type.items():
        numel = [e["shape"][0] * e["shape"][1] for e in entries]
        counts = Counter(e["config"] for e in entries).most_common(2)
        row = {
            "type": kind,
            "matrices": len(entries),
            "configs": ", ".join(f"{c}×{k}" for c, k in counts)
            + (" …" if len(set(e["config"] for e in entries)) > 2 else ""),
            "bits": sum(e["bits"] * n for e, n in zip(entries, numel, strict=True)) / sum(numel),
            "rel_error": float(np.mean([e["rel_error"] for e in entries])),
        }
        if "weighted_rel_error" in entries[0]:
            row["weighted_rel_error"] = float(np.mean([e["weighted_rel_error"] for e in entries]))
        rows.append(row)
    return rows


def format_type_table(rows: list[dict[str, Any]]) -> str:
    weighted = "weighted_rel_error" in rows[0]
    head = f"{'type':<10} {'n':>4} {'bits':>7} {'rel err':>9}" + (f" {'F-rel err':>9}" if weighted else "")
    lines = [head + "  configs (most used)"]
    for r in rows:
        line = f"{r['type']:<10} {r['matrices']:>4} {r['bits']:>7.3f} {r['rel_error']:>9.4f}"
        if weighted:
            line += f" {r['weighted_rel_error']:>9.4f}"
        lines.append(line + "  " + r["configs"])
    return "\n".join(lines)


def bits_heatmap(matrices: dict[str, Any], path: Path, title: str) -> None:
    """PNG: bits per parameter of each matrix, layers × matrix types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(layer_type(n) for n in matrices))
    layers = sorted({layer_index(n) for n in matrices if layer_index(n) is not None})
    grid = np.full((len(layers), len(types)), np.nan)
    for name, entry in matrices.items():
        index = layer_index(name)
        if index is not None:
            grid[layers.index(index), types.index(layer_type(name))] = entry["bits"]
    fig, ax = plt.subplots(figsize=(1.2 * len(types) + 2, 0.25 * len(layers) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="bits per parameter")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plan_matrices(
    model_dir: Path, targets: Sequence[str], grid: Sequence[QuantConfig], budget: float | None
) -> tuple[list[str], list[int], dict[str, tuple[int, int]]]:
    """The selected matrices, their sizes and shapes; errors (before any slow stage) if
    one is missing from the weights or the budget cannot be met or used whole (None:
    one uniform config)."""
    shapes = stored_linear(model_dir, SafetensorsWeights(model_dir), targets)
    names, numel = list(shapes), [rows * cols for rows, cols in shapes.values()]
    if budget is None and len(grid) != 1:
        raise QpeftError("give a bit budget, or a single config")
    if budget is not None:
        check_budget(budget, storage_bits_table(grid, list(shapes.values())), numel, above_ok=False)
    return names, numel, shapes


def decompose_model(
    model_dir: Path,
    out_dir: Path,
    budget: float | None,
    method: Method,
    targets: Sequence[str],
    grid: Sequence[QuantConfig],
    device: str = "cpu",
    resume: bool = False,
    costs_from: Path | None = None,
    source: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    unquantized_dtype: torch.dtype | None = None,
) -> dict[str, Any] | None:
    """Run stages 2–4 (the method holds its calibration) and write the checkpoint to
    `out_dir`; `budget` None with a one-config `grid` puts every matrix under that
    config. Returns the manifest on rank 0, None on the other ranks."""
    from qpeft.pipeline.calibrate import model_fingerprint

    rank_id, world = rank_and_world()
    started = time.perf_counter()
    weights = SafetensorsWeights(model_dir)
    names, numel, shapes = plan_matrices(model_dir, targets, grid, budget)
    calibration = method_settings(method)
    costed = {k: v for k, v in calibration.items() if k not in method.split_only}
    settings = DecomposeSettings(
        model_fingerprint(model_dir), list(targets), [c.name for c in grid], method.name, costed
    )
    work = work_dir_for(out_dir)
    if len(grid) == 1:  # one config for every matrix: nothing to allocate
        table = CostTable(list(names), [], [grid[0].name], np.zeros((len(names), 1)), settings=settings.as_dict())
    elif costs_from is not None:
        table = load_cost_table(costs_from, settings) if rank_id == 0 else None
    else:
        if rank_id == 0:
            prepare_work_dir(work, settings, resume)
        barrier()
        table = compute_cost_table(model_dir, names, numel, grid, settings, method, work, device)
    if rank_id == 0 and table.names != list(names):
        raise QpeftError("the cost table's matrices are not the selected ones")

    # rank 0 solves the allocation; every process then splits a share of the matrices
    solve_start = time.perf_counter()
    bits = storage_bits_table(grid, list(shapes.values()))
    allocation = None
    if rank_id == 0 and budget is None:
        average = float((bits[:, 0] * np.asarray(numel)).sum() / sum(numel))
        allocation = Allocation([0] * len(names), 0.0, average, len(names), "uniform")
    elif rank_id == 0:
        allocation = ilp_allocate(table.costs, bits, numel, budget)
    solve_seconds = time.perf_counter() - solve_start
    choice = broadcast_object(None if allocation is None else allocation.choice, device)
    chosen = {name: grid[j] for name, j in zip(names, choice, strict=True)}
    owners = split_owners(weights, names, world)

    write_start = time.perf_counter()
    if rank_id != 0:  # send each split to rank 0, in the order it writes them
        sender = ObjectSender(0, device)
        for name, owner in owners.items():
            if owner == rank_id:
                tensor = weights.tensor(f"{name}.weight").to(device)
                sender.send(_split_matrix(tensor, chosen[name], method, name))
        sender.close()
        return None
    received = dict.fromkeys(range(world), 0)  # objects taken from each rank so far
    table_cost = {
        name: float(table.costs[i, j]) for i, (name, j) in enumerate(zip(names, allocation.choice, strict=True))
    }
    selected = {f"{n}.weight": n for n in names}

    def split(name: str, tensor: torch.Tensor) -> dict[str, Any]:
        if owners[name] == 0:
            entry, tensors = _split_matrix(tensor.to(device), chosen[name], method, name)
        else:
            entry, tensors = receive_object(owners[name], received[owners[name]], device)
            received[owners[name]] += 1
        for key, value in tensors.items():
            writer.add(key, value)
        return entry | ({"table_cost": table_cost[name]} if len(grid) > 1 else {})

    with atomic_directory(out_dir) as tmp:
        copy_model_files(model_dir, tmp)
        writer = ShardWriter(tmp, max_shard_bytes)
        matrices = stream_model(weights, writer, selected, split, "write", unquantized_dtype)
        matrices = {n: matrices[n] for n in names}
        if len(grid) > 1:
            save_cost_table(tmp / COST_TABLE_NAME, table)
        summary = summarise(matrices) | {
            "budget": budget,
            "ilp_objective": allocation.cost,
            "ilp_average_bits": allocation.average_bits,
            "ilp_variables": allocation.kept_variables,
        }
        held = {key: value for key, value in method.calibrations().items() if value is not None}
        calib = next((CALIBRATION_LABELS.get(key, key) for key in held), "no calibration")
        target = grid[0].name if budget is None else f"budget {budget:g}"
        title = f"{source or model_dir}: {method.name}, {target}, rank {calibration['rank']}, {calib}"
        bits_heatmap(matrices, tmp / HEATMAP_NAME, title)
        manifest = {
            "method": method.name,
            "base_model": {"path": str(model_dir), "source": source or str(model_dir), "fingerprint": settings.model},
            "targets": list(targets),
            "unquantized_dtype": dtype_name(unquantized_dtype),
            "settings": settings.as_dict()
            | {"budget": budget, "grid_size": len(grid), "split": {k: calibration[k] for k in method.split_only}},
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
