"""The interface that every ranker implements: encode a sequence, then score candidate items."""

from __future__ import annotations

import abc
import dataclasses

import torch

from training.schema import PADDING_ID


@dataclasses.dataclass
class SequenceBatch:
    """Left-padded index sequences of B users, each tensor of shape (B, L) and dtype int64.

    Padding is index 0 in all three, at the front of each row.
    """

    item_ids: torch.Tensor
    category_ids: torch.Tensor
    behaviors: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {self.item_ids.shape, self.category_ids.shape, self.behaviors.shape}
        if len(shapes) != 1 or self.item_ids.dim() != 2:
            raise ValueError(
                "item_ids, category_ids and behaviors must share one (B, L) shape, got "
                f"{tuple(self.item_ids.shape)}, {tuple(self.category_ids.shape)}, {tuple(self.behaviors.shape)}"
            )

    @classmethod
    def from_numpy(cls, item_ids, category_ids, behaviors) -> "SequenceBatch":
        return cls(torch.as_tensor(item_ids), torch.as_tensor(category_ids), torch.as_tensor(behaviors))


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
