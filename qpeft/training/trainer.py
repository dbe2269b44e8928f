"""`qpeft train RECIPE.yaml`: fine-tune the adapters of a packed low-bit model.

Built on accelerate: one process, `accelerate launch` (DDP over GPUs or CPU
processes) alike. Every `train.save_every` steps (and at the end) the trainable
tensors, the optimizer, the scheduler, the RNG states and the data position are
written atomically to OUTPUT_DIR/state; `--resume` continues from there, and the
run's parameters then equal those of an uninterrupted run (the data order is a
function of the seed and the epoch). Logs: OUTPUT_DIR/log.jsonl, TensorBoard under
OUTPUT_DIR/tensorboard, a tqdm bar with the loss and tokens/s, and loss.png. At the
end the trained model is written as a qpeft checkpoint, OUTPUT_DIR/model, which
`qpeft eval` loads.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qpeft.data.training import collate, load_examples, load_text
from qpeft.errors import QpeftError
from qpeft.io.atomic import atomic_directory, atomic_file
from qpeft.io.checkpoint import is_checkpoint
from qpeft.io.trained import save_trained
from qpeft.training.model import (
    BASE_DIR,
    add_lora,
    base_dir,
    build_base,
    check_base_matches,
    check_method_inputs,
    freeze_all_but_adapters,
    trainable_state,
)
from qpeft.training.recipe import DECOMPOSITIONS, Recipe

STATE_DIR = "state"
MODEL_DIR = "model"  # the trained model as a qpeft checkpoint
LOG_NAME = "log.jsonl"
RECIPE_NAME = "recipe.json"  # the recipe of the run that made OUTPUT_DIR
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    kinds = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
    }
    return kinds[t.optimizer](params, lr=t.lr, weight_decay=t.weight_decay)


def _scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total: int):
    from transformers import get_scheduler

    warmup = recipe.train.warmup
    warmup_steps = round(warmup * total) if warmup < 1 else int(warmup)
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[recipe.train.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total)


def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of the seed and the epoch
    alone, so a resumed run sees the batches an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_state(out: Path, model, optimizer, scheduler, progress: dict[str, Any]) -> None:
    """Write OUTPUT_DIR/state atomically (a new one replaces the old at the end)."""
    from safetensors.torch import save_file

    target = out / STATE_DIR
    staged = out / f"{STATE_DIR}.new"
    shutil.rmtree(staged, ignore_errors=True)
    with atomic_directory(staged) as tmp:
        save_file(
            {k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, str(tmp / "trainable.safetensors")
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "optimizer.pt",
        )
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
    old = out / f"{STATE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path, model, optimizer, scheduler) -> dict[str, Any]:
    from safetensors.torch import load_file

    target = out / STATE_DIR
    if not (target / "progress.json").is_file() and (out / f"{STATE_DIR}.old" / "progress.json").is_file():
        target = out / f"{STATE_DIR}.old"  # a crash between the two renames of save_state
    if not (target / "progress.json").is_file():
        raise QpeftError(f"--resume: {out} has no saved training state")
    tensors = load_file(str(target / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(trainable_state(model)) - set(tensors))
    if missing:
        raise QpeftError(f"--resume: the saved state lacks {missing[0]} (was the recipe changed?)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    saved = torch.load(target / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return json.loads((target / "progress.json").read_text())


def plot_losses(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_ppl"]) for r in rows if "eval_ppl" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    handles = ax.get_lines()
    if evals:
        twin = ax.twinx()
        twin.plot(*zip(*evals, strict=True), "o-", label="eval perplexity", color="tab:orange")
        twin.set_ylabel("eval perplexity")
        handles = [*handles, *twin.get_lines()]
    ax.set_title(f"{out.parent.name}: training")
    ax.legend(handles, [h.get_label() for h in handles], loc="best")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _evaluate(model, eval_ids: torch.Tensor, recipe: Recipe, device: torch.device) -> float:
    from qpeft.eval.perplexity import perplexity

    was_training = model.training
    result = perplexity(model, eval_ids, recipe.data.seqlen, recipe.data.eval_max_windows, device, progress=False)
    model.train(was_training)
    return result.ppl


def has_run(out: Path) -> bool:
    """Whether `out` holds a qpeft training run (its recipe.json, written first)."""
    return (Path(out) / RECIPE_NAME).is_file()


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """What `train` may do with OUTPUT_DIR, decided before anything is written: a new
    or empty directory is used; a run's own directory only with --resume (or
    --overwrite); anything else (a user's files) only with --overwrite."""
    from qpeft.io.atomic import check_writable

    if out.exists() and not out.is_dir():
        raise QpeftError(f"output_dir {out} is a file, not a directory")
    if has_run(out):
        if not (resume or overwrite):
            raise QpeftError(
                f"{out} holds a training run: pass --resume to continue it, --overwrite to start over, "
                "or choose another output_dir"
            )
    elif resume:
        raise QpeftError(f"--resume: {out} holds no qpeft training run")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise QpeftError(
            f"output_dir {out} is not empty and holds no qpeft training run: choose another output_dir, "
            "or pass --overwrite to replace what it holds"
        )
    check_writable(out / RECIPE_NAME if out.exists() else out)


def _examples_and_eval(recipe: Recipe, tokenizer) -> tuple[list, torch.Tensor | None]:
    from qpeft.eval.perplexity import tokenize

    examples = load_examples(tokenizer, recipe.data.train, recipe.data.format, recipe.data.seqlen)
    eval_ids = None
    if recipe.data.eval is not None:
        eval_ids = tokenize(tokenizer, load_text(recipe.data.eval, "test"))
    return examples, eval_ids


def train(recipe: Recipe, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run the recipe; returns the final progress record (step, losses, eval ppl).

    Everything that can be checked is checked before any slow or irreversible step:
    OUTPUT_DIR (`check_output_dir`), the model, the data (read and tokenized), the
    rank against every selected matrix, and a base left by an earlier run against
    this recipe. Only then is recipe.json written (it marks the run) and the base
    made."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import AutoTokenizer

    from qpeft.io.atomic import remove_partials
    from qpeft.models.loading import load_checkpoint

    out = Path(recipe.output_dir)
    check_output_dir(out, resume, overwrite)
    has_state = (out / STATE_DIR).exists() or (out / f"{STATE_DIR}.old").exists()
    resumed = resume and has_state  # a run stopped before its first save starts at step 0
    base = base_dir(recipe)
    tokenizer = AutoTokenizer.from_pretrained(check_method_inputs(recipe))
    examples, eval_ids = _examples_and_eval(recipe, tokenizer)
    if resume:
        check_base_matches(recipe, out / RECIPE_NAME)
    t = recipe.train
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=MIXED_PRECISION[t.dtype],
        cpu=not torch.cuda.is_available(),
    )
    set_seed(recipe.seed)
    main = accelerator.is_main_process
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if main and fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate turns FSDP on for GPUs only; on CPUs its processes run DDP
        print(
            f"note: FSDP needs GPUs; these {accelerator.num_processes} CPU processes train as DDP "
            "(every process holds the whole model)",
            file=sys.stderr,
        )
    accelerator.wait_for_everyone()  # every process has checked OUTPUT_DIR before it changes
    if main:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for stale in (MODEL_DIR, f"{STATE_DIR}.new", BASE_DIR):
            remove_partials(out / stale)  # what a killed write left
        if not resumed:  # a run with no saved state starts over: its recipe is this one
            with atomic_file(out / RECIPE_NAME) as tmp:
                tmp.write_text(json.dumps(recipe.as_dict(), indent=1))
    accelerator.wait_for_everyone()
    if not is_checkpoint(base):
        decomposition = recipe.method.name in DECOMPOSITIONS
        if main or (decomposition and accelerator.num_processes > 1):
            build_base(recipe, resume)
    accelerator.wait_for_everyone()

    device = accelerator.device
    model = load_checkpoint(base, torch.float32, "cpu" if device.type == "cpu" else str(device))  # not "cpu:0"
    if recipe.method.name == "qlora":
        alpha = recipe.method.alpha if recipe.method.alpha is not None else 2.0 * recipe.method.rank
        add_lora(model, recipe.method.rank, alpha, recipe.seed)
        model.to(accelerator.device)
    params = freeze_all_but_adapters(model)
    model.train()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    world = accelerator.num_processes
    batches_per_epoch = len(examples) // (t.batch_size * world)
    if batches_per_epoch == 0:
        raise QpeftError(
            f"data {recipe.data.train}: {len(examples)} examples, fewer than one batch of {t.batch_size} × {world}"
        )
    total = t.steps or max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))
    optimizer = _optimizer(recipe, params)
    scheduler = _scheduler(recipe, optimizer, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaces the Parameter objects
    state = {"step": 0, "micro": 0, "tokens": 0, "seconds": 0.0}
    if resumed:
        state = load_state(out, accelerator.unwrap_model(model), optimizer, scheduler)
    log = out / LOG_NAME
    tracker = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        tracker = SummaryWriter(str(out / "tensorboard"))
        if not resumed:
            log.write_text("")

    def record(row: dict[str, Any]) -> None:
        if not main:
            return
        with log.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                tracker.add_scalar(key, value, row["step"])

    if main and eval_ids is not None and state["step"] == 0 and not resumed:
        record(
            {"step": 0, "eval_ppl": _evaluate(accelerator.unwrap_model(model), eval_ids, recipe, accelerator.device)}
        )

    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", disable=not (progress and main))
    started, window_loss, window_micro = time.perf_counter() - state["seconds"], 0.0, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    try:
        while state["step"] < total:
            epoch, position = divmod(state["micro"], batches_per_epoch)
            order = _epoch_order(len(examples), recipe.seed, epoch)
            start = (position * world + accelerator.process_index) * t.batch_size
            indices = order[start : start + t.batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            state["micro"] += 1
            state["tokens"] += int(accelerator.reduce(batch["attention_mask"].sum(), "sum"))  # every process's
            window_loss += float(loss.detach())
            window_micro += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            state["seconds"] = time.perf_counter() - started
            bar.update()
            step = state["step"]
            if step % t.log_every == 0 or step == total:
                mean_loss = float(
                    accelerator.reduce(torch.tensor(window_loss / window_micro, device=accelerator.device), "mean")
                )
                tokens_per_s = state["tokens"] / max(state["seconds"], 1e-9)
                lr = scheduler.get_last_lr()[0]
                record({"step": step, "loss": mean_loss, "lr": lr, "tokens_per_s": tokens_per_s})
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                window_loss, window_micro = 0.0, 0
            if eval_ids is not None and main and (step == total or (t.eval_every and step % t.eval_every == 0)):
                ppl = _evaluate(accelerator.unwrap_model(model), eval_ids, recipe, accelerator.device)
                state["eval_ppl"] = ppl
                record({"step": step, "eval_ppl": ppl})
            if step == total or (t.save_every and step % t.save_every == 0):
                accelerator.wait_for_everyone()
                if main:
                    save_state(out, accelerator.unwrap_model(model), optimizer, scheduler, state)
                accelerator.wait_for_everyone()
    finally:
        bar.close()  # before any error line, so that it stands last
    if main:
        tracker.close()
        plot_losses(log, out / "loss.png")
        final = out / MODEL_DIR
        shutil.rmtree(final, ignore_errors=True)  # a resumed run that had already finished writes it again
        training = {"recipe": recipe.as_dict(), **{k: state[k] for k in state if k != "main"}}
        save_trained(accelerator.unwrap_model(model), base, final, training)
    return {**state, "main": main}
