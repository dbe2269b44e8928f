"""Calibration and evaluation text shipped with qpeft (WikiText-2, CC BY-SA 3.0)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent

DATASETS = {
    "wikitext2": {"test": DATA_DIR / "wikitext-2" / "test.txt", "valid": DATA_DIR / "wikitext-2" / "valid.txt"},
}


def dataset_path(name: str, split: str) -> Path:
    """Path of a built-in text split, e.g. ("wikitext2", "test")."""
    return DATASETS[name][split]
