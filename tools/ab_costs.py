"""Cost-table A/B: this checkout's `matrix_costs` against a git revision's, interleaved.

The LQ-LoRA cost table of every 5th layer's matrices of the embedded SmolLM2 (Fisher
row/column weights from the default calibration, cached; the full grid; rank 8) is
computed by two worker processes, one importing qpeft from this checkout and one
from a worktree of REV. They take each matrix in turn, in alternating order, one
thread each, so a drift in the machine's speed (on shared VMs it is large: the same
code ran 0.8-1.3x as long an hour apart) falls on both alike. Prints each side's total
time and their ratio, and the optimal allocation's total cost on each table at
several budgets: every cost in either table is that of a valid decomposition, so
the ratio of the optima is what the change gives up (above 1) or gains.

    OMP_NUM_THREADS=1 python tools/ab_costs.py HEAD~1
    OMP_NUM_THREADS=1 python tools/ab_costs.py HEAD~1 --layers 0,10,20   # one half
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# Runs in each worker, with the worker's qpeft first on sys.path: reads a matrix
# name per line, answers with the seconds its cost table took and the costs.
WORKER = """
import json, sys, time, torch
try:
    from qpeft.methods.lqlora import matrix_costs
except ImportError:  # a revision from before the methods registry
    from qpeft.allocation.costs import matrix_costs
from qpeft.quant import parse_grid
from qpeft.models.resolve import resolve_model
from qpeft.models.selection import DEFAULT_TARGETS
from qpeft.models.weights import SafetensorsWeights
from qpeft.calibration.cache import calibrate
torch.set_num_threads(1)
model_dir = resolve_model(None)
fisher = calibrate(model_dir, DEFAULT_TARGETS)[0]
grid = parse_grid("lqlora")
weights = {k[: -len(".weight")]: t for k, t in SafetensorsWeights(model_dir).items() if k.endswith(".weight")}
print(json.dumps({n: weights[n].numel() for n in sorted(set(weights) & set(fisher.row_mean))}), flush=True)
for line in sys.stdin:
    name = line.strip()
    row, col = fisher.weights(name)
    start = time.perf_counter()
    costs = matrix_costs(weights[name].float(), grid, RANK, row, col)
    print(json.dumps({"seconds": time.perf_counter() - start, "costs": costs.tolist()}), flush=True)
"""


def start_worker(source: Path, rank: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    code = WORKER.replace("RANK", str(rank))
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=source, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def ask(worker: subprocess.Popen, name: str) -> dict:
    worker.stdin.write(name + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise SystemExit(f"a worker stopped on {name}")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--layers", default="0,5,10,15,20,25", help="decoder layers whose matrices to price")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--budgets", default="2.5,2.75,3.25,3.5,4.5,6")
    args = parser.parse_args()

    from qpeft.allocation.cost_table import storage_bits_table
    from qpeft.allocation.ilp import ilp_allocate
    from qpeft.quant import parse_grid

    layers = {int(x) for x in args.layers.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "rev"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.rev], check=True)
        try:
            # one after the other, so that a Fisher not yet cached is computed once
            workers = {"this": start_worker(REPO, args.rank)}
            sizes = json.loads(workers["this"].stdout.readline())
            workers[args.rev] = start_worker(tree, args.rank)
            workers[args.rev].stdout.readline()
            names = [n for n in sizes if int(n.split(".")[2]) in layers]
            seconds = dict.fromkeys(workers, 0.0)
            costs: dict[str, list[list[float]]] = {side: [] for side in workers}
            for i, name in enumerate(names):
                order = list(workers) if i % 2 == 0 else list(workers)[::-1]
                for side in order:
                    answer = ask(workers[side], name)
                    seconds[side] += answer["seconds"]
                    costs[side].append(answer["costs"])
                print(f"{i + 1}/{len(names)} {name}", file=sys.stderr, flush=True)
            for worker in workers.values():
                worker.stdin.close()
                worker.wait()
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)

    numel = [sizes[n] for n in names]
    bits = storage_bits_table(parse_grid("lqlora"), [(1, n) for n in numel])  # NF: only the size counts
    this, other = (np.array(costs[side]) for side in workers)
    print(f"{len(names)} matrices, rank {args.rank}; this checkout vs {args.rev}")
    print(
        f"time: this {seconds['this']:.1f} s, {args.rev} {seconds[args.rev]:.1f} s, "
        f"ratio {seconds['this'] / seconds[args.rev]:.4f}"
    )
    grid = parse_grid("lqlora")
    print("per-config cost ratio (this / rev) over every matrix, by the configs' scale bits b0")
    print("b0  configs  min      median   max")
    for scale_bits in sorted({c.scale_bits for c in grid}):
        ratios = (this / other)[:, [j for j, c in enumerate(grid) if c.scale_bits == scale_bits]]
        low, mid, high = np.quantile(ratios, [0, 0.5, 1])
        print(f"{scale_bits:<3} {ratios.shape[1]:<8} {low:.5f}  {mid:.5f}  {high:.5f}")
    print("budget  optimum ratio (this / rev)")
    for budget in (float(b) for b in args.budgets.split(",")):
        ratio = ilp_allocate(this, bits, numel, budget).cost / ilp_allocate(other, bits, numel, budget).cost
        print(f"{budget:<7g} {ratio:.5f}")


if __name__ == "__main__":
    main()
