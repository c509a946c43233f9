"""How sure a figure is: 95% bootstrap intervals over validation rows, and the mean over probe seeds.

Every probe figure of the table is a mean over validation rows of a per-row
score (1 if the row's prediction was right, averaged over the row's samples
and the probe's seeds). Its interval resamples the rows with replacement, and
the probe seeds too, ``resamples`` times from a generator seeded by the
evaluation's seed, and takes the 2.5th and 97.5th percentiles of the resampled
means: the spread that another draw of validation clips of the same kind, and
other probe initialisations, would give (a probe that fails for one seed in
three widens its interval instead of hiding in the mean). Two figures whose
intervals overlap are not told apart (README, "Reading the table").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def resample_weights(rows: int, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """``[resamples, rows]`` counts: how often each row is drawn in each bootstrap resample."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, rows, 31]))
    return (
        rng.multinomial(rows, np.full(rows, 1 / rows), size=resamples).astype(np.float64)
        if rows
        else np.zeros((resamples, 0))
    )


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def seeds_and_rows_interval(per_seed_row: np.ndarray, seed: int) -> tuple[float, float]:
    """The 95% bootstrap interval of ``per_seed_row.mean()`` (``[seeds, rows]``), resampling rows and seeds."""
    per_seed_row = np.asarray(per_seed_row, dtype=np.float64)
    seeds, rows = per_seed_row.shape
    if rows == 0:
        return (float("nan"), float("nan"))
    row_weights = resample_weights(rows, seed)  # [resamples, rows]
    seed_weights = resample_weights(seeds, seed + 1)  # [resamples, seeds]; all ones for one seed
    per_resample_seed = row_weights @ per_seed_row.T / rows  # [resamples, seeds]
    return interval((per_resample_seed * seed_weights).sum(axis=1) / seeds)


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, seed: int) -> tuple[float, float]:
    """The interval of ``sum(numerator) / sum(denominator)`` over rows (e.g. a loss summed per row over
    its masked tokens, divided by the rows' token counts)."""
    weights = resample_weights(len(numerator), seed)
    return interval((weights @ numerator) / (weights @ denominator))


@dataclass(frozen=True)
class SeededScore:
    """One probe figure over several probe seeds: what eval.json records in full."""

    top1: float  # mean over seeds
    top1_interval: tuple[float, float]  # 95% bootstrap over validation rows and probe seeds
    top1_seeds: tuple[float, ...]
    top5: float | None
    top5_interval: tuple[float, float] | None
    chance: float
    samples: int
    rows: int  # validation rows the interval resamples

    def record(self) -> dict:
        return {
            "top1": self.top1,
            "top1_interval": list(self.top1_interval),
            "top1_seeds": list(self.top1_seeds),
            "top5": self.top5,
            "top5_interval": None if self.top5_interval is None else list(self.top5_interval),
            "chance": self.chance,
            "samples": self.samples,
            "rows": self.rows,
        }


def seeded_score(
    correct1: np.ndarray, correct5: np.ndarray | None, row_of_sample: np.ndarray, chance: float, seed: int
) -> SeededScore:
    """From ``[seeds, samples]`` right/wrong (top-1, and top-5 or None) and each sample's validation row:
    the means over seeds and samples, and their intervals over rows and seeds."""
    rows, inverse = np.unique(row_of_sample, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(rows))

    def per_seed_row(correct: np.ndarray) -> np.ndarray:
        sums = np.zeros((correct.shape[0], len(rows)))
        for k, per_sample in enumerate(correct):
            np.add.at(sums[k], inverse, per_sample)
        return sums / counts

    top1_rows = per_seed_row(correct1)
    top5_rows = per_seed_row(correct5) if correct5 is not None else None
    return SeededScore(
        top1=float(correct1.mean()),
        top1_interval=seeds_and_rows_interval(top1_rows, seed),
        top1_seeds=tuple(float(c.mean()) for c in correct1),
        top5=None if correct5 is None else float(correct5.mean()),
        top5_interval=None if top5_rows is None else seeds_and_rows_interval(top5_rows, seed),
        chance=chance,
        samples=correct1.shape[1],
        rows=len(rows),
    )
