"""Input second moments G = XᵀX of the selected linear layers (QWHA's initialisation).

X stacks the calibration tokens' inputs of a layer (tokens × d_in). G is summed in
fp64 (each batch's XᵀX formed in fp32) in one forward sweep of the model, one decoder
layer at a time (`qpeft.calibration.stream`), and no backward. Layers that read the same tensor
(q/k/v of an attention block, gate/up of an MLP) share one G: the first batch finds
which by tensor identity, and later batches accumulate each shared input once. For
SmolLM2 that is 4 matrices per decoder layer instead of 7 (0.8 GB in fp64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.linalg.blas import ssyrk
from torch import nn

from qpeft.calibration.stream import LayerwiseLM
from qpeft.errors import QpeftError
from qpeft.io.tagged import FileTensors, load_tagged, save_tagged

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


def check_gram_memory(in_features: Sequence[int], processes: int, needed_for: str, instead: str) -> None:
    """Error before any slow stage when the XᵀX of the selected layers' inputs cannot
    fit in memory: each of the `processes` on this machine holds all of them in fp64
    (8·d_in² bytes per matrix; matrices that share an input share one, so this is an
    upper bound) until the stage that uses them has run."""
    needed = processes * sum(8 * d * d for d in in_features)
    available = available_memory()
    if available is not None and needed > available:
        raise QpeftError(
            f"{needed_for} keeps the XᵀX of every selected layer's input in memory, up to {needed / 2**30:.1f} GiB "
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


def all_reduce_grams(grams: InputGrams, device: str | torch.device) -> InputGrams:
    """Across the processes of a torch.distributed group that each calibrated a share of
    the sequences: XᵀX and the token and sequence counts summed over all of them."""
    from qpeft.distributed import all_reduce_sum

    counts = torch.tensor([grams.tokens, grams.metadata["sequences"]], dtype=torch.float64)
    tokens, sequences = (int(v) for v in all_reduce_sum(counts, device).tolist())
    summed = {k: all_reduce_sum(g, device) for k, g in grams.grams.items()}
    return InputGrams(summed, dict(grams.owner), tokens, {**grams.metadata, "sequences": sequences})


class GramCollector:
    """Sums XᵀX of the inputs of the linear layers `names` during a forward sweep of
    `lm` (`LayerwiseLM.forward_sweep` with `on_layer=collector.layer_done`): that of
    `input_grams`, or the Fisher's own forward sweep, which then yields both. Each
    layer's matrices are accumulated on the device and moved to the CPU when the
    layer has seen every sequence; after the last layer the hooks are removed, so
    that a backward sweep that re-runs the layers adds nothing."""

    def __init__(self, lm: LayerwiseLM, names: Sequence[str]) -> None:
        modules = {name: lm.model.get_submodule(name) for name in names}
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise QpeftError(f"{name} is not a linear layer")
        self.lm = lm
        self.hooks = _GramHooks(modules, lm.device)

    def layer_done(self, index: int) -> None:
        self.hooks.end_first_batch()
        for key in self.lm.linear_names(index, list(self.hooks.grams)):
            self.hooks.grams[key] = self.hooks.grams[key].cpu()
        if index == len(self.lm.layers) - 1:
            self.hooks.remove()

    def remove(self) -> None:
        self.hooks.remove()

    def result(self, batches: torch.Tensor) -> InputGrams:
        """The sums over `batches` (the token ids the sweep saw)."""
        grams = {k: _symmetric(g.cpu()) for k, g in self.hooks.grams.items()}
        return InputGrams(grams, self.hooks.owner, int(batches.numel()), {"sequences": int(batches.shape[0])})


@torch.no_grad()
def input_grams(
    lm: LayerwiseLM, names: Sequence[str], batches: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> InputGrams:
    """XᵀX of the inputs of the linear layers `names` of a causal LM streamed layer by
    layer, over the rows of `batches` (num_sequences × seqlen token ids)."""
    collector = GramCollector(lm, names)
    try:
        lm.forward_sweep(
            batches, batch_size, on_layer=collector.layer_done, progress="activations" if progress else None
        )
    finally:
        collector.remove()
    return collector.result(batches)


def save_grams(path: Path, grams: InputGrams) -> None:
    description = {"owner": grams.owner, "tokens": grams.tokens, "settings": grams.metadata}
    save_tagged(path, grams.grams, METADATA_KEY, description)


def load_grams(path: Path) -> InputGrams:
    """The Grams of a file written by `save_grams`, each read from it when used."""
    names, description = load_tagged(path, METADATA_KEY, "activation file", lazy=True)
    grams = FileTensors(path, {n: n for n in names})
    return InputGrams(grams, description["owner"], description["tokens"], description["settings"])
