"""`qpeft export --to hf-hqq`: qpeft's integer codes as HQQ layers, bit for bit.

transformers 5 does not load HQQ models, so the default suite loads each exported
layer with hqq's own `HQQLinear.load_state_dict` (what transformers 4.57 calls for a
pre-quantized HQQ model) into the model and puts peft's LoRA over it. The load through
`AutoModelForCausalLM.from_pretrained` itself runs in a transformers 4.57 environment
(`make hf4-env`): the slow test at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qpeft.export.formats import REPORT_NAME, export_checkpoint
from qpeft.export.hqq import hqq_group, hqq_pack, int_candidates
from qpeft.models.loading import load_checkpoint
from qpeft.modules import quantized_layers
from qpeft.quant import parse_config
from qpeft.quant.formats.integer import IntConfig
from qpeft.training.model import save_with_random_lora
from tests.conftest import assert_one_line_error, run

hqq_quantize = pytest.importorskip("hqq.core.quantize")
ROOT = Path(__file__).resolve().parents[1]
HF4_PYTHON = ROOT / ".venv-hf4" / "bin" / "python"
MIXED = "int2-g32,int3-g64,int4-g32,int8-g128"
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_hqqs_own(bits):
    """hqq_pack gives BitPack's bytes, and hqq unpacks them to the same codes."""
    codes = torch.randint(0, 2**bits, (36, 16), dtype=torch.uint8)  # 36 rows: 3-bit pads to 40
    Quantizer = hqq_quantize.Quantizer
    packing = Quantizer.bit_to_packing[bits]
    theirs = Quantizer.pack[packing](codes)
    ours = hqq_pack(codes, bits)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(Quantizer.unpack[packing](ours, dtype=torch.uint8)[:36], codes)


def test_group_sizes_hqq_can_hold():
    assert hqq_group(IntConfig(4, 64), (576, 576)) == 64
    assert hqq_group(IntConfig(4, 128), (576, 576)) == 64  # 576 = 4.5 · 128: sub-groups of 64
    assert hqq_group(IntConfig(2, 32), (3, 96)) == 8  # 36 groups of 8 fill 2-bit bytes; 9 of 32 would not
    assert hqq_group(IntConfig(3, 32), (5, 36)) is None  # gcd 4: below HQQ's smallest group
    fours = {c.name for c, _ in int_candidates((64, 64)) if c.bits == 4}
    assert fours == {"int4-g8", "int4-g16", "int4-g32", "int4-g64"}


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory) -> Path:
    """An ILP mixture of the four integer configs of MIXED (each matrix of the tiny
    LLaMA scaled by 8^-1.5 … 8^1.5, so that the costs differ and the ILP mixes) with
    non-zero rank-4 LoRA adapters, RoPE at SmolLM2's θ."""
    from safetensors.torch import load_file, save_file

    from qpeft.cli import main
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("hqq")
    source = make_tiny_llama(root / "model")
    tensors = load_file(source / "model.safetensors")
    for i, key in enumerate(sorted(k for k in tensors if k.endswith("proj.weight"))):
        tensors[key] = tensors[key] * 8.0 ** (i % 4 - 1.5)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 100000.0  # SmolLM2's: transformers 4.57 must see it too
    (source / "config.json").write_text(json.dumps(config))
    argv = ["decompose", source, "--out", root / "int", "--budget", "4.5", "--rank", "0", "--no-fisher"]
    assert main([str(a) for a in [*argv, "--rounding", "nearest", "--configs", MIXED]]) == 0
    return save_with_random_lora(root / "int", root / "trained", 4, 8.0, std=0.05)


def _load_like_transformers(export: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The exported model as transformers 4.57 builds it: the model's other tensors,
    and every HQQ layer by `HQQLinear.load_state_dict` from its serialized state."""
    from hqq.core.quantize import HQQLinear
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(export)
    hqq = config.quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {}
    for path in export.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            tensors |= {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    layers = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers -= set(hqq["skip_modules"])
    for name in layers:
        state = {k[len(name) + 1 :]: tensors.pop(k) for k in list(tensors) if k.startswith(f"{name}.")}
        layer = HQQLinear(None, None, compute_dtype=dtype, device="cpu", del_orig=False)
        layer.load_state_dict(state)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()


def test_integer_layers_are_hqq_bit_for_bit_and_peft_adapts_them(mixed_checkpoint, tmp_path):
    from hqq.core.quantize import HQQLinear
    from peft import PeftModel

    ours = load_checkpoint(mixed_checkpoint)
    configs = {layer.config.name for layer in quantized_layers(ours).values()}
    assert configs == set(MIXED.split(",")), configs  # every packing: 2, 3, 4 and 8 bits
    report = export_checkpoint(mixed_checkpoint, "hf-hqq", tmp_path / "hqq", dtype="fp32")
    assert report["requantized"] == {} and set(report["adapter_rel_error"].values()) == {0.0}
    model = _load_like_transformers(tmp_path / "hqq", torch.float32)
    for name, layer in quantized_layers(ours).items():
        theirs = model.get_submodule(name)
        assert isinstance(theirs, HQQLinear) and theirs.meta["nbits"] == layer.config.bits
        assert torch.equal(theirs.dequantize(), layer.dequantized_weight()), name
    # int8-g128 on 64-wide rows: HQQ groups of 64 with the same values; its bits counted as stored
    expected_bits = sum(
        (r["nbits"] + 32 / r["group_size"]) * ours.get_submodule(n).in_features * ours.get_submodule(n).out_features
        for n, r in report["hqq_layers"].items()
    ) / sum(layer.in_features * layer.out_features for layer in quantized_layers(ours).values())
    assert report["hqq_bits_per_param"] == pytest.approx(expected_bits)
    adapted = PeftModel.from_pretrained(model, tmp_path / "hqq" / "adapter")
    with torch.no_grad():
        expected, got = ours(IDS).logits, adapted(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    config = json.loads((tmp_path / "hqq" / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # transformers 4.x's name of transformers 5's rope_parameters
    hqq = config["quantization_config"]
    assert hqq["quant_method"] == "hqq" and "lm_head" in hqq["skip_modules"]


def test_fp16_scales_stay_exact_in_an_fp16_runtime(mixed_checkpoint, tmp_path):
    """HQQ casts scale and zero to its compute dtype: in fp16 (the default) they are
    the values of the fp32 runtime, whose weights are qpeft's bit for bit (above)."""
    export_checkpoint(mixed_checkpoint, "hf-hqq", tmp_path / "fp16")
    export_checkpoint(mixed_checkpoint, "hf-hqq", tmp_path / "fp32", dtype="fp32")
    half, full = (
        _load_like_transformers(tmp_path / "fp16", torch.float16),
        _load_like_transformers(tmp_path / "fp32", torch.float32),
    )
    for name in quantized_layers(load_checkpoint(mixed_checkpoint)):
        for key in ("scale", "zero"):
            value = half.get_submodule(name).meta[key]
            assert value.dtype == torch.float16
            assert torch.equal(value.float(), full.get_submodule(name).meta[key]), (name, key)


def test_nf_matrices_need_requantize_and_report_their_error(tiny_model_dir, tmp_path, capsys):
    from qpeft.stages.quantize import quantize_model

    quantize_model(tiny_model_dir, tmp_path / "nf4", parse_config("nf4"))
    code, _, err = run(capsys, "export", tmp_path / "nf4", "--to", "hf-hqq", "--out", tmp_path / "a")
    assert_one_line_error(code, err, "hf-hqq cannot hold 14 of the checkpoint's matrices as they are")
    assert not (tmp_path / "a").exists()
    code, out, err = run(capsys, "export", tmp_path / "nf4", "--to", "hf-hqq", "--requantize", "--out", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / REPORT_NAME).read_text())
    chosen = {r["to"] for r in report["requantized"].values()}
    # NF4 at 4.127 bits on 64-wide rows: no int4 group fits, 3-bit codes in groups of 32 (4.0 bits) are nearest
    assert chosen == {"int3-g32"} and report["hqq_bits_per_param"] == 4.0
    assert all(0 < r["rel_error"] < 0.3 for r in report["requantized"].values())
    assert "re-quantized to an integer config: 14 matrices" in out


@pytest.mark.slow
@pytest.mark.skipif(not HF4_PYTHON.exists(), reason="needs the transformers 4.57 environment: make hf4-env")
def test_transformers_457_loads_the_export_with_no_qpeft(mixed_checkpoint, tmp_path):
    """`AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained` in a
    transformers 4.57 + hqq + peft environment: qpeft's logits, bit for bit in fp32,
    and within fp16 rounding in the default fp16 runtime."""
    ours = load_checkpoint(mixed_checkpoint)
    with torch.no_grad():
        logits = ours(IDS).logits.float()
    weights = {name: layer.dequantized_weight() for name, layer in quantized_layers(ours).items()}
    torch.save({"ids": IDS, "logits": logits, "weights": weights}, tmp_path / "reference.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = {}
    for dtype in ("fp32", "fp16"):
        export_checkpoint(mixed_checkpoint, "hf-hqq", tmp_path / dtype, dtype=dtype)
        loader = [str(HF4_PYTHON), str(ROOT / "tools" / "hqq_load.py"), str(tmp_path / dtype)]
        result = subprocess.run(
            [*loader, str(tmp_path / "reference.pt"), "--dtype", dtype],
            capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        found[dtype] = json.loads(result.stdout.strip().splitlines()[-1])
    full, half = found["fp32"], found["fp16"]
    assert full["transformers"].startswith("4.57") and not full["qpeft_imported"]
    assert full["hqq_layers"] == len(weights) and full["weights_equal"] and full["adapter"]
    assert full["rel_diff"] < 1e-6, full
    assert half["hqq_layers"] == len(weights) and half["rel_diff"] < 1e-2, half
