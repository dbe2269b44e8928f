"""Running the user-facing `qpeft` commands from the result tools (lqlora_results,
qwha_results, train_results): each command in a child process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_qpeft(*argv: object, nproc: int = 1) -> tuple[str, float]:
    """`qpeft ARGV...`: its stdout and wall seconds; exits with the end of its stderr if
    it fails. `nproc` > 1 runs it under torchrun with one thread per process (a cost
    table split over single-thread processes is 1.5x faster on 2 cores)."""
    command, env = [sys.executable, "-m", "qpeft.cli"], None
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "qpeft.cli"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run([*command, *map(str, argv)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: qpeft {' '.join(map(str, argv))}\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - start


def resume_flag(ckpt: Path) -> list[str]:
    """`--resume` when `qpeft decompose --out CKPT` left an interrupted cost table."""
    return ["--resume"] if Path(f"{ckpt}.work").is_dir() else []
