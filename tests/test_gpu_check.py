"""tools/gpu_check.py --cpu-smoke: the device check's every section on the CPU at tiny
shapes, through the same code paths, so that it cannot rot before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, SUBPROCESS_ENV

SCRIPT = REPO / "tools" / "gpu_check.py"


@pytest.mark.subprocess
def test_cpu_smoke_runs_every_section(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--cpu-smoke", "--out", tmp_path], env=SUBPROCESS_ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = body["rows"]
    assert all(row["ok"] for row in rows)
    names = {(row["section"], row["name"]) for row in rows}
    for section in ("tests", "matmul", "dequant", "train", "costs", "pipeline"):
        assert any(s == section for s, _ in names), section
    matmul = [r for r in rows if r["section"] == "matmul"]
    assert {r["name"].split(" ", 1)[1] for r in matmul} >= {"nf4 triton", "int4-g32 triton", "nf3 torch dequant+matmul"}
    assert all(r["rel_error"] < 1e-4 for r in matmul)
    train = {r["name"]: r for r in rows if r["section"] == "train"}
    assert set(train) == {"qlora nf4 r8", "lqlora 2.75 r8", "qwha nf3 r8", "peft + bitsandbytes qlora nf4 r8"}
    assert abs(train["qlora nf4 r8"]["first_loss_vs_peft"] - 1) < 1e-2  # bit-compatible NF4, LoRA at zero
    assert [r["name"] for r in rows if r["section"] == "pipeline"] == [
        "decompose lqlora 2.75 r8",
        "train 2 steps",
        "eval 2 windows",
    ]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "| NO |" not in table


def test_unknown_section_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--cpu-smoke", "--sections", "matmul,gpus", "--out", tmp_path],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "gpu_check: unknown sections gpus (of tests, matmul, train, pipeline, costs)"
