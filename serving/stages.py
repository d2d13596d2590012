"""The serving pipeline's stages as plain classes: FeatureLookup -> CandidateGenerator -> Ranker.

Each stage has one pure method that a unit test can call directly. The Ray Serve deployments in
``serving.app`` are thin wrappers around these classes, and ``RecommendationPipeline`` composes
them in one process, without Ray or HTTP.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from feast.data_source import PushMode

from training.artifacts import ModelArtifact, load_artifact
from training.models import SequenceBatch
from training.online import SequenceAppender, SequenceEvent
from training.schema import (
    EVENT_TIMESTAMP,
    ITEM_ID,
    ITEM_NEIGHBORS_VIEW,
    NEIGHBOR_IDS,
    NEIGHBOR_SCORES,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_CATEGORY_IDS,
    SEQUENCE_ITEM_IDS,
    SEQUENCE_LENGTH,
    SEQUENCE_TIMESTAMPS_S,
    USER_ID,
    USER_SEQUENCE_PUSH_SOURCE,
    USER_SEQUENCE_VIEW,
)
from training.sequences import behavior_codes, pad_left

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UserSequence:
    """A user's recent events from the online store, oldest first."""

    user_id: int
    item_ids: tuple[int, ...]
    category_ids: tuple[int, ...]
    behaviors: tuple[str, ...]
    timestamps_s: tuple[int, ...]

    def __post_init__(self) -> None:
        lengths = {len(self.item_ids), len(self.category_ids), len(self.behaviors), len(self.timestamps_s)}
        if len(lengths) != 1:
            raise ValueError(f"sequence lists of user {self.user_id} differ in length: {sorted(lengths)}")


@dataclasses.dataclass(frozen=True)
class ScoredItem:
    """A recommended item. ``source`` names what the score is: a model logit or a popularity count."""

    item_id: int
    score: float
    source: str = "model"


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """A ranked list for one user, with flags for every degraded path taken."""

    user_id: int
    items: tuple[ScoredItem, ...]
    model_version: str
    cold_start: bool = False
    """The user has no sequence in the online store, so the list is the popularity fallback."""
    backfilled: bool = False
    """Fewer than k candidates were found, so popular items fill the rest of the list."""


def _open_feature_store(repo_path: str | Path):
    from feast import FeatureStore

    repo_path = Path(repo_path)
    if not (repo_path / "feature_store.yaml").is_file():
        raise FileNotFoundError(f"no feature_store.yaml in {repo_path}; pass the folder of the Feast repository")
    return FeatureStore(repo_path=str(repo_path))


class FeatureLookup:
    """Reads users' sequences from the Feast online store."""

    def __init__(self, repo_path: str | Path) -> None:
        self.store = _open_feature_store(repo_path)
        self.features = [f"{USER_SEQUENCE_VIEW}:{name}" for name in (
            SEQUENCE_ITEM_IDS, SEQUENCE_CATEGORY_IDS, SEQUENCE_BEHAVIORS, SEQUENCE_TIMESTAMPS_S
        )]

    def lookup(self, user_ids: Sequence[int]) -> list[UserSequence | None]:
        """Return each user's sequence in request order, or None for a user the store lacks."""
        if not user_ids:
            return []
        rows = self.store.get_online_features(
            features=self.features, entity_rows=[{USER_ID: int(user_id)} for user_id in user_ids]
        ).to_dict()
        sequences: list[UserSequence | None] = []
        for index, user_id in enumerate(user_ids):
            item_ids = rows[SEQUENCE_ITEM_IDS][index]
            if item_ids is None:
                sequences.append(None)
                continue
            sequences.append(
                UserSequence(
                    user_id=int(user_id),
                    item_ids=tuple(item_ids),
                    category_ids=tuple(rows[SEQUENCE_CATEGORY_IDS][index] or ()),
                    behaviors=tuple(rows[SEQUENCE_BEHAVIORS][index] or ()),
                    timestamps_s=tuple(rows[SEQUENCE_TIMESTAMPS_S][index] or ()),
                )
            )
        return sequences


@dataclasses.dataclass(frozen=True)
class CandidateConfig:
    """How many candidates to generate and from which recent items."""

    max_candidates: int = 200
    recent_items: int = 10
    """Neighbours are read for this many of the user's most recent distinct items."""
    include_recent_items: bool = True
    """Also offer the recent items themselves: repeat views are common in e-commerce."""
    recency_decay: float = 0.8
    """Weight of the i-th most recent item's neighbours is recency_decay ** i."""

    def __post_init__(self) -> None:
        if self.max_candidates < 1 or self.recent_items < 1:
            raise ValueError(
                f"max_candidates and recent_items must be at least 1, got {self.max_candidates}, {self.recent_items}"
            )
        if not 0.0 < self.recency_decay <= 1.0:
            raise ValueError(f"recency_decay must be in (0, 1], got {self.recency_decay}")


class CandidateGenerator:
    """Item-to-item CF candidates: co-visitation neighbours of the user's recent items."""

    def __init__(self, repo_path: str | Path, config: CandidateConfig | None = None) -> None:
        self.store = _open_feature_store(repo_path)
        self.config = config or CandidateConfig()
        self.features = [f"{ITEM_NEIGHBORS_VIEW}:{NEIGHBOR_IDS}", f"{ITEM_NEIGHBORS_VIEW}:{NEIGHBOR_SCORES}"]

    def recent_distinct_items(self, sequence: UserSequence) -> list[int]:
        """Return the user's most recent distinct items, most recent first."""
        seen: dict[int, None] = {}
        for item_id in reversed(sequence.item_ids):
            seen.setdefault(int(item_id), None)
            if len(seen) == self.config.recent_items:
                break
        return list(seen)

    def generate(self, sequence: UserSequence) -> list[int]:
        """Return up to ``max_candidates`` item ids, best CF score first, without duplicates."""
        recent = self.recent_distinct_items(sequence)
        if not recent:
            return []
        rows = self.store.get_online_features(
            features=self.features, entity_rows=[{ITEM_ID: item_id} for item_id in recent]
        ).to_dict()
        scores: dict[int, float] = {}
        for rank, (neighbor_ids, neighbor_scores) in enumerate(zip(rows[NEIGHBOR_IDS], rows[NEIGHBOR_SCORES])):
            weight = self.config.recency_decay**rank
            for neighbor_id, score in zip(neighbor_ids or (), neighbor_scores or ()):
                scores[int(neighbor_id)] = scores.get(int(neighbor_id), 0.0) + weight * float(score)
        candidates = sorted(scores, key=lambda item_id: (-scores[item_id], item_id))
        if self.config.include_recent_items:
            candidates = recent + [item_id for item_id in candidates if item_id not in set(recent)]
        return candidates[: self.config.max_candidates]


class Ranker:
    """Scores candidates with the trained sequence model, exactly as evaluation does."""

    def __init__(self, artifact: ModelArtifact) -> None:
        self.artifact = artifact
        self.max_length = artifact.model.config.max_length

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, version: str = "latest") -> "Ranker":
        return cls(load_artifact(model_dir, version))

    @property
    def model_version(self) -> str:
        return self.artifact.version

    def encode_inputs(self, sequences: Sequence[UserSequence]) -> SequenceBatch:
        """Left-padded model inputs for a batch of sequences; items unknown to the model are skipped."""
        item_rows, category_rows, behavior_rows, timestamp_rows = [], [], [], []
        for sequence in sequences:
            items = self.artifact.item_vocab.lookup(np.asarray(sequence.item_ids, dtype=np.int64))
            known = items != 0
            item_rows.append(items[known])
            category_rows.append(self.artifact.category_vocab.lookup(np.asarray(sequence.category_ids))[known])
            behavior_rows.append(behavior_codes(sequence.behaviors)[known])
            timestamp_rows.append(np.asarray(sequence.timestamps_s, dtype=np.int64)[known])
        return SequenceBatch.from_numpy(
            pad_left(item_rows, self.max_length),
            pad_left(category_rows, self.max_length),
            pad_left(behavior_rows, self.max_length),
            pad_left(timestamp_rows, self.max_length),
        )

    @torch.no_grad()
    def rank(self, sequences: Sequence[UserSequence], candidates: Sequence[Sequence[int]], k: int) -> list[list[ScoredItem]]:
        """Return the top k candidates of each user by model score; unknown candidates are dropped."""
        if len(sequences) != len(candidates):
            raise ValueError(f"got {len(sequences)} sequences but {len(candidates)} candidate lists")
        if not sequences:
            return []
        width = max(1, max(len(items) for items in candidates))
        candidate_ids = np.zeros((len(candidates), width), dtype=np.int64)
        for row, items in enumerate(candidates):
            candidate_ids[row, : len(items)] = self.artifact.item_vocab.lookup(np.asarray(items, dtype=np.int64))
        model = self.artifact.model
        scores = model.score(model.encode(self.encode_inputs(sequences)), torch.from_numpy(candidate_ids))
        ranked = []
        for row in range(len(candidates)):
            finite = torch.isfinite(scores[row])
            top = torch.argsort(scores[row].masked_fill(~finite, float("-inf")), descending=True, stable=True)
            top = top[finite[top]][:k]
            ranked.append([ScoredItem(int(candidates[row][i]), float(scores[row, i])) for i in top])
        return ranked

    def popular_items(self, k: int, exclude: Sequence[int] = ()) -> list[ScoredItem]:
        """Return the k most popular training items not in ``exclude``, scored by their event count."""
        excluded = set(exclude)
        popularity = self.artifact.popularity
        top = popularity.top_items(k + len(excluded))
        raw = self.artifact.item_vocab.raw(top)
        counts = popularity.counts[torch.from_numpy(top)].tolist()
        return [ScoredItem(int(item), float(count), "popularity") for item, count in zip(raw, counts) if int(item) not in excluded][:k]


@dataclasses.dataclass(frozen=True)
class BehaviorEvent:
    """One real-time event, validated at the HTTP edge."""

    user_id: int
    item_id: int
    category_id: int
    behavior: str
    timestamp_s: int


class SequenceUpdater:
    """Appends real-time events to users' online sequences.

    Each user's append is one atomic read-modify-write in the online store
    (``training.online.SequenceAppender``), so concurrent requests to any number of replicas lose
    nothing. The new sequence is the stored one plus the new events, ordered by time (ties keep
    request order) and cut to the last ``sequence_length`` events, as the batch pipeline cuts it.
    """

    def __init__(self, repo_path: str | Path, sequence_length: int = SEQUENCE_LENGTH) -> None:
        self.lookup = FeatureLookup(repo_path)
        self.store = self.lookup.store
        self.sequence_length = sequence_length
        self.appender = SequenceAppender(self.store, sequence_length)

    def append(self, events: Sequence[BehaviorEvent]) -> dict[int, int]:
        """Append events to their users' sequences; return each user's new sequence length."""
        by_user: dict[int, list[SequenceEvent]] = {}
        for event in events:
            by_user.setdefault(event.user_id, []).append(
                SequenceEvent(event.item_id, event.category_id, event.behavior, event.timestamp_s)
            )
        return {user_id: len(self.appender.append(user_id, user_events)) for user_id, user_events in by_user.items()}


class RecommendationPipeline:
    """The three stages composed in one process: the reference for the served graph."""

    def __init__(self, lookup: FeatureLookup, generator: CandidateGenerator, ranker: Ranker) -> None:
        self.lookup = lookup
        self.generator = generator
        self.ranker = ranker

    def recommend(self, user_id: int, k: int) -> Recommendation:
        sequence = self.lookup.lookup([user_id])[0]
        if sequence is None:
            return cold_start(self.ranker, user_id, k)
        candidates = self.generator.generate(sequence)
        ranked = self.ranker.rank([sequence], [candidates], k)[0]
        return complete(self.ranker, user_id, ranked, k)


def cold_start(ranker: Ranker, user_id: int, k: int) -> Recommendation:
    return Recommendation(user_id, tuple(ranker.popular_items(k)), ranker.model_version, cold_start=True)


def complete(ranker: Ranker, user_id: int, ranked: list[ScoredItem], k: int) -> Recommendation:
    """Backfill a ranked list shorter than k with popular items, flagging it."""
    if len(ranked) >= k:
        return Recommendation(user_id, tuple(ranked[:k]), ranker.model_version)
    backfill = ranker.popular_items(k - len(ranked), exclude=[item.item_id for item in ranked])
    return Recommendation(user_id, tuple(ranked + backfill), ranker.model_version, backfilled=True)
