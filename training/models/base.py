"""The interface that every ranker implements: encode a sequence, then score candidate items."""

from __future__ import annotations

import abc
import dataclasses

import torch

from training.schema import PADDING_ID


@dataclasses.dataclass
class SequenceBatch:
    """Left-padded index sequences of B users, each tensor of shape (B, L) and dtype int64.

    Padding is index 0 in every tensor, at the front of each row, so the most recent event is
    always in the last position. Rows padded on the right, or with padding between events, are
    rejected: models read a user's state from the last column. ``timestamps_s`` contains each
    event's Unix time in seconds (0 at padding). Callers without timestamps leave it None, and
    models that read time gaps then see every gap as unknown.
    """

    item_ids: torch.Tensor
    category_ids: torch.Tensor
    behaviors: torch.Tensor
    timestamps_s: torch.Tensor | None = None

    def __post_init__(self) -> None:
        tensors = [self.item_ids, self.category_ids, self.behaviors]
        if self.timestamps_s is not None:
            tensors.append(self.timestamps_s)
        shapes = {tuple(tensor.shape) for tensor in tensors}
        if len(shapes) != 1 or self.item_ids.dim() != 2:
            raise ValueError(
                "item_ids, category_ids, behaviors and timestamps_s must share one (B, L) shape, got "
                f"{[tuple(tensor.shape) for tensor in tensors]}"
            )
        is_item = self.item_ids != PADDING_ID
        padding_after_item = (is_item[:, :-1] & ~is_item[:, 1:]).any(dim=1)  # (B,)
        if bool(padding_after_item.any()):
            rows = torch.nonzero(padding_after_item).flatten().tolist()
            raise ValueError(
                f"item_ids rows {rows[:5]} have padding after an item; sequences must be left-padded "
                "(training.sequences.pad_left) with the most recent event last"
            )

    @classmethod
    def from_numpy(cls, item_ids, category_ids, behaviors, timestamps_s=None) -> "SequenceBatch":
        return cls(
            torch.as_tensor(item_ids),
            torch.as_tensor(category_ids),
            torch.as_tensor(behaviors),
            None if timestamps_s is None else torch.as_tensor(timestamps_s),
        )

    def to(self, device: torch.device | str) -> "SequenceBatch":
        """Return the batch with every tensor on ``device``."""
        return SequenceBatch(
            self.item_ids.to(device),
            self.category_ids.to(device),
            self.behaviors.to(device),
            None if self.timestamps_s is None else self.timestamps_s.to(device),
        )


class SequenceRanker(torch.nn.Module, abc.ABC):
    """A next-item model: ``encode`` turns sequences into user states, ``score`` rates candidates.

    Evaluation and serving both call ``encode`` then ``score`` (or ``score_all``), so a user gets
    the same scores on both paths.
    """

    num_items: int
    """Size of the item index space, padding included."""

    @abc.abstractmethod
    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """Return the user states of a batch, one row per user."""

    @abc.abstractmethod
    def score_all(self, state: torch.Tensor) -> torch.Tensor:
        """Score every item index for each state: (B, num_items), padding column at -inf."""

    def item_embeddings(self) -> torch.Tensor | None:
        """Item vectors whose dot product with ``encode``'s state is the score, (num_items, D).

        Embedding retrieval builds its nearest-neighbour index from them. Rankers that do not
        score by a dot product return None.
        """
        return None

    def score(self, state: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Score candidate item indices (B, C) for each state; padding candidates get -inf."""
        scores = self._score_candidates(state, candidates)
        return scores.masked_fill(candidates == PADDING_ID, float("-inf"))

    def _score_candidates(self, state: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return torch.gather(self.score_all(state), 1, candidates)
