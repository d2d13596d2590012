"""Full-ranking metrics: each target is ranked against every item in the catalogue.

Ties are broken at random in expectation: a target that ties with ``t`` other items gets rank
``greater + t / 2``. A ranker that scores many items alike (popularity, for one) is thus neither
favoured nor penalised by the order of item ids.

With ``exclude_seen``, the items among a user's input events are left out of that user's ranking,
as in a shop that never recommends an item twice. A target that the user has already seen then
counts as a miss. The option is off by default.

Sampled-negative metrics (the target ranked against a few sampled items) are computed only on
request, with a named sampler and a seed. They are reported under ``sampled_`` names and never
replace the full-ranking ones.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from training.models.base import SequenceBatch, SequenceRanker
from training.schema import PADDING_ID

CUTOFFS = (10, 20)
METRIC_NAMES = tuple(f"{name}@{k}" for k in CUTOFFS for name in ("hr", "recall", "ndcg", "mrr")) + ("mrr",)
SAMPLED_PREFIX = "sampled_"
SAMPLERS = ("uniform", "popularity")


@dataclasses.dataclass(frozen=True)
class SampledMetricsConfig:
    """Negatives for sampled metrics: ``num_negatives`` items per user from a named sampler.

    ``uniform`` draws items uniformly; ``popularity`` draws them in proportion to their training
    events. Draws are with replacement. A user's negatives depend only on the seed, the user id
    and the sampler, so they do not change with batching or the number of workers. The target
    itself is never a uniform negative. A popularity draw that hits the target is dropped, so such
    a user is ranked against slightly fewer negatives.
    """

    sampler: Literal["uniform", "popularity"]
    num_negatives: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """Hash each value to a well-mixed 64-bit integer with the SplitMix64 finaliser."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class NegativeSampler:
    """Draws each user's evaluation negatives; see ``SampledMetricsConfig``."""

    def __init__(self, config: SampledMetricsConfig, item_counts: np.ndarray) -> None:
        item_counts = np.asarray(item_counts, dtype=np.float64)
        if len(item_counts) < 3:
            raise ValueError(f"sampled metrics need at least 2 items besides padding, got {len(item_counts) - 1}")
        self.config = config
        self.num_items = len(item_counts)
        weights = item_counts.copy()
        weights[PADDING_ID] = 0.0
        if config.sampler == "popularity" and weights.sum() <= 0:
            raise ValueError("the popularity sampler needs at least one item with training events")
        self._cumulative = np.cumsum(weights)

    def sample(self, user_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Negatives (B, S) for users (B,) with targets (B,); a dropped draw is the padding index."""
        config = self.config
        user_ids = np.asarray(user_ids, dtype=np.int64)
        draws = np.arange(config.num_negatives, dtype=np.uint64)
        with np.errstate(over="ignore"):
            keys = _splitmix64(_splitmix64(np.array([config.seed], np.uint64)) ^ user_ids.astype(np.uint64))
            hashes = _splitmix64(keys[:, None] * np.uint64(0x100000001B3) + draws[None, :])  # (B, S)
        targets = np.asarray(targets, dtype=np.int64)[:, None]
        if config.sampler == "uniform":
            # Uniform over the items other than padding and the target.
            negatives = (hashes % np.uint64(self.num_items - 2)).astype(np.int64) + 1
            return negatives + (negatives >= targets)
        fractions = (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        negatives = np.searchsorted(self._cumulative, fractions * self._cumulative[-1], side="right")
        return np.where(negatives == targets, PADDING_ID, negatives)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Zero-based rank of each target among all items, (B,) float, from scores (B, N) and targets (B,)."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    greater = (scores > target_scores).sum(dim=1)
    ties = (scores == target_scores).sum(dim=1) - 1
    return greater.double() + ties.double() / 2


def metric_sums(ranks: torch.Tensor) -> dict[str, float]:
    """Sum HR, NDCG, Recall and MRR at each cutoff, and MRR over the whole list, for a batch of target ranks.

    With one target per user, HR@K and Recall@K are equal; both are reported under their usual names.
    MRR@K counts a target ranked beyond K as 0.
    """
    sums: dict[str, float] = {"count": float(len(ranks))}
    for k in CUTOFFS:
        hit = ranks < k
        sums[f"hr@{k}"] = float(hit.sum())
        sums[f"recall@{k}"] = float(hit.sum())
        sums[f"ndcg@{k}"] = float((hit / torch.log2(ranks + 2)).sum())
        sums[f"mrr@{k}"] = float((hit / (ranks + 1)).sum())
    sums["mrr"] = float((1.0 / (ranks + 1)).sum())
    return sums


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    for name, value in part.items():
        total[name] = total.get(name, 0.0) + value
    return total


def means(sums: dict[str, float]) -> dict[str, float]:
    """Divide metric sums by the number of targets."""
    count = sums.get("count", 0.0)
    if not count:
        return {name: 0.0 for name in sums if name != "count"} | {"count": 0.0}
    return {name: value / count for name, value in sums.items() if name != "count"} | {"count": count}


def sampled_metric_sums(
    scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, missed: torch.Tensor | None = None
) -> dict[str, float]:
    """Rank each target against its negatives (B, S) alone and return the sums under ``sampled_`` names.

    Targets flagged in ``missed`` (B,) count as misses.
    """
    candidates = torch.cat([targets.unsqueeze(1), negatives], dim=1)  # (B, 1 + S)
    candidate_scores = scores.gather(1, candidates).masked_fill(candidates == PADDING_ID, float("-inf"))
    ranks = target_ranks(candidate_scores, torch.zeros_like(targets))
    if missed is not None:
        ranks = ranks.masked_fill(missed, float("inf"))
    sums = metric_sums(ranks)
    return {SAMPLED_PREFIX + name: value for name, value in sums.items() if name != "count"}


@torch.no_grad()
def evaluate_batch(
    ranker: SequenceRanker,
    batch: SequenceBatch,
    targets: torch.Tensor,
    user_ids: np.ndarray | None = None,
    sampler: NegativeSampler | None = None,
    exclude_seen: bool = False,
) -> dict[str, float]:
    """Rank each target against all items with ``encode`` then ``score_all``; return metric sums.

    With a ``sampler`` (and the batch's ``user_ids``), sampled-negative sums are added. With
    ``exclude_seen``, the items of the batch's inputs get the lowest score before ranking, and a
    target among them gets an infinite rank.
    """
    scores = ranker.score_all(ranker.encode(batch))
    missed = None
    if exclude_seen:
        scores = scores.scatter(1, batch.item_ids, float("-inf"))
        missed = (batch.item_ids == targets.unsqueeze(1)).any(dim=1)
    ranks = target_ranks(scores, targets)
    if missed is not None:
        ranks = ranks.masked_fill(missed, float("inf"))
    sums = metric_sums(ranks)
    if sampler is not None:
        if user_ids is None:
            raise ValueError("sampled metrics need the user ids of the batch")
        negatives = torch.from_numpy(sampler.sample(user_ids, targets.cpu().numpy())).to(scores.device)
        sums |= sampled_metric_sums(scores, targets, negatives, missed)
    return sums

