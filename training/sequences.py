"""Model inputs from user sequences, shared by training, evaluation and serving.

Sequences are left-padded: the most recent event is always in the last position, and padding
(index 0) fills the front. Every path that builds model inputs calls ``pad_left``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.schema import BEHAVIOR_CODES, PADDING_ID


def pad_left(sequences: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Stack sequences into a (B, length) int64 array, keeping the last ``length`` ids of each."""
    batch = np.full((len(sequences), length), PADDING_ID, dtype=np.int64)
    for row, values in enumerate(sequences):
        tail = np.asarray(values, dtype=np.int64)[-length:]
        if len(tail):
            batch[row, length - len(tail) :] = tail
    return batch


def behavior_codes(behaviors: Sequence[str]) -> np.ndarray:
    """Map behaviour names to codes 1..4; unknown names raise ValueError."""
    try:
        return np.fromiter((BEHAVIOR_CODES[name] for name in behaviors), dtype=np.int64, count=len(behaviors))
    except KeyError as error:
        raise ValueError(
            f"unknown behavior {error.args[0]!r}; expected one of {sorted(BEHAVIOR_CODES)}"
        ) from None
