"""The cost table: shared pricing of scale formats, refinement, weights, exact-bit ILP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpeft.allocation.costs import element_weights, group_configs, scale_format_errors
from qpeft.allocation.ilp import hull_configs, ilp_allocate, pareto_configs
from qpeft.errors import QpeftError
from qpeft.methods.lqlora import matrix_costs
from qpeft.methods.lqlora.alternation import alternate
from qpeft.quant import dequantize, parse_config, parse_grid, quantize, simulate


@pytest.mark.parametrize("shape", [(48, 64), (37, 29)])
def test_simulate_is_dequantize_of_quantize(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    for config in [*parse_grid("lqlora")[::11], parse_config("nf4-b64-fp16")]:
        assert torch.equal(simulate(w, config), dequantize(quantize(w, config))), config.name


@pytest.mark.parametrize("weighted", [False, True])
def test_scale_format_errors_equal_direct_errors(weighted):
    torch.manual_seed(1)
    x = torch.randn(40, 96) * 0.1
    weights = torch.rand(40, 96) if weighted else None
    group = [c for c in parse_grid("lqlora") if (c.bits, c.block_size) == (3, 32)]
    fast = scale_format_errors(x, group, weights)
    for config, value in zip(group, fast, strict=True):
        diff = (x - simulate(x, config)).square()
        direct = float((diff * weights).sum() if weighted else diff.sum())
        assert value == pytest.approx(direct, rel=1e-5), config.name
    with pytest.raises(ValueError, match="share one codes_key"):
        scale_format_errors(x, [parse_config("nf3"), parse_config("nf4")])


def test_element_weights_keep_the_fisher_mass_and_a_rank_one_fisher():
    a, b = torch.rand(12) + 0.1, torch.rand(20) + 0.1
    fisher = torch.outer(a, b)
    r, c = fisher.mean(dim=1).sqrt(), fisher.mean(dim=0).sqrt()
    torch.testing.assert_close(element_weights((12, 20), r, c), fisher)
    assert element_weights((12, 20), None, None) is None


def test_groups_share_bits_and_block_and_start_with_the_finest_scales():
    grid = parse_grid("lqlora")
    groups = group_configs(grid)
    assert len(groups) == 12 and sorted(j for g in groups for j in g) == list(range(432))
    for group in groups:
        assert len({(grid[j].bits, grid[j].block_size) for j in group}) == 1
        assert grid[group[0]].bits_per_param == max(grid[j].bits_per_param for j in group)


def test_rank_zero_costs_are_plain_quantization_errors():
    torch.manual_seed(2)
    w = torch.randn(32, 64) * 0.02
    grid = parse_grid("lqlora")[::17]
    costs = matrix_costs(w, grid, rank=0)
    direct = [float((w - simulate(w, c)).square().sum()) for c in grid]
    np.testing.assert_allclose(costs, direct, rtol=1e-5)


def test_refinement_only_lowers_costs_and_refines_the_hull():
    torch.manual_seed(3)
    w = torch.randn(64, 96) * 0.02 + 0.01 * torch.randn(64, 4) @ torch.randn(4, 96)
    r, c = torch.rand(64) + 0.5, torch.rand(96) + 0.5
    grid = parse_grid("lqlora")[::5]
    shared = matrix_costs(w, grid, rank=4, row_weight=r, col_weight=c, refine_iters=0)
    refined = matrix_costs(w, grid, rank=4, row_weight=r, col_weight=c)
    everything = matrix_costs(w, grid, rank=4, row_weight=r, col_weight=c, refine="all")
    assert np.all(refined <= shared) and np.all(everything <= shared)
    assert np.any(refined < shared * 0.999)
    bits = np.array([g.bits_per_param for g in grid])
    # the configs the allocation picks were all refined as if every config had been
    for j in hull_configs(refined, bits):
        assert refined[j] == pytest.approx(everything[j], rel=1e-9)
    front = matrix_costs(w, grid, rank=4, row_weight=r, col_weight=c, refine="front")
    for j in pareto_configs(front, bits):
        assert front[j] == pytest.approx(everything[j], rel=1e-9)
    # the hull is a strict subset of the front here, so refining it did less work
    assert len(hull_configs(refined, bits)) < len(pareto_configs(refined, bits))
    # and a cost is the decomposition's weighted squared error, F̂ = r²c²/mean(F)
    quant_only = matrix_costs(w, grid[:1], rank=0, row_weight=r, col_weight=c)[0]
    weights = element_weights((64, 96), r, c)
    expected = float(((w - simulate(w, grid[0])).square() * weights).sum())
    assert quant_only == pytest.approx(expected, rel=1e-5)


def test_elementwise_fisher_costs():
    """With the full Fisher diagonal F a cost is Σ F·δ² of a valid decomposition: for
    rank 0 exactly F-weighted quantization errors; for a rank-one F the same as pricing
    with its row/column reduction; for any F never above F-pricing the configs' plain
    quantization (each config's cost is at most that of its own Q with L = 0)."""
    torch.manual_seed(4)
    w = torch.randn(48, 64) * 0.02 + 0.01 * torch.randn(48, 3) @ torch.randn(3, 64)
    grid = parse_grid("lqlora")[::23]
    skewed = torch.rand(48, 64).square() * (torch.rand(48, 1) + 0.1)  # not rank one
    r, c = skewed.mean(dim=1).sqrt(), skewed.mean(dim=0).sqrt()
    direct = [float((skewed * (w - simulate(w, g)).square()).sum()) for g in grid]
    np.testing.assert_allclose(matrix_costs(w, grid, 0, r, c, fisher=skewed), direct, rtol=1e-5)
    ranked = matrix_costs(w, grid, 3, r, c, fisher=skewed)
    assert np.all(ranked <= np.array(direct) * (1 + 1e-6)) and np.any(ranked < np.array(direct) * 0.9)
    rank_one = element_weights(tuple(w.shape), r, c)
    np.testing.assert_allclose(
        matrix_costs(w, grid, 3, r, c, fisher=rank_one), matrix_costs(w, grid, 3, r, c), rtol=1e-4
    )


def test_coarse_scale_configs_get_their_own_low_rank_fit():
    """Outlier input channels in a low-rank pattern: with 2-3 bit, 256-block scales the
    low-rank part fitted for the fine-scale anchor leaves the outliers setting the scale
    range, and pricing on it is ~2× too high. The table's lower convex envelope (the
    hull, which the allocation's choices follow) must stay within 5% of that of each
    config's own cold alternation."""
    torch.manual_seed(0)
    rank = 4
    w = torch.randn(96, 256) * 0.02 + torch.randn(96, rank) @ torch.randn(rank, 256) * 0.01
    w[:, :3] *= 25
    r, c = torch.rand(96) + 0.5, torch.rand(256) + 0.5
    grid = [g for g in parse_grid("lqlora") if g.bits in (2, 3) and g.block_size == 64]
    bits = np.array([g.bits_per_param for g in grid])

    def envelope(costs):
        hull = hull_configs(costs, bits)
        return np.interp(sorted(set(bits)), bits[hull], costs[hull])

    def cold_alternation(config):
        quant = lambda x: simulate(x, config)  # noqa: E731
        return alternate(w, quant, rank, r, c, generator=torch.Generator().manual_seed(0))

    weights = element_weights(tuple(w.shape), r, c)
    cold = np.array([cold_alternation(g).error ** 2 for g in grid]) / float(r.square().mean())
    on_anchor = np.empty(len(grid))
    for group in group_configs(grid):
        anchor = cold_alternation(grid[group[0]])
        residual = w - anchor.left @ anchor.right
        on_anchor[group] = scale_format_errors(residual, [grid[j] for j in group], weights)
    assert (envelope(on_anchor) / envelope(cold)).max() > 1.5  # the trap is there
    assert (envelope(matrix_costs(w, grid, rank, r, c)) / envelope(cold)).max() < 1.05


def test_ilp_with_exact_bits_meets_the_budget():
    rng = np.random.default_rng(0)
    costs = rng.random((6, 3)) * np.array([4.0, 2.0, 1.0])
    bits = np.array([[2.1, 3.1, 4.1]] * 6) + rng.random((6, 1)) * 0.01
    numel = [100, 200, 300, 100, 50, 500]
    result = ilp_allocate(costs, bits, numel, 3.0)
    achieved = sum(bits[i, j] * numel[i] for i, j in enumerate(result.choice)) / sum(numel)
    assert achieved <= 3.0 + 1e-9 and result.average_bits == pytest.approx(achieved)
    with pytest.raises(QpeftError, match=r"the configs allow averages from 2\.10"):
        ilp_allocate(costs, bits, numel, 2.0)


def test_parse_grid():
    assert len(parse_grid("lqlora")) == 432
    assert [c.name for c in parse_grid("nf3, nf4-b32-s8x256-fp16")] == ["nf3-b64-s8x256-fp32", "nf4-b32-s8x256-fp16"]
    with pytest.raises(QpeftError, match="lists nf3-b64-s8x256-fp32 twice"):
        parse_grid("nf3,nf3-b64-s8x256-fp32")
    with pytest.raises(QpeftError, match="unknown quantization config 'nf5'"):
        parse_grid("nf5")


def test_scale_dtype_siblings_share_one_fit_that_prices_each_validly(monkeypatch):
    """One one-step fit per (bits, block, scale bits, scale block) serves the three
    scale dtypes. Every cost stays that of a valid decomposition (at most the config's
    own Q with L = 0), and at 3 bits, where the scale dtype barely moves Q, the siblings
    priced on the fp16 member's fit cost what it costs."""
    import qpeft.methods.lqlora.pricing as costs_module

    torch.manual_seed(5)
    w = torch.randn(64, 128) * 0.02 + 0.01 * torch.randn(64, 3) @ torch.randn(3, 128)
    r, c = torch.rand(64) + 0.5, torch.rand(128) + 0.5
    grid = [g for g in parse_grid("lqlora") if (g.bits, g.block_size) == (3, 32) and g.scale_bits in (4, 8)]
    fits = []
    fitted = costs_module.lowrank_factors

    def counted(*args, **kwargs):
        fits.append(args[0])
        return fitted(*args, **kwargs)

    monkeypatch.setattr(costs_module, "lowrank_factors", counted)
    costs = matrix_costs(w, grid, 3, r, c, refine_iters=0)
    assert len(grid) == 18 and len(fits) == 6
    weights = element_weights(tuple(w.shape), r, c)
    plain = np.array([float(((w - simulate(w, g)).square() * weights).sum()) for g in grid])
    assert np.all(costs <= plain * (1 + 1e-6))
    for j, config in enumerate(grid):
        sibling = next(k for k, g in enumerate(grid) if g.scale_dtype == "fp16" and g.name.startswith(config.name[:-5]))
        assert costs[j] == pytest.approx(costs[sibling], rel=0.03), config.name


@pytest.mark.parametrize("elementwise", [False, True])
def test_priced_decomposition_is_the_decomposition_behind_each_price(elementwise):
    """Rerun alone, one config's table path gives a decomposition whose cost (Q =
    quant(quant_input), L1·L2 = left @ right, recomputed here) is the table's price
    for the configs the table refined, and at most it for every other config."""
    from qpeft.methods.lqlora.pricing import priced_decomposition

    g = torch.Generator().manual_seed(6)
    w = torch.randn(48, 128, generator=g) * 0.02 + 0.01 * torch.randn(48, 3, generator=g) @ torch.randn(
        3, 128, generator=g
    )
    r, c = torch.rand(48, generator=g) + 0.5, torch.rand(128, generator=g) + 0.5
    fisher = torch.rand(48, 128, generator=g).square() * (torch.rand(48, 1, generator=g) + 0.1) if elementwise else None
    grid = [g for g in parse_grid("lqlora") if g.block_size in (32, 64) and g.bits in (2, 3)][::3]
    costs = matrix_costs(w, grid, 3, r, c, fisher=fisher)
    weights = fisher if elementwise else element_weights(tuple(w.shape), r, c)
    hull = set(hull_configs(costs, np.array([g.bits_per_param for g in grid])))
    for j, config in enumerate(grid):
        priced = priced_decomposition(w, grid, j, 3, r, c, fisher=fisher)
        diff = w - simulate(priced.quant_input, config) - priced.left @ priced.right
        recomputed = float((weights * diff.square()).sum())
        assert priced.cost == pytest.approx(recomputed, rel=1e-4), config.name
        if j in hull:
            assert priced.cost == pytest.approx(costs[j], rel=1e-6), config.name
        assert priced.cost <= costs[j] * (1 + 1e-6), config.name


def test_the_split_writes_the_cheaper_of_the_table_path_and_a_cold_alternation():
    """LQ-LoRA's split (round-to-nearest) stores a decomposition that costs at most the
    table's price and at most a cold alternation's, up to storing L1/L2 in bf16; its
    report's cost is that of the stored tensors."""
    from qpeft.calibration.fisher import FisherStats
    from qpeft.methods.lqlora import LQLoRA

    g = torch.Generator().manual_seed(8)
    w = (
        torch.randn(64, 256, generator=g) * 0.02
        + torch.randn(64, 4, generator=g) @ torch.randn(4, 256, generator=g) * 0.01
    )
    w[:, :3] *= 25  # coarse scales: the table's one-step fits beat the cold alternation here
    r, c = torch.rand(64, generator=g) + 0.5, torch.rand(256, generator=g) + 0.5
    method = LQLoRA(FisherStats({"w": r.square()}, {"w": c.square()}), rounding="nearest")
    row, col = method._weights("w", w.device)
    grid = [g for g in parse_grid("lqlora") if g.bits in (2, 3) and g.block_size == 64]
    costs = method.costs("w", w, grid, 4)
    weights = element_weights(tuple(w.shape), row, col)
    sources = set()
    for j, config in enumerate(grid):
        split = method.split("w", w, config, 4, grid)
        diff = w - dequantize(split.quantized) - split.adapter.delta_weight()
        assert split.report["cost"] == pytest.approx(float((weights * diff.square()).sum()), rel=1e-4)
        cold = alternate(w, lambda x, c=config: simulate(x, c), 4, row, col, generator=torch.Generator().manual_seed(0))
        cold_cost = cold.error**2 / float(row.square().mean())
        assert split.report["cost"] <= min(costs[j], cold_cost) * 1.002, config.name
        sources.add(split.report["init"])
    assert "cold" in sources and sources - {"cold"}  # both paths win somewhere


def _kfac_problem(seed: int):
    """A matrix, Fisher row/column weights and correlated inputs' XᵀX."""
    from qpeft.calibration.activations import InputGrams
    from qpeft.calibration.fisher import FisherStats

    g = torch.Generator().manual_seed(seed)
    rows, cols = 48, 128
    w = torch.randn(rows, cols, generator=g) * 0.02 + 0.01 * torch.randn(rows, 3, generator=g) @ torch.randn(
        3, cols, generator=g
    )
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)  # correlated input channels
    x = (torch.randn(1024, cols, generator=g) * torch.rand(cols, generator=g).add(0.2)) @ mix
    grams = InputGrams({"w": (x.T @ x).double()}, {"w": "w"}, 1024)
    row_mean, col_mean = torch.rand(rows, generator=g) + 0.2, torch.rand(cols, generator=g) + 0.2
    col_mean *= row_mean.mean() / col_mean.mean()  # both average the one Fisher
    return w, FisherStats({"w": row_mean}, {"w": col_mean}), grams


def test_kfac_measure_is_row_energy_times_input_covariance():
    """K-FAC prices δ as Σ_i a_i·δ_i Σ δ_iᵀ, a_i = r_i² / mean(diag Σ); with a
    diagonal Σ proportional to the Fisher's column means it is the F̂ price."""
    from qpeft.methods.lqlora.pricing import cost_measure

    w, fisher, grams = _kfac_problem(11)
    row, col = fisher.weights("w")
    sigma = grams.second_moment("w").float()
    diff = torch.randn_like(w) * 0.01
    _, kfac = cost_measure(w, row, col, second_moment=sigma)
    a = row.square() / sigma.diagonal().mean()
    assert kfac(diff) == pytest.approx(float((a * ((diff @ sigma) * diff).sum(dim=1)).sum()), rel=1e-5)
    weights, fisher_price = cost_measure(w, row, col)
    _, diagonal = cost_measure(w, row, col, second_moment=torch.diag(col.square()) * 7.0)
    assert diagonal(diff) == pytest.approx(fisher_price(diff), rel=1e-5)
    assert fisher_price(diff) == pytest.approx(float((weights * diff.square()).sum()), rel=1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_kfac_costs_price_what_the_gptq_split_writes(rank):
    """With kfac costs and gptq rounding, the configs an allocation can pick (the hull)
    are priced as the split writes them: the split of each costs at most the table's
    price, in the K-FAC measure; and GPTQ, which lowers output errors, makes those
    prices lower than round-to-nearest's."""
    from qpeft.methods.lqlora import LQLoRA

    w, fisher, grams = _kfac_problem(12)
    grid = [g for g in parse_grid("lqlora") if g.block_size == 64 and g.scale_dtype == "fp16"][::2]
    kfac = LQLoRA(fisher, rounding="gptq", grams=grams, cost="kfac")
    nearest = LQLoRA(fisher, rounding="nearest", grams=grams, cost="kfac")
    assert kfac.split_only == () and LQLoRA(fisher).split_only == ("rounding", "grams")
    costs, rtn = kfac.costs("w", w, grid, rank), nearest.costs("w", w, grid, rank)
    hull = hull_configs(costs, np.array([g.bits_per_param for g in grid]))
    for j in hull:
        split = kfac.split("w", w, grid[j], rank, grid)
        assert split.report["cost"] <= costs[j] * (1 + 1e-6), grid[j].name
        assert costs[j] < rtn[j], grid[j].name


def test_kfac_costs_need_activations():
    from qpeft.methods.lqlora import LQLoRA

    with pytest.raises(QpeftError, match=r"^kfac costs needs the calibration activations \(XᵀX\)$"):
        LQLoRA(cost="kfac")
    with pytest.raises(QpeftError, match=r"^unknown cost 'l2': choose fisher or kfac$"):
        LQLoRA(cost="l2")
