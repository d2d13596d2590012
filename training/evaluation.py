"""Full-ranking metrics: each target is ranked against every item in the catalogue.

Ties are broken at random in expectation: a target that ties with ``t`` other items gets rank
``greater + t / 2``. A ranker that scores many items alike (popularity, for one) is thus neither
favoured nor penalised by the order of item ids.
"""

from __future__ import annotations

import torch

from training.models.base import SequenceBatch, SequenceRanker

CUTOFFS = (10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Zero-based rank of each target among all items, (B,) float, from scores (B, N) and targets (B,)."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    greater = (scores > target_scores).sum(dim=1)
    ties = (scores == target_scores).sum(dim=1) - 1
    return greater.double() + ties.double() / 2


def metric_sums(ranks: torch.Tensor) -> dict[str, float]:
    """Sum HR, NDCG and Recall at each cutoff, and MRR, over a batch of target ranks.

    With one target per user, HR@K and Recall@K are equal; both are reported under their usual names.
    """
    sums: dict[str, float] = {"count": float(len(ranks))}
    for k in CUTOFFS:
        hit = ranks < k
        sums[f"hr@{k}"] = float(hit.sum())
        sums[f"recall@{k}"] = float(hit.sum())
        sums[f"ndcg@{k}"] = float((hit / torch.log2(ranks + 2)).sum())
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


@torch.no_grad()
def evaluate_batch(ranker: SequenceRanker, batch: SequenceBatch, targets: torch.Tensor) -> dict[str, float]:
    """Rank each target against all items with ``encode`` then ``score_all``; return metric sums."""
    scores = ranker.score_all(ranker.encode(batch))
    return metric_sums(target_ranks(scores, targets))

