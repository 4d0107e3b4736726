"""The paired statistics: Holm's correction, the interval's coverage, the test's size, the power
behind "seeds needed", and the comparison chosen for each seed layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from experiments.report.paired import (
    compare_to_best,
    holm,
    mean_interval,
    seeds_needed,
    t_power,
    verdict,
)


def test_holm_step_down_matches_the_hand_computation() -> None:
    # sorted p: 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> monotone: 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_the_interval_of_the_mean_covers_95_percent() -> None:
    # 1,500 samples of 5 normal values: coverage 0.95 +- 3 * sqrt(0.95 * 0.05 / 1500) = 0.0169.
    rng = np.random.default_rng(0)
    samples = rng.normal(3.0, 2.0, size=(1500, 5))
    covered = 0
    for row in samples:
        interval = mean_interval(list(row))
        assert interval is not None
        covered += interval[0] <= 3.0 <= interval[1]
    assert abs(covered / 1500 - 0.95) < 0.0169
    assert mean_interval([1.0]) is None and mean_interval([2.0, 2.0]) == (2.0, 2.0)


def test_without_a_difference_worse_is_declared_five_percent_of_the_time() -> None:
    # Two variants of the same distribution with a shared seed effect (std 1) and noise 0.3, 5
    # seeds, 800 sweeps: the paired test's size 0.05 +- 3 * sqrt(0.05 * 0.95 / 800) = 0.0231.
    # (Picking the better mean as "best" only fixes the sign of the two-sided test.)
    rng = np.random.default_rng(1)
    worse = 0
    for _ in range(800):
        seed_effect = rng.normal(0.0, 1.0, 5)
        values = {name: dict(enumerate(seed_effect + rng.normal(0.0, 0.3, 5)))
                  for name in ("a", "b")}
        outcome = verdict(values, "test/nll_iwae", higher_is_better=False)
        worse += outcome.resolved
    assert abs(worse / 800 - 0.05) < 0.0231


@pytest.mark.parametrize("effect", [0.5, 1.0, 2.0])
def test_seeds_needed_gives_the_stated_power(effect: float) -> None:
    # Simulated paired t tests at n = seeds_needed(d): rejection rate >= 0.8 - 3 SE and at n - 1
    # below 0.8 + 3 SE, SE = sqrt(0.8 * 0.2 / 4000) = 0.0063 (so 3 SE = 0.019).
    n = seeds_needed(effect, paired=True)
    assert n is not None
    rng = np.random.default_rng(2)
    for size, check in ((n, lambda r: r > 0.8 - 0.019), (n - 1, lambda r: r < 0.8 + 0.019)):
        if size < 2:
            continue
        differences = rng.normal(effect, 1.0, size=(4000, size))
        p = stats.ttest_1samp(differences, 0.0, axis=1).pvalue
        assert check(float(np.mean(p < 0.05))), (effect, size)
    # Large n: the normal approximation n ~ (1.96 + 0.84)^2 / d^2 (+1 or 2 for the t tails).
    assert seeds_needed(0.2, paired=True) == pytest.approx((1.96 + 0.8416) ** 2 / 0.04, abs=3)
    assert seeds_needed(0.0, paired=True) is None and seeds_needed(1e-4, paired=True) == 1001
    assert 0.0 < t_power(0.5, 10, paired=False) < t_power(0.5, 10, paired=True) < 1.0


def test_the_comparison_follows_the_seed_layout() -> None:
    best = {0: 10.0, 1: 11.0, 2: 12.0}
    paired = compare_to_best("v", {0: 11.0, 1: 12.5, 2: 13.0}, best)
    assert paired.method == "paired t" and paired.n == 3 and paired.unpaired_seeds == 0
    assert paired.difference == pytest.approx(7 / 6)  # differences 1, 1.5, 1
    assert paired.p_t == pytest.approx(stats.ttest_rel([11, 12.5, 13], [10, 11, 12]).pvalue)
    failed = compare_to_best("v", {0: 11.0, 1: 12.5}, best)  # seed 2 of v failed
    assert failed.method == "paired t" and failed.n == 2 and failed.unpaired_seeds == 1
    welch = compare_to_best("v", {5: 11.0, 6: 12.5, 7: 13.0}, best)
    assert welch.method == "Welch" and welch.n == 3
    assert welch.p_t == pytest.approx(
        stats.ttest_ind([11, 12.5, 13], [10, 11, 12], equal_var=False).pvalue)
    single = compare_to_best("v", {0: 11.0}, {0: 10.0})
    assert single.method == "untested" and single.tied and "one seed" in single.reason
    tie = compare_to_best("v", dict(best), best)
    assert tie.p_t == 1.0 and tie.seeds_needed is None and tie.ci == (0.0, 0.0)
    assert compare_to_best("v", {s: v + 1 for s, v in best.items()}, best).p_t == 0.0
    wilcoxon = compare_to_best("v", {s: 1.0 + s * 1.1 for s in range(6)},
                               {s: s * 1.0 for s in range(6)})
    assert wilcoxon.p_wilcoxon == pytest.approx(2 / 2**6)  # all 6 differences positive, exact
    assert math.isfinite(wilcoxon.p_t or math.nan)
