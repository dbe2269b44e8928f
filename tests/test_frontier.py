"""The frontier sweep (tools/sweep.py with `frontier`) and the peers it measures
(tools/peers.py): HQQ, bitsandbytes NF4 and peft's LoftQ, quantized by their own
libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qpeft.quant import parse_config, simulate, storage_bits

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import peers  # noqa: E402
import sweep  # noqa: E402


def test_lower_frontier_keeps_the_points_nothing_beats():
    points = {"a": (2.0, 30.0), "b": (2.5, 31.0), "c": (3.0, 25.0), "d": (3.0, 24.0), "e": (4.0, 24.5), "f": (4.5, 20)}
    assert sweep.lower_frontier(points) == ["a", "d", "f"]
    assert sweep.lower_frontier({}) == []


def test_peers_quantize_as_their_libraries_do_and_count_their_bits():
    """HQQ's optimised scale and zero beat round-to-nearest of the same integer format
    (qpeft's int4-g64: the same bits); bitsandbytes NF4 costs what qpeft's bit-compatible
    nf4 costs; LoftQ's B·A lowers its own Q's error."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 576, generator=g) * 0.02

    def rel(approx: torch.Tensor) -> float:
        return float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))

    hqq, bits, adapter = peers.hqq_matrix(w, 4, 64)
    assert bits == w.numel() * 4 + (w.numel() // 64) * 32 and adapter == 0
    assert bits == storage_bits(parse_config("int4-g64"), w.shape)
    assert rel(hqq) < 0.98 * rel(simulate(w, parse_config("int4-g64")))
    nf4, bits, _ = peers.bnb_nf4_matrix(w)
    assert bits == storage_bits(parse_config("nf4"), w.shape)  # qpeft counts the offset too
    assert rel(nf4) == pytest.approx(rel(simulate(w, parse_config("nf4"))), rel=0.01)
    merged, q_bits, adapter_bits = peers.loftq_matrix(w, 8, 1)
    assert q_bits == w.numel() * 4 + (w.numel() // 64) * 32 and adapter_bits == 16 * 8 * (192 + 576)
    no_lora, _, _ = peers.loftq_matrix(w, 1, 1)
    assert rel(merged) < rel(no_lora)


def test_frontier_sweep_screens_every_row_and_measures_each_frontier_fully(tiny_model_dir, tiny_text_file, tmp_path):
    """Every row on the screening windows; the rows on their method's frontier, and
    only they, also on all windows; peers' bits from their peer.json; a table and a
    plot."""
    tiny = str(tiny_model_dir)

    def quantize(config):
        return {"label": config, "method": "qpeft", "steps": [["quantize", tiny, "--config", config, "--out", "{out}"]]}

    def peer(label, method, *argv):
        step = {"script": "peers.py", "argv": [*argv, "--model", tiny, "--out", "{out}"]}
        return {"label": label, "method": method, "steps": [step]}

    rows = [quantize("nf4"), quantize("nf3"), quantize("nf8"),
            peer("hqq 4", "HQQ", "hqq", "--nbits", 4, "--group-size", 64), peer("bnb", "bnb", "bnb-nf4")]  # fmt: skip
    spec = {
        "title": "tiny",
        "eval": {"seqlen": 32, "max_windows": 6, "dtype": "fp32"},
        "domains": {"tiny": ["--text-file", str(tiny_text_file)]},
        "peer": "nf4",
        "frontier": {"screen_windows": 2},
        "rows": rows,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    work = tmp_path / "work"
    command = [sys.executable, str(TOOLS / "sweep.py"), str(tmp_path / "spec.yaml"), str(work)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((work / "sweep.json").read_text())
    by_windows = {label: {e["windows"]: e for e in record["evals"].values()} for label, record in state.items()}
    assert all(2 in evals for evals in by_windows.values())  # every row screened on 2 windows
    ppl = {label: evals[2]["ppl"] for label, evals in by_windows.items()}
    qpeft_points = {r: (json.loads((work / r / "qpeft_manifest.json").read_text())["summary"]["bits_per_param"], ppl[r])
                    for r in ("nf3", "nf4", "nf8")}  # fmt: skip
    expected = {*sweep.lower_frontier(qpeft_points), "hqq-4", "bnb"}
    assert {label for label, evals in by_windows.items() if 6 in evals} == expected
    assert all(len(evals) == (2 if label in expected else 1) for label, evals in by_windows.items())
    peer = json.loads((work / "hqq-4" / "peer.json").read_text())
    assert peer["bits_total"] == pytest.approx(4.5) and peer["matrices"] > 0
    assert "| HQQ | hqq 4 (frontier) | 4.5000 | 4.5000 |" in result.stdout
    assert (work / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
