"""`qpeft plan`: predictions against what a run really holds, on the tiny model, and
its errors."""

from __future__ import annotations

import pytest
import torch

from qpeft.models.loading import load_checkpoint
from qpeft.quant import PRESETS
from qpeft.stages.plan import PlanRequest, parse_size, run_plan
from qpeft.stages.quantize import quantize_model
from qpeft.training.model import add_lora, freeze_all_but_adapters
from tests.conftest import assert_one_line_error, run


def test_checkpoint_size_and_saved_activations_match_the_real_model(tiny_model_dir, tmp_path):
    """The checkpoint's tensor bytes exactly, and the fake-tensor trace of one layer
    and the head against the bytes autograd saves in a real forward of the model."""
    base = tmp_path / "nf4"
    quantize_model(tiny_model_dir, base, PRESETS["nf4"])
    predicted = run_plan(PlanRequest(str(tiny_model_dir), config="nf4", rank=4, batch_size=4, seqlen=64, device="cpu"))
    # the shards' tensor data: each file less its 8-byte length and JSON header
    data = sum(p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little") for p in base.glob("*.safetensors"))
    assert abs(predicted["checkpoint_bytes"] / data - 1) < 1e-3

    model = load_checkpoint(base, torch.float32)
    add_lora(model, 4, 8.0, seed=0)
    freeze_all_but_adapters(model)
    model.train()
    fixed = {id(t) for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        if id(tensor) not in fixed:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, use_cache=False)
    real = sum(storages.values())
    assert abs(predicted["train"]["none"]["activations"] / real - 1) < 0.05, (predicted["train"]["none"], real)


def test_sizes_parse():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)


def test_fits_and_advice(tiny_model_dir):
    request = PlanRequest(str(tiny_model_dir), config="nf4", rank=4, device="cpu", device_memory="1TiB")
    assert run_plan(request)["advice"] == "fits as planned"
    request.device_memory = "1KiB"
    result = run_plan(request)
    assert not result["fits"] and not result["fits_with_gradient_checkpointing"]
    assert result["advice"].startswith("the base and adapters alone exceed it")


def test_bad_device_memory_is_one_line(tiny_model_dir, capsys):
    code, _, err = run(capsys, "plan", tiny_model_dir, "--device-memory", "lots")
    assert_one_line_error(code, err, "--device-memory 'lots': expected a size such as 24GiB or 80GB")


def test_total_budget_below_the_adapters_is_one_line(tiny_model_dir, capsys):
    code, _, err = run(capsys, "plan", tiny_model_dir, "--method", "lqlora", "--total-budget", "0.1", "--rank", "16")
    assert_one_line_error(code, err, "--total-budget 0.1: the rank-16 adapters alone take more")


def test_cli_prints_the_table(tiny_model_dir, capsys):
    code, out, _ = run(capsys, "plan", tiny_model_dir, "--config", "nf3", "--device-memory", "24GiB")
    assert code == 0
    assert "checkpoint" in out and "grad. ckpt" in out and out.rstrip().endswith("fits as planned")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rank", "-1"], "--rank must be 0 or more, got -1"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--seqlen", "-4"], "--seqlen must be a positive integer, got -4"),
    ],
)
def test_bad_numbers_are_one_line(tiny_model_dir, capsys, flags, message):
    code, _, err = run(capsys, "plan", tiny_model_dir, *flags)
    assert_one_line_error(code, err, message)
