"""The qpeft checkpoint: checksums, the errors a damaged one gives, `qpeft inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.io.checkpoint import MANIFEST_NAME, file_sha256, read_manifest, tensor_sha256
from qpeft.models.loading import load_checkpoint
from qpeft.quant import PRESETS
from qpeft.stages.quantize import quantize_model
from tests.conftest import assert_one_line_error, run


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "nf4"
    quantize_model(tiny_model_dir, out, PRESETS["nf4"])
    return out


def _edit_manifest(path: Path, change) -> None:
    body = json.loads((path / MANIFEST_NAME).read_text())
    change(body)
    (path / MANIFEST_NAME).write_text(json.dumps(body))


def test_manifest_holds_the_sha256_of_every_file_and_tensor(checkpoint):
    manifest = read_manifest(checkpoint)
    files = {p.name for p in checkpoint.iterdir() if p.name != MANIFEST_NAME}
    assert set(manifest["checksums"]["files"]) == files and "config.json" in files
    for name, digest in manifest["checksums"]["files"].items():
        assert file_sha256(checkpoint / name) == digest
    assert set(manifest["checksums"]["tensors"]) == set(manifest["weight_map"])
    from safetensors import safe_open

    shard = next(iter(sorted(set(manifest["weight_map"].values()))))
    with safe_open(str(checkpoint / shard), "pt") as handle:
        key = next(iter(handle.keys()))
        assert tensor_sha256(handle.get_tensor(key)) == manifest["checksums"]["tensors"][key]


def test_a_corrupt_byte_names_the_shard_and_tensor(checkpoint):
    manifest = read_manifest(checkpoint)
    shard = sorted(set(manifest["weight_map"].values()))[-1]
    data = bytearray((checkpoint / shard).read_bytes())
    data[-3] ^= 0x55  # inside the last tensor's data
    (checkpoint / shard).write_bytes(bytes(data))
    with pytest.raises(QpeftError, match=rf"{shard} is corrupt: tensor \S+ does not match its checksum"):
        load_checkpoint(checkpoint)


def test_missing_and_changed_files(checkpoint, tmp_path, capsys):
    config = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(config.replace("64", "65", 1))
    code, _, err = run(capsys, "inspect", checkpoint)
    assert_one_line_error(code, err, "config.json does not match its checksum (changed or corrupt)")
    (checkpoint / "config.json").unlink()
    code, _, err = run(capsys, "inspect", checkpoint)
    assert_one_line_error(code, err, "is missing config.json")
    (checkpoint / "config.json").write_text(config)
    shard = next(checkpoint.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(QpeftError, match=f"is missing {shard.name}"):
        load_checkpoint(checkpoint)


def test_schema_versions(checkpoint, capsys):
    _edit_manifest(checkpoint, lambda body: body.update(schema_version=99))
    code, _, err = run(capsys, "inspect", checkpoint)
    assert_one_line_error(code, err, "schema version 99 is not supported (this qpeft reads 1, 2)")

    def as_version_one(body):  # the first format: no checksums
        body.update(schema_version=1)
        del body["checksums"]

    _edit_manifest(checkpoint, as_version_one)
    model = load_checkpoint(checkpoint)
    assert any(t.dtype == torch.uint8 for t in model.buffers())


def test_inspect_prints_the_manifest(checkpoint, capsys):
    code, stdout, err = run(capsys, "inspect", checkpoint)
    assert code == 0, err
    assert "method        quantize" in stdout and "Q bits/param  4.13" in stdout
    assert "checksums     " in stdout and "q_proj" in stdout and "nf4-b64-s8x256-fp32" in stdout
    code, _, err = run(capsys, "inspect", checkpoint.parent)
    assert_one_line_error(code, err, "is not a qpeft checkpoint (no qpeft_manifest.json)")
