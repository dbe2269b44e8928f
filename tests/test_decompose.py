"""`qpeft decompose`: checkpoint contents, eval, errors, resume after a kill, two processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qpeft.calibration.activations import load_grams
from qpeft.calibration.cache import calibrate, calibrate_activations
from qpeft.calibration.fisher import load_fisher
from qpeft.io.checkpoint import read_manifest
from qpeft.models.loading import load_checkpoint
from qpeft.models.selection import DEFAULT_TARGETS
from qpeft.quant import dequantize, parse_config, simulate
from tests.conftest import SMALL_GRID, SUBPROCESS_ENV, assert_one_line_error, cli_command, free_port, run


def decompose(capsys, model, out, *extra):
    return run(capsys, "decompose", model, "--out", out, *extra)


def test_decompose_writes_a_checkpoint_that_eval_loads(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "lq"
    code, stdout, err = decompose(
        capsys, tiny_model_dir, out, "--budget", "3bits", "--rank", 4, "--no-fisher", "--rounding", "nearest",
        "--configs", SMALL_GRID,
    )  # fmt: skip
    assert code == 0, err
    assert "q_proj" in stdout and "with the adapter" in stdout
    manifest = read_manifest(out)
    summary = manifest["summary"]
    assert summary["bits_per_param"] <= 3.0 and summary["bits_with_adapter"] > summary["bits_with_lowrank_nf8"]
    assert manifest["settings"]["grid"] == SMALL_GRID.split(",") and manifest["fisher"] is None
    assert (out / "bits_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not Path(f"{out}.work").exists()  # the work directory goes once the checkpoint is written
    # forward = dequant(Q) + L1·L2, the reconstruction the manifest's error describes
    model = load_checkpoint(out)
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    weight = dequantize(layer.quantized) + layer.adapter.delta_weight()
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-4, atol=1e-5)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_submodule(name).weight
    rel = float(torch.linalg.norm(original - weight.detach()) / torch.linalg.norm(original))
    assert rel == pytest.approx(manifest["quantized"][name]["rel_error"], rel=1e-4)
    code, stdout, _ = run(capsys, "eval", out, "--text-file", tiny_text_file, "--seqlen", 64, "--json")
    assert code == 0 and json.loads(stdout.splitlines()[-1])["ppl"] > 1
    # the cost table is reusable: another budget without recomputing it
    code, _, err = decompose(
        capsys,
        tiny_model_dir,
        tmp_path / "lq2",
        "--budget",
        "2.5",
        "--rank",
        4,
        "--no-fisher",
        "--rounding",
        "nearest",
        "--configs",
        SMALL_GRID,
        "--costs",
        out,
    )
    assert code == 0, err
    second = read_manifest(tmp_path / "lq2")
    assert second["summary"]["bits_per_param"] <= 2.5 < summary["bits_per_param"]
    assert second["provenance"]["cost_table_from"] == str(out)


def test_fisher_weighted_ilp_only(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ilp"
    code, stdout, err = decompose(
        capsys,
        tiny_model_dir,
        out,
        "--budget",
        "2.75",
        "--rank",
        0,
        "--configs",
        SMALL_GRID,
        "--calib-sequences",
        2,
        "--calib-seqlen",
        32,
    )
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["fisher"]["sequences"] == 2 and manifest["fisher"]["data"] == "wikitext2:valid"
    entry = next(iter(manifest["quantized"].values()))
    assert entry["rank"] == 0 and entry["adapter"] is None and "weighted_rel_error" in entry and "F-rel err" in stdout
    s = manifest["summary"]
    assert s["bits_per_param"] == s["bits_with_adapter"] <= 2.75
    assert not any(".adapter." in key for key in manifest["weight_map"])


def test_gptq_rounding_lowers_the_output_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The default rounding (gptq) gives Q a lower output error ‖(W − Ŵ)X‖² on the
    calibration inputs than round-to-nearest, with the same configs; the
    rounding is recorded in the manifest, and a cost table is reusable across it."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    calib = ["--calib-sequences", 4, "--calib-seqlen", 32]
    argv = ["--budget", "3", "--rank", 2, "--configs", SMALL_GRID, *calib]
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "gptq", *argv)
    assert code == 0, err
    code, _, err = decompose(
        capsys, tiny_model_dir, tmp_path / "nearest", *argv, "--rounding", "nearest", "--costs", tmp_path / "gptq"
    )
    assert code == 0, err
    gptq, nearest = read_manifest(tmp_path / "gptq"), read_manifest(tmp_path / "nearest")
    assert gptq["settings"]["split"]["rounding"] == "gptq" and gptq["grams"]["sequences"] == 4
    assert nearest["settings"]["split"] == {"rounding": "nearest", "grams": None}
    assert {n: e["config"] for n, e in gptq["quantized"].items()} == {
        n: e["config"] for n, e in nearest["quantized"].items()
    }
    grams = calibrate_activations(tiny_model_dir, DEFAULT_TARGETS, num_sequences=4, seqlen=32)[0]
    errors = {}
    for how in ("gptq", "nearest"):
        model = load_checkpoint(tmp_path / how)
        errors[how] = {}
        for name in gptq["quantized"]:
            layer = model.get_submodule(name)
            with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as handle:
                weight = handle.get_tensor(f"{name}.weight").double()
            delta = weight - (layer.dequantized_weight() + layer.adapter.delta_weight()).double()
            errors[how][name] = float(((delta @ grams.gram(name)) * delta).sum())
    assert sum(errors["gptq"].values()) < 0.8 * sum(errors["nearest"].values())
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "q", "--method", "qwha", "--config", "nf3", "--rank",
                             2, "--rounding", "gptq")  # fmt: skip
    assert_one_line_error(code, err, "--rounding is for --method lqlora only, not qwha")


def test_kfac_costs_price_the_gptq_split_that_is_written(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--cost kfac: the table is priced in the K-FAC measure with GPTQ rounding, so the
    cost of what is written is at most the ILP's objective (the table's prices of the
    configs picked), and the table cannot be reused for another rounding."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    calib = ["--calib-sequences", 4, "--calib-seqlen", 32]
    argv = ["--budget", "3", "--rank", 2, "--configs", SMALL_GRID, *calib]
    code, stdout, err = decompose(capsys, tiny_model_dir, tmp_path / "kfac", *argv, "--cost", "kfac")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "kfac")
    summary = manifest["summary"]
    assert manifest["settings"]["method_settings"]["cost"] == "kfac" and manifest["settings"]["split"] == {}
    assert summary["objective"] <= summary["ilp_objective"] * (1 + 1e-6)
    assert f"cost of the stored split {summary['objective']:.6g}" in stdout
    for entry in manifest["quantized"].values():
        assert entry["cost"] <= entry["table_cost"] * (1 + 1e-6)
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "n", *argv, "--cost", "kfac", "--rounding", "nearest",
                             "--costs", tmp_path / "kfac")  # fmt: skip
    assert_one_line_error(code, err, "was computed with other method_settings")
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "e", *argv, "--cost", "kfac", "--fisher-elementwise")
    assert_one_line_error(code, err, "--fisher-elementwise prices with the diagonal Fisher: drop it, or --cost kfac")


def test_grams_that_cannot_fit_in_memory_stop_before_the_slow_stages(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The bound counts 8·d_in² bytes per selected matrix of a decoder layer, and per
    process; the error names the way out."""
    import qpeft.calibration.activations as activations
    from qpeft.models.selection import select_linear
    from qpeft.models.skeleton import build_skeleton

    skeleton = build_skeleton(tiny_model_dir)
    layer = [n for n in select_linear(skeleton, DEFAULT_TARGETS) if n.startswith("model.layers.0.")]
    bound = sum(8 * skeleton.get_submodule(n).in_features ** 2 for n in layer)
    monkeypatch.setattr(activations, "available_memory", lambda: 2 * bound - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    argv = ["--budget", "3", "--rank", 2, "--configs", SMALL_GRID, "--calib-sequences", 2, "--calib-seqlen", 16]
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", *argv)
    assert_one_line_error(
        code,
        err,
        f"gptq rounding sums the XᵀX of a decoder layer's inputs in memory, up to {2 * bound / 2**30:.1f} GiB "
        "here (2 process(es) × fp64 d_in² per matrix), more than the",
    )
    assert "use --rounding nearest (the paper's rounding, no XᵀX)" in err and not (tmp_path / "cache").exists()
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "q", "--method", "qwha", "--config", "nf3", "--rank", 2)
    assert_one_line_error(code, err, "QWHA's initialisation sums the XᵀX of a decoder layer's inputs in memory")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "b", *argv)
    assert code == 0, err


def test_decompose_errors(tiny_model_dir, tmp_path, capsys):
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", "--budget", "1.5")
    assert_one_line_error(code, err, "budget 1.5 bits/param is infeasible: the configs allow averages from 2.0")
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", "--budget", "lots")
    assert_one_line_error(code, err, "cannot read the budget 'lots': give bits per parameter, e.g. 2.75 or 2.75bits")
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", "--budget", "3", "--rank", -1)
    assert_one_line_error(code, err, "--rank must be 0 or more, got -1")
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", "--budget", "3", "--calib", tmp_path / "no.txt")
    assert_one_line_error(code, err, "is neither a built-in text (wikitext2, python-docs) nor a text file")
    code, _, err = decompose(
        capsys, tiny_model_dir, tmp_path / "a", "--budget", "3", "--rank", 4, "--fisher", tmp_path / "f.st"
    )
    assert_one_line_error(code, err, "Fisher file not found")
    work = tmp_path / "b.work"
    work.mkdir()
    (work / "costs-0.jsonl").write_text('{"name": "x", "shape": [1, 1], "costs": [1.0]}\n')
    code, _, err = decompose(
        capsys, tiny_model_dir, tmp_path / "b", "--budget", "3", "--rank", 4, "--no-fisher", "--rounding", "nearest"
    )
    assert_one_line_error(code, err, "holds an interrupted run (1 matrices costed): pass --resume to continue it")


@pytest.mark.subprocess
def test_resume_after_a_kill_recomputes_nothing_finished(tiny_model_dir, tmp_path, capsys):
    args = ["--budget", "3", "--rank", 4, "--no-fisher", "--rounding", "nearest", "--configs", "lqlora"]
    out = tmp_path / "killed"
    shard = Path(f"{out}.work") / "costs-0.jsonl"
    proc = subprocess.Popen(
        cli_command("decompose", tiny_model_dir, "--out", out, *args),
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.is_file() and len(shard.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(shard.read_text().splitlines())
    assert 3 <= done < 14 and not out.exists()
    code, _, err = decompose(capsys, tiny_model_dir, out, *args)  # without --resume: refused
    assert_one_line_error(code, err, f"holds an interrupted run ({done} matrices costed)")
    code, _, err = decompose(capsys, tiny_model_dir, out, *args[:3], 8, *args[4:], "--resume")
    assert_one_line_error(code, err, "cannot resume from")
    for target, extra in [(out, ["--resume"]), (tmp_path / "whole", [])]:
        result = subprocess.run(
            cli_command("decompose", tiny_model_dir, "--out", target, *args, *extra),
            env=SUBPROCESS_ENV,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    resumed, whole = read_manifest(out), read_manifest(tmp_path / "whole")
    assert resumed["provenance"]["cost_table_resumed_matrices"] == done
    assert whole["provenance"]["cost_table_resumed_matrices"] == 0
    table = json.loads((out / "cost_table.json").read_text())["matrices"]
    assert table == json.loads((tmp_path / "whole" / "cost_table.json").read_text())["matrices"]
    assert {n: e["config"] for n, e in resumed["quantized"].items()} == {
        n: e["config"] for n, e in whole["quantized"].items()
    }


def _torchrun(*argv, env=SUBPROCESS_ENV) -> subprocess.CompletedProcess:
    """`qpeft ARGV` in 2 CPU processes under torchrun."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return subprocess.run(
        [*launch, "-m", "qpeft.cli", *map(str, argv)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.subprocess
def test_two_processes_split_the_cost_table_and_the_split(tiny_model_dir, tmp_path):
    args = ["--budget", "3", "--rank", 4, "--no-fisher", "--rounding", "nearest", "--configs", SMALL_GRID]
    out = tmp_path / "two"
    result = _torchrun("decompose", tiny_model_dir, "--out", out, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(out)
    assert manifest["provenance"]["processes"] == 2
    result = subprocess.run(
        cli_command("decompose", tiny_model_dir, "--out", tmp_path / "one", *args),
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    two = json.loads((out / "cost_table.json").read_text())["matrices"]
    one = json.loads((tmp_path / "one" / "cost_table.json").read_text())["matrices"]
    assert two == one
    # the split is shared too (rank 1 sends its matrices to rank 0): the same checkpoint
    single = read_manifest(tmp_path / "one")
    assert manifest["quantized"] == single["quantized"]
    assert manifest["checksums"]["tensors"] == single["checksums"]["tensors"]


@pytest.mark.subprocess
def test_two_processes_share_the_calibration(tiny_model_dir, tmp_path, monkeypatch):
    """Each process calibrates half of the sequences; the combined Fisher and XᵀX equal
    one process's up to the order of the sums."""
    calib = ["--calib-sequences", 5, "--calib-seqlen", 16]
    env = {**SUBPROCESS_ENV, "QPEFT_CACHE": str(tmp_path / "two")}
    for how in (["--budget", 3, "--configs", SMALL_GRID], ["--method", "qwha", "--config", "nf3"]):
        result = _torchrun(
            "decompose", tiny_model_dir, "--rank", 2, *how, *calib, "--out", tmp_path / str(how[1]), env=env
        )
        assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "one"))
    fisher, _, hit = calibrate(tiny_model_dir, DEFAULT_TARGETS, num_sequences=5, seqlen=16)
    grams, hit_grams = calibrate_activations(tiny_model_dir, DEFAULT_TARGETS, num_sequences=5, seqlen=16)
    assert not hit and not hit_grams
    (fisher_file,) = (tmp_path / "two" / "fisher").glob("*.safetensors")
    shared = load_fisher(fisher_file)
    assert shared.metadata["processes"] == 2 and shared.metadata["sequences"] == 5
    for name in fisher.row_mean:
        torch.testing.assert_close(shared.row_mean[name], fisher.row_mean[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(shared.col_mean[name], fisher.col_mean[name], rtol=1e-5, atol=0)
    (grams_file,) = (tmp_path / "two" / "activations").glob("*.safetensors")
    shared_grams = load_grams(grams_file)
    assert shared_grams.tokens == grams.tokens == 5 * 16 and shared_grams.owner == grams.owner
    for key in grams.grams:
        torch.testing.assert_close(shared_grams.grams[key], grams.grams[key], rtol=1e-9, atol=1e-12)


def test_calibrate_writes_a_file_and_never_overwrites(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "f.safetensors"
    argv = ["calibrate", tiny_model_dir, "--out", out, "--calib-sequences", 2, "--calib-seqlen", 16]
    code, stdout, err = run(capsys, *argv)
    assert code == 0 and out.is_file() and "Fisher row/column means of 14 matrices" in stdout, err
    before = out.read_bytes()
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, f"output file already exists: {out}")
    assert out.read_bytes() == before
    code, _, err = run(capsys, "calibrate", tiny_model_dir, "--out", tmp_path / "f.bin")
    assert_one_line_error(code, err, "--out should name a .safetensors file")


def test_elementwise_fisher_prices_the_table(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--fisher-elementwise: the cost table is priced with the full diagonal (a rank-0
    table then holds exactly Σ F·δ², which the row/column reduction does not give), the
    manifest says so, and the options that cannot go with it are refused."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    fisher_file = tmp_path / "f.safetensors"
    calib = ["--calib-sequences", 2, "--calib-seqlen", 32]
    code, stdout, err = run(capsys, "calibrate", tiny_model_dir, "--out", fisher_file, *calib, "--fisher-elementwise")
    assert code == 0 and "row/column means and full diagonal of 14 matrices" in stdout, err
    out = tmp_path / "ilp"
    argv = ["--budget", "2.75", "--rank", 0, "--configs", SMALL_GRID, *calib]
    code, _, err = decompose(capsys, tiny_model_dir, out, *argv, "--fisher-elementwise")
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["fisher"]["elementwise"] is True
    fisher = load_fisher(fisher_file)
    table = json.loads((out / "cost_table.json").read_text())
    row = table["matrices"][0]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as handle:
        weight = handle.get_tensor(f"{row['name']}.weight").float()
    for config, cost in zip(table["configs"], row["costs"], strict=True):
        direct = float((fisher.element[row["name"]] * (weight - simulate(weight, parse_config(config))).square()).sum())
        assert cost == pytest.approx(direct, rel=1e-4)
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", *argv, "--fisher-elementwise", "--no-fisher")
    assert_one_line_error(code, err, "--fisher-elementwise needs a Fisher: drop --no-fisher")
    code, _, err = decompose(
        capsys, tiny_model_dir, tmp_path / "a", "--method", "qwha", "--config", "nf3", "--fisher-elementwise"
    )
    assert_one_line_error(code, err, "--fisher-elementwise is for --method lqlora only, not qwha")
    plain = tmp_path / "plain.safetensors"
    code, _, err = run(capsys, "calibrate", tiny_model_dir, "--out", plain, *calib)
    assert code == 0, err
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "a", *argv, "--fisher", plain, "--fisher-elementwise")
    assert_one_line_error(code, err, "has no full Fisher diagonal: make it with qpeft calibrate --fisher-elementwise")


def test_inspect_json_gives_the_exact_stored_averages(tiny_model_dir, tmp_path, capsys):
    """bits_q is every matrix's exact Q storage; bits_total adds each adapter tensor's
    bytes as the shards hold them."""
    from safetensors.torch import load_file

    from qpeft.quant import storage_bits

    out = tmp_path / "lq"
    code, _, err = decompose(capsys, tiny_model_dir, out, "--budget", "3.5", "--rank", 3, "--no-fisher",
                             "--rounding", "nearest", "--configs", SMALL_GRID)  # fmt: skip
    assert code == 0, err
    code, stdout, err = run(capsys, "inspect", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    matrices = read_manifest(out)["quantized"]
    numel = sum(m["shape"][0] * m["shape"][1] for m in matrices.values())
    q_bits = sum(storage_bits(parse_config(m["config"]), tuple(m["shape"])) for m in matrices.values())
    tensors = {}
    for shard in out.glob("*.safetensors"):
        tensors |= load_file(shard)
    adapter_bits = sum(8 * t.numel() * t.element_size() for key, t in tensors.items() if ".adapter." in key)
    assert report["bits_q"] == pytest.approx(q_bits / numel, rel=1e-12) and report["bits_q"] <= 3.5
    assert report["bits_total"] == pytest.approx((q_bits + adapter_bits) / numel, rel=1e-12)
    assert report["ranks"] == dict.fromkeys(matrices, 3) and sum(report["configs"].values()) == len(matrices)
    assert report["matrices"] == len(matrices) and report["budget"] == 3.5


def test_total_budget_with_ranks_picks_config_and_rank_jointly(tiny_model_dir, tmp_path, capsys):
    """--total-budget --ranks: one binary per (config, rank) pair; the checkpoint holds
    what the program chose, every matrix's adapter costs the bits the program counted,
    and the total average meets the budget."""
    from qpeft.allocation.cost_table import load_cost_table, storage_bits_table
    from qpeft.allocation.ilp import ilp_allocate
    from qpeft.methods import METHODS

    out = tmp_path / "joint"
    code, stdout, err = decompose(capsys, tiny_model_dir, out, "--total-budget", "4.5", "--ranks", "4,0,2",
                                  "--no-fisher", "--rounding", "nearest", "--configs", SMALL_GRID)  # fmt: skip
    assert code == 0, err
    manifest = read_manifest(out)
    matrices, summary = manifest["quantized"], manifest["summary"]
    assert manifest["settings"]["ranks"] == [0, 2, 4] and summary["total_budget"] == 4.5
    assert summary["budget"] is None
    assert summary["bits_with_adapter"] <= 4.5 and summary["bits_with_adapter"] == pytest.approx(
        summary["ilp_average_bits"], rel=1e-12
    )
    plugin = METHODS["lqlora"]
    for m in matrices.values():
        assert m["adapter_bits"] == plugin.adapter_bits(m["rank"], tuple(m["shape"]))
        assert (m["adapter"] is None) == (m["rank"] == 0)
    # the program solved again from the stored table picks the same pair for each matrix
    grid = [parse_config(c) for c in SMALL_GRID.split(",")]
    table = json.loads((out / "cost_table.json").read_text())
    assert table["ranks"] == [0, 2, 4] and len(table["matrices"][0]["costs"]) == 3 * len(grid)
    names = [row["name"] for row in table["matrices"]]
    shapes = [tuple(row["shape"]) for row in table["matrices"]]
    costs = [row["costs"] for row in table["matrices"]]
    bits = storage_bits_table(grid, shapes, [0, 2, 4], plugin.adapter_bits)
    choice = ilp_allocate(costs, bits, [r * c for r, c in shapes], 4.5).choice
    picked = {n: (grid[k % len(grid)].name, [0, 2, 4][k // len(grid)]) for n, k in zip(names, choice, strict=True)}
    assert picked == {n: (m["config"], m["rank"]) for n, m in matrices.items()}
    assert summary["ilp_objective"] == pytest.approx(sum(m["table_cost"] for m in matrices.values()), rel=1e-9)
    # what was written costs what its matrices' splits cost, at most the table's price
    # (gptq rounding and bf16 factors aside, round-to-nearest here)
    assert summary["objective"] == pytest.approx(sum(m["cost"] for m in matrices.values()), rel=1e-9)
    assert summary["objective"] <= summary["ilp_objective"] * 1.002
    assert f"cost of the stored split {summary['objective']:.6g}" in stdout
    assert len({m["rank"] for m in matrices.values()}) > 1  # this budget makes rank pay in some matrices only
    per_rank = Counter(m["rank"] for m in matrices.values())
    assert "total budget 4.5; matrices per rank " + ", ".join(f"{r}: {per_rank[r]}" for r in sorted(per_rank)) in stdout
    # the heat map has a second panel, the rank of each matrix: twice the width of one panel
    one = SMALL_GRID.split(",")[0]
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "r1", "--config", one, "--rank", "2", "--no-fisher")
    assert code == 0, err
    width = int.from_bytes((out / "bits_heatmap.png").read_bytes()[16:20], "big")
    assert width == 2 * int.from_bytes((tmp_path / "r1" / "bits_heatmap.png").read_bytes()[16:20], "big")
    code, stdout, err = run(capsys, "inspect", out, "--json")
    report = json.loads(stdout)
    assert report["total_budget"] == 4.5 and report["ranks"] == {n: m["rank"] for n, m in matrices.items()}
    assert report["bits_total"] == pytest.approx(summary["bits_with_adapter"], rel=1e-12)
    # the table of a joint run is reusable only by the same ranks
    again = ["--total-budget", "4.5", "--rank", "2", "--no-fisher", "--rounding", "nearest", "--configs", SMALL_GRID]
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "r", *again, "--costs", out)
    assert_one_line_error(code, err, "was computed with other ranks")
    assert load_cost_table(out, _settings_of(manifest)).ranks == [0, 2, 4]


def _settings_of(manifest):
    from qpeft.allocation.cost_table import DecomposeSettings

    keys = ("model", "targets", "grid", "ranks", "method", "method_settings")
    return DecomposeSettings(**{k: manifest["settings"][k] for k in keys})


def test_total_budget_counts_the_adapter_at_one_rank(tiny_model_dir, tmp_path, capsys):
    """--total-budget with one --rank: Q gets what the adapter leaves."""
    args = ["--rank", "4", "--no-fisher", "--rounding", "nearest", "--configs", SMALL_GRID]
    code, _, err = decompose(capsys, tiny_model_dir, tmp_path / "t", "--total-budget", "4.5", *args)
    assert code == 0, err
    summary = read_manifest(tmp_path / "t")["summary"]
    assert summary["bits_with_adapter"] <= 4.5 < summary["bits_with_adapter"] + 0.5
    assert summary["bits_per_param"] < summary["bits_with_adapter"] - 0.5  # rank 4 costs over half a bit here
