"""Calibration and evaluation text shipped with qpeft: WikiText-2 (CC BY-SA 3.0) and
prose of the Python documentation (PSF License), each in its folder with its licence.

Every built-in text has a split for calibration and fine-tuning and a disjoint one for
evaluation (`calib_split`, "test"), so that no command evaluates on what it saw."""

from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BuiltinText:
    folder: str
    calib_split: str  # the split that calibration and training read


DATASETS = {
    "wikitext2": BuiltinText("wikitext-2", "valid"),
    "python-docs": BuiltinText("python-docs", "calib"),
}
BUILTIN_NAMES = ", ".join(DATASETS)  # for help texts and errors


def dataset_path(name: str, split: str) -> Path:
    """Path of a built-in text split, e.g. ("wikitext2", "test")."""
    return DATA_DIR / DATASETS[name].folder / f"{split}.txt"


def calibration_path(name: str) -> tuple[Path, str]:
    """The calibration (and fine-tuning) split of a built-in text and its label, e.g.
    (…/valid.txt, "wikitext2:valid")."""
    split = DATASETS[name].calib_split
    return dataset_path(name, split), f"{name}:{split}"
