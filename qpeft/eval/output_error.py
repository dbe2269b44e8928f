"""Output error of a decomposed model's matrices on calibration activations.

For each selected matrix, ‖X(W − Ŵ)ᵀ‖²_F = tr((W − Ŵ) G (W − Ŵ)ᵀ) with G = XᵀX and
Ŵ = deq(Q) + ΔW as the checkpoint stores it: the quantity QWHA's initialisation
minimises, and the one LQ-LoRA's Fisher weighting only approximates. Reported
relative to ‖XWᵀ‖², per matrix and summed over the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qpeft.calibration.activations import InputGrams
from qpeft.models.loading import load_checkpoint
from qpeft.models.skeleton import build_skeleton, model_weights
from qpeft.modules import QuantLinear


@dataclass
class OutputError:
    per_matrix: dict[str, float]  # ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖
    total: float  # √(Σ‖X(W − Ŵ)ᵀ‖² / Σ‖XWᵀ‖²) over the matrices


def _trace_form(matrix: torch.Tensor, gram: torch.Tensor) -> float:
    return float(((matrix @ gram) * matrix).sum())


@torch.no_grad()
def output_errors(checkpoint: Path, model_dir: Path, grams: InputGrams) -> OutputError:
    """Output errors of every quantized layer of `checkpoint` against the original
    weights in `model_dir` (streamed one matrix at a time)."""
    model = load_checkpoint(checkpoint)
    layers = {f"{n}.weight": (n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    per_matrix, error_sum, output_sum = {}, 0.0, 0.0
    for key, weight in model_weights(model_dir, build_skeleton(checkpoint)).items():
        if key not in layers:
            continue
        name, layer = layers[key]
        w = weight.double()
        approx = layer.dequantized_weight().double()
        if layer.adapter is not None:
            approx += layer.adapter.delta_weight(torch.float32).double()
        gram = grams.second_moment(name)
        error, output = _trace_form(w - approx, gram), _trace_form(w, gram)
        per_matrix[name] = (error / output) ** 0.5
        error_sum, output_sum = error_sum + error, output_sum + output
    return OutputError(per_matrix, (error_sum / output_sum) ** 0.5)
