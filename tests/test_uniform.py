"""`qpeft decompose --method uniform`: Q alone, GPTQ-rounded, under one config or
the ILP's mixed precision priced by the round-to-nearest error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qpeft.errors import QpeftError
from qpeft.io.checkpoint import read_manifest
from qpeft.methods.uniform import uniform_costs
from qpeft.quant import parse_grid, simulate
from qpeft.training.recipe import load_recipe
from tests.conftest import SMALL_GRID, assert_one_line_error, run

CALIB = ["--calib-sequences", 2, "--calib-seqlen", 16]


def _tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def test_uniform_is_lqlora_at_rank_zero_without_its_adapter(tiny_model_dir, tmp_path, capsys):
    """One config: the same GPTQ-rounded Q as LQ-LoRA with rank 0 and no Fisher, and no adapter."""
    uniform, lqlora = tmp_path / "uniform", tmp_path / "lqlora"
    code, _, err = run(capsys, "decompose", tiny_model_dir, "--method", "uniform", "--config", "nf3",
                            *CALIB, "--out", uniform)  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "decompose", tiny_model_dir, "--config", "nf3", "--rank", 0, "--no-fisher",
                       *CALIB, "--out", lqlora)  # fmt: skip
    assert code == 0, err
    a, b = _tensors(uniform), _tensors(lqlora)
    assert a.keys() == b.keys() and not any(".adapter." in key for key in a)
    assert all(torch.equal(a[key], b[key]) for key in a)
    manifest = read_manifest(uniform)
    assert manifest["method"] == "uniform" and manifest["grams"] is not None
    assert manifest["summary"]["bits_with_adapter"] == manifest["summary"]["bits_per_param"]
    assert all(entry["adapter"] is None for entry in manifest["quantized"].values())


def test_uniform_costs_are_the_round_to_nearest_errors():
    w = torch.randn(48, 128) * torch.linspace(0.2, 3, 128)
    grid = parse_grid(SMALL_GRID + ",int4-g32,int3-g64")
    expected = [float((w - simulate(w, config)).square().sum()) for config in grid]
    np.testing.assert_allclose(uniform_costs(w, grid), expected, rtol=1e-5)


def test_uniform_under_a_budget(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mixed"
    code, _, err = run(capsys, "decompose", tiny_model_dir, "--method", "uniform", "--budget", "3.5",
                       "--configs", SMALL_GRID, *CALIB, "--out", out)  # fmt: skip
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["summary"]["bits_per_param"] <= 3.5
    assert len({entry["config"] for entry in manifest["quantized"].values()}) > 1  # mixed precision
    table = json.loads((out / "cost_table.json").read_text())
    assert table["settings"]["method"] == "uniform"


def test_uniform_takes_no_rank(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "decompose", tiny_model_dir, "--method", "uniform", "--config", "nf3",
                       "--rank", 4, "--out", tmp_path / "o")  # fmt: skip
    assert_one_line_error(
        code, err, "--rank 4 is too large for model.layers.0.self_attn.q_proj (64×64): "
        "uniform quantization has no adapter (--rank 0)"
    )  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_recipe_cannot_train_a_uniform_base(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: uniform, config: nf3}\ntrain: {steps: 1}\n")
    with pytest.raises(
        QpeftError, match=r"^recipe key method.name: one of qlora, lqlora, qwha, checkpoint, got 'uniform'$"
    ):
        load_recipe(recipe)
