"""Atomic directory writes: build in a sibling temp dir, rename into place at the end.

A crash (or Ctrl-C) leaves at most a ``NAME.partial-*`` directory, never a
directory at NAME that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qpeft.errors import QpeftError


def ensure_absent(target: Path) -> None:
    """Refuse to write over anything the user already has."""
    if Path(target).exists():
        raise QpeftError(f"output directory already exists: {target}")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    target = Path(target)
    ensure_absent(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only once the
    block finishes, so a crash never leaves a half-written file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    try:
        yield Path(name)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
