"""Cost-table speed and accuracy: qpeft's shared/refined table vs one full alternation
per config.

For each matrix shape (random N(0, 0.02²) weights, random positive Fisher row/column
weights), times `matrix_costs` over the whole grid, and the reference method (one
cold LQ-LoRA alternation per config, as the authors' code does) on a sample of
configs, projected to the grid. Also prints the projected time for all matrices of
the model shape.

    python tools/bench_costs.py --device cuda --model llama2-7b --rank 64
    python tools/bench_costs.py --device cpu --model smollm2 --rank 8

`--accuracy` instead takes real matrices of the embedded SmolLM2, with their Fisher
row/column weights (WikiText-2 calibration at the default settings, cached), and
compares over the grid the lower envelope (lowest cost at ≤ b bits, b = 2.05 … 4.5,
the only part of a row the ILP can use) of qpeft's table, with and without the front
refinement, against the paper's method: every config's own cold alternation
(20 iterations at most, rel. tolerance 1e-3). Ratios below 1 mean qpeft found a
better decomposition than the reference.

`--refine-sets` prices every 5th layer's matrices of the embedded SmolLM2 (LQ-LoRA
with Fisher row/column weights, or `--method qwha`) twice, refining the lower convex
hull of each matrix's front (the default) and the whole front, times both, and
solves the allocation on each table at several budgets: the ratio of the two optimal
total costs is what refining only the hull gives up (every cost in either table is
that of a valid decomposition).
"""

from __future__ import annotations

import argparse
import time

import torch
from measure import sync

from qpeft.methods.lqlora import matrix_costs
from qpeft.methods.lqlora.alternation import lq_decompose
from qpeft.quant import parse_grid

# (name, shape, matrices of that shape in the model)
MODELS = {
    "llama2-7b": [("q/k/v/o", (4096, 4096), 4 * 32), ("gate/up", (11008, 4096), 2 * 32), ("down", (4096, 11008), 32)],
    "smollm2": [
        ("q/o", (576, 576), 2 * 30),
        ("k/v", (192, 576), 2 * 30),
        ("gate/up", (1536, 576), 2 * 30),
        ("down", (576, 1536), 30),
    ],
}


ACCURACY_MATRICES = [
    "model.layers.3.self_attn.q_proj",
    "model.layers.20.self_attn.k_proj",
    "model.layers.10.mlp.down_proj",
    "model.layers.27.mlp.gate_proj",
]


def accuracy(rank: int, grid: list) -> None:
    import numpy as np

    from qpeft.calibration.cache import calibrate
    from qpeft.methods.lqlora.alternation import alternate
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import DEFAULT_TARGETS
    from qpeft.models.weights import SafetensorsWeights
    from qpeft.quant import simulate

    model_dir = resolve_model(None)
    fisher, _, _ = calibrate(model_dir, DEFAULT_TARGETS)
    bits = np.array([c.bits_per_param for c in grid])
    at = np.linspace(2.05, 4.5, 50)

    def envelope(costs):
        return np.array([costs[bits <= b + 1e-12].min() for b in at])

    def reference(w, row_weight, col_weight):
        costs = []
        for config in grid:
            generator = torch.Generator().manual_seed(0)
            quant = lambda x, config=config: simulate(x, config)  # noqa: E731
            result = alternate(w, quant, rank, row_weight, col_weight, generator=generator)
            costs.append(result.error**2 / float(row_weight.square().mean()))
        return np.array(costs)

    wanted = {f"{n}.weight": n for n in ACCURACY_MATRICES}
    print(f"rank {rank}, {len(grid)} configs, Fisher-weighted; envelope ratio = qpeft / per-config cold alternation")
    print(f"{'matrix':<34} {'ref s':>7} {'qpeft s':>8} {'max':>7} {'min':>7} {'no-refine s':>12} {'max':>7} {'min':>7}")
    for key, tensor in SafetensorsWeights(model_dir).items():
        if key not in wanted:
            continue
        w = tensor.float()
        r, c = fisher.weights(wanted[key])
        timed = {}
        for label, run, kwargs in [
            ("reference", reference, {}),
            ("default", matrix_costs, {"configs": grid, "rank": rank}),
            ("steps", matrix_costs, {"configs": grid, "rank": rank, "refine_iters": 0}),
        ]:
            start = time.perf_counter()
            timed[label] = (envelope(run(w, row_weight=r, col_weight=c, **kwargs)), time.perf_counter() - start)
        ref = timed["reference"][0]
        default, steps = timed["default"][0] / ref, timed["steps"][0] / ref
        print(
            f"{wanted[key]:<34} {timed['reference'][1]:>7.1f} {timed['default'][1]:>8.2f} {default.max():>7.4f} "
            f"{default.min():>7.4f} {timed['steps'][1]:>12.2f} {steps.max():>7.4f} {steps.min():>7.4f}",
            flush=True,
        )


def refine_sets(method_name: str, rank: int, grid: list, layer_stride: int, budgets: list[float]) -> None:
    import dataclasses

    import numpy as np

    from qpeft.allocation.ilp import ilp_allocate
    from qpeft.calibration.cache import calibrate, calibrate_activations
    from qpeft.methods.lqlora import LQLoRA
    from qpeft.methods.qwha import QWHA
    from qpeft.models.resolve import resolve_model
    from qpeft.models.selection import DEFAULT_TARGETS
    from qpeft.models.weights import SafetensorsWeights

    model_dir = resolve_model(None)
    if method_name == "qwha":
        method = QWHA(calibrate_activations(model_dir, DEFAULT_TARGETS)[0])
        selected = set(method.grams.owner)
    else:
        method = LQLoRA(calibrate(model_dir, DEFAULT_TARGETS)[0])
        selected = set(method.fisher.row_mean)
    bits = np.array([c.bits_per_param for c in grid])
    tables: dict[str, list[np.ndarray]] = {"hull": [], "front": []}
    seconds = dict.fromkeys(tables, 0.0)
    numel = []
    for key, tensor in SafetensorsWeights(model_dir).items():
        name = key.removesuffix(".weight")
        if name not in selected or int(name.split(".")[2]) % layer_stride:
            continue
        w = tensor.float()
        numel.append(w.numel())
        for refine in tables:
            start = time.perf_counter()
            tables[refine].append(dataclasses.replace(method, refine=refine).costs(name, w, grid, rank))
            seconds[refine] += time.perf_counter() - start
        print(f"{name:<34} hull {seconds['hull']:7.1f} s  front {seconds['front']:7.1f} s", flush=True)
    weighting = "output error" if method_name == "qwha" else "Fisher-weighted"
    print(f"{method_name} rank {rank}, {len(numel)} matrices, {len(grid)} configs, {weighting}")
    print(
        f"cost table: hull {seconds['hull']:.1f} s, front {seconds['front']:.1f} s "
        f"({seconds['hull'] / seconds['front']:.3f}x)"
    )
    print(f"{'budget':>7} {'hull cost':>12} {'front cost':>12} {'hull / front':>13}")
    for budget in budgets:
        hull, front = (ilp_allocate(np.array(tables[k]), bits, numel, budget).cost for k in ("hull", "front"))
        print(f"{budget:>7g} {hull:>12.6g} {front:>12.6g} {hull / front:>13.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--configs", default="lqlora")
    parser.add_argument("--cold-sample", type=int, default=6, help="configs timed with a full cold alternation each")
    parser.add_argument("--no-fisher", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="envelope accuracy on real SmolLM2 matrices")
    parser.add_argument("--refine-sets", action="store_true", help="hull vs front refinement on real SmolLM2 matrices")
    parser.add_argument("--method", choices=["lqlora", "qwha"], default="lqlora", help="--refine-sets: whose table")
    parser.add_argument("--layer-stride", type=int, default=5, help="--refine-sets: every n-th layer")
    parser.add_argument("--budgets", default="2.5,2.75,3.25,3.5", help="--refine-sets: budgets to allocate")
    args = parser.parse_args()
    grid = parse_grid(args.configs)
    if args.refine_sets:
        refine_sets(args.method, args.rank, grid, args.layer_stride, [float(b) for b in args.budgets.split(",")])
        return
    if args.accuracy:
        accuracy(args.rank, grid)
        return
    generator = torch.Generator(device="cpu").manual_seed(0)
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
        f"rank {args.rank}, {len(grid)} configs, Fisher {'off' if args.no_fisher else 'on'}, torch {torch.__version__}"
    )
    header = f"{'matrix':<8} {'shape':>12} {'qpeft s':>9} {'per-config s':>13} {'reference s':>12} {'speed-up':>9}"
    print(header)
    total_qpeft = total_reference = 0.0
    warm = False
    for name, shape, count in MODELS[args.model]:
        w = (torch.randn(shape, generator=generator) * 0.02).to(args.device)
        row = col = None
        if not args.no_fisher:
            row = torch.rand(shape[0], generator=generator).add_(0.1).to(args.device)
            col = torch.rand(shape[1], generator=generator).add_(0.1).to(args.device)
        if not warm:  # first CUDA calls pay for kernel loading
            matrix_costs(w, grid[:2], args.rank, row, col)
            warm = True
        sync(args.device)
        start = time.perf_counter()
        matrix_costs(w, grid, args.rank, row, col)
        sync(args.device)
        qpeft_seconds = time.perf_counter() - start
        sample = grid[:: max(1, len(grid) // args.cold_sample)][: args.cold_sample]
        start = time.perf_counter()
        for config in sample:
            lq_decompose(w, config, args.rank, row, col)
        sync(args.device)
        per_config = (time.perf_counter() - start) / len(sample)
        reference = per_config * len(grid)
        total_qpeft += qpeft_seconds * count
        total_reference += reference * count
        print(
            f"{name:<8} {'x'.join(map(str, shape)):>12} {qpeft_seconds:>9.2f} {per_config:>13.3f} "
            f"{reference:>12.1f} {reference / qpeft_seconds:>8.1f}x"
        )
    matrices = sum(count for *_, count in MODELS[args.model])
    print(
        f"all {matrices} matrices of {args.model}: qpeft {total_qpeft / 60:.1f} min, "
        f"reference (projected from the sample) {total_reference / 3600:.1f} h, "
        f"{total_reference / total_qpeft:.1f}x"
    )


if __name__ == "__main__":
    main()
