"""GGUF's 32-value block formats (q4_0 … q8_0): bytes that gguf-py reads back to
qpeft's own values, bit for bit, and a scale search at least as good as gguf-py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.quant import GRIDS, dequantize, parse_config, quantize, simulate
from qpeft.quant.formats.ggml import KINDS
from qpeft.quant.gptq import gptq_quantize

gguf = pytest.importorskip("gguf")


def _weight(rows: int = 48, cols: int = 96) -> torch.Tensor:
    w = torch.randn(rows, cols) * 0.05
    w[3, 5] = 1.0  # an outlier
    w[7, :32] = 0.0  # an all-zero block
    w[9, 32:64] = 0.02  # a constant block
    return w


def _theirs(raw: torch.Tensor, kind: str, rows: int) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    return torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(rows, -1), qtype).copy())


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_reads_qpefts_bytes_as_qpefts_values(kind):
    config, w = parse_config(kind), _weight()
    qt = quantize(w, config)
    ours = dequantize(qt)
    assert torch.equal(_theirs(qt.parts["blocks"], kind, w.shape[0]), ours)
    assert torch.equal(simulate(w, config), ours)
    assert qt.parts["blocks"].numel() * 8 == config.storage_bits(w.shape) == config.bits_per_param * w.numel()
    _, bytes_per_block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind.upper())]
    assert config.block_bytes == bytes_per_block
    assert torch.equal(ours[7, :32], torch.zeros(32))


@pytest.mark.parametrize("kind", KINDS)
def test_the_scale_search_beats_gguf_pys_quantizer(kind):
    w = torch.randn(256, 256) * 0.02
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    reference = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    ours = dequantize(quantize(w, parse_config(kind)))
    assert float((w - ours).square().sum()) <= float(np.square(w.numpy() - reference).sum())


@pytest.mark.parametrize("kind", ["q4_0", "q5_1"])
def test_gptq_rounds_onto_the_searched_scales(kind):
    config, w = parse_config(kind), _weight(32, 64)
    x = torch.randn(256, 64)
    qt = gptq_quantize(w, config, x.T @ x)
    out = dequantize(qt)
    assert torch.equal(_theirs(qt.parts["blocks"], kind, 32), out)
    nearest = dequantize(quantize(w, config))
    assert float(((w - out) @ x.T).square().sum()) < float(((w - nearest) @ x.T).square().sum())


def test_names_grid_and_row_lengths():
    assert [c.name for c in GRIDS["gguf"]] == list(KINDS)
    assert parse_config("Q4_1").name == "q4_1"
    with pytest.raises(QpeftError, match="unknown quantization config 'q8_1'"):
        parse_config("q8_1")
    with pytest.raises(QpeftError, match="q4_0 needs rows whose length divides by 32, got 48"):
        quantize(torch.randn(4, 48), parse_config("q4_0"))


def test_the_ilp_allocates_over_gguf_formats(tiny_model_dir, tmp_path, capsys):
    from qpeft.io.checkpoint import read_manifest
    from qpeft.models.loading import load_checkpoint
    from tests.conftest import run

    code, _, err = run(
        capsys, "decompose", tiny_model_dir, "--out", tmp_path / "g", "--budget", "5.5", "--rank", 0,
        "--no-fisher", "--rounding", "nearest", "--configs", "gguf",
    )  # fmt: skip
    assert code == 0, err
    manifest = read_manifest(tmp_path / "g")
    configs = {entry["config"] for entry in manifest["quantized"].values()}
    assert configs <= set(KINDS) and manifest["summary"]["bits_per_param"] <= 5.5
    model = load_checkpoint(tmp_path / "g")
    name, entry = next(iter(manifest["quantized"].items()))
    layer = model.get_submodule(name)
    assert layer.config.name == entry["config"]
    assert torch.equal(_theirs(layer.quantized.parts["blocks"], entry["config"], layer.out_features),
                       layer.dequantized_weight())  # fmt: skip
