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
    """NF-`bits` levels, sorted ascending, float32; one shared tensor per device (never
    modify it in place), so that a dequantize on a GPU copies no table from the host."""
    return _nf_codebook_on(bits, str(torch.device(device)))


@functools.cache
def _nf_codebook_on(bits: int, device: str) -> torch.Tensor:
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
    """The signed 8-bit dynamic map (256 levels, sorted, float32); shared per device
    as `nf_codebook`."""
    return _dynamic_codebook_on(str(torch.device(device)))


@functools.cache
def _dynamic_codebook_on(device: str) -> torch.Tensor:
    return _dynamic_codebook_cpu().to(device)


def uniform_codebook(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Unsigned uniform levels k / (2^bits - 1), k = 0 .. 2^bits - 1."""
    return torch.linspace(0.0, 1.0, 2**bits, dtype=torch.float32, device=device)


# Bins of the level lookup table over the codebook's range: fine enough that a bin
# and its neighbours hold at most one or two decision boundaries for every codebook
# here (NF2..NF8, the uniform maps, the dynamic map's dense part is the exception).
_TABLE_BINS = 4096
# Correction steps taken for every value; values that still have boundaries to pass
# after them (in the dynamic map's dense part near zero) go to binary search.
_MAX_CORRECTIONS = 2


@functools.lru_cache(maxsize=64)
def _level_table(levels: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor, float, float, int]:
    """(first code of each bin, decision boundaries padded with +inf, low edge, bins
    per unit, corrections) for `nearest_level`'s table lookup.

    A value's bin is floor((x − low) · bins_per_unit), clamped. The table holds, for
    each bin, the number of boundaries below the bin widened by one bin on each side,
    so an off-by-one bin from fp32 rounding still starts at or below the true code;
    `corrections` steps of code += (x > boundary[code]) then reach it exactly."""
    codebook = torch.tensor(levels, dtype=torch.float64)
    midpoints64 = ((codebook[:-1].float() + codebook[1:].float()) / 2).double()
    low, high = float(codebook[0]), float(codebook[-1])
    width = (high - low) / _TABLE_BINS
    edges = low + width * torch.arange(_TABLE_BINS + 1, dtype=torch.float64)
    first = torch.searchsorted(midpoints64, edges[:-1] - width)  # boundaries strictly below
    last = torch.searchsorted(midpoints64, edges[1:] + width, right=True)
    first[0], last[-1] = 0, midpoints64.numel()  # the end bins also take values outside the range
    corrections = int((last - first).max())
    padded = torch.cat([midpoints64.float(), torch.tensor([float("inf")])])
    return first.to(torch.int32).to(device), padded.to(device), low, 1.0 / width, corrections


def nearest_level(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (int32) of the nearest level of a sorted `codebook` for each element of `x`.

    Uses the midpoints between neighbouring levels as decision boundaries; a value
    exactly on a midpoint goes to the lower level (bitsandbytes' tie rule): the code is
    the number of midpoints strictly below x, as `torch.bucketize` gives it. A lookup
    table plus one or two exact comparisons finds it in the same time for every
    codebook size, where binary search grows with the levels (the hot loop of the
    LQ-LoRA cost table; tools/bench_nearest_level.py); bit for bit the same codes.
    Only the values still short of their code after the comparisons (the dynamic
    map's dense part near zero) take the binary search.
    """
    first, padded, low, bins_per_unit, corrections = _level_table(tuple(codebook.tolist()), str(x.device))
    flat = x.reshape(-1)
    bins = flat.sub(low).mul_(bins_per_unit).nan_to_num_(0.0).clamp_(0, _TABLE_BINS - 1).to(torch.int32)
    codes = first.index_select(0, bins)
    # each step moves a code up while x lies above its upper boundary, never past it
    for _ in range(min(corrections, _MAX_CORRECTIONS)):
        codes += flat > padded.index_select(0, codes)
    if corrections > _MAX_CORRECTIONS:
        pending = (flat > padded.index_select(0, codes)).nonzero().squeeze(1)
        codes[pending] = torch.bucketize(flat[pending], padded[:-1], out_int32=True)
    return codes.view(x.shape)
