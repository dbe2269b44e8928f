"""The bit-budget ILP: grid, budget parsing, optimality against brute force, errors."""

import itertools
import re

import numpy as np
import pytest

from qpeft.allocation import ilp_allocate, parse_budget
from qpeft.allocation.ilp import hull_configs, pareto_configs
from qpeft.errors import QpeftError
from qpeft.quant import parse_grid


def test_grid_is_the_papers():
    grid = parse_grid("lqlora")
    assert len(grid) == 432 == len({c.name for c in grid})
    bits = sorted(c.bits_per_param for c in grid)
    assert round(bits[0], 3) == 2.032 and round(bits[-1], 3) == 8.625


@pytest.mark.parametrize(("text", "value"), [("2.75bits", 2.75), ("2.75", 2.75), (" 3 bits ", 3.0), (3.5, 3.5)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["two", "2.75 bytes", "-1", "0"])
def test_bad_budget(text):
    with pytest.raises(QpeftError):
        parse_budget(text)


def test_pareto_front():
    bits = np.array([2.0, 3.0, 3.0, 4.0, 5.0])
    costs = np.array([10.0, 6.0, 7.0, 6.0, 1.0])
    assert pareto_configs(costs, bits) == [0, 1, 4]


def test_hull_of_the_front():
    bits = np.array([2.0, 3.0, 3.5, 4.0, 5.0, 8.0])
    costs = np.array([10.0, 6.0, 5.5, 3.0, 2.5, 0.0])
    # 3.5 bits lies above the segment from 3 to 4 bits (4.5), 5 bits above 4 to 8 (2.25)
    assert pareto_configs(costs, bits) == [0, 1, 2, 3, 4, 5]
    assert hull_configs(costs, bits) == [0, 1, 3, 5]


def test_hull_configs_are_the_price_minimisers():
    """A config is on the hull iff some price per bit λ makes it the cheapest in
    cost + λ·bits (the LP relaxation's choices); every other front config lies on or
    above the hull."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        bits = rng.uniform(2, 8, 40)
        costs = np.exp(-bits + rng.normal(0, 0.3, 40))
        hull = hull_configs(costs, bits)
        slopes = -np.diff(costs[hull]) / np.diff(bits[hull])  # the prices where the choice changes
        assert np.all(np.diff(slopes) < 0)  # convex
        prices = np.concatenate([[2 * slopes[0]], (slopes[:-1] + slopes[1:]) / 2, [0.0]])
        assert [int(np.argmin(costs + lam * bits)) for lam in prices] == hull
        for j in set(pareto_configs(costs, bits)) - set(hull):
            assert costs[j] >= np.interp(bits[j], bits[hull], costs[hull])


def brute_force(costs, bits, numel, budget):
    best = (np.inf, None)
    for choice in itertools.product(range(len(bits)), repeat=len(numel)):
        avg = sum(bits[j] * numel[i] for i, j in enumerate(choice)) / sum(numel)
        if avg <= budget + 1e-12:
            cost = sum(costs[i, j] for i, j in enumerate(choice))
            best = min(best, (cost, choice))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    bits = np.array([2.25, 2.5, 3.125, 3.25, 4.125, 8.25])
    numel = rng.integers(1, 10, size=5) * 4096
    # error falls with bits, with per-matrix sensitivity and noise
    costs = rng.uniform(0.5, 2.0, size=(5, 1)) * 4.0 ** (-bits) * rng.uniform(0.8, 1.2, size=(5, 6))
    budget = rng.uniform(2.4, 4.5)
    expected_cost, _ = brute_force(costs, bits, numel, budget)
    allocation = ilp_allocate(costs, bits, numel, budget)
    assert allocation.cost == pytest.approx(expected_cost, rel=1e-9)
    assert allocation.average_bits <= budget + 1e-9


def test_infeasible_budget_names_the_range():
    bits = [2.5, 4.0]
    with pytest.raises(QpeftError, match=re.escape("configs allow averages from 2.5000 to 4.0000")):
        ilp_allocate(np.ones((2, 2)), bits, [10, 20], 2.0)


def test_generous_budget_takes_the_cheapest():
    costs = np.array([[3.0, 1.0], [2.0, 0.5]])
    allocation = ilp_allocate(costs, [2.0, 8.0], [100, 100], 9.0)
    assert allocation.choice == [1, 1]


def test_shared_counter_hands_out_each_index_once(tmp_path):
    """Four threads taking indices from one counter file get 0..199 between them, each
    once; constructing it again (a resumed run) starts over."""
    from concurrent.futures import ThreadPoolExecutor

    from qpeft.allocation.cost_table import SharedCounter

    counter = SharedCounter(tmp_path / "next")

    def take(_: int) -> list[int]:
        return [counter.next() for _ in range(50)]

    with ThreadPoolExecutor(4) as pool:
        taken = [i for part in pool.map(take, range(4)) for i in part]
    assert sorted(taken) == list(range(200))
    assert SharedCounter(tmp_path / "next").next() == 0
