"""Trending items: the items whose latest day of events most exceeds their usual daily rate.

Popularity ranks items by all their events, so an item that has only just begun to sell stays
below the long-time sellers. The trending list looks only at the end of the data. For each item it
counts the events in the last ``window_s`` before the newest event (``recent``) and in the
``baseline_s`` before that window (``baseline``).
The baseline scaled to the window length is the expected count, and the score is how far the
recent count exceeds it in units of its Poisson spread:

    expected = baseline * window_s / baseline_s
    score = (recent - expected) / sqrt(expected + 1)

Only items with at least ``min_recent_events`` recent events are ranked, so one stray view does not
trend. The list is computed when a model is trained and stored in its artefact, so it is as fresh
as the model version.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import ray.data

from training.examples import timestamps_seconds
from training.schema import ITEM_ID
from training.vocab import Vocabulary

_RECENT = "recent"
_BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class TrendingConfig:
    window_s: int = 86_400
    """Length of the recent window that ends at the newest event."""
    baseline_s: int = 7 * 86_400
    """Length of the window just before it, which sets each item's usual rate."""
    min_recent_events: int = 3
    max_items: int = 1_000
    """Length of the stored list."""

    def __post_init__(self) -> None:
        if self.window_s < 1 or self.baseline_s < 1:
            raise ValueError(f"window_s and baseline_s must be at least 1 second, got {self.window_s}, {self.baseline_s}")
        if self.min_recent_events < 1 or self.max_items < 1:
            raise ValueError(
                f"min_recent_events and max_items must be at least 1, got {self.min_recent_events}, {self.max_items}"
            )


def trending_scores(recent: np.ndarray, baseline: np.ndarray, config: TrendingConfig) -> np.ndarray:
    """Score items from their recent and baseline event counts. Items below the minimum get -inf."""
    recent = np.asarray(recent, dtype=np.float64)
    expected = np.asarray(baseline, dtype=np.float64) * (config.window_s / config.baseline_s)
    scores = (recent - expected) / np.sqrt(expected + 1.0)
    return np.where(recent >= config.min_recent_events, scores, -np.inf)


def rank_trending(item_indices: np.ndarray, scores: np.ndarray, max_items: int) -> np.ndarray:
    """Return the item indices with a finite score, best first. Ties go to the smaller index."""
    item_indices, scores = np.asarray(item_indices), np.asarray(scores)
    keep = np.isfinite(scores)
    item_indices, scores = item_indices[keep], scores[keep]
    order = np.lexsort((item_indices, -scores))
    return item_indices[order][:max_items].astype(np.int64)


def _window_counts(batch: pa.Table, newest_s: int, config: TrendingConfig) -> pa.Table:
    seconds = timestamps_seconds(batch)
    recent_start = newest_s - config.window_s
    recent = seconds > recent_start
    baseline = (seconds > recent_start - config.baseline_s) & ~recent
    keep = recent | baseline
    return pa.table(
        {
            ITEM_ID: batch[ITEM_ID].filter(pa.array(keep)),
            _RECENT: pa.array(recent[keep].astype(np.int64)),
            _BASELINE: pa.array(baseline[keep].astype(np.int64)),
        }
    )


def trending_items(events: ray.data.Dataset, item_vocab: Vocabulary, config: TrendingConfig | None = None) -> np.ndarray:
    """Rank the trending items of canonical events and return their indices in ``item_vocab``, best first.

    Only the events of the last ``window_s + baseline_s`` reach the aggregation, and only one row
    per item seen there reaches the driver.
    """
    config = config or TrendingConfig()
    newest = events.map_batches(
        lambda batch: pa.table({"seconds": timestamps_seconds(batch)}), batch_format="pyarrow"
    ).max("seconds")
    if newest is None:
        return np.zeros(0, dtype=np.int64)
    counts = (
        events.map_batches(_window_counts, fn_kwargs={"newest_s": int(newest), "config": config}, batch_format="pyarrow")
        .groupby(ITEM_ID)
        .sum([_RECENT, _BASELINE])
        .to_pandas()
    )
    if counts.empty:
        return np.zeros(0, dtype=np.int64)
    scores = trending_scores(counts[f"sum({_RECENT})"].to_numpy(), counts[f"sum({_BASELINE})"].to_numpy(), config)
    return rank_trending(item_vocab.lookup(counts[ITEM_ID].to_numpy()), scores, config.max_items)
