"""Choosing one quantization config per matrix under a bit budget (LQ-LoRA §3.2).

Binary x[i, j] = matrix i uses choice j. Minimise Σ cost[i, j]·x[i, j] subject to
Σ_j x[i, j] = 1 for every matrix and Σ bits[i, j]·numel[i]·x[i, j] ≤ budget·Σ numel[i].
A choice is a config (the paper's program, bits of Q only) or a (config, rank) pair
whose bits count the adapter as stored (`--total-budget --ranks`): one binary per
pair, so quantization levels and ranks are chosen together, exactly.

Solved with pulp's bundled CBC (no Gurobi). Before solving, each matrix keeps only
its Pareto-optimal configs: a config that another config beats or ties in both bits
and cost for that matrix can be swapped for it in any solution without raising the
cost or the bits, so dropping it loses nothing and shrinks the problem several-fold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qpeft.errors import QpeftError


def parse_budget(text: str | float, what: str = "budget") -> float:
    """'2.75bits', '2.75' or 2.75 → 2.75 (average bits per parameter); `what` names it in errors."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:bits?)?\s*", text)
        if not match:
            raise QpeftError(f"cannot read the {what} {text!r}: give bits per parameter, e.g. 2.75 or 2.75bits")
        value = float(match.group(1))
    if value <= 0:
        raise QpeftError(f"the {what} must be positive, got {value}")
    return value


def parse_ranks(text: str | Sequence[int], what: str = "--ranks") -> list[int]:
    """'0,4,8' or [0, 4, 8] → [0, 4, 8]: distinct ranks ≥ 0, sorted."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ranks = []
    for item in items:
        value = item.strip() if isinstance(item, str) else item
        if isinstance(value, str) and not re.fullmatch(r"\d+", value):
            raise QpeftError(
                f"{what}: cannot read {value!r} as a rank: give ranks of 0 or more, comma-separated, e.g. 0,8,16"
            )
        if isinstance(value, bool) or not isinstance(value, int | str) or int(value) < 0:
            raise QpeftError(f"{what}: ranks must be integers of 0 or more, got {value!r}")
        ranks.append(int(value))
    if not ranks:
        raise QpeftError(f"{what}: give at least one rank, e.g. 0,8,16")
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise QpeftError(f"{what}: rank {repeated[0]} is listed twice")
    return sorted(ranks)


@dataclass(frozen=True)
class Budget:
    """A bit budget: the average bits per parameter of Q over the selected matrices
    (`--budget`, LQ-LoRA's convention), or with `total` of everything stored for
    them, Q plus the adapter in its stored dtype (`--total-budget`)."""

    bits: float
    total: bool = False

    @property
    def flag(self) -> str:
        return "--total-budget" if self.total else "--budget"

    @property
    def name(self) -> str:
        return "total budget" if self.total else "budget"

    @property
    def label(self) -> str:
        return f"{self.name} {self.bits:g}"


@dataclass
class Allocation:
    choice: list[int]  # config index per matrix
    cost: float  # total cost of the choice
    average_bits: float  # Σ bits·numel / Σ numel
    kept_variables: int  # binaries after per-matrix Pareto pruning
    status: str


def pareto_configs(costs: np.ndarray, bits: np.ndarray) -> list[int]:
    """Indices of the configs on one matrix's (bits, cost) Pareto front, by rising bits."""
    order = np.lexsort((costs, bits))  # by bits, then cost
    kept, best = [], np.inf
    for j in order:
        if costs[j] < best:
            kept.append(int(j))
            best = costs[j]
    return kept


def hull_configs(costs: np.ndarray, bits: np.ndarray) -> list[int]:
    """Indices of the configs on the lower convex hull of one matrix's (bits, cost)
    front, by rising bits: the configs that some price per bit makes optimal.

    The LP relaxation of the allocation (a multiple-choice knapsack with one budget
    row) has an optimum that uses hull configs for every matrix but at most one,
    which mixes two neighbouring hull configs (Sinha & Zoltners 1979). The integer
    optimum can use a front config off the hull, but only to fill the budget's last
    bits, so the hull is where the costs have to be accurate."""
    hull: list[int] = []
    for j in pareto_configs(costs, bits):
        # drop the last kept point while it lies on or above the segment to j
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (costs[b] - costs[a]) * (bits[j] - bits[a]) >= (costs[j] - costs[a]) * (bits[b] - bits[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def all_configs(costs: np.ndarray, bits: np.ndarray) -> list[int]:
    """Every config, for checking the refined sets against refining them all."""
    return list(range(len(costs)))


# which configs of a matrix a cost table refines (LQ-LoRA) or initialises exactly (QWHA)
REFINED_SETS = {"hull": hull_configs, "front": pareto_configs, "all": all_configs}


def check_budget(
    budget: float,
    bits: np.ndarray,
    numel: Sequence[int] | np.ndarray,
    above_ok: bool = True,
    name: str = "budget",
    choices: str = "configs",
) -> None:
    """Error unless some choice per matrix meets the budget; it names the range of
    average bits that the choices allow. `bits`: matrices × choices. With
    `above_ok` False, a budget above the costliest choice is an error too (the
    user asked for bits that nothing spends). `name` and `choices` word the error
    ("total budget", "(config, rank) pairs")."""
    numel_arr = np.asarray(numel, dtype=np.float64)
    lowest = float((bits.min(axis=1) * numel_arr).sum() / numel_arr.sum())
    costliest = np.where(np.isfinite(bits), bits, -np.inf).max(axis=1)  # inf: a config the matrix cannot take
    highest = float((costliest * numel_arr).sum() / numel_arr.sum())
    if budget < lowest - 1e-12:
        raise QpeftError(
            f"{name} {budget:g} bits/param is infeasible: the {choices} allow averages from {lowest:.4f} to "
            f"{highest:.4f}"
        )
    if not above_ok and budget > highest + 1e-12:
        raise QpeftError(
            f"{name} {budget:g} bits/param is more than the {choices} can use (at most {highest:.4f}, every "
            f"matrix at its costliest): give a {name} up to {highest:.4f}, or --config for one config everywhere"
        )


def ilp_allocate(
    costs: np.ndarray,
    bits: Sequence[float] | np.ndarray,
    numel: Sequence[int],
    budget: float,
    time_limit: float | None = None,
) -> Allocation:
    """Solve the allocation for a (matrices × configs) cost table. `bits` is per config,
    or per (matrix, config) for exact storage (padding and offsets included)."""
    import pulp

    costs = np.asarray(costs, dtype=np.float64)
    numel_arr = np.asarray(numel, dtype=np.float64)
    bits_arr = np.broadcast_to(np.asarray(bits, dtype=np.float64), costs.shape)
    if costs.shape != (numel_arr.size, np.shape(bits)[-1]):
        raise ValueError(
            f"cost table {costs.shape} does not match {numel_arr.size} matrices × {np.shape(bits)[-1]} configs"
        )
    total = numel_arr.sum()
    check_budget(budget, bits_arr, numel_arr)
    fronts = [pareto_configs(costs[i], bits_arr[i]) for i in range(numel_arr.size)]
    # normalise costs so CBC's tolerances mean the same thing at every model scale
    finite = np.abs(costs[np.isfinite(costs)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1e-300)
    problem = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for i, front in enumerate(fronts) for j in front}
    problem += pulp.lpSum(costs[i, j] / scale * var for (i, j), var in x.items())
    for i, front in enumerate(fronts):
        problem += pulp.lpSum(x[i, j] for j in front) == 1
    problem += pulp.lpSum(bits_arr[i, j] * numel_arr[i] / total * var for (i, j), var in x.items()) <= budget
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=1e-9)
    problem.solve(solver)
    status = pulp.LpStatus[problem.status]
    if status != "Optimal":
        raise QpeftError(f"the allocation solver ended with status {status}")
    choice = [max(front, key=lambda j, i=i: x[i, j].value() or 0.0) for i, front in enumerate(fronts)]
    chosen_bits = float(sum(bits_arr[i, j] * numel_arr[i] for i, j in enumerate(choice)) / total)
    return Allocation(choice, float(sum(costs[i, j] for i, j in enumerate(choice))), chosen_bits, len(x), status)
