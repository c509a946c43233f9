"""Per-channel statistics of a store's teacher latents, and the outlier-channel check.

Why: the student regresses per-token layer-normed teacher latents. If a few channels of
the teacher's residual stream are much larger than the rest, they hold most of each
token's normed energy, and the loss mostly measures them. ``salt-cache stats`` (and a
short block at the end of a build and at the start of a training run) reports that;
``model.target_norm: channel`` standardises every channel with these statistics before
the layer norm.

Definitions (``x[t, c]``: the latent of token ``t`` (over every token of every row read),
channel ``c``, width D):

- ``mean[c]``, ``std[c]``: over all tokens (population std); ``max_abs[c]``: max ``|x[t, c]|``.
- normed latent ``z[t, :]``: ``x[t, :]`` layer-normed per token, no affine, eps
  :data:`LAYER_NORM_EPS` (what the objective regresses with ``model.target_norm: layer``).
- ``energy[c]``: mean over tokens of ``z[t, c]**2`` (sums to about D, since each token's
  normed values have unit variance); ``energy_share[c] = energy[c] / sum(energy)``.
- top-8 share: the sum of the :data:`TOP_CHANNELS` largest ``energy_share`` values: the
  share of the loss's target energy held by 8 fixed channels. Even energy gives 8/D.

Channels whose share exceeds :data:`OUTLIER_MULTIPLE` times the even share 1/D are named
outliers; the warning fires when the top-8 share exceeds :func:`warning_share` (the same
multiple of 8/D, capped at :data:`MAX_WARNING_SHARE` for narrow teachers, where 10 x 8/D
could not be reached). Sums are accumulated in float64.

Rows are read through the store's one read path (:func:`shared.rows.read_rows`), each
checked against its stored checksum: a damaged or non-finite row is skipped and counted,
never averaged in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared.errors import SaltUsageError
from shared.rows import committed_rows, read_rows
from shared.store import LatentStore

TOP_CHANNELS = 8
OUTLIER_MULTIPLE = 10.0  # a channel with 10x the even energy share (3.2x the typical normed std) is an outlier
MAX_WARNING_SHARE = 0.5  # for narrow teachers: warn once 8 channels hold half the energy
LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default, as salt_train.loss uses it
STD_FLOOR = 1e-6  # a constant channel is left unscaled rather than divided by zero
DEFAULT_ROWS = 512  # `salt-cache stats` and model.target_norm: channel read a seeded sample of this many rows
SUMMARY_ROWS = 64  # the short blocks of a build and of a training run's start: cheap
READ_BATCH = 8  # rows per read


def warning_share(width: int) -> float:
    """The top-8 share past which the warning fires, for a teacher ``width`` channels wide."""
    return min(OUTLIER_MULTIPLE * TOP_CHANNELS / width, MAX_WARNING_SHARE)


@dataclass
class LatentStats:
    """The statistics of the rows read (see the module docstring for each figure)."""

    width: int
    rows_read: int
    committed: int  # committed rows in the store
    sampled: bool  # a seeded sample of the committed rows (else all of them)
    seed: int
    tokens: int
    mean: np.ndarray  # float64 [D]
    std: np.ndarray
    max_abs: np.ndarray
    energy: np.ndarray
    skipped_rows: list[int] = field(default_factory=list)  # damaged (checksum) or non-finite: not counted

    @property
    def energy_share(self) -> np.ndarray:
        return self.energy / self.energy.sum()

    @property
    def top_share(self) -> float:
        return float(np.sort(self.energy_share)[::-1][:TOP_CHANNELS].sum())

    @property
    def warning_share(self) -> float:
        return warning_share(self.width)

    @property
    def outlier_channels(self) -> list[int]:
        """Channels above :data:`OUTLIER_MULTIPLE` times the even share, largest share first."""
        share = self.energy_share
        above = np.flatnonzero(share > OUTLIER_MULTIPLE / self.width)
        return [int(c) for c in above[np.argsort(-share[above], kind="stable")]]

    @property
    def warns(self) -> bool:
        return self.top_share > self.warning_share

    def rows_line(self) -> str:
        read = (
            f"a seeded sample of {self.rows_read} of {self.committed} committed rows (seed {self.seed})"
            if self.sampled
            else f"all {self.rows_read} committed rows"
        )
        skipped = f"; {len(self.skipped_rows)} damaged or non-finite rows skipped" if self.skipped_rows else ""
        return read + skipped

    def share_line(self) -> str:
        return (
            f"{100 * self.top_share:.1f}% of the layer-normed target energy "
            f"(even: {100 * TOP_CHANNELS / self.width:.1f}%, warning above {100 * self.warning_share:.1f}%)"
        )

    def outliers_line(self) -> str:
        share = self.energy_share
        named = ", ".join(f"{c} ({100 * share[c]:.1f}%)" for c in self.outlier_channels[:16])
        more = len(self.outlier_channels) - 16
        return (named + (f" and {more} more" if more > 0 else "")) or "none"

    def warning(self) -> str | None:
        """The warning line, or None when the top-8 share is below the threshold."""
        if not self.warns:
            return None
        return (
            f"{TOP_CHANNELS} of {self.width} teacher channels hold {100 * self.top_share:.1f}% of the layer-normed "
            f"target energy (threshold {100 * self.warning_share:.1f}%): the loss mostly measures channels "
            f"{', '.join(map(str, self.outlier_channels[:TOP_CHANNELS]))}; consider model.target_norm: channel"
        )

    def summary(self) -> dict[str, str]:
        """The short block of a build's end and a training run's start."""
        return {
            "rows read": self.rows_line(),
            "channels": f"{self.width}; std {self.std.min():.3g} to {self.std.max():.3g} (median "
            f"{np.median(self.std):.3g}), max |x| {self.max_abs.max():.4g} "
            f"(channel {int(self.max_abs.argmax())})",
            f"top-{TOP_CHANNELS} energy": self.share_line(),
            "outlier channels": self.outliers_line(),
        }

    def table(self, top: int = 10) -> list[str]:
        """Per-channel lines: the ``top`` channels by std, then by energy share."""
        share = self.energy_share
        header = f"  {'channel':>7} {'mean':>10} {'std':>10} {'max |x|':>10} {'energy share':>13}"

        def rows(order: np.ndarray) -> list[str]:
            return [
                f"  {c:>7} {self.mean[c]:>10.4g} {self.std[c]:>10.4g} {self.max_abs[c]:>10.4g} {100 * share[c]:>12.2f}%"
                for c in order[:top]
            ]

        return (
            [f"top {min(top, self.width)} channels by std:", header]
            + rows(np.argsort(-self.std, kind="stable"))
            + [f"top {min(top, self.width)} channels by energy share:", header]
            + rows(np.argsort(-share, kind="stable"))
        )

    def standardisation(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` for ``model.target_norm: channel``: ``(x - mean) / std``, std floored."""
        return self.mean.copy(), np.maximum(self.std, STD_FLOOR)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("mean", "std", "max_abs", "energy"):
            record[key] = [float(v) for v in record[key]]  # repr round-trips float64 exactly
        return {
            **record,
            "energy_share": [float(v) for v in self.energy_share],
            "top_share": self.top_share,
            "warning_share": self.warning_share,
            "outlier_channels": self.outlier_channels,
            "warning": self.warning(),
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LatentStats:
        fields = {key: record[key] for key in ("width", "rows_read", "committed", "sampled", "seed", "tokens")}
        arrays = {key: np.asarray(record[key], dtype=np.float64) for key in ("mean", "std", "max_abs", "energy")}
        if any(len(a) != fields["width"] for a in arrays.values()):
            raise ValueError(f"statistics of {fields['width']} channels hold arrays of another length")
        return cls(
            **fields,
            mean=arrays["mean"],
            std=arrays["std"],
            max_abs=arrays["max_abs"],
            energy=arrays["energy"],
            skipped_rows=list(record.get("skipped_rows", [])),
        )


class ChannelAccumulator:
    """Float64 running sums over tokens, fed one block of rows at a time."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.tokens = 0
        self.sum = np.zeros(width)
        self.sum_sq = np.zeros(width)
        self.max_abs = np.zeros(width)
        self.energy_sum = np.zeros(width)

    def add(self, latents: np.ndarray) -> None:
        """``latents``: ``[..., D]`` (any float dtype)."""
        x = np.asarray(latents, dtype=np.float64).reshape(-1, self.width)
        self.tokens += len(x)
        self.sum += x.sum(axis=0)
        self.sum_sq += np.square(x).sum(axis=0)
        np.maximum(self.max_abs, np.abs(x).max(axis=0), out=self.max_abs)
        centred = x - x.mean(axis=1, keepdims=True)
        squared = np.square(centred)  # each token's layer-normed energy per channel, below
        self.energy_sum += (squared / (squared.mean(axis=1, keepdims=True) + LAYER_NORM_EPS)).sum(axis=0)

    def finish(self) -> dict[str, np.ndarray]:
        if not self.tokens:
            raise ValueError("no tokens accumulated")
        mean = self.sum / self.tokens
        variance = np.maximum(self.sum_sq / self.tokens - np.square(mean), 0.0)
        return {
            "mean": mean,
            "std": np.sqrt(variance),
            "max_abs": self.max_abs.copy(),
            "energy": self.energy_sum / self.tokens,
        }


def sample_committed_rows(store: LatentStore, rows: int | None, seed: int) -> tuple[np.ndarray, int]:
    """Sorted committed row ids: a seeded sample of ``rows`` of them (all when ``rows`` is None or 0,
    or when there are no more); and the committed count."""
    committed = committed_rows(store)
    if not len(committed):
        raise SaltUsageError(f"store {store.path} has no committed rows: nothing to measure")
    if rows and rows < len(committed):
        chosen = np.random.default_rng(seed).choice(committed, size=rows, replace=False)
        return np.sort(chosen), len(committed)
    return committed, len(committed)


def iter_latent_rows(store: LatentStore, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray | None]]:
    """``(row, latents [1568, D])`` for each row, read through the store's read path;
    ``None`` for a row whose bytes do not match its stored checksum or cannot be read."""
    for start in range(0, len(rows), READ_BATCH):
        block = rows[start : start + READ_BATCH]
        data: Iterable[np.ndarray | None]
        try:
            (data,) = read_rows(store, block, ("latents",), check=True)
        except Exception:  # a damaged row or shard file: read the rows one by one, to skip only the bad ones
            data = [_read_one(store, int(row)) for row in block]
        yield from zip((int(row) for row in block), data, strict=False)


def _read_one(store: LatentStore, row: int) -> np.ndarray | None:
    try:
        return read_rows(store, np.array([row]), ("latents",), check=True)[0][0]
    except Exception:
        return None


def compute_stats(store: LatentStore, rows: int | None = DEFAULT_ROWS, seed: int = 0) -> LatentStats:
    """The statistics of ``rows`` seeded-sampled committed rows (all of them when ``rows`` is None or 0)."""
    chosen, committed = sample_committed_rows(store, rows, seed)
    width = store.teacher_width
    accumulator = ChannelAccumulator(width)
    skipped: list[int] = []
    for row, latents in iter_latent_rows(store, chosen):
        if latents is None or not np.isfinite(latents).all():
            skipped.append(row)
            continue
        accumulator.add(latents)
    if not accumulator.tokens:
        raise SaltUsageError(
            f"store {store.path}: every row read ({len(chosen)}) is damaged or non-finite; run salt-cache verify on it"
        )
    return LatentStats(
        width=width,
        rows_read=len(chosen) - len(skipped),
        committed=committed,
        sampled=len(chosen) < committed,
        seed=seed,
        tokens=accumulator.tokens,
        skipped_rows=skipped,
        **accumulator.finish(),
    )
