"""Id vocabularies: raw ids from the event log to dense model indices.

Index 0 is padding and never a real id, so real ids map to 1..N. Lookups are vectorized with a
binary search over the sorted raw ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.schema import PADDING_ID


class Vocabulary:
    """A sorted set of raw ids; the raw id at position i has index i + 1."""

    def __init__(self, raw_ids: np.ndarray) -> None:
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        if raw_ids.ndim != 1:
            raise ValueError(f"raw ids must be one-dimensional, got shape {raw_ids.shape}")
        self.raw_ids = np.unique(raw_ids)

    def __len__(self) -> int:
        """Number of real ids, without padding."""
        return len(self.raw_ids)

    @property
    def size_with_padding(self) -> int:
        return len(self.raw_ids) + 1

    def lookup(self, raw_ids: np.ndarray) -> np.ndarray:
        """Map raw ids to indices; unknown ids map to the padding index 0."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64)
        if len(self.raw_ids) == 0:
            return np.full(raw_ids.shape, PADDING_ID, dtype=np.int64)
        position = np.searchsorted(self.raw_ids, raw_ids)
        clipped = np.minimum(position, len(self.raw_ids) - 1)
        known = self.raw_ids[clipped] == raw_ids
        return np.where(known, clipped + 1, PADDING_ID).astype(np.int64)

    def raw(self, indices: np.ndarray) -> np.ndarray:
        """Map indices 1..N back to raw ids. Padding has no raw id and raises."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 1 or indices.max() > len(self.raw_ids)):
            raise IndexError(f"indices must be in 1..{len(self.raw_ids)}, got {indices.min()}..{indices.max()}")
        return self.raw_ids[indices - 1]

    def save(self, path: str | Path) -> None:
        np.save(path, self.raw_ids)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls(np.load(path))
