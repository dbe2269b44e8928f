"""A checkpoint's summary: its bits per parameter with and without the adapters,
the per-layer-type table that `qpeft decompose` and `qpeft inspect` print, and the
heat map of bits per matrix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qpeft.io.atomic import atomic_file
from qpeft.quant import PRESETS, storage_bits

HEATMAP_NAME = "bits_heatmap.png"


def lowrank_bits(rank: int, shape: tuple[int, int], nf8: bool) -> int:
    """Bits of L1 (d_out × r) and L2 (r × d_in): bf16, or NF8 (nf8-b64-s8x256-fp32)."""
    rows, cols = shape
    if rank == 0:
        return 0
    if nf8:
        return storage_bits(PRESETS["nf8"], (rows, rank)) + storage_bits(PRESETS["nf8"], (rank, cols))
    return 16 * rank * (rows + cols)


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
    """PNG: bits per parameter of Q for each matrix, layers × matrix types; beside it
    each matrix's adapter rank when the matrices differ in rank (a joint
    (config, rank) allocation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(layer_type(n) for n in matrices))
    layers = sorted({layer_index(n) for n in matrices if layer_index(n) is not None})

    def layer_grid(key: str) -> np.ndarray:
        grid = np.full((len(layers), len(types)), np.nan)
        for name, entry in matrices.items():
            index = layer_index(name)
            if index is not None:
                grid[layers.index(index), types.index(layer_type(name))] = entry[key]
        return grid

    panels = [("bits", "viridis", "bits per parameter of Q")]
    if len({m["rank"] for m in matrices.values() if "rank" in m}) > 1:
        panels.append(("rank", "magma", "adapter rank"))
    width = 1.2 * len(types) + 2
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 0.25 * len(layers) + 1.8), squeeze=False)
    for ax, (key, cmap, label) in zip(axes[0], panels, strict=True):
        image = ax.imshow(layer_grid(key), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label=label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def bit_averages(manifest: dict[str, Any]) -> dict[str, Any]:
    """The exact stored averages over a checkpoint's quantized matrices: `bits_q`
    (Q's parts: codes, scales, offsets, padding) and `bits_total` (Q plus every
    adapter tensor as stored: factors, values, position indices), in bits per
    parameter of the matrices; with the budget (of Q, or the total), the adapter
    parameters, each matrix's rank where the method records one (0: no adapter)
    and how many matrices took each config."""
    matrices = manifest["quantized"]
    numel = sum(m["shape"][0] * m["shape"][1] for m in matrices.values())
    q_bits = sum(m["bits"] * m["shape"][0] * m["shape"][1] for m in matrices.values())
    adapter_bits = sum(m.get("adapter_bits", 0) for m in matrices.values())
    ranks = {name: m["rank"] for name, m in matrices.items() if "rank" in m}
    return {
        "method": manifest.get("method"),
        "matrices": len(matrices),
        "params": numel,
        "bits_q": q_bits / numel,
        "bits_total": (q_bits + adapter_bits) / numel,
        "budget": manifest["summary"].get("budget"),
        "total_budget": manifest["summary"].get("total_budget"),
        "adapter_params": sum(m.get("adapter_params", 0) for m in matrices.values()),
        "ranks": ranks,
        "configs": dict(Counter(m["config"] for m in matrices.values()).most_common()),
    }
