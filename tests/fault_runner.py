"""Run `qpeft ARGS` with a fault injected: the process sends itself SIGNAL on the
N-th call of a function (SIGKILL: dies at once; SIGINT: Ctrl-C), or that call
raises OSError(ENOSPC) (a full disk).

    python tests/fault_runner.py MODULE:QUALNAME:N KILL|INT|ENOSPC qpeft-args...

The function is replaced where MODULE looks it up, so the fault lands at that stage
of the real code path; nothing in qpeft knows about it.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import signal
import sys


def inject(target: str, fault: str) -> None:
    module_name, qualname, nth = target.split(":")
    module = importlib.import_module(module_name)
    *owners, attr = qualname.split(".")
    owner = module
    for name in owners:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = {"n": 0}

    @functools.wraps(original)
    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth):
            if fault == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "injected")
            signal.raise_signal(getattr(signal, f"SIG{fault}"))  # SIGINT: KeyboardInterrupt from here
        return original(*args, **kwargs)

    setattr(owner, attr, faulty)


if __name__ == "__main__":
    if sys.argv[2] == "INT":  # a shell's background job starts with SIGINT ignored; Ctrl-C needs Python's handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
    inject(sys.argv[1], sys.argv[2])
    from qpeft.cli import main

    sys.exit(main(sys.argv[3:]))
