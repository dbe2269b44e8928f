"""`qpeft train`: recipes, data, exact resume, the methods' bases, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qpeft.data import dataset_path
from qpeft.data.training import IGNORE, alpaca_examples, alpaca_prompt, collate
from qpeft.errors import QpeftError
from qpeft.io.checkpoint import read_manifest
from qpeft.training import trainer
from qpeft.training.recipe import load_recipe
from tests.conftest import SUBPROCESS_ENV, assert_one_line_error, free_port, make_tokenizer, run


@pytest.fixture(scope="module")
def train_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "train.txt"
    path.write_text(dataset_path("wikitext2", "valid").read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


def write_recipe(path: Path, model: Path, text: Path, out: Path, **sections) -> Path:
    body = {
        "model": str(model),
        "method": {"name": "qlora", "rank": 4},
        "data": {"train": str(text), "eval": str(text), "seqlen": 32, "eval_max_windows": 4},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "dtype": "fp32", "save_every": 2, "schedule": "cosine"},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(body))
    return path


def _final_adapters(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "state" / "trainable.safetensors"))


def test_resume_continues_exactly(tiny_model_dir, train_text, tmp_path, monkeypatch):
    """4 steps straight, and 2 steps + a crash + --resume + 2 steps, end with the
    same adapter weights, optimizer step count and loss log."""
    straight = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_model_dir, train_text, tmp_path / "a"))
    trainer.train(straight, progress=False)

    broken = load_recipe(write_recipe(tmp_path / "b.yaml", tiny_model_dir, train_text, tmp_path / "b"))
    real_save = trainer.save_state

    def save_then_crash(out, model, optimizer, scheduler, progress):
        real_save(out, model, optimizer, scheduler, progress)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(trainer, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(broken, progress=False)
    monkeypatch.setattr(trainer, "save_state", real_save)
    assert json.loads((tmp_path / "b" / "state" / "progress.json").read_text())["step"] == 2
    with pytest.raises(QpeftError, match="holds a training run: pass --resume"):
        trainer.train(broken, progress=False)
    trainer.train(broken, resume=True, progress=False)

    a, b = _final_adapters(tmp_path / "a"), _final_adapters(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 2 * 14  # L1 and L2 of the 14 matrices
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    curves = [[(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r] for rows in losses]
    assert curves[0] == curves[1] and len(curves[0]) == 4
    assert (tmp_path / "a" / "loss.png").is_file() and list((tmp_path / "a" / "tensorboard").iterdir())


def test_training_lowers_the_loss_on_its_data(tiny_model_dir, train_text, tmp_path, capsys):
    """QLoRA on the tiny random model: 20 steps on a text lower its perplexity on that
    text (the adapters alone learn: the base is frozen)."""
    train = {"steps": 20, "lr": 3e-2, "schedule": "constant", "save_every": None}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_text, tmp_path / "q", train=train))
    state = trainer.train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "q" / "log.jsonl").read_text().splitlines()]
    evals = [r["eval_ppl"] for r in rows if "eval_ppl" in r]
    assert evals[0] == rows[0]["eval_ppl"] and len(evals) == 2
    assert evals[-1] < 0.95 * evals[0], evals
    assert state["step"] == 20 and state["tokens"] == 20 * 2 * 32
    assert (tmp_path / "q" / "base" / "qpeft_manifest.json").is_file()
    # the trained model is a checkpoint that eval loads, with the final perplexity
    manifest = read_manifest(tmp_path / "q" / "model")
    entry = next(iter(manifest["quantized"].values()))
    assert entry["adapter"] == {"kind": "lowrank", "rank": 4, "scale": 2.0} and manifest["training"]["step"] == 20
    code, stdout, err = run(
        capsys,
        "eval",
        tmp_path / "q" / "model",
        "--text-file",
        train_text,
        "--seqlen",
        32,
        "--max-windows",
        4,
        "--json",
    )
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(evals[-1], rel=2e-2)


def test_alpaca_examples_mask_the_prompt(tmp_path):
    tokenizer = make_tokenizer()
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    examples = alpaca_examples(tokenizer, str(path), seqlen=256)
    assert len(examples) == 2
    for record, example in zip(records, examples, strict=True):
        prompt = tokenizer(alpaca_prompt(record["instruction"], record["input"]), add_special_tokens=False).input_ids
        answer = [*tokenizer(record["output"], add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        targets = example.labels[example.labels != IGNORE].tolist()
        assert targets == answer and example.input_ids[-len(answer) :].tolist() == answer
        assert (example.labels[: len(prompt)] == IGNORE).all()
    assert "### Input:\n2 and 3" in alpaca_prompt("x", "2 and 3") and "### Input" not in alpaca_prompt("x")
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = int(batch["attention_mask"][0].sum()) if len(examples[0].input_ids) < len(examples[1].input_ids) else None
    if short is not None:
        assert (batch["labels"][0, short:] == IGNORE).all()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"instruction": "a"}\n', "records need instruction and output fields, missing ['output']"),
        ("not json at all\n", "cannot read"),
        ("", "is empty"),
    ],
)
def test_bad_alpaca_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(QpeftError, match=message.replace("[", r"\[").replace("]", r"\]")):
        alpaca_examples(make_tokenizer(), str(path), 64)


def test_train_cli_errors(tiny_model_dir, train_text, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_text, tmp_path / "o")
    code, _, err = run(capsys, "train", recipe, "--set", "train.lrr=1")
    assert_one_line_error(code, err, "unknown recipe key train.lrr (known: steps, epochs,")
    code, _, err = run(capsys, "train", recipe, "--set", "train.lr=fast")
    assert_one_line_error(code, err, "recipe key train.lr: expected float, got 'fast'")
    code, _, err = run(capsys, "train", recipe, "--set", "data.train=" + str(tmp_path / "none.txt"))
    assert_one_line_error(code, err, "data file not found:")
    code, _, err = run(capsys, "train", tmp_path / "missing.yaml")
    assert_one_line_error(code, err, "cannot read the recipe")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    code, _, err = run(capsys, "train", tmp_path / "bad.yaml")
    assert_one_line_error(code, err, "is not valid YAML")
    code, _, err = run(capsys, "train", recipe, "--resume")
    assert_one_line_error(code, err, "holds no qpeft training run")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run(capsys, "train", recipe, "--set", f"data.train={empty}")
    assert_one_line_error(code, err, "is empty")


def test_shipped_recipes_are_valid():
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    names = {p.stem for p in recipes}
    assert {"llama2-7b-lqlora-2.75bit", "llama2-70b-lqlora-2.75bit", "llama3-8b-qwha-3bit"} <= names
    assert {"mistral-7b-qlora-nf4", "smollm2-qlora-nf4", "smollm2-lqlora-2.75bit", "smollm2-qwha-3bit"} <= names
    for path in recipes:
        load_recipe(path)


def _accelerate_train(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    # accelerate's --cpu launches one process whatever --num_processes says; --multi_gpu on a
    # machine without GPUs starts 2 processes over gloo (accelerate's MULTI_CPU)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", str(free_port()), "-m", "qpeft.cli", "train", str(recipe), *extra]
    env = SUBPROCESS_ENV
    return subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.subprocess
def test_two_cpu_processes_train_and_resume(tiny_model_dir, train_text, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPUs: each process takes its own share of
    every step's batch; 2 steps, then --resume to 4, equal 4 steps straight (DDP's
    averaged gradients on both sides)."""
    train = {"schedule": "constant", "save_every": 1}
    straight = write_recipe(tmp_path / "a.yaml", tiny_model_dir, train_text, tmp_path / "a", train=train)
    result = _accelerate_train(straight)
    assert result.returncode == 0, result.stderr[-3000:]
    halves = write_recipe(tmp_path / "b.yaml", tiny_model_dir, train_text, tmp_path / "b", train=train)
    result = _accelerate_train(halves, "--set", "train.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "state" / "progress.json").read_text())["step"] == 2
    result = _accelerate_train(halves, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _final_adapters(tmp_path / "a"), _final_adapters(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    progress = json.loads((tmp_path / "a" / "state" / "progress.json").read_text())
    assert progress["step"] == 4 and progress["tokens"] == 4 * 2 * 2 * 32  # 2 processes × batch 2 × 32 tokens


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_fsdp_config_on_cpus_trains_as_ddp_and_says_so(tiny_model_dir, train_text, tmp_path):
    """recipes/accelerate/fsdp.yaml on a machine without GPUs: accelerate runs its processes as
    DDP over gloo (FSDP is GPU-only there); they train together, and qpeft says so."""
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
    text = config.read_text().replace("num_processes: 8", "num_processes: 2").replace("bf16", "'no'")
    (tmp_path / "fsdp.yaml").write_text(text)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_text, tmp_path / "o", train={"steps": 2})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml")]
    launch += ["--main_process_port", str(free_port()), "-m", "qpeft.cli", "train", str(recipe)]
    env = SUBPROCESS_ENV
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: FSDP needs GPUs; these 2 CPU processes train as DDP" in result.stderr
    progress = json.loads((tmp_path / "o" / "state" / "progress.json").read_text())
    assert progress["tokens"] == 2 * 2 * 2 * 32  # both processes' tokens: one job, not two


def test_a_base_made_by_another_recipe_is_not_reused(tiny_model_dir, train_text, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_text, tmp_path / "o", train={"steps": 1})
    code, _, err = run(capsys, "train", recipe)
    assert code == 0, err
    before = (tmp_path / "o" / "base" / "qpeft_manifest.json").read_bytes()
    code, _, err = run(capsys, "train", recipe, "--resume", "--set", "method.config=nf3", "--set", "train.steps=2")
    assert_one_line_error(code, err, "was made by another recipe (qpeft quantize")
    assert (tmp_path / "o" / "base" / "qpeft_manifest.json").read_bytes() == before


def test_a_joint_rank_base_trains_each_matrix_at_its_own_rank(tiny_model_dir, train_text, tmp_path):
    """method.total_budget with method.ranks: the base's ILP gives matrices different
    ranks (0: no adapter); training updates each adapter at its rank and leaves the
    rank-0 matrices without one."""
    method = {"name": "lqlora", "total_budget": 4.5, "ranks": "0,2,4", "fisher": False}
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_text, tmp_path / "j", method=method,
                        train={"steps": 2, "save_every": None})  # fmt: skip
    body = yaml.safe_load(path.read_text())
    del body["method"]["rank"]
    path.write_text(yaml.safe_dump(body))
    trainer.train(load_recipe(path), progress=False)
    base = read_manifest(tmp_path / "j" / "base")
    assert base["summary"]["bits_with_adapter"] <= 4.5
    ranks = {name: m["rank"] for name, m in base["quantized"].items()}
    assert len(set(ranks.values())) > 1, ranks
    trained = read_manifest(tmp_path / "j" / "model")["quantized"]
    for name, rank in ranks.items():
        assert trained[name].get("rank", 0) == rank and (trained[name]["adapter"] is None) == (rank == 0)
    before = {}
    for shard in (tmp_path / "j" / "base").glob("*.safetensors"):
        before |= {k: v for k, v in load_file(shard).items() if ".adapter." in k}
    after = _final_adapters(tmp_path / "j")
    assert set(after) == set(before) and {k.split(".adapter.")[0] for k in before} == {n for n, r in ranks.items() if r}
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before), "training changed no adapter"
