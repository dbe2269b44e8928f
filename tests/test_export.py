"""`qpeft export`: hf-bnb (transformers + bitsandbytes + peft), merged, peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpeft.errors import QpeftError
from qpeft.export import formats
from qpeft.export.formats import REPORT_NAME, export_checkpoint
from qpeft.io.trained import save_trained
from qpeft.models.loading import load_checkpoint
from qpeft.quant import PRESETS
from qpeft.stages.quantize import quantize_model
from qpeft.training.model import save_with_random_lora
from tests.conftest import SMALL_GRID, assert_one_line_error, run

IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """An all-NF4 checkpoint with non-zero LoRA adapters (scale 2), as `qpeft train` writes."""
    root = tmp_path_factory.mktemp("lora")
    quantize_model(tiny_model_dir, root / "nf4", PRESETS["nf4"])
    return save_with_random_lora(root / "nf4", root / "trained", 4, 8.0, std=0.05)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_hf_bnb_loads_in_transformers_and_peft(lora_checkpoint, tmp_path):
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = export_checkpoint(lora_checkpoint, "hf-bnb", tmp_path / "hf", dtype="fp32")
    assert report["requantized_rel_error"] == {} and set(report["adapter_rel_error"].values()) == {0.0}
    ours = load_checkpoint(lora_checkpoint)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    name = "model.layers.1.mlp.down_proj"
    layer = base.get_submodule(name)
    assert type(layer).__name__ == "Linear4bit"
    # the same NF4 weight, bit for bit
    bnb_weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(bnb_weight, ours.get_submodule(name).dequantized_weight())
    model = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter")
    expected = _logits(ours)
    # bitsandbytes' CPU 4-bit matmul is not exactly fp32: 0.4% of a layer's outputs here
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=2e-2 * float(expected.abs().max()))
    assert json.loads((tmp_path / "hf" / REPORT_NAME).read_text())["format"] == "hf-bnb"


def test_merged_loads_as_a_plain_model(lora_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    export_checkpoint(lora_checkpoint, "merged", tmp_path / "merged", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(plain.config, "quantization_config")
    # transformers 4 reads RoPE's θ from rope_theta, transformers 5 from rope_parameters
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    torch.testing.assert_close(_logits(plain), _logits(load_checkpoint(lora_checkpoint)), rtol=1e-4, atol=1e-4)


def test_mixed_configs_are_requantized_with_their_error_reported(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    code, _, err = run(
        capsys, "decompose", tiny_model_dir, "--out", tmp_path / "lq", "--budget", "3", "--rank", 2,
        "--no-fisher", "--rounding", "nearest", "--configs", SMALL_GRID,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "lq", "--to", "hf-bnb", "--out", tmp_path / "hf")
    assert_one_line_error(code, err, "hf-bnb cannot hold ")
    assert "pass --requantize to re-quantize them" in err and not (tmp_path / "hf").exists()
    code, stdout, err = run(
        capsys, "export", tmp_path / "lq", "--to", "hf-bnb", "--requantize", "--out", tmp_path / "hf"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "hf" / REPORT_NAME).read_text())
    manifest = json.loads((tmp_path / "lq" / "qpeft_manifest.json").read_text())
    others = {n for n, e in manifest["quantized"].items() if e["config"] != "nf4-b64-s8x256-fp32"}
    assert others and set(report["requantized_rel_error"]) == others
    assert all(0 < e < 1 for e in report["requantized_rel_error"].values())
    assert "re-quantized to NF4" in stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_qwha_needs_a_rank_and_lora_compression_reports_its_error(
    tiny_model_dir, lora_checkpoint, tmp_path, capsys, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    code, _, err = run(
        capsys, "decompose", tiny_model_dir, "--out", tmp_path / "qwha", "--method", "qwha", "--config", "nf4",
        "--rank", 2, "--calib-sequences", 2, "--calib-seqlen", 32,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "qwha", "--to", "peft", "--out", tmp_path / "p")
    assert_one_line_error(code, err, "a 'wht' adapter has no LoRA form: pass --rank R to fit one by truncated SVD")
    assert not (tmp_path / "p").exists()
    report = export_checkpoint(tmp_path / "qwha", "hf-bnb", tmp_path / "hf", rank=4)
    assert all(0 < e < 1 for e in report["adapter_rel_error"].values())
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter")
    # LoRA-Squeeze of a rank-4 LoRA to rank 2: the error is that of the discarded singular values
    squeezed = export_checkpoint(lora_checkpoint, "peft", tmp_path / "squeezed", rank=2)
    errors = list(squeezed["adapter_rel_error"].values())
    assert all(0 < e < 1 for e in errors)
    config = json.loads((tmp_path / "squeezed" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2


def test_a_failed_export_leaves_no_directory(lora_checkpoint, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(formats.EXPORTERS, "merged", crash)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(lora_checkpoint, "merged", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    expected = r"^unknown export format 'onnx' \(choose from hf-bnb, hf-hqq, gguf, merged, peft\)$"
    with pytest.raises(QpeftError, match=expected):
        export_checkpoint(lora_checkpoint, "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_saved_checkpoint_reloads_to_identical_logits(lora_checkpoint, tmp_path):
    """qpeft checkpoint → load → save → load: the same logits, bit for bit."""
    model = load_checkpoint(lora_checkpoint)
    save_trained(model, lora_checkpoint, tmp_path / "again", {"step": 0, "tokens": 0})
    assert torch.equal(_logits(load_checkpoint(tmp_path / "again")), _logits(model))
