"""GGUF's block formats (q4_0 … q8_0, iq4_nl, the k-quants q2_k … q6_k): bytes that
gguf-py reads back to qpeft's own values, bit for bit, a scale search at least as good
as gguf-py's, GPTQ on the searched scales, and an allocation that gives each matrix
only the formats its rows can take."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.quant import GRIDS, dequantize, parse_config, quantize, simulate
from qpeft.quant.formats.ggml import KINDS
from qpeft.quant.formats.kquants import KQUANT_KINDS
from qpeft.quant.gptq import gptq_quantize
from tests.conftest import assert_one_line_error, make_tiny_llama, run

gguf = pytest.importorskip("gguf")

ALL_KINDS = (*KINDS, "iq4_nl", *KQUANT_KINDS)


def _weight(rows: int = 48, cols: int = 512) -> torch.Tensor:
    w = torch.randn(rows, cols) * 0.05
    w[3, 5] = 1.0  # an outlier
    w[7, :256] = 0.0  # an all-zero (super-)block
    w[9, 256:] = 0.02  # a constant one
    w[11, :256] = w[11, :256].abs()  # all positive: a k-quant minimum of 0
    return w


def _theirs(raw: torch.Tensor, kind: str, rows: int) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    return torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(rows, -1), qtype).copy())


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gguf_reads_qpefts_bytes_as_qpefts_values(kind):
    config, w = parse_config(kind), _weight()
    qt = quantize(w, config)
    ours = dequantize(qt)
    assert torch.equal(_theirs(qt.parts["blocks"], kind, w.shape[0]), ours)
    assert torch.equal(simulate(w, config), ours)
    assert qt.parts["blocks"].numel() * 8 == config.storage_bits(w.shape) == config.bits_per_param * w.numel()
    block, bytes_per_block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind.upper())]
    assert (config.block_size, config.block_bytes) == (block, bytes_per_block)
    assert torch.equal(ours[7, :256], torch.zeros(256))
    assert float((w - ours).norm() / w.norm()) < 0.3


def test_more_bits_give_less_error():
    w = torch.randn(64, 1024) * 0.02
    errors = {kind: float((w - simulate(w, parse_config(kind))).square().sum()) for kind in ALL_KINDS}
    for family in (("q4_0", "q5_0", "q8_0"), ("q4_1", "q5_1"), KQUANT_KINDS):
        assert all(errors[dear] < errors[cheap] for cheap, dear in itertools.pairwise(family)), family
    # at equal bits: the k-quants' finer sub-block scales beat the 32-value types, and
    # iq4_nl's non-uniform levels beat q4_0's uniform ones
    assert errors["q4_k"] < errors["iq4_nl"] < errors["q4_0"] and errors["q5_k"] < errors["q5_0"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_scale_search_beats_gguf_pys_quantizer(kind):
    w = torch.randn(256, 256) * 0.02
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    reference = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    ours = dequantize(quantize(w, parse_config(kind)))
    assert float((w - ours).square().sum()) <= float(np.square(w.numpy() - reference).sum())


@pytest.mark.parametrize("kind", ["q4_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q5_k", "q6_k"])
def test_gptq_rounds_onto_the_searched_scales(kind):
    config, w = parse_config(kind), _weight(32, 256)
    x = torch.randn(1024, 256)
    qt = gptq_quantize(w, config, x.T @ x)
    out = dequantize(qt)
    assert torch.equal(_theirs(qt.parts["blocks"], kind, 32), out)
    nearest = dequantize(quantize(w, config))
    assert float(((w - out) @ x.T).square().sum()) < float(((w - nearest) @ x.T).square().sum())


def test_names_grid_and_row_lengths():
    assert [c.name for c in GRIDS["gguf"]] == list(ALL_KINDS)
    assert parse_config("Q4_1").name == "q4_1" and parse_config("Q6_K").name == "q6_k"
    assert parse_config("IQ4_NL").name == "iq4_nl"
    with pytest.raises(QpeftError, match="unknown quantization config 'q8_1'"):
        parse_config("q8_1")
    with pytest.raises(QpeftError, match="unknown quantization config 'q8_k'"):
        parse_config("q8_k")
    with pytest.raises(QpeftError, match=r"^q4_0 needs rows whose length divides by 32, got 48$"):
        quantize(torch.randn(4, 48), parse_config("q4_0"))
    with pytest.raises(QpeftError, match=r"^q3_k needs rows whose length divides by 256, got 576$"):
        quantize(torch.randn(4, 576), parse_config("q3_k"))
    assert parse_config("q2_k").holds((4, 512)) and not parse_config("q2_k").holds((4, 576))
    with pytest.raises(QpeftError, match=r"^weight contains NaN or Inf values$"):
        quantize(torch.full((2, 256), float("nan")), parse_config("q4_k"), name="weight")


def test_the_ilp_allocates_over_gguf_formats(tiny_model_dir, tmp_path, capsys):
    from qpeft.io.checkpoint import read_manifest
    from qpeft.models.loading import load_checkpoint

    code, _, err = run(
        capsys, "decompose", tiny_model_dir, "--out", tmp_path / "g", "--budget", "5.5", "--rank", 0,
        "--no-fisher", "--rounding", "nearest", "--configs", "gguf",
    )  # fmt: skip
    assert code == 0, err
    manifest = read_manifest(tmp_path / "g")
    configs = {entry["config"] for entry in manifest["quantized"].values()}
    assert configs <= {*KINDS, "iq4_nl"} and manifest["summary"]["bits_per_param"] <= 5.5  # rows of 64, 128
    model = load_checkpoint(tmp_path / "g")
    name, entry = next(iter(manifest["quantized"].items()))
    layer = model.get_submodule(name)
    assert layer.config.name == entry["config"]
    assert torch.equal(_theirs(layer.quantized.parts["blocks"], entry["config"], layer.out_features),
                       layer.dequantized_weight())  # fmt: skip


def test_k_quants_go_only_where_rows_divide_by_256(tmp_path, capsys):
    """Intermediate 256: only down_proj's rows (256) take k-quants; the others' (64)
    cost at least 4.5 bits, so the lowest average is (45056·4.5 + 16384·2.625)/61440 = 4."""
    from qpeft.io.checkpoint import read_manifest

    model = make_tiny_llama(tmp_path / "m", intermediate_size=256)
    args = ["--rank", 0, "--no-fisher", "--rounding", "nearest", "--configs", "gguf"]
    code, _, err = run(capsys, "decompose", model, "--out", tmp_path / "low", "--budget", "3.9", *args)
    assert_one_line_error(
        code, err, "budget 3.9 bits/param is infeasible: the configs allow averages from 4.0000 to 8.5000"
    )
    code, _, err = run(capsys, "decompose", model, "--out", tmp_path / "g", "--budget", "4.2", *args)
    assert code == 0, err
    chosen = {name: entry["config"] for name, entry in read_manifest(tmp_path / "g")["quantized"].items()}
    assert all((chosen[n] in KQUANT_KINDS) == n.endswith("down_proj") for n in chosen), chosen
    code, _, err = run(capsys, "decompose", model, "--out", tmp_path / "k", "--config", "q4_k", *args[:-2])
    assert_one_line_error(code, err, "q4_k needs rows whose length divides by 256, got 64")
