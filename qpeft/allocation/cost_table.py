"""The cost table: cost(matrix, (rank, config)) for every selected matrix, candidate
rank and candidate config, computed by the method's `costs` and kept so that a crash
loses nothing. Column k of a row is rank ranks[k // C] with config grid[k % C] (C
configs): one rank gives the paper's matrices × configs table.

Rows are appended to `OUT.work/costs-RANK.jsonl` as they finish, so `--resume` after
a crash skips finished matrices. Under torch.distributed (torchrun / accelerate
launch) the processes take matrices from a shared counter, largest first. The
finished table is stored in the checkpoint as cost_table.json; `--costs` reuses it
when the settings (`DecomposeSettings`) match.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qpeft.calibration.activations import InputGrams
from qpeft.calibration.fisher import FisherStats
from qpeft.distributed import barrier, rank_and_world
from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_file
from qpeft.methods import Method
from qpeft.models.weights import SafetensorsWeights
from qpeft.quant import QuantConfig, storage_bits

COST_TABLE_NAME = "cost_table.json"


@dataclass
class DecomposeSettings:
    """Everything that determines the cost table (checked on --resume / --costs)."""

    model: str  # fingerprint of the model's weights
    targets: list[str]
    grid: list[str]  # config names
    ranks: list[int]  # the adapter ranks priced with every config
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
    ranks: list[int]
    costs: np.ndarray  # matrices × (ranks · configs), rank-major
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


def _row_costs(method: Method, name: str, w: torch.Tensor, grid: Sequence[QuantConfig], rank: int) -> np.ndarray:
    """One matrix's costs at one rank; inf for the configs its shape cannot take."""
    held = [j for j, config in enumerate(grid) if config.holds(tuple(w.shape))]
    costs = np.full(len(grid), np.inf)
    costs[held] = method.costs(name, w, [grid[j] for j in held], rank)
    return costs


def compute_cost_table(
    weights: SafetensorsWeights,
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
    done = len(names) - len(todo)
    with (
        shard.open("a") as out,
        tqdm(total=len(names), initial=done, desc="cost table", unit="matrix", disable=rank != 0) as bar,
    ):
        while (index := counter.next()) < len(todo):
            name = todo[index]
            w = weights.tensor(f"{name}.weight").to(device).float()
            costs = np.concatenate([_row_costs(method, name, w, grid, rank) for rank in settings.ranks])
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
        list(settings.ranks),
        np.array([rows[n]["costs"] for n in names]),
        time.perf_counter() - start,
        sum(n in finished for n in names),
        settings.as_dict(),
    )


def save_cost_table(path: Path, table: CostTable) -> None:
    body = {
        "settings": table.settings,
        "configs": table.configs,
        "ranks": table.ranks,
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
        body["ranks"],
        np.array([r["costs"] for r in rows]),
        settings=body["settings"],
    )


def storage_bits_table(
    grid: Sequence[QuantConfig],
    shapes: Sequence[tuple[int, int]],
    ranks: Sequence[int] = (0,),
    adapter_bits: Callable[[int, tuple[int, int]], int] | None = None,
) -> np.ndarray:
    """Exact stored bits per parameter of every cost-table column, matrices × (ranks ·
    configs): Q's (padding and offsets included), plus with `adapter_bits` (the
    method's, `MethodPlugin.adapter_bits`) the adapter's at the column's rank; inf
    where the matrix cannot take the config (`QuantConfig.holds`)."""
    rows = []
    for shape in shapes:
        numel = shape[0] * shape[1]
        q_bits = np.array([storage_bits(c, shape) if c.holds(shape) else np.inf for c in grid], dtype=np.float64)
        extra = [0 if adapter_bits is None else adapter_bits(rank, shape) for rank in ranks]
        rows.append(np.concatenate([(q_bits + bits) / numel for bits in extra]))
    return np.array(rows)
