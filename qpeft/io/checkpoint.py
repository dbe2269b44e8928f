"""The qpeft checkpoint: safetensors shards + config/tokenizer + a JSON manifest.

Layout of a checkpoint directory:

    config.json, tokenizer files     copied from the base model
    model-00001.safetensors, ...     every tensor of the model; a quantized linear
                                     layer NAME is stored as NAME.codes, NAME.scales
                                     (+ NAME.scale_scales, NAME.scale_offset)
    qpeft_manifest.json              format version, per-matrix config and bits,
                                     tensor → shard map, provenance, and the sha256
                                     of every other file and of every tensor

Tensors are written shard by shard as they are produced and read back shard by
shard, so neither side holds more than one shard beyond the model itself. Reading
checks every tensor against its sha256 (an error names the shard and the tensor) and
every other file against its own; schema version 1 (no checksums) still loads.
The format in full: docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qpeft.errors import QpeftError

if TYPE_CHECKING:
    from qpeft.models.weights import SafetensorsWeights

MANIFEST_NAME = "qpeft_manifest.json"
FORMAT_NAME = "qpeft"
SCHEMA_VERSION = 2  # 2 added the checksums
READABLE_VERSIONS = (1, 2)
DEFAULT_SHARD_BYTES = 2 << 30
# how the tensors that are not quantized (embeddings, norms, lm_head) are stored
UNQUANTIZED_DTYPES = {"source": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype | None) -> str:
    """The UNQUANTIZED_DTYPES name of `dtype` (None: "source")."""
    return next(name for name, value in UNQUANTIZED_DTYPES.items() if value == dtype)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (C order, its own dtype)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever it is full; keeps
    each tensor's sha256 for the manifest."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.sha256: dict[str, str] = {}
        self.shards = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.weight_map or key in self.pending:
            raise ValueError(f"tensor {key} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[key] = tensor.detach().contiguous().cpu()
        self.sha256[key] = tensor_sha256(self.pending[key])
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        self.shards += 1
        name = f"model-{self.shards:05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0


def stream_model(
    weights: SafetensorsWeights,
    writer: ShardWriter,
    selected: dict[str, str],
    convert: Callable[[str, torch.Tensor], dict[str, Any]],
    desc: str,
    unquantized_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, Any]]:
    """Copy every tensor of `weights` into `writer`, except the selected ones (weight
    key → module name), which `convert(name, tensor)` writes itself; returns its
    manifest entries by module name. `unquantized_dtype`: the floating tensors that
    are copied are stored in it (None: as in the source)."""
    entries: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(weights.weight_map), desc=desc, unit="tensor") as bar:
        for key, tensor in weights.items():
            bar.update()
            if key in selected:
                entries[selected[key]] = convert(selected[key], tensor)
            elif unquantized_dtype is not None and tensor.is_floating_point():
                writer.add(key, tensor.to(unquantized_dtype))
            else:
                writer.add(key, tensor)
    writer.flush()
    return entries


def write_manifest(directory: Path, manifest: dict[str, Any], writer: ShardWriter) -> None:
    """Write the manifest, last (a directory without it is not a checkpoint), with the
    sha256 of every file already in `directory` and of every tensor `writer` wrote."""
    directory = Path(directory)
    files = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    body = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        **{k: v for k, v in manifest.items() if k not in ("format", "schema_version", "checksums")},
        "checksums": {"files": files, "tensors": writer.sha256},
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise QpeftError(f"cannot read {file}: it is not UTF-8 JSON ({exc.reason} at byte {exc.start})") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise QpeftError(f"cannot read {file}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QpeftError(f"{file} is not a qpeft manifest")
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise QpeftError(f"{file}: schema version {version} is not supported (this qpeft reads {readable})")
    for name, digest in manifest.get("checksums", {}).get("files", {}).items():
        if name.endswith(".safetensors"):
            continue  # checked tensor by tensor as they are read
        other = Path(path) / name
        if not other.is_file():
            raise QpeftError(f"checkpoint {path} is missing {name}")
        if file_sha256(other) != digest:
            raise QpeftError(f"checkpoint {path}: {name} does not match its checksum (changed or corrupt)")
    return manifest


def iter_shards(path: Path, manifest: dict[str, Any], device: str = "cpu", shards: list[str] | None = None):
    """Yield (shard name, {key: tensor}) one shard at a time (all, or `shards`), each
    tensor checked against its sha256 when the manifest has them."""
    digests = manifest.get("checksums", {}).get("tensors")
    for shard in shards if shards is not None else sorted(set(manifest["weight_map"].values())):
        file = Path(path) / shard
        if not file.is_file():
            raise QpeftError(f"checkpoint {path} is missing {shard}")
        try:
            with safe_open(str(file), framework="pt", device=device) as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise QpeftError(f"checkpoint {path}: {shard} cannot be read ({exc})") from exc
        if digests is not None:
            for key, tensor in tensors.items():
                if digests.get(key) != tensor_sha256(tensor):
                    raise QpeftError(f"checkpoint {path}: {shard} is corrupt: tensor {key} does not match its checksum")
        yield shard, tensors


def verify_checkpoint(path: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    """Check every file and every tensor of a checkpoint against the manifest's sha256
    (the other files by `read_manifest`); returns (files, tensors) checked. Each shard
    is read once, whole, against its file sha256, which covers every tensor's bytes;
    only a shard that fails is read again tensor by tensor, so that the error names the
    tensor. Schema 1 has no sums: only that every shard is there and reads."""
    sums = manifest.get("checksums", {}).get("files", {})
    for shard in sorted(set(manifest["weight_map"].values())):
        file = Path(path) / shard
        if not file.is_file():
            raise QpeftError(f"checkpoint {path} is missing {shard}")
        if shard in sums and file_sha256(file) == sums[shard]:
            continue
        for _ in iter_shards(path, manifest, shards=[shard]):  # names a damaged tensor, or an unreadable shard
            pass
        if shard in sums:  # every tensor reads back right: the header or padding changed
            raise QpeftError(f"checkpoint {path}: {shard} does not match its checksum (changed or corrupt)")
    return len(sums), len(manifest["weight_map"])
