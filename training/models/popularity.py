"""Popularity baseline: every user gets the items with the most training events."""

from __future__ import annotations

import numpy as np
import torch

from training.models.base import SequenceBatch, SequenceRanker
from training.schema import PADDING_ID


class PopularityRanker(SequenceRanker):
    """Scores an item by its event count in the training data, whatever the user's sequence."""

    def __init__(self, item_counts: np.ndarray) -> None:
        super().__init__()
        counts = torch.as_tensor(np.asarray(item_counts, dtype=np.float32))
        if counts.dim() != 1 or len(counts) < 1:
            raise ValueError(f"item_counts must be a non-empty vector indexed by item, got shape {tuple(counts.shape)}")
        self.num_items = len(counts)
        counts = counts.clone()
        counts[PADDING_ID] = float("-inf")
        self.register_buffer("counts", counts)
        # Counts never change after construction, so the ranking is computed once for all requests.
        order = np.lexsort((np.arange(self.num_items), -counts.numpy()))
        self._ranked_items = order[order != PADDING_ID]

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.zeros(batch.item_ids.shape[0], 1)

    def score_all(self, state: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(state.shape[0], -1)

    def _score_candidates(self, state: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.counts[candidates]

    def top_items(self, k: int) -> np.ndarray:
        """Indices of the k most popular items, most popular first; ties go to the smaller index."""
        return self._ranked_items[:k]
