"""Paired comparisons of variants against the best one, by seed, and the report's verdict.

Every variant of a compare sweep trained with the same ``seed`` starts from the same weights and
sees the same batches (common random numbers), so the seeds pair across variants and the paired
difference removes what the seed contributes to both. For each variant against the best (the
best mean on the ranking metric):

* **paired t** (``scipy.stats.ttest_rel``) on the per-seed differences over the seeds both
  variants have (at least 2; a failed job only drops its seed): mean difference, its 95 %
  confidence interval (Student t with n - 1 degrees of freedom) and the two-sided p-value;
* **Wilcoxon signed-rank** (``scipy.stats.wilcoxon``, exact for small n) beside it from
  :data:`WILCOXON_MIN_PAIRS` pairs on: with n pairs its two-sided p-value cannot go below
  2 / 2^n, which is above 0.05 for n <= 5, so below that it could never resolve anything;
* **Welch's unpaired t** (``scipy.stats.ttest_ind(equal_var=False)``) when fewer than 2 seeds
  are shared (other seed lists), each variant needing 2 seeds; the report says which used it.

The p-values of the paired (or Welch) t tests are Holm-corrected over the variants compared
(Holm 1979, step-down: the i-th smallest of m p-values is multiplied by m - i + 1, then made
monotone), which controls the family-wise error rate at 5 %. A variant whose corrected p-value
is at least 0.05, or that cannot be tested, is **tied with best**; the winner is named only
when no variant is tied with it.

**Seeds needed**: the smallest number of seeds n at which a two-sided t test at the 5 % level
would detect the observed mean difference with power 0.8, taking the observed standard
deviation as the truth. Paired: effect size d = |mean difference| / std of the differences
(Cohen's d_z), power(n) = P(|T| > t_{0.975, n-1}) with T noncentral t (n - 1 degrees of
freedom, noncentrality d * sqrt(n)). Welch: d = |difference| / sqrt((s_a^2 + s_b^2) / 2), n seeds
per variant, 2n - 2 degrees of freedom, noncentrality d * sqrt(n / 2). For large n this is the
familiar n ~ (1.96 + 0.84)^2 / d^2. It is a rough guide: d is itself estimated from few seeds,
and the Holm correction asks for somewhat more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8
CONFIDENCE = 0.95
WILCOXON_MIN_PAIRS = 6
SEEDS_NEEDED_CAP = 1000  # "more than this many seeds": the difference is practically nil

SeedValues = Mapping[int, float]  # seed -> the metric of that seed's job


@dataclass
class Versus:
    """One variant against the best: ``difference`` is mean(variant) - mean(best) (over the
    pairs for a paired test)."""

    variant: str
    method: str  # "paired t" | "Welch" | "untested"
    n: int  # pairs (paired t), the smaller group (Welch), or the seeds available (untested)
    difference: float
    ci: tuple[float, float] | None = None
    p_t: float | None = None
    p_wilcoxon: float | None = None
    p_holm: float | None = None
    seeds_needed: int | None = None  # None: no difference observed, or not estimable
    reason: str = ""  # why it was not tested
    unpaired_seeds: int = 0  # seeds of either variant left out of the pairs (failed jobs)

    @property
    def tied(self) -> bool:
        """Not distinguishable from the best at the 5 % level after Holm (or untestable)."""
        return self.p_holm is None or self.p_holm >= ALPHA


@dataclass
class Verdict:
    """The paired comparison of every variant with the best on one metric."""

    metric: str
    higher_is_better: bool
    best: str | None
    versus: dict[str, Versus] = field(default_factory=dict)

    @property
    def tied(self) -> list[str]:
        return [name for name, v in self.versus.items() if v.tied]

    @property
    def resolved(self) -> bool:
        """The best is better than every other variant (Holm-corrected, 5 %)."""
        return self.best is not None and bool(self.versus) and not self.tied

    def mark(self, variant: str) -> str:
        """``best``, ``tied with best`` or ``worse`` (``better`` never happens: the best has the
        best mean, and a significant difference has the sign of the mean difference)."""
        if variant == self.best:
            return "best"
        versus = self.versus.get(variant)
        if versus is None:
            return "–"
        return "tied with best" if versus.tied else "worse"

    def sentence(self) -> str:
        """One line: the winner when resolved, else what is and is not resolved."""
        if self.best is None:
            return f"No verdict: no variant has {self.metric}."
        if not self.versus:
            return f"Only {self.best} has {self.metric}: nothing to compare."
        direction = "higher" if self.higher_is_better else "lower"
        welch = sorted(n for n, v in self.versus.items() if v.method == "Welch")
        unpaired = (f" Unpaired (Welch) for {', '.join(welch)}: fewer than 2 seeds shared with "
                    f"the best." if welch else "")
        tested = [v for v in self.versus.values() if v.method != "untested"]
        if not tested:
            return (f"Not resolved: {self.best} has the best mean {self.metric} ({direction} is "
                    f"better), but {next(iter(self.versus.values())).reason}, so nothing can be "
                    f"tested; run at least 2 seeds per variant.")
        if self.resolved:
            worst_p = max(v.p_holm or 0.0 for v in self.versus.values())
            return (f"Winner: {self.best} on {self.metric} ({direction} is better): better than "
                    f"all {len(self.versus)} other variants (Holm-corrected p <= "
                    f"{worst_p:.2g}).{unpaired}")
        tied = self.tied
        beaten = len(self.versus) - len(tied)
        needed = [n for name in tied if (n := self.versus[name].seeds_needed) is not None]
        hint = (f" About {min(needed)} to {max(needed)} seeds would resolve them (power 0.8, "
                f"observed effects)." if needed else "")
        return (f"Not resolved: {self.best} has the best mean {self.metric} ({direction} is "
                f"better), but {len(tied)} variant(s) are tied with it at the 5 % level "
                f"(Holm): {', '.join(tied)}; it is better than the other {beaten}.{hint}"
                f"{unpaired}")


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE
                  ) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean (None below 2 values)."""
    n = len(values)
    if n < 2:
        return None
    mean, sem = float(np.mean(values)), float(stats.sem(values))
    if sem == 0.0:
        return (mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return (float(low), float(high))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def t_power(effect: float, n: int, paired: bool, alpha: float = ALPHA) -> float:
    """Power of the two-sided t test (noncentral t; see the module docstring)."""
    df = n - 1 if paired else 2 * n - 2
    noncentrality = effect * math.sqrt(n if paired else n / 2)
    critical = stats.t.ppf(1 - alpha / 2, df)
    power = float(stats.nct.sf(critical, df, noncentrality)
                  + stats.nct.cdf(-critical, df, noncentrality))
    if math.isnan(power):  # scipy's noncentral t fails for very large noncentralities
        power = float(stats.norm.sf(critical - noncentrality)
                      + stats.norm.cdf(-critical - noncentrality))
    return power


def seeds_needed(effect: float, paired: bool, power: float = POWER) -> int | None:
    """Smallest n >= 2 with :func:`t_power` >= ``power``; None when ``effect`` is 0 and
    ``SEEDS_NEEDED_CAP + 1`` when even the cap is not enough."""
    if not effect > 0:
        return None
    if math.isinf(effect):
        return 2
    high = 2
    while t_power(effect, high, paired) < power:  # power grows with n: double, then bisect
        if high > SEEDS_NEEDED_CAP:
            return SEEDS_NEEDED_CAP + 1
        high *= 2
    low = max(2, high // 2)
    while low < high:
        middle = (low + high) // 2
        if t_power(effect, middle, paired) >= power:
            high = middle
        else:
            low = middle + 1
    return low


def paired_test(name: str, own: SeedValues, best: SeedValues) -> Versus:
    seeds = sorted(own)
    differences = np.array([own[s] - best[s] for s in seeds], dtype=float)
    mean = float(differences.mean())
    versus = Versus(name, "paired t", len(seeds), mean)
    spread = float(differences.std(ddof=1))
    if spread == 0.0:  # the same difference on every seed: t is 0/0 or infinite
        versus.ci, versus.p_t = (mean, mean), (1.0 if mean == 0 else 0.0)
        versus.seeds_needed = None if mean == 0 else 2
    else:
        result = stats.ttest_rel([own[s] for s in seeds], [best[s] for s in seeds])
        interval = result.confidence_interval(CONFIDENCE)
        versus.ci, versus.p_t = (float(interval.low), float(interval.high)), float(result.pvalue)
        versus.seeds_needed = seeds_needed(abs(mean) / spread, paired=True)
    if len(seeds) >= WILCOXON_MIN_PAIRS and np.any(differences != 0):
        versus.p_wilcoxon = float(stats.wilcoxon(differences).pvalue)
    return versus


def welch_test(name: str, own: SeedValues, best: SeedValues) -> Versus:
    a, b = np.array(list(own.values()), float), np.array(list(best.values()), float)
    mean = float(a.mean() - b.mean())
    versus = Versus(name, "Welch", min(len(a), len(b)), mean)
    pooled = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    if pooled == 0.0:
        versus.ci, versus.p_t = (mean, mean), (1.0 if mean == 0 else 0.0)
        versus.seeds_needed = None if mean == 0 else 2
        return versus
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    versus.ci, versus.p_t = (float(interval.low), float(interval.high)), float(result.pvalue)
    versus.seeds_needed = seeds_needed(abs(mean) / pooled, paired=False)
    return versus


def compare_to_best(name: str, own: SeedValues, best: SeedValues) -> Versus:
    """Paired t on the seeds both have (at least 2; a failed job drops its seed from the pairs),
    else Welch (2 seeds each), else untested."""
    common = sorted(set(own) & set(best))
    if len(common) >= 2:
        versus = paired_test(name, {s: own[s] for s in common}, {s: best[s] for s in common})
        versus.unpaired_seeds = len(set(own) ^ set(best))
        return versus
    if min(len(own), len(best)) >= 2:
        return welch_test(name, own, best)
    difference = float(np.mean(list(own.values())) - np.mean(list(best.values())))
    reason = "one seed per variant" if set(own) == set(best) else "fewer than 2 seeds"
    return Versus(name, "untested", min(len(own), len(best)), difference, reason=reason)


def verdict(values: Mapping[str, SeedValues], metric: str, higher_is_better: bool) -> Verdict:
    """Compare every variant of ``values`` (variant -> seed -> value) with the best mean."""
    present = {name: seeds for name, seeds in values.items() if seeds}
    if not present:
        return Verdict(metric, higher_is_better, None)
    sign = -1.0 if higher_is_better else 1.0
    best = min(present, key=lambda name: sign * float(np.mean(list(present[name].values()))))
    result = Verdict(metric, higher_is_better, best)
    for name, seeds in present.items():
        if name != best:
            result.versus[name] = compare_to_best(name, seeds, present[best])
    tested = [v for v in result.versus.values() if v.p_t is not None]
    for versus, adjusted in zip(tested, holm([v.p_t or 0.0 for v in tested]), strict=True):
        versus.p_holm = adjusted
    return result
