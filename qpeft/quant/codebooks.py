"""Codebooks (sorted level sets in [-1, 1]) used by the blockwise quantizers.

* NormalFloat NF-k (QLoRA, Dettmers et al. 2023, §3): 2^k levels with an exact zero.
  The positive half is 2^(k-1)+1 Normal quantiles and the negative half 2^(k-1)
  quantiles (zero shared), taken at probabilities evenly spaced from 0.5 to
  δ = 0.9677083 (1-δ .. 0.5 for the negative side), each half scaled so that its
  extreme is exactly ±1. NF4 reproduces bitsandbytes' 16 values.
* The signed 8-bit *dynamic* map (Dettmers 2016, "8-bit approximations"): the map
  bitsandbytes uses for double-quantized block scales.
* The unsigned uniform map {0, 1/(L-1), ..., 1} used for low-bit block scales.
"""

from __future__ import annotations

import functools

import torch

NF_DELTA = 0.9677083


def _normal_quantiles(start: float, count: int) -> torch.Tensor:
    """Normal quantiles at `count` probabilities evenly spaced from `start` towards
    0.5 (0.5 itself excluded). The probabilities are float32 and the quantiles are
    evaluated in float64, as bitsandbytes did when it tabulated NF4."""
    probs = torch.linspace(start, 0.5, count + 1, dtype=torch.float32)[:-1]
    return torch.special.ndtri(probs.double())


@functools.cache
def _nf_codebook_cpu(bits: int) -> torch.Tensor:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"NF codebooks exist for 2, 3, 4 and 8 bits, not {bits}")
    half = 2 ** (bits - 1)
    positive = _normal_quantiles(NF_DELTA, half)
    negative = -_normal_quantiles(NF_DELTA, half - 1)
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).to(torch.float32).sort().values
    # Both extremes are the quantile at δ, so one float32 division puts them at ±1.
    return levels / levels.max()


def nf_codebook(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """NF-`bits` levels, sorted ascending, float32."""
    return _nf_codebook_cpu(bits).to(device)


@functools.cache
def _dynamic_codebook_cpu() -> torch.Tensor:
    # Signed dynamic tree map with 7 exponent levels: for exponent i (0..6) the
    # fraction interval [0.1, 1] is cut into 2^i equal parts and each part's midpoint,
    # times 10^(i-6), is a level (both signs); plus 0 and 1.0: 2*127 + 2 = 256 levels.
    # Computed in float32 exactly as bitsandbytes does, so the codes match bit for bit.
    levels: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (i - 6)
        levels += (magnitude * mids).tolist() + (-magnitude * mids).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32)


def dynamic_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (256 levels, sorted, float32)."""
    return _dynamic_codebook_cpu().to(device)


def uniform_codebook(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Unsigned uniform levels k / (2^bits - 1), k = 0 .. 2^bits - 1."""
    return torch.linspace(0.0, 1.0, 2**bits, dtype=torch.float32, device=device)


def nearest_level(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted `codebook` for each element of `x`.

    Uses the midpoints between neighbouring levels as decision boundaries; a value
    exactly on a midpoint goes to the lower level (bitsandbytes' tie rule).
    """
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)
