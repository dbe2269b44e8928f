"""Atomic directory writes: build in a sibling temp dir, rename into place at the end.

A crash (or Ctrl-C) leaves at most a ``NAME.partial-*`` directory, never a
directory at NAME that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qpeft.errors import QpeftError


def ensure_absent(target: Path) -> None:
    """Refuse to write over anything the user already has."""
    if Path(target).exists():
        raise QpeftError(f"output directory already exists: {target}")


def check_writable(target: Path) -> None:
    """Error (before any slow work) unless a file can be made where `target` goes:
    its nearest existing ancestor must take a new entry. The probe is a temporary
    directory made and removed at once, so the check holds for read-only or
    special file systems and for root alike (access(2) would say yes to root)."""
    target = Path(target)
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.rmdir(tempfile.mkdtemp(prefix=".qpeft-probe-", dir=ancestor))
    except OSError as exc:
        raise QpeftError(f"cannot write {target}: {ancestor} does not take new files ({exc.strerror})") from exc


def check_output(target: Path) -> None:
    """An output that must not exist yet and must be writable (checked up front)."""
    ensure_absent(target)
    check_writable(target)


# a write that fails for want of room or rights: the user's to fix, named in one line
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def disk_error(exc: BaseException) -> str | None:
    """The reason (strerror) when `exc` is a write refused by a full or read-only disk:
    an OSError, or safetensors' own error type, which carries the OS error code in its
    text (`I/O error: No space left on device (os error 28)`)."""
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code in _DISK_ERRNOS else None


def remove_partials(target: Path) -> None:
    """Remove the `NAME.partial-*` directories a killed write of `target` left (call it
    only where no other process is writing `target`: on --resume)."""
    target = Path(target)
    for path in target.parent.glob(f"{target.name}.partial-*"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a sibling `NAME.partial-*` directory that becomes `target` once the block
    finishes; on any error it is removed, and a full or read-only disk becomes a
    one-line QpeftError naming `target`."""
    target = Path(target)
    ensure_absent(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if reason := disk_error(exc):
            raise QpeftError(f"cannot write {target}: {reason}") from exc
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
    except BaseException as exc:
        Path(name).unlink(missing_ok=True)
        if reason := disk_error(exc):
            raise QpeftError(f"cannot write {target}: {reason}") from exc
        raise
