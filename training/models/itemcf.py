"""ItemCF baseline: items that co-occur with the user's recent items in training sequences.

Shapes: B batch, L sequence length, N item index space (padding included), P item pairs.

The similarity of items i and j is ``c_ij / sqrt(n_i * n_j)``: ``c_ij`` counts the times j follows
or precedes i within ``window`` steps in a training sequence, and ``n_i`` is i's number of training
events. Each item keeps its ``neighbors_per_item`` most similar items. A user's score for item j
sums the similarities of j to the user's last ``recent_items`` events, the most recent event
weighted 1 and each earlier one ``recency_decay`` times the next.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from training.models.base import SequenceBatch, SequenceRanker
from training.schema import PADDING_ID


@dataclasses.dataclass(frozen=True)
class ItemCFConfig:
    """How ItemCF counts co-occurrences and weighs a user's recent events."""

    window: int = 3
    """Events at most this many steps apart in a sequence co-occur."""
    neighbors_per_item: int = 100
    recent_items: int = 10
    recency_decay: float = 0.8

    def __post_init__(self) -> None:
        for name in ("window", "neighbors_per_item", "recent_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"ItemCF {name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.recency_decay <= 1.0:
            raise ValueError(f"ItemCF recency_decay must be in (0, 1], got {self.recency_decay}")


def count_cooccurrences(sequences: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count ordered item pairs at most ``window`` steps apart in left-padded rows (R, L).

    Returns ``(items, neighbors, counts)``, each (P,), with both orders of every pair and no pair
    of an item with itself.
    """
    sequences = np.asarray(sequences, dtype=np.int64)
    firsts, seconds = [], []
    for distance in range(1, min(window, sequences.shape[1] - 1) + 1):
        left, right = sequences[:, :-distance].ravel(), sequences[:, distance:].ravel()
        keep = (left != PADDING_ID) & (right != PADDING_ID) & (left != right)
        firsts += [left[keep], right[keep]]
        seconds += [right[keep], left[keep]]
    if not firsts:
        empty = np.array([], dtype=np.int64)
        return empty, empty, empty
    pairs = np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1)
    unique, counts = np.unique(pairs, axis=0, return_counts=True)
    return unique[:, 0], unique[:, 1], counts.astype(np.int64)


def top_similarities(
    items: np.ndarray,
    neighbors: np.ndarray,
    counts: np.ndarray,
    item_counts: np.ndarray,
    neighbors_per_item: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn pair counts into cosine similarities and keep each item's most similar neighbours.

    Ties keep the smaller neighbour index. Returns ``(items, neighbors, similarities)``.
    """
    item_counts = np.maximum(np.asarray(item_counts, dtype=np.float64), 1.0)
    similarities = counts / np.sqrt(item_counts[items] * item_counts[neighbors])
    order = np.lexsort((neighbors, -similarities, items))
    items, neighbors, similarities = items[order], neighbors[order], similarities[order]
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if len(items) else np.array([], np.int64)
    rank = np.arange(len(items)) - np.repeat(starts, np.diff(np.r_[starts, len(items)]))
    keep = rank < neighbors_per_item
    return items[keep], neighbors[keep], similarities[keep].astype(np.float32)


class ItemCFRanker(SequenceRanker):
    """Scores items by their similarity to the user's recent events; see the module docstring."""

    def __init__(
        self,
        num_items: int,
        items: np.ndarray,
        neighbors: np.ndarray,
        similarities: np.ndarray,
        config: ItemCFConfig | None = None,
    ) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"num_items must count padding and at least one item, got {num_items}")
        items, neighbors = np.asarray(items, dtype=np.int64), np.asarray(neighbors, dtype=np.int64)
        if len(items) and (min(items.min(), neighbors.min()) < 1 or max(items.max(), neighbors.max()) >= num_items):
            raise ValueError(f"item pairs must hold item indices in [1, {num_items - 1}]")
        self.num_items = num_items
        self.config = config or ItemCFConfig()
        # Neighbour lists in CSR form: item i's neighbours are neighbor_ids[offsets[i]:offsets[i + 1]].
        order = np.argsort(items, kind="stable")
        offsets = np.searchsorted(items[order], np.arange(num_items + 1))
        self.register_buffer("neighbor_offsets", torch.from_numpy(offsets.astype(np.int64)))  # (N + 1,)
        self.register_buffer("neighbor_ids", torch.from_numpy(neighbors[order]))  # (P,)
        self.register_buffer(
            "neighbor_similarities", torch.from_numpy(np.asarray(similarities, dtype=np.float32)[order])
        )  # (P,)

    @classmethod
    def from_sequences(
        cls, sequences: np.ndarray, item_counts: np.ndarray, config: ItemCFConfig | None = None
    ) -> "ItemCFRanker":
        """Build ItemCF from left-padded training sequences (R, L) and training events per item."""
        config = config or ItemCFConfig()
        items, neighbors, counts = count_cooccurrences(sequences, config.window)
        items, neighbors, similarities = top_similarities(
            items, neighbors, counts, item_counts, config.neighbors_per_item
        )
        return cls(len(item_counts), items, neighbors, similarities, config)

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """Weights of the user's recent items: (B, N), summed over repeats of an item."""
        recent = batch.item_ids[:, -self.config.recent_items :]  # (B, R)
        steps_back = torch.arange(recent.shape[1] - 1, -1, -1, device=recent.device)
        weights = (self.config.recency_decay**steps_back).expand_as(recent).to(torch.float32)
        weights = weights.masked_fill(recent == PADDING_ID, 0.0)
        state = torch.zeros(recent.shape[0], self.num_items, device=recent.device)
        return state.scatter_add_(1, recent, weights)

    def score_all(self, state: torch.Tensor) -> torch.Tensor:
        # A state row contains at most recent_items weights, so only those items' neighbour lists are
        # read. A product with a dense state would run through all N columns of every row.
        rows, items = state.nonzero(as_tuple=True)  # (E,)
        weights = state[rows, items]
        starts = self.neighbor_offsets[items]
        lengths = self.neighbor_offsets[items + 1] - starts
        entry = torch.repeat_interleave(torch.arange(len(items), device=state.device), lengths)  # (M,)
        entry_starts = torch.cumsum(lengths, 0) - lengths
        pair = starts[entry] + torch.arange(len(entry), device=state.device) - entry_starts[entry]
        scores = torch.zeros_like(state)
        scores.index_put_(
            (rows[entry], self.neighbor_ids[pair]),
            weights[entry] * self.neighbor_similarities[pair],
            accumulate=True,
        )  # (B, N)
        scores[:, PADDING_ID] = float("-inf")
        return scores
