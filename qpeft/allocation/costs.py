"""What the cost tables of every method share (`qpeft.methods.*` price each
matrix under every candidate config for the ILP, LQ-LoRA §3.2): the Fisher's
element weights, the grouping of configs that pick the same codes, and their
quantization errors from one shared pass (`QuantConfig.shared_levels`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpeft.quant import QuantConfig


def element_weights(
    shape: tuple[int, int], row_weight: torch.Tensor | None, col_weight: torch.Tensor | None
) -> torch.Tensor | None:
    """F̂ = (r²)(c²)ᵀ / mean(F) for row/column weights r = √(row means of F),
    c = √(column means of F); None (all ones) without weights."""
    if row_weight is None or col_weight is None:
        return None
    row_mean, col_mean = row_weight.float().square(), col_weight.float().square()
    fisher_mean = row_mean.mean().clamp(min=1e-30)  # = mean(F) = mean(col_mean)
    return torch.outer(row_mean, col_mean).div_(fisher_mean).reshape(shape)


def scale_format_errors(
    residual: torch.Tensor, configs: Sequence[QuantConfig], weights: torch.Tensor | None = None
) -> list[float]:
    """Σ F̂·(x − deq(quant(x)))² for each config, all sharing one `codes_key`."""
    if any(c.codes_key != configs[0].codes_key for c in configs):
        raise ValueError("scale_format_errors needs configs that share one codes_key")
    return configs[0].shared_levels(residual).errors(configs, weights)


def group_configs(configs: Sequence[QuantConfig]) -> list[list[int]]:
    """Indices of `configs` grouped by `codes_key`; within a group the finest scale
    format (most bits) comes first; groups in `group_order` (NF: rising code bits,
    falling block size), then in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config.codes_key, []).append(index)
    ordered = [sorted(members, key=lambda j: -configs[j].bits_per_param) for members in groups.values()]
    return sorted(ordered, key=lambda members: configs[members[0]].group_order)
