"""Training data from local files, read through `datasets`.

* text (`.txt`, or a built-in text's calibration split: `wikitext2`, `python-docs`): tokenized whole and
  packed into non-overlapping blocks of `seqlen` tokens; every token is a target.
* alpaca (`.json` list or `.jsonl`, records with instruction / input / output): the
  Alpaca prompt, then the output and EOS; only the output tokens (and EOS) are
  targets, the prompt is masked (-100). Sequences are cut at `seqlen` and padded in
  the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qpeft.data import DATASETS, calibration_path, dataset_path
from qpeft.errors import QpeftError

IGNORE = -100  # label of a token that is not a target (torch's cross-entropy ignore_index)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca template (Taori et al. 2023), with or without an input."""
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if input_text else "",
        instruction=instruction,
        input_block=f"### Input:\n{input_text}\n\n" if input_text else "",
    )


@dataclass
class Example:
    input_ids: torch.Tensor  # (length,)
    labels: torch.Tensor  # (length,), IGNORE where not a target


def data_format(source: str, declared: str | None) -> str:
    if declared is not None:
        return declared
    if source in DATASETS or source.endswith(".txt"):
        return "text"
    if source.endswith((".json", ".jsonl")):
        return "alpaca"
    raise QpeftError(f"data {source!r}: say data.format (text or alpaca); the file name does not tell")


def _local_file(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise QpeftError(f"data file not found: {source}")
    return path


def quiet_datasets() -> None:
    """No "Generating train split" bar from `datasets` for each file it reads: the run
    has its own bars, and a local file is read in well under a second."""
    import datasets

    datasets.disable_progress_bars()


def check_data_file(source: str, text: bool) -> None:
    """One-line errors for a data file that is missing, empty, not UTF-8, or (`text`)
    binary, before `datasets` sees it (its errors on these are tracebacks)."""
    path = _local_file(source)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QpeftError(f"data file {source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise QpeftError(f"cannot read data file {source}: {exc.strerror}") from exc
    if not content.strip():
        raise QpeftError(f"data file {source} is empty")
    if text and "\x00" in content:
        raise QpeftError(f"data file {source} holds NUL bytes: it is not a text file")


def load_text(source: str, split: str = "calib") -> str:
    """A text file's contents via `datasets`, or a built-in text's calibration
    ("calib": training data) or "test" split."""
    if source in DATASETS:
        path = calibration_path(source)[0] if split == "calib" else dataset_path(source, split)
    else:
        check_data_file(source, text=True)
        path = Path(source)
    from datasets import load_dataset

    quiet_datasets()
    lines = load_dataset("text", data_files=str(path), split="train", keep_linebreaks=True)["text"]
    return "".join(lines)


def text_blocks(tokenizer, text: str, seqlen: int, source: str) -> list[Example]:
    """Non-overlapping blocks of `seqlen` tokens; the remainder is dropped."""
    from qpeft.eval.perplexity import tokenize

    ids = tokenize(tokenizer, text)
    count = ids.numel() // seqlen
    if count == 0:
        raise QpeftError(f"data {source} has {ids.numel()} tokens, fewer than one block of {seqlen}")
    blocks = ids[: count * seqlen].view(count, seqlen)
    return [Example(b.clone(), b.clone()) for b in blocks]


def alpaca_examples(tokenizer, source: str, seqlen: int) -> list[Example]:
    from datasets import load_dataset

    check_data_file(source, text=False)
    path = Path(source)
    quiet_datasets()
    try:
        records = load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises several types for unreadable JSON
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QpeftError(f"cannot read {source} as JSON records: {reason}") from exc
    if len(records) == 0:
        raise QpeftError(f"data file {source} has no records")
    missing = {"instruction", "output"} - set(records.column_names)
    if missing:
        raise QpeftError(f"data file {source}: records need instruction and output fields, missing {sorted(missing)}")
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for index, record in enumerate(records):
        instruction, output = record["instruction"], record["output"]
        input_text = record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(input_text, str):
            raise QpeftError(f"data file {source}, record {index}: instruction, input and output must be text")
        prompt = tokenizer(alpaca_prompt(instruction, input_text), add_special_tokens=False).input_ids
        answer = tokenizer(output, add_special_tokens=False).input_ids + eos
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = (bos + prompt + answer)[:seqlen]
        labels = ([IGNORE] * (len(bos) + len(prompt)) + answer)[:seqlen]
        if all(label == IGNORE for label in labels[1:]):
            continue  # the prompt fills the whole sequence: nothing to learn from it
        examples.append(Example(torch.tensor(ids), torch.tensor(labels)))
    if not examples:
        raise QpeftError(f"data file {source}: every record's prompt is longer than seqlen {seqlen}")
    return examples


def load_examples(tokenizer, source: str, declared_format: str | None, seqlen: int) -> list[Example]:
    """The training examples of a recipe's data.train."""
    if data_format(source, declared_format) == "text":
        return text_blocks(tokenizer, load_text(source), seqlen, source)
    return alpaca_examples(tokenizer, source, seqlen)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    length = max(e.input_ids.numel() for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = example.input_ids.numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = example.input_ids, example.labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
