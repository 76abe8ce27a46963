"""bench_mds_rule's checks of the goal itself (numpy only): the fixed-R buffer's bootstrap self-agreement and
the fixed-budget top-K rule (SAR) it is compared with."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_mds_rule as rule  # noqa: E402


def _losses(gaps, n_draws=1000, seed=0):
    """Cases with expected losses ``gaps`` and a shared per-draw term (common draws), unit-variance noise."""
    rng = np.random.default_rng(seed)
    common = rng.normal(0.0, 3.0, n_draws)
    return np.stack([g + common + rng.normal(0.0, 1.0, n_draws) for g in gaps])


def test_separated_cases_repeat_their_top_k_and_sar_finds_it_within_its_budget():
    matrix = _losses([0.0, 0.1, 0.2, 0.3] + [1.0 + 0.1 * i for i in range(8)])
    cases = [f"c{i}" for i in range(len(matrix))]
    losses = dict(zip(cases, matrix))
    assert rule.self_agreement(losses, cases, 4, 200, np.random.default_rng(1)) == 1.0
    budget = int(0.05 * matrix.size)
    chosen, drawn = rule.successive_accepts_rejects(matrix, 4, budget)
    assert chosen == {0, 1, 2, 3} and drawn <= budget


def test_a_near_tie_at_the_boundary_makes_the_fixed_buffer_a_coin_flip():
    # 4th and 5th expected losses 0.02 apart: 1000 paired draws (sd ~1.4) leave the order at about 0.5 se
    matrix = _losses([0.0, 0.1, 0.2, 0.5, 0.52] + [2.0 + 0.1 * i for i in range(7)], seed=3)
    cases = [f"c{i}" for i in range(len(matrix))]
    agreement = rule.self_agreement(dict(zip(cases, matrix)), cases, 4, 200, np.random.default_rng(1))
    assert 0.2 < agreement < 0.95
