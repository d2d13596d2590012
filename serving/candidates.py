"""Candidate sources, their quotas, and the filters applied to every list a user sees.

Each source turns a user's sequence into item ids, best first. ``merge_candidates`` takes up to
each source's quota in source order, drops duplicates and excluded items, then fills the free
slots from what the sources with a non-zero quota have left, so a user gets ``max_candidates`` whenever the sources
together hold that many items.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from training.retrieval import ItemIndex
from training.vocab import Vocabulary

# Source names, as they appear in metrics and in CandidateSet.sources.
RECENT = "recent"
CF = "cf"
EMBEDDING = "embedding"
TRENDING = "trending"
POPULAR = "popular"
SOURCE_ORDER = (RECENT, CF, EMBEDDING, TRENDING, POPULAR)


class BoughtItemPolicy(str, enum.Enum):
    """Policy for keeping items the user already bought out of their recommendations."""

    KEEP = "keep"
    """Recommend bought items again (consumables, groceries)."""
    EXCLUDE = "exclude"
    """Never recommend an item bought within the stored sequence."""
    EXCLUDE_RECENT = "exclude_recent"
    """Exclude items bought within ``bought_window_s`` before the user's latest event."""


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """The already-bought filter; request exclusions come on top of it."""

    bought_items: BoughtItemPolicy = BoughtItemPolicy.EXCLUDE
    bought_window_s: int = 7 * 86_400

    def __post_init__(self) -> None:
        object.__setattr__(self, "bought_items", BoughtItemPolicy(self.bought_items))
        if self.bought_window_s < 0:
            raise ValueError(f"bought_window_s must be at least 0, got {self.bought_window_s}")


def bought_items(item_ids: Sequence[int], behaviors: Sequence[str], timestamps_s: Sequence[int], config: FilterConfig) -> set[int]:
    """Return the items of a sequence that ``config`` keeps out of recommendations."""
    if config.bought_items is BoughtItemPolicy.KEEP or not item_ids:
        return set()
    since_s = timestamps_s[-1] - config.bought_window_s if config.bought_items is BoughtItemPolicy.EXCLUDE_RECENT else None
    return {
        int(item_id)
        for item_id, behavior, timestamp_s in zip(item_ids, behaviors, timestamps_s)
        if behavior == "buy" and (since_s is None or timestamp_s >= since_s)
    }


@dataclasses.dataclass(frozen=True)
class CandidateConfig:
    """How many candidates to take from each source, and how the sources read the sequence."""

    max_candidates: int = 200
    quotas: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {RECENT: 10, CF: 110, EMBEDDING: 50, TRENDING: 15, POPULAR: 15}
    )
    """First-pass share of each source; free slots are then filled from the sources in order.
    A source with quota 0 is switched off."""
    recent_items: int = 10
    """Neighbours and the embedding query use this many of the user's most recent distinct items."""
    recency_decay: float = 0.8
    """The i-th most recent item weighs recency_decay ** i in CF scores and in the embedding query."""

    def __post_init__(self) -> None:
        if self.max_candidates < 1 or self.recent_items < 1:
            raise ValueError(
                f"max_candidates and recent_items must be at least 1, got {self.max_candidates}, {self.recent_items}"
            )
        if not 0.0 < self.recency_decay <= 1.0:
            raise ValueError(f"recency_decay must be in (0, 1], got {self.recency_decay}")
        unknown = set(self.quotas) - set(SOURCE_ORDER)
        if unknown:
            raise ValueError(f"unknown candidate sources in quotas: {sorted(unknown)}; use {list(SOURCE_ORDER)}")
        negative = {name: quota for name, quota in self.quotas.items() if quota < 0}
        if negative:
            raise ValueError(f"quotas must be at least 0, got {negative}")
        object.__setattr__(self, "quotas", {name: int(self.quotas.get(name, 0)) for name in SOURCE_ORDER})


@dataclasses.dataclass(frozen=True)
class CandidateSet:
    """Merged candidates of one user, with the source that contributed each item."""

    item_ids: tuple[int, ...]
    sources: tuple[str, ...]
    degraded: tuple[str, ...] = ()
    """Reasons a source was skipped, such as an unreachable online store."""

    def count(self, source: str) -> int:
        return sum(1 for name in self.sources if name == source)


def merge_candidates(
    lists: Mapping[str, Sequence[int]], quotas: Mapping[str, int], max_candidates: int, excluded: Iterable[int] = ()
) -> tuple[list[int], list[str]]:
    """Merge per-source lists by quota, without duplicates or excluded items; return ids and sources."""
    seen = set(excluded)
    item_ids: list[int] = []
    sources: list[str] = []
    positions = {name: 0 for name in lists}

    def take(name: str, limit: int) -> None:
        items = lists[name]
        taken = 0
        while positions[name] < len(items) and taken < limit and len(item_ids) < max_candidates:
            item_id = int(items[positions[name]])
            positions[name] += 1
            if item_id in seen:
                continue
            seen.add(item_id)
            item_ids.append(item_id)
            sources.append(name)
            taken += 1

    ordered = [name for name in SOURCE_ORDER if name in lists and quotas.get(name, 0) > 0]
    for name in ordered:
        take(name, quotas.get(name, 0))
    for name in ordered:
        take(name, max_candidates)
    return item_ids, sources


class ItemSource(Protocol):
    """A candidate source that reads only the user's recent items."""

    name: str

    def fetch(self, recent_items: Sequence[int], limit: int) -> list[int]:
        """Return up to ``limit`` item ids for a user whose recent items are given, most recent first."""


class EmbeddingSource:
    """Nearest items to a recency-weighted mean of the recent items' embeddings, from the ANN index."""

    name = EMBEDDING

    def __init__(self, index: ItemIndex, item_vocab: Vocabulary, recency_decay: float) -> None:
        self.index = index
        self.item_vocab = item_vocab
        self.recency_decay = recency_decay

    def fetch(self, recent_items: Sequence[int], limit: int) -> list[int]:
        if not recent_items or limit < 1:
            return []
        indices = self.item_vocab.lookup(np.asarray(recent_items, dtype=np.int64))
        weights = self.recency_decay ** np.arange(len(indices), dtype=np.float32)
        query = self.index.query_vector(indices, weights)
        if query is None:
            return []
        # The recent items are their own nearest neighbours, so ask for that many more.
        nearest = self.index.search(query, limit + len(recent_items))
        return [int(item_id) for item_id in self.item_vocab.raw(nearest)]


class FixedListSource:
    """A source that gives every user the same ranked list: the popular or the trending items of a
    model version (``training.artifacts``)."""

    def __init__(self, name: str, ranked_item_ids: Sequence[int]) -> None:
        self.name = name
        self.ranked_item_ids = [int(item_id) for item_id in ranked_item_ids]

    def fetch(self, recent_items: Sequence[int], limit: int) -> list[int]:
        return self.ranked_item_ids[:limit]
