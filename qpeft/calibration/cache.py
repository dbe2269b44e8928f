"""Calibration of a model (the Fisher, the layer inputs' XᵀX), cached by model + data + settings."""

from __future__ import annotations

import hashlib
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpeft.calibration.activations import (
    GramCollector,
    InputGrams,
    grams_dir,
    input_grams,
    load_grams,
    save_grams,
)
from qpeft.calibration.fisher import (
    FisherStats,
    all_reduce_fisher,
    empirical_fisher,
    load_fisher,
    save_fisher,
    settings_key,
)
from qpeft.data.calibration import calibration_batches, calibration_text
from qpeft.distributed import barrier, rank_and_world
from qpeft.errors import QpeftError
from qpeft.models.resolve import cache_dir
from qpeft.models.selection import Targets, select_linear, targets_json
from qpeft.models.skeleton import resolve_targets
from qpeft.quant.config import TORCH_DTYPES


def model_fingerprint(model_dir: Path) -> str:
    """Digest of config.json and each safetensors shard's name, size and header (the
    tensor names, dtypes, shapes and offsets): cheap even for a 70B model, and it
    changes when the weights are replaced by others of a different layout or size."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with shard.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            digest.update(shard.name.encode() + struct.pack("<Q", shard.stat().st_size) + handle.read(header_len))
    return digest.hexdigest()[:20]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(
    model_dir: Path, targets: Targets | None, data: str, num_sequences: int, seqlen: int, seed: int, dtype: str
) -> tuple[dict[str, Any], str]:
    """What identifies a calibration result (its cache key), and the calibration text."""
    text, data_name = calibration_text(data)
    settings = {
        "model": model_fingerprint(model_dir),
        "data": data_name,
        "data_sha256": text_digest(text),
        "sequences": num_sequences,
        "seqlen": seqlen,
        "seed": seed,
        "dtype": dtype,
        "targets": targets_json(resolve_targets(model_dir, targets)),
    }
    return settings, text


def _model_and_batches(model_dir: Path, settings: dict[str, Any], text: str, device: str):
    from transformers import AutoTokenizer

    from qpeft.calibration.stream import layerwise_model
    from qpeft.eval.perplexity import tokenize

    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), text)
    batches = calibration_batches(ids, settings["sequences"], settings["seqlen"], settings["seed"])
    return layerwise_model(model_dir, TORCH_DTYPES[settings["dtype"]], device), batches


@dataclass(frozen=True)
class _Statistic:
    """One kind of calibration result and its cache file ($QPEFT_CACHE/KIND/, keyed by
    `settings`)."""

    kind: str
    settings: dict[str, Any]
    load: Callable[[Path], Any]
    save: Callable[[Path, Any], None]
    reduce: Callable[[Any, str], Any]

    @property
    def file(self) -> Path:
        return cache_dir() / self.kind / f"{settings_key(self.settings)}.safetensors"


def _cached_statistics(
    statistics: Sequence[_Statistic],
    model_dir: Path,
    targets: Targets | None,
    text: str,
    device: str,
    compute: Callable[[Any, list[str], Any, set[str]], dict[str, Any]],
) -> list[tuple[Any, Path, bool]]:
    """(statistics, cache file, whether it was a hit) of each kind: loaded, or the
    missing kinds computed together by compute(layer-wise model, layer names,
    batches, kinds) and saved with their settings and run time as metadata. The
    kinds share the batches: their settings agree on the data, sequences and dtype.

    In a torch.distributed run every process computes a share of the sequences
    (rank k takes rows k, k + world, …), `reduce` combines the shares, and rank 0
    writes the files that all then read: two 1-thread CPU processes get through the
    calibration faster than one with both threads. The cache directory must be shared."""
    rank, world = rank_and_world()
    hits = [s.file.is_file() for s in statistics]
    barrier()  # every process has looked before rank 0 may write
    missing = [s for s, hit in zip(statistics, hits, strict=True) if not hit]
    if missing:
        lm, batches = _model_and_batches(model_dir, missing[0].settings, text, device)
        if batches.shape[0] < world:
            raise QpeftError(f"{batches.shape[0]} calibration sequences cannot be shared by {world} processes")
        start = time.perf_counter()
        results = compute(lm, select_linear(lm.model, targets), batches[rank::world], {s.kind for s in missing})
        del lm
        seconds = round(time.perf_counter() - start, 1)  # of the shared pass when there are several kinds
        for statistic in missing:
            stats = results[statistic.kind]
            if world > 1:
                stats = statistic.reduce(stats, device)
            metadata = {**statistic.settings, "seconds": seconds, "device": device}
            stats.metadata = metadata | ({"processes": world} if world > 1 else {})
            if rank == 0:
                statistic.save(statistic.file, stats)
        barrier()
    # loaded as a hit would be: the Grams then come from the file one at a time
    return [(s.load(s.file), s.file, hit) for s, hit in zip(statistics, hits, strict=True)]


def _summed_by_the_collector(grams: InputGrams, device: str) -> InputGrams:
    return grams  # the GramCollector sums each layer's XᵀX over the processes when it is done


def _activations(settings: dict[str, Any]) -> _Statistic:
    return _Statistic("activations", settings, load_grams, save_grams, _summed_by_the_collector)


def _calibration_pass(
    lm: Any,
    names: list[str],
    batches: Any,
    kinds: set[str],
    batch_size: int,
    elementwise: bool,
    spill: Path | None = None,
) -> dict[str, Any]:
    """The Fisher and/or the XᵀX of the layer inputs; both from one forward sweep when
    both are wanted (the Fisher's own, whose layer inputs are the Grams'). `spill`:
    where each XᵀX is written once complete (`grams_dir` of the activation file)."""
    if "fisher" not in kinds:
        return {"activations": input_grams(lm, names, batches, batch_size, spill=spill)}
    collector = GramCollector(lm, names, spill) if "activations" in kinds else None
    try:
        on_layer = None if collector is None else collector.layer_done
        fisher = empirical_fisher(lm, names, batches, batch_size, elementwise=elementwise, on_forward_layer=on_layer)
    finally:
        if collector is not None:
            collector.remove()
    return {"fisher": fisher} | ({} if collector is None else {"activations": collector.result(batches)})


def calibrate(
    model_dir: Path,
    targets: Targets | None,
    data: str = "wikitext2",
    num_sequences: int = 32,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
    out: Path | None = None,
    elementwise: bool = False,
    activations: bool = False,
) -> tuple[FisherStats, Path, bool]:
    """Fisher statistics of the selected layers: (stats, file, whether it came from
    the cache). The cache ($QPEFT_CACHE/fisher) is keyed by everything that changes
    the result; `out` also gets a copy. `elementwise` keeps the full diagonal too.
    With `activations` the XᵀX that `calibrate_activations` gives for the same
    settings is collected in the Fisher's forward sweep and cached, saving its own
    sweep."""
    settings, text = _settings(model_dir, targets, data, num_sequences, seqlen, seed, dtype)
    # "elementwise" only when set, so that the row/column-only cache keys stay as they were
    fisher_settings = settings | ({"elementwise": True} if elementwise else {})
    statistics = [_Statistic("fisher", fisher_settings, load_fisher, save_fisher, all_reduce_fisher)]
    if activations:
        statistics.append(_activations(settings))
    spill = grams_dir(statistics[-1].file) if activations else None
    results = _cached_statistics(
        statistics,
        model_dir,
        targets,
        text,
        device,
        lambda model, names, batches, kinds: _calibration_pass(
            model, names, batches, kinds, batch_size, elementwise, spill
        ),
    )
    stats, cached, hit = results[0]
    if out is not None and Path(out).resolve() != cached.resolve():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, out)
    return stats, cached, hit


def calibrate_activations(
    model_dir: Path,
    targets: Targets | None,
    data: str = "wikitext2",
    num_sequences: int = 32,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
) -> tuple[InputGrams, bool]:
    """XᵀX of the selected layers' inputs over the same calibration batches as the
    Fisher (same settings, same sequences): (grams, whether from the cache
    $QPEFT_CACHE/activations)."""
    settings, text = _settings(model_dir, targets, data, num_sequences, seqlen, seed, dtype)
    statistic = _activations(settings)
    spill = grams_dir(statistic.file)
    ((grams, _, hit),) = _cached_statistics(
        [statistic],
        model_dir,
        targets,
        text,
        device,
        lambda model, names, batches, kinds: _calibration_pass(model, names, batches, kinds, batch_size, False, spill),
    )
    return grams, hit


def fisher_for(path: Path, names: Sequence[str], elementwise: bool = False) -> FisherStats:
    """Load a Fisher file and check it covers every selected matrix (with its full
    diagonal if `elementwise`)."""
    stats = load_fisher(path)
    missing = [n for n in names if n not in stats.row_mean]
    if missing:
        raise QpeftError(f"{path} has no Fisher statistics for {len(missing)} selected matrices, e.g. {missing[0]}")
    if elementwise and any(n not in stats.element for n in names):
        raise QpeftError(f"{path} has no full Fisher diagonal: make it with qpeft calibrate --fisher-elementwise")
    return stats
