"""Input second moments G = XᵀX of the selected linear layers (QWHA's initialisation).

X stacks the calibration tokens' inputs of a layer (tokens × d_in). G is summed in
fp64 (each batch's XᵀX formed in fp32) in one forward sweep of the model, one decoder
layer at a time (`qpeft.calibration.stream`), and no backward. Layers that read the same tensor
(q/k/v of an attention block, gate/up of an MLP) share one G: the first batch finds
which by tensor identity, and later batches accumulate each shared input once. For
SmolLM2 that is 4 matrices per decoder layer instead of 7 (0.8 GB in fp64).

A cached activation file holds the description (which layer reads which input, the
token count, the settings); the matrices are files of their own in the directory
beside it (`grams_dir`), each written as soon as its decoder layer has seen every
sequence, so that memory holds one decoder layer's G at a time (LLaMA-2-70B: 8 GB,
against 650 GB for all of them).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.linalg.blas import ssyrk
from torch import nn

from qpeft.calibration.stream import LayerwiseLM
from qpeft.distributed import all_reduce_sum, rank_and_world
from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_file
from qpeft.io.tagged import READ_ERRORS, FileTensors, load_tagged, save_tagged

METADATA_KEY = "qpeft_input_grams"
DAMPING = 1e-4  # × mean diagonal, added to G before any solve (QWHA; GPTQ uses 1e-2)


@dataclass
class InputGrams:
    """G = XᵀX per shared layer input, and which layers read which input."""

    grams: Mapping[str, torch.Tensor]  # input key (its first reader) → d_in × d_in, fp64
    owner: dict[str, str]  # layer name → input key
    tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def gram(self, name: str) -> torch.Tensor:
        """XᵀX of the input of layer `name` (fp64)."""
        if name not in self.owner:
            raise QpeftError(f"the calibration activations have no entry for {name}")
        return self.grams[self.owner[name]]

    def second_moment(self, name: str) -> torch.Tensor:
        """XᵀX / tokens: the per-token second moment, so output errors are per token."""
        return self.gram(name) / self.tokens


def damping_shift(gram: torch.Tensor, ratio: float = DAMPING) -> float:
    """ratio·mean(diag G): added to the diagonal of G (or of T·G·Tᵀ, whose diagonal
    has the same mean for an orthogonal T) before a solve, so that dead input
    channels do not make it singular."""
    return ratio * float(gram.diagonal().mean())


def grams_dir(path: Path) -> Path:
    """The directory of the Gram matrices of the activation file `path`."""
    return Path(path).with_suffix(".grams")


def _write_gram(directory: Path, key: str, gram: torch.Tensor) -> None:
    """G's upper triangle, row by row, in fp32: a quarter of the fp64 matrix (LLaMA-2-70B:
    164 GB instead of 655 GB). The sums stay fp64; each batch's product was fp32
    already, so storing fp32 adds rounding of the same order (~1e-7 relative), far
    below the damping of any solve."""
    upper = torch.cat([gram[i, i:] for i in range(gram.shape[0])]).float()
    with atomic_file(directory / f"{key}.safetensors") as tmp:
        save_file({"upper": upper}, str(tmp))


def _read_gram(path: Path) -> torch.Tensor:
    """The fp64 symmetric G of a file `_write_gram` wrote."""
    with safe_open(str(path), framework="pt") as handle:
        upper = handle.get_tensor("upper").double()
    size = (math.isqrt(8 * upper.numel() + 1) - 1) // 2  # d(d+1)/2 values
    gram = torch.zeros(size, size, dtype=torch.float64)
    start = 0
    for i in range(size):
        gram[i, i:] = upper[start : start + size - i]
        start += size - i
    return _symmetric(gram)


class GramFiles(Mapping[str, torch.Tensor]):
    """Gram matrices stored one per file in `directory` (input key → G), each read
    when asked for."""

    def __init__(self, directory: Path, keys: Sequence[str]) -> None:
        self.directory, self.keys_ = Path(directory), list(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        path = self.directory / f"{key}.safetensors"
        try:
            return _read_gram(path)
        except READ_ERRORS as exc:
            raise QpeftError(f"cannot read the Gram matrix {path}: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (Linux MemAvailable), or
    None where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_gram_memory(in_features: Mapping[str, int], processes: int, needed_for: str, instead: str) -> None:
    """Error before any slow stage when one decoder layer's XᵀX cannot fit in memory:
    each of the `processes` on this machine sums those of the layer it is at, in fp64
    (8·d_in² bytes per selected matrix `name → d_in`; matrices that share an input
    share one, so this is an upper bound), and the split holds one at a time."""
    per_layer: dict[str, int] = {}
    for name, d_in in in_features.items():
        layer = re.match(r"(.*?\.\d+)\.", name)
        key = layer.group(1) if layer else name
        per_layer[key] = per_layer.get(key, 0) + 8 * d_in * d_in
    needed = processes * max(per_layer.values(), default=0)
    available = available_memory()
    if available is not None and needed > available:
        raise QpeftError(
            f"{needed_for} sums the XᵀX of a decoder layer's inputs in memory, up to {needed / 2**30:.1f} GiB "
            f"here ({processes} process(es) × fp64 d_in² per matrix), more than the {available / 2**30:.1f} GiB "
            f"this machine has available; {instead}"
        )


def _add_upper_gram(accumulator: torch.Tensor, rows: torch.Tensor) -> None:
    """accumulator += the upper triangle of rowsᵀ·rows. The batch's product is formed
    in fp32 (~1e-6 relative over a sequence, far below the 1e-4 damping of any solve)
    and summed in fp64; on the CPU by BLAS syrk, which computes one triangle: half the
    work of a matmul."""
    rows = rows.float().contiguous()
    if rows.device.type == "cpu":
        # a C-contiguous (tokens × d) array is Fortran-contiguous as its transpose
        upper = torch.from_numpy(ssyrk(1.0, rows.numpy().T, trans=0, lower=0))
    else:
        upper = rows.T @ rows
    accumulator.add_(torch.triu(upper).double())


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    return upper + torch.triu(upper, diagonal=1).T


class _GramHooks:
    def __init__(self, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.device = device
        self.owner: dict[str, str] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self._first_batch: dict[int, tuple[str, torch.Tensor]] = {}  # id → (key, tensor kept alive)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if name not in self.owner:  # first batch: group layers by the tensor they read
                seen = self._first_batch.get(id(x))
                if seen is not None and seen[1] is x:
                    self.owner[name] = seen[0]
                    return
                self._first_batch[id(x)] = (name, x)
                self.owner[name] = name
                self.grams[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=self.device)
            elif self.owner[name] != name:
                return
            _add_upper_gram(self.grams[name], x.detach().reshape(-1, x.shape[-1]))

        return hook

    def end_first_batch(self) -> None:
        self._first_batch.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class GramCollector:
    """Sums XᵀX of the inputs of the linear layers `names` during a forward sweep of
    `lm` (`LayerwiseLM.forward_sweep` with `on_layer=collector.layer_done`): that of
    `input_grams`, or the Fisher's own forward sweep, which then yields both. Each
    layer's matrices are accumulated on the device; when the layer has seen every
    sequence they are summed over the processes of a torch.distributed run (each
    calibrates a share of the sequences) and moved to the CPU, or with `spill` written
    to that directory (by rank 0) and dropped. After the last layer the hooks are
    removed, so that a backward sweep that re-runs the layers adds nothing."""

    def __init__(self, lm: LayerwiseLM, names: Sequence[str], spill: Path | None = None) -> None:
        modules = {name: lm.model.get_submodule(name) for name in names}
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise QpeftError(f"{name} is not a linear layer")
        self.lm = lm
        self.hooks = _GramHooks(modules, lm.device)
        self.spill = spill
        self.kept: dict[str, torch.Tensor] = {}  # input key → its G, without `spill`
        self.spilled: list[str] = []  # input keys written to `spill`
        self.rank, self.world = rank_and_world()
        if spill is not None and self.rank == 0:
            shutil.rmtree(spill, ignore_errors=True)  # a crashed run's files
            spill.mkdir(parents=True)

    def layer_done(self, index: int) -> None:
        self.hooks.end_first_batch()
        for key in self.lm.linear_names(index, list(self.hooks.grams)):
            gram = self.hooks.grams.pop(key)
            if self.world > 1:  # every process runs the layers in the same order
                gram = all_reduce_sum(gram, self.lm.device)
            gram = _symmetric(gram.cpu())
            if self.spill is None:
                self.kept[key] = gram
            else:
                if self.rank == 0:
                    _write_gram(self.spill, key, gram)
                self.spilled.append(key)
        if index == len(self.lm.layers) - 1:
            self.hooks.remove()

    def remove(self) -> None:
        self.hooks.remove()

    def result(self, batches: torch.Tensor) -> InputGrams:
        """The sums over the rows of `batches` (the token ids this process's sweep saw)
        and those of the other processes."""
        counts = torch.tensor([batches.numel(), batches.shape[0]], dtype=torch.float64)
        if self.world > 1:
            counts = all_reduce_sum(counts, self.lm.device)
        tokens, sequences = (int(v) for v in counts.tolist())
        grams = self.kept if self.spill is None else GramFiles(self.spill, self.spilled)
        return InputGrams(grams, self.hooks.owner, tokens, {"sequences": sequences})


@torch.no_grad()
def input_grams(
    lm: LayerwiseLM,
    names: Sequence[str],
    batches: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    spill: Path | None = None,
) -> InputGrams:
    """XᵀX of the inputs of the linear layers `names` of a causal LM streamed layer by
    layer, over the rows of `batches` (num_sequences × seqlen token ids); with `spill`
    each is written to that directory as soon as it is complete."""
    collector = GramCollector(lm, names, spill)
    try:
        lm.forward_sweep(
            batches, batch_size, on_layer=collector.layer_done, progress="activations" if progress else None
        )
    finally:
        collector.remove()
    return collector.result(batches)


def save_grams(path: Path, grams: InputGrams) -> None:
    """The description to `path` and each G to `grams_dir(path)` (those already
    spilled there are left as they are); the description last, atomically, so that
    a complete set is what a file stands for."""
    directory = grams_dir(path)
    if not (isinstance(grams.grams, GramFiles) and grams.grams.directory == directory):
        directory.mkdir(parents=True, exist_ok=True)
        for key, gram in grams.grams.items():
            _write_gram(directory, key, gram)
    description = {"owner": grams.owner, "tokens": grams.tokens, "settings": grams.metadata}
    description["inputs"] = list(grams.grams)
    save_tagged(path, {}, METADATA_KEY, description)


def load_grams(path: Path) -> InputGrams:
    """The Grams of a file written by `save_grams` (or by earlier versions, which kept
    them in the file itself), each read when used."""
    names, description = load_tagged(path, METADATA_KEY, "activation file", lazy=True)
    in_file = FileTensors(path, {n: n for n in names})  # the earlier versions' layout
    grams = in_file if names else GramFiles(grams_dir(path), description["inputs"])
    return InputGrams(grams, description["owner"], description["tokens"], description["settings"])
