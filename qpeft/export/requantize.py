"""Re-quantizing a matrix into an export format that cannot hold its config as it is."""

from __future__ import annotations

from qpeft.export.transformers_dir import relative_error
from qpeft.quant import QuantConfig, QuantizedTensor, dequantize, quantize


def nearest_requantization(
    qt: QuantizedTensor, candidates: list[tuple[QuantConfig, float]]
) -> tuple[QuantizedTensor, float]:
    """`qt` re-quantized (round-to-nearest from its dequantized values) to the config
    of `candidates` (config, stored bits per parameter) closest to it, the smallest
    ‖deq(Q) − deq(Q')‖, among those storing at most its own bits per parameter (among
    the cheapest when none does); and that relative error ‖deq(Q) − deq(Q')‖ / ‖deq(Q)‖."""
    if not candidates:
        raise ValueError("no candidate configs")
    shape = (qt.shape[0], qt.shape[1])
    own = qt.config.storage_bits(shape) / (shape[0] * shape[1])
    below = [config for config, bits in candidates if bits <= own]
    if not below:
        fewest = min(bits for _, bits in candidates)
        below = [config for config, bits in candidates if bits == fewest]
    weight = dequantize(qt)
    best: tuple[QuantizedTensor, float] | None = None
    for config in below:
        requantized = quantize(weight, config)
        error = relative_error(weight - dequantize(requantized), weight)
        if best is None or error < best[1]:
            best = requantized, error
    return best
