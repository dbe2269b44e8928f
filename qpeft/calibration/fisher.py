"""Empirical Fisher diagonal of the selected matrices, reduced to rows and columns.

F_ij = mean over calibration sequences s of (∂ℓ_s/∂W_ij)², ℓ_s the mean next-token
NLL of sequence s (LQ-LoRA §3.3). The weighted decomposition needs only
r_i = √(mean_j F_ij) and c_j = √(mean_i F_ij), so by default only the row and
column means are kept, accumulated in fp32. With `elementwise` the full diagonal F
is kept too (4 bytes per weight): the cost table then prices Σ_ij F_ij·δ_ij² with the
exact F instead of its rank-one reduction.

Per-sequence gradients come from hooks, not from parameter .grad: for y = x·Wᵀ the
gradient of sequence s is Σ_t g_st·x_stᵀ = G_sᵀX_s (G the output gradients, X the
inputs), one batched matmul per layer. No parameter requires grad, so a batch of
sequences costs one backward, and no full-size gradient is ever stored. The model
runs one decoder layer at a time (`qpeft.calibration.stream`): the hooks see each
layer's activations and output gradients in its recomputed forward and backward.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.calibration.stream import LayerwiseLM
from qpeft.errors import QpeftError
from qpeft.io.tagged import FileTensors, load_tagged, save_tagged

METADATA_KEY = "qpeft_fisher"
# row and column means are floored at this fraction of their average before use: a
# row or column that no calibration gradient reached (F = 0) would otherwise drop out
# of the weighted SVD and be divided by zero when its factors are unweighted
FISHER_FLOOR = 1e-6


def floored_mean(mean: torch.Tensor) -> torch.Tensor:
    """max(mean, FISHER_FLOOR · average(mean)); all ones if no entry is positive."""
    average = float(mean.float().mean())
    if not average > 0:  # also NaN
        return torch.ones_like(mean)
    return mean.nan_to_num(0.0).clamp(min=FISHER_FLOOR * average)


@dataclass
class FisherStats:
    """Row and column means of the Fisher diagonal of each selected matrix."""

    row_mean: dict[str, torch.Tensor]  # name → (d_out,)
    col_mean: dict[str, torch.Tensor]  # name → (d_in,)
    metadata: dict[str, Any] = field(default_factory=dict)
    element: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name → F (d_out, d_in), if kept

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, c) = (√row means, √column means) of matrix `name`, for the weighted SVD,
        each mean floored (`floored_mean`) so that no weight is zero."""
        if name not in self.row_mean:
            raise QpeftError(f"the Fisher statistics have no entry for {name}")
        return floored_mean(self.row_mean[name]).sqrt(), floored_mean(self.col_mean[name]).sqrt()


class _PerSequenceGradients:
    """Hooks that add each sequence's squared weight gradient, summed over rows and
    over columns (and, with `elementwise`, as is), into fp32 accumulators."""

    def __init__(self, modules: dict[str, nn.Linear], device: torch.device, elementwise: bool = False) -> None:
        self.row_sum = {n: torch.zeros(m.out_features, device=device) for n, m in modules.items()}
        self.col_sum = {n: torch.zeros(m.in_features, device=device) for n, m in modules.items()}
        self.element_sum = (
            {n: torch.zeros(m.out_features, m.in_features, device=device) for n, m in modules.items()}
            if elementwise
            else {}
        )
        self.handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in modules.items()]

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self._accumulate(name, inputs, grad))

        return hook

    def _accumulate(self, name: str, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        x = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).float()
        g = grad.reshape(grad.shape[0], -1, grad.shape[-1]).float()
        squared = torch.bmm(g.transpose(1, 2), x).square_().sum(dim=0)  # (d_out, d_in), summed over sequences
        self.row_sum[name] += squared.sum(dim=1)
        self.col_sum[name] += squared.sum(dim=0)
        if self.element_sum:
            self.element_sum[name] += squared

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def empirical_fisher(
    lm: LayerwiseLM,
    names: Sequence[str],
    batches: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    elementwise: bool = False,
    on_forward_layer: Callable[[int], None] | None = None,
) -> FisherStats:
    """Fisher row/column means (and with `elementwise` the full diagonal) of the
    linear layers `names` of a causal or masked LM streamed layer by layer, over the rows of
    `batches` (num_sequences × seqlen token ids). `on_forward_layer(i)` runs after
    layer i has seen every sequence in the forward sweep (e.g. a `GramCollector`'s)."""
    modules = {name: lm.model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise QpeftError(f"{name} is not a linear layer")
    accumulators = _PerSequenceGradients(modules, lm.device, elementwise)
    try:
        states = lm.forward_sweep(
            batches, batch_size, keep=True, on_layer=on_forward_layer, progress="fisher forward" if progress else None
        )
        grad = lm.sequence_loss_grad(states[-1], batches, batch_size)
        lm.backward_sweep(states, grad, batch_size, progress="fisher backward" if progress else None)
    finally:
        accumulators.remove()
    num_sequences = batches.shape[0]
    row_mean = {n: (s / (num_sequences * modules[n].in_features)).cpu() for n, s in accumulators.row_sum.items()}
    col_mean = {n: (s / (num_sequences * modules[n].out_features)).cpu() for n, s in accumulators.col_sum.items()}
    element = {n: (s / num_sequences).cpu() for n, s in accumulators.element_sum.items()}
    metadata = {"sequences": num_sequences, "seqlen": int(batches.shape[1])}
    return FisherStats(row_mean, col_mean, metadata, element)


def all_reduce_fisher(stats: FisherStats, device: str | torch.device) -> FisherStats:
    """Across the processes of a torch.distributed group that each calibrated a share of
    the sequences: the means over all of them, Σ_k n_k·mean_k / Σ_k n_k (equal to one
    process's result up to the order of the fp32 sums)."""
    from qpeft.distributed import all_reduce_sum

    local = stats.metadata["sequences"]
    total = int(all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64), device).item())

    def mean_over_all(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: all_reduce_sum(t * local, device).div_(total) for n, t in tensors.items()}

    return FisherStats(
        mean_over_all(stats.row_mean),
        mean_over_all(stats.col_mean),
        {**stats.metadata, "sequences": total},
        mean_over_all(stats.element),
    )


def save_fisher(path: Path, stats: FisherStats) -> None:
    """Write the statistics (and their settings as metadata) atomically."""
    tensors = {f"{n}.row_mean": t for n, t in stats.row_mean.items()}
    tensors |= {f"{n}.col_mean": t for n, t in stats.col_mean.items()}
    tensors |= {f"{n}.element": t for n, t in stats.element.items()}
    save_tagged(path, tensors, METADATA_KEY, stats.metadata)


def load_fisher(path: Path) -> FisherStats:
    """The statistics of a Fisher file; a full diagonal is read per matrix when used."""
    keys, metadata = load_tagged(path, METADATA_KEY, "Fisher file", lazy=True)

    small = FileTensors(path, {k: k for k in keys}).read(k for k in keys if not k.endswith(".element"))
    row = {k.removesuffix(".row_mean"): v for k, v in small.items() if k.endswith(".row_mean")}
    col = {k.removesuffix(".col_mean"): v for k, v in small.items() if k.endswith(".col_mean")}
    element = {k.removesuffix(".element"): k for k in keys if k.endswith(".element")}
    return FisherStats(row, col, metadata, FileTensors(path, element))


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable digest of JSON-able settings (cache file names)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
