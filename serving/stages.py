"""The serving pipeline's stages as plain classes: FeatureLookup -> CandidateGenerator -> Ranker.

Each stage has one pure method that a unit test can call directly. The Ray Serve deployments in
``serving.app`` are thin wrappers around these classes, and ``RecommendationPipeline`` composes
them in one process, without Ray or HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import redis
import torch
from feast.data_source import PushMode
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from serving.candidates import (
    CF,
    POPULAR,
    RECENT,
    TRENDING,
    CandidateConfig,
    CandidateSet,
    EmbeddingSource,
    FilterConfig,
    FixedListSource,
    merge_candidates,
)
from training.artifacts import ModelArtifact, load_artifact
from training.models import SequenceBatch
from training.online import SequenceAppender, SequenceEvent
from training.retrieval import ItemIndex, load_index
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

# Errors of the online store's client libraries that mean "the store did not answer".
STORE_ERRORS = (redis.exceptions.RedisError, sqlite3.OperationalError, OSError)
# Popular items kept ready for fallbacks and backfills; more are computed when exclusions need them.
POPULAR_ITEMS_CACHED = 1_000
# Reasons in Recommendation.degraded.
ONLINE_STORE_UNAVAILABLE = "online_store_unavailable"
FEATURE_LOOKUP_TIMED_OUT = "feature_lookup_timed_out"
CANDIDATE_GENERATION_TIMED_OUT = "candidate_generation_timed_out"
RANKING_TIMED_OUT = "ranking_timed_out"
DEGRADED_REASONS = (ONLINE_STORE_UNAVAILABLE, FEATURE_LOOKUP_TIMED_OUT, CANDIDATE_GENERATION_TIMED_OUT, RANKING_TIMED_OUT)


class OnlineStoreUnavailable(RuntimeError):
    """A read from the online store failed or timed out."""


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

    @property
    def latest_timestamp_s(self) -> int | None:
        return max(self.timestamps_s) if self.timestamps_s else None


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
    """Fewer than k candidates were ranked, so popular items fill the rest of the list."""
    degraded: tuple[str, ...] = ()
    """Known failures that were worked around, such as an unreachable online store or a slow stage."""
    latest_event_timestamp_s: int | None = None
    """Time of the newest event the list is based on, None without a sequence."""


@dataclasses.dataclass(frozen=True)
class RankRequest:
    """One user's input to the ranker. Without a sequence or candidates, the list is all backfill."""

    sequence: UserSequence | None
    candidates: tuple[int, ...]
    k: int
    excluded: frozenset[int] = frozenset()
    """Items that neither the ranked list nor the backfill may contain."""

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        bad = [item_id for item_id in self.candidates if not isinstance(item_id, (int, np.integer))]
        if bad:
            raise ValueError(f"candidate ids must be integers, got {bad[:3]!r}")


@dataclasses.dataclass(frozen=True)
class RankedList:
    """The ranker's output for one RankRequest."""

    items: tuple[ScoredItem, ...]
    model_version: str
    backfilled: bool


@dataclasses.dataclass
class ServingModel:
    """A model artefact together with the ANN index of its item embeddings."""

    artifact: ModelArtifact
    index: ItemIndex | None

    @classmethod
    def load(cls, model_dir: str | Path, version: str = "latest") -> "ServingModel":
        artifact = load_artifact(model_dir, version)
        index = load_index(artifact.location, artifact.model.item_embeddings())
        model = cls(artifact, index)
        model.warm_up()
        logger.info("Loaded model version %s from %s", artifact.version, model_dir)
        return model

    @torch.no_grad()
    def warm_up(self, num_candidates: int = 200) -> None:
        """Score one full-length sequence, so that the first request does not pay torch's start-up."""
        net = self.artifact.model
        length, num_items = net.config.max_length, net.config.num_items
        items = torch.arange(length, dtype=torch.int64).remainder(num_items - 1).add(1).unsqueeze(0)
        batch = SequenceBatch(items, torch.zeros_like(items), torch.ones_like(items))
        candidates = torch.arange(num_candidates, dtype=torch.int64).remainder(num_items - 1).add(1).unsqueeze(0)
        net.score(net.encode(batch), candidates)

    @property
    def version(self) -> str:
        return self.artifact.version

    def popular_items(self, k: int, exclude: Iterable[int] = ()) -> list[ScoredItem]:
        """Return the k most popular training items not in ``exclude``, scored by their event count."""
        excluded = set(exclude)
        popularity = self.artifact.popularity
        top = popularity.top_items(k + len(excluded))
        raw = self.artifact.item_vocab.raw(top)
        counts = popularity.counts[torch.from_numpy(top)].tolist()
        items = [ScoredItem(int(item), float(count), "popularity") for item, count in zip(raw, counts)]
        return [item for item in items if item.item_id not in excluded][:k]


def _open_feature_store(repo_path: str | Path):
    from feast import FeatureStore

    repo_path = Path(repo_path)
    if not (repo_path / "feature_store.yaml").is_file():
        raise FileNotFoundError(f"no feature_store.yaml in {repo_path}; pass the folder of the Feast repository")
    return FeatureStore(repo_path=str(repo_path))


class OnlineViewReader:
    """Reads features of one feature view for Int64 entity keys through the Feast online store.

    ``FeatureStore.get_online_features`` resolves the feature references against the registry on
    every call, and with a file registry Feast 0.67 caches none of that work: it took about half of
    a request's CPU time in the serving pipeline under a profiler. This reader resolves the view
    once and calls the online store's ``online_read``, so keys, serialization and storage stay
    Feast's own.
    """

    def __init__(self, store, view_name: str, join_key: str, features: Sequence[str]) -> None:
        from feast.infra.online_stores.helpers import get_online_store_from_config

        self.config = store.config
        self.view = store.get_feature_view(view_name)
        self.join_key = join_key
        self.features = list(features)
        self.online_store = get_online_store_from_config(store.config.online_store)

    def read(self, keys: Sequence[int]) -> list[dict | None]:
        """Return each key's features as Python values in key order, or None for a key without a row."""
        entity_keys = [
            EntityKeyProto(join_keys=[self.join_key], entity_values=[ValueProto(int64_val=int(key))]) for key in keys
        ]
        # online_read appends its timestamp field to the list it is given, so it gets a copy.
        rows = self.online_store.online_read(self.config, self.view, entity_keys, list(self.features))
        values: list[dict | None] = []
        for _, row in rows:
            if row is None:
                values.append(None)
                continue
            values.append(
                {name: feast_value_type_to_python_type(row[name]) if name in row else None for name in self.features}
            )
        return values


class FeatureLookup:
    """Reads users' sequences from the Feast online store."""

    def __init__(self, repo_path: str | Path) -> None:
        self.store = _open_feature_store(repo_path)
        self.reader = OnlineViewReader(
            self.store,
            USER_SEQUENCE_VIEW,
            USER_ID,
            (SEQUENCE_ITEM_IDS, SEQUENCE_CATEGORY_IDS, SEQUENCE_BEHAVIORS, SEQUENCE_TIMESTAMPS_S),
        )
        # The first read loads the registry and connects, so it is made here, not by a request.
        try:
            self.lookup([0])
        except OnlineStoreUnavailable as error:
            logger.warning("Online store read failed at start-up, requests will degrade until it recovers: %s", error)

    def lookup(self, user_ids: Sequence[int]) -> list[UserSequence | None]:
        """Return each user's sequence in request order, or None for a user the store lacks.

        Raises OnlineStoreUnavailable when the store read fails.
        """
        if not user_ids:
            return []
        try:
            rows = self.reader.read(user_ids)
        except STORE_ERRORS as error:
            raise OnlineStoreUnavailable(f"online store read of user sequences failed: {error}") from error
        sequences: list[UserSequence | None] = []
        for user_id, row in zip(user_ids, rows):
            if row is None or row[SEQUENCE_ITEM_IDS] is None:
                sequences.append(None)
                continue
            sequences.append(
                UserSequence(
                    user_id=int(user_id),
                    item_ids=tuple(row[SEQUENCE_ITEM_IDS]),
                    category_ids=tuple(row[SEQUENCE_CATEGORY_IDS] or ()),
                    behaviors=tuple(row[SEQUENCE_BEHAVIORS] or ()),
                    timestamps_s=tuple(row[SEQUENCE_TIMESTAMPS_S] or ()),
                )
            )
        return sequences


class CandidateGenerator:
    """Merges candidates from the user's recent items, CF neighbours, the ANN index, and the trending
    and popular items.

    CF neighbours come from the ``item_neighbors`` feature view in the online store. When the store
    read fails, the other sources still fill the list and the set is flagged.
    """

    def __init__(self, repo_path: str | Path, model: ServingModel, config: CandidateConfig | None = None) -> None:
        self.store = _open_feature_store(repo_path)
        self.config = config or CandidateConfig()
        self.reader = OnlineViewReader(self.store, ITEM_NEIGHBORS_VIEW, ITEM_ID, (NEIGHBOR_IDS, NEIGHBOR_SCORES))
        self.set_model(model)

    def set_model(self, model: ServingModel) -> None:
        """Switch the embedding and popularity sources to another model version."""
        vocab = model.artifact.item_vocab
        self.popular = FixedListSource(POPULAR, vocab.raw(model.artifact.popularity.top_items(POPULAR_ITEMS_CACHED)))
        self.trending = FixedListSource(TRENDING, vocab.raw(model.artifact.trending_items))
        self.embedding = (
            EmbeddingSource(model.index, model.artifact.item_vocab, self.config.recency_decay) if model.index else None
        )

    def recent_distinct_items(self, sequence: UserSequence) -> list[int]:
        """Return the user's most recent distinct items, most recent first."""
        seen: dict[int, None] = {}
        for item_id in reversed(sequence.item_ids):
            seen.setdefault(int(item_id), None)
            if len(seen) == self.config.recent_items:
                break
        return list(seen)

    def neighbors(self, recent: Sequence[int], limit: int) -> list[int]:
        """Return co-visitation neighbours of the recent items by recency-weighted score, best first."""
        if not recent or limit < 1:
            return []
        try:
            rows = self.reader.read(recent)
        except STORE_ERRORS as error:
            raise OnlineStoreUnavailable(f"online store read of item neighbours failed: {error}") from error
        scores: dict[int, float] = {}
        for rank, row in enumerate(rows):
            if row is None:
                continue
            neighbor_ids, neighbor_scores = row[NEIGHBOR_IDS], row[NEIGHBOR_SCORES]
            weight = self.config.recency_decay**rank
            for neighbor_id, score in zip(neighbor_ids or (), neighbor_scores or ()):
                scores[int(neighbor_id)] = scores.get(int(neighbor_id), 0.0) + weight * float(score)
        return sorted(scores, key=lambda item_id: (-scores[item_id], item_id))[:limit]

    def generate(self, sequence: UserSequence, excluded: Iterable[int] = ()) -> CandidateSet:
        """Return up to ``max_candidates`` distinct candidates, none of them in ``excluded``."""
        config = self.config
        excluded = set(excluded)
        recent = self.recent_distinct_items(sequence)
        # Each source is asked for enough items to fill its whole share after exclusions.
        limit = config.max_candidates + len(excluded)
        lists: dict[str, list[int]] = {RECENT: recent}
        degraded: list[str] = []
        try:
            lists[CF] = self.neighbors(recent, limit)
        except OnlineStoreUnavailable as error:
            logger.warning("CF candidates skipped for user %d: %s", sequence.user_id, error)
            degraded.append(ONLINE_STORE_UNAVAILABLE)
        if self.embedding is not None:
            lists[self.embedding.name] = self.embedding.fetch(recent, limit)
        lists[TRENDING] = self.trending.fetch(recent, limit)
        lists[POPULAR] = self.popular.fetch(recent, limit)
        item_ids, sources = merge_candidates(lists, config.quotas, config.max_candidates, excluded)
        return CandidateSet(tuple(item_ids), tuple(sources), tuple(degraded))


class Ranker:
    """Scores candidates with the trained sequence model, exactly as evaluation does."""

    def __init__(self, model: ServingModel) -> None:
        self.model = model

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, version: str = "latest") -> "Ranker":
        return cls(ServingModel.load(model_dir, version))

    @property
    def artifact(self) -> ModelArtifact:
        return self.model.artifact

    @property
    def model_version(self) -> str:
        return self.model.version

    def encode_inputs(self, sequences: Sequence[UserSequence], artifact: ModelArtifact | None = None) -> SequenceBatch:
        """Left-padded model inputs for a batch of sequences; items unknown to the model are skipped."""
        artifact = artifact or self.artifact
        item_rows, category_rows, behavior_rows, timestamp_rows = [], [], [], []
        for sequence in sequences:
            items = artifact.item_vocab.lookup(np.asarray(sequence.item_ids, dtype=np.int64))
            known = items != 0
            item_rows.append(items[known])
            category_rows.append(artifact.category_vocab.lookup(np.asarray(sequence.category_ids))[known])
            behavior_rows.append(behavior_codes(sequence.behaviors)[known])
            timestamp_rows.append(np.asarray(sequence.timestamps_s, dtype=np.int64)[known])
        max_length = artifact.model.config.max_length
        return SequenceBatch.from_numpy(
            pad_left(item_rows, max_length),
            pad_left(category_rows, max_length),
            pad_left(behavior_rows, max_length),
            pad_left(timestamp_rows, max_length),
        )

    @torch.no_grad()
    def rank(self, sequences: Sequence[UserSequence], candidates: Sequence[Sequence[int]], k: int) -> list[list[ScoredItem]]:
        """Return the top k candidates of each user by model score; unknown candidates are dropped."""
        return self._rank(self.artifact, sequences, candidates, k)

    def _rank(self, artifact: ModelArtifact, sequences, candidates, k: int) -> list[list[ScoredItem]]:
        if len(sequences) != len(candidates):
            raise ValueError(f"got {len(sequences)} sequences but {len(candidates)} candidate lists")
        if not sequences:
            return []
        width = max(1, max(len(items) for items in candidates))
        candidate_ids = np.zeros((len(candidates), width), dtype=np.int64)
        for row, items in enumerate(candidates):
            candidate_ids[row, : len(items)] = artifact.item_vocab.lookup(np.asarray(items, dtype=np.int64))
        model = artifact.model
        scores = model.score(model.encode(self.encode_inputs(sequences, artifact)), torch.from_numpy(candidate_ids))
        ranked = []
        for row in range(len(candidates)):
            finite = torch.isfinite(scores[row])
            top = torch.argsort(scores[row].masked_fill(~finite, float("-inf")), descending=True, stable=True)
            top = top[finite[top]][:k]
            ranked.append([ScoredItem(int(candidates[row][i]), float(scores[row, i])) for i in top])
        return ranked

    @torch.no_grad()
    def rank_requests(self, requests: Sequence[RankRequest]) -> list[RankedList]:
        """Rank a batch with one model call and backfill each list to k: one output per request.

        A request without a sequence or without candidates skips the model and gets popular items.
        """
        # One model version for the whole batch, even if a swap lands while it runs.
        model = self.model
        scored = [index for index, request in enumerate(requests) if request.sequence and request.candidates]
        ranked: dict[int, list[ScoredItem]] = {}
        if scored:
            k_max = max(requests[index].k for index in scored)
            lists = self._rank(
                model.artifact,
                [requests[index].sequence for index in scored],
                [requests[index].candidates for index in scored],
                k_max,
            )
            ranked = dict(zip(scored, lists))
        outputs = []
        for index, request in enumerate(requests):
            items = [item for item in ranked.get(index, []) if item.item_id not in request.excluded][: request.k]
            outputs.append(complete(model, items, request.k, request.excluded))
        return outputs

    def rank_each(self, requests: Sequence[RankRequest]) -> list[RankedList | Exception]:
        """``rank_requests``, except that a request whose own ranking raises gets its exception as output.

        The batch is ranked in one model call first. If that raises, each request is ranked on its
        own, so one bad request never fails the others.
        """
        try:
            return self.rank_requests(requests)
        except Exception as error:
            if len(requests) == 1:
                logger.exception("Ranking one request failed")
                return [error]
            logger.exception("Ranking a batch of %d requests failed; ranking them one by one", len(requests))
        return [output for request in requests for output in self.rank_each([request])]

    def popular_items(self, k: int, exclude: Iterable[int] = ()) -> list[ScoredItem]:
        return self.model.popular_items(k, exclude)


def complete(model: ServingModel, ranked: list[ScoredItem], k: int, excluded: Iterable[int] = ()) -> RankedList:
    """Backfill a ranked list shorter than k with popular items, flagging it."""
    if len(ranked) >= k:
        return RankedList(tuple(ranked[:k]), model.version, backfilled=False)
    backfill = model.popular_items(k - len(ranked), exclude={*excluded, *(item.item_id for item in ranked)})
    return RankedList(tuple(ranked + backfill), model.version, backfilled=True)


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
    """The three stages composed in one process: the reference for the served graph.

    ``recommend_async`` runs the same flow as the Serve ingress (``serving.flow``), with the
    stages called in this process.
    """

    def __init__(
        self,
        lookup: FeatureLookup,
        generator: CandidateGenerator,
        ranker: Ranker,
        filters: FilterConfig | None = None,
        timeouts: "StageTimeouts | None" = None,
        in_threads: bool = False,
        max_batch_size: int = 16,
    ) -> None:
        from serving.flow import LocalStageCalls, StageTimeouts

        self.calls = LocalStageCalls(lookup, generator, ranker, in_threads=in_threads, max_batch_size=max_batch_size)
        self.filters = filters or FilterConfig()
        self.timeouts = timeouts or StageTimeouts()

    async def recommend_async(self, user_id: int, k: int, exclude: Iterable[int] = ()) -> Recommendation:
        from serving.flow import recommend

        return await recommend(self.calls, user_id, k, exclude, self.filters, self.timeouts)

    def recommend(self, user_id: int, k: int, exclude: Iterable[int] = ()) -> Recommendation:
        return asyncio.run(self.recommend_async(user_id, k, exclude))
