"""How well do per-matrix error measures predict the perplexity of decomposed models?

For each checkpoint (given as DIR=PPL, its measured perplexity), sums over the
quantized matrices, with δ = W − Ŵ (Ŵ = deq(Q) + adapter, as stored):

* diag:   Σ F̂ ⊙ δ²,  F̂ = r²c²ᵀ / mean F  (LQ-LoRA's cost: the diagonal Fisher, row × column)
* kfac:   Σ_i a_i · δ_i Σ δ_iᵀ,  Σ = XᵀX / tokens,  a_i = (row mean of F)_i / mean diag Σ
          (the output-gradient energy of row i times the full input covariance)
* output: Σ_i δ_i Σ δ_iᵀ  (QWHA's cost)

with the default calibration's Fisher and XᵀX (WikiText-2 validation, cached), then
prints each measure's Spearman rank correlation with the perplexities.

    python tools/loss_proxies.py /tmp/res3/uniform-nf4=22.3389 /tmp/t6/lq-r8-f-3.25=24.0057 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from qpeft.calibration.cache import calibrate, calibrate_activations
from qpeft.models.loading import load_checkpoint
from qpeft.models.resolve import resolve_model
from qpeft.models.selection import DEFAULT_TARGETS
from qpeft.models.weights import SafetensorsWeights
from qpeft.modules import QuantLinear

MEASURES = ("diag", "kfac", "output")


@torch.no_grad()
def measures(checkpoint: Path, model_dir: Path, fisher, grams) -> dict[str, float]:
    model = load_checkpoint(checkpoint)
    layers = {f"{n}.weight": (n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    sums = dict.fromkeys(MEASURES, 0.0)
    for key, weight in SafetensorsWeights(model_dir).items():
        if key not in layers:
            continue
        name, layer = layers[key]
        approx = layer.dequantized_weight().double()
        if layer.adapter is not None:
            approx += layer.adapter.delta_weight(torch.float32).double()
        delta = weight.double() - approx
        row, col = fisher.row_mean[name].double(), fisher.col_mean[name].double()
        sigma = grams.second_moment(name).double()
        per_row = ((delta @ sigma) * delta).sum(dim=1)
        sums["diag"] += float((torch.outer(row, col) / row.mean() * delta.square()).sum())
        sums["kfac"] += float((row / sigma.diagonal().mean() * per_row).sum())
        sums["output"] += float(per_row.sum())
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="DIR=PPL")
    args = parser.parse_args()
    model_dir = resolve_model(None)
    fisher = calibrate(model_dir, DEFAULT_TARGETS)[0]
    grams = calibrate_activations(model_dir, DEFAULT_TARGETS)[0]
    rows = []
    for item in args.checkpoints:
        path, ppl = item.rsplit("=", 1)
        rows.append((Path(path).name, float(ppl), measures(Path(path), model_dir, fisher, grams)))
    rows.sort(key=lambda r: r[1])
    print(f"{'checkpoint':<24} {'ppl':>9} " + " ".join(f"{m:>10}" for m in MEASURES))
    for name, ppl, sums in rows:
        print(f"{name:<24} {ppl:>9.2f} " + " ".join(f"{sums[m]:>10.4g}" for m in MEASURES))
    ppl = np.array([r[1] for r in rows])
    correlations = (f"{m} {spearmanr([r[2][m] for r in rows], ppl)[0]:.3f}" for m in MEASURES)
    print("Spearman rank correlation with perplexity: " + ", ".join(correlations))


if __name__ == "__main__":
    main()
