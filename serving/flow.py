"""One recommendation request through the stages, with a deadline and a timeout per stage call.

The Serve ingress and the in-process pipeline run the same ``recommend`` function. They differ
only in how a stage is called: through a deployment handle, or directly in this process.

Known failures degrade instead of failing, and each one is named in ``Recommendation.degraded``:
a failed online store read, and a stage that misses its timeout. A user without a
sequence gets the popularity fallback, flagged ``cold_start``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from serving.candidates import CandidateSet, FilterConfig, bought_items
from serving.metrics import get_metrics
from serving.stages import (
    CANDIDATE_GENERATION_TIMED_OUT,
    FEATURE_LOOKUP_TIMED_OUT,
    ONLINE_STORE_UNAVAILABLE,
    RANKING_TIMED_OUT,
    CandidateGenerator,
    FeatureLookup,
    OnlineStoreUnavailable,
    RankedList,
    Ranker,
    RankRequest,
    Recommendation,
    UserSequence,
)

logger = logging.getLogger(__name__)

# Stage names in metrics and logs.
FEATURE_LOOKUP = "feature_lookup"
CANDIDATE_GENERATION = "candidate_generation"
RANKING = "ranking"
REQUEST = "request"


@dataclasses.dataclass(frozen=True)
class StageTimeouts:
    """The deadline of a whole request and the timeout of each stage call within it, in seconds.

    A stage call gets its own timeout or what is left of the deadline, whichever is shorter.
    """

    request_deadline_s: float = 1.0
    feature_lookup_s: float = 0.2
    candidate_generation_s: float = 0.25
    ranking_s: float = 0.5

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ValueError(f"{field.name} must be a positive number of seconds, got {value!r}")


class StageCalls(Protocol):
    """Interface through which the flow calls the stages. Each call raises TimeoutError when it misses ``timeout_s``."""

    async def lookup(self, user_id: int, timeout_s: float) -> UserSequence | None: ...

    async def generate(self, sequence: UserSequence, excluded: frozenset[int], timeout_s: float) -> CandidateSet: ...

    async def rank(self, request: RankRequest, timeout_s: float) -> RankedList: ...

    def fallback(self, k: int, excluded: frozenset[int]) -> RankedList:
        """Popular items without calling a stage, for when the ranker itself missed its timeout."""


class RankBatcher:
    """Ranks together the requests of one process that reach ranking in the same event-loop turn.

    The first request of a turn schedules the batch for the next turn, so a batch never waits for
    more requests: under load it contains the requests that queued up meanwhile, and alone a request
    is ranked at once. Each request gets exactly one output, its own ranking error included, and a
    request whose caller gave up before its batch started is left out.
    """

    def __init__(self, rank_each: Callable[[list[RankRequest]], list], max_batch_size: int = 16, in_threads: bool = False) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.rank_each = rank_each
        self.max_batch_size = max_batch_size
        self.in_threads = in_threads
        self._waiting: list[tuple[RankRequest, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()

    async def rank(self, request: RankRequest) -> RankedList:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((request, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._start_batches)
        return await future

    def _start_batches(self) -> None:
        waiting = [(request, future) for request, future in self._waiting if not future.done()]
        self._waiting = []
        for start in range(0, len(waiting), self.max_batch_size):
            batch = waiting[start : start + self.max_batch_size]
            if self.in_threads:
                task = asyncio.get_running_loop().create_task(self._run_in_thread(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            else:
                self._deliver(batch, self._rank(batch))

    async def _run_in_thread(self, batch: list[tuple[RankRequest, asyncio.Future]]) -> None:
        self._deliver(batch, await asyncio.to_thread(self._rank, batch))

    def _rank(self, batch: list[tuple[RankRequest, asyncio.Future]]) -> list:
        get_metrics().observe_batch_size(len(batch))
        try:
            return self.rank_each([request for request, _ in batch])
        except Exception as error:  # rank_each isolates requests, so only an unexpected failure gets here
            logger.exception("Ranking a batch of %d requests failed", len(batch))
            return [error] * len(batch)

    @staticmethod
    def _deliver(batch: list[tuple[RankRequest, asyncio.Future]], outputs: list) -> None:
        for (_, future), output in zip(batch, outputs, strict=True):
            if future.done():
                continue
            if isinstance(output, Exception):
                future.set_exception(output)
            else:
                future.set_result(output)


class LocalStageCalls:
    """Stage calls in this process.

    With ``in_threads``, each call runs in a worker thread, so a timeout returns on time while the
    call finishes in the background. Without it, a call runs to the end and then counts as timed
    out if it took longer than its timeout. Ranking goes through a ``RankBatcher`` unless
    ``max_batch_size`` is 1.
    """

    def __init__(
        self,
        lookup: FeatureLookup,
        generator: CandidateGenerator,
        ranker: Ranker,
        in_threads: bool = False,
        max_batch_size: int = 16,
    ) -> None:
        self.lookup_stage = lookup
        self.generator = generator
        self.ranker = ranker
        self.in_threads = in_threads
        self.batcher: RankBatcher | None = None
        self.set_max_batch_size(max_batch_size)

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Rank up to ``max_batch_size`` concurrent requests in one model call; 1 ranks each alone."""
        # A replaced batcher still starts the batches already waiting in it.
        if max_batch_size == 1:
            self.batcher = None
        else:
            self.batcher = RankBatcher(self._rank_each, max_batch_size, self.in_threads)

    def _rank_each(self, requests: list[RankRequest]) -> list:
        return self.ranker.rank_each(requests)  # the ranker in place now, after any model swap

    async def _call(self, function: Callable, *args, timeout_s: float):
        if self.in_threads:
            return await asyncio.wait_for(asyncio.to_thread(function, *args), timeout_s)
        start = time.monotonic()
        result = function(*args)
        _check_elapsed(function, start, timeout_s)
        return result

    async def lookup(self, user_id: int, timeout_s: float) -> UserSequence | None:
        return (await self._call(self.lookup_stage.lookup, [user_id], timeout_s=timeout_s))[0]

    async def generate(self, sequence: UserSequence, excluded: frozenset[int], timeout_s: float) -> CandidateSet:
        return await self._call(self.generator.generate, sequence, excluded, timeout_s=timeout_s)

    async def rank(self, request: RankRequest, timeout_s: float) -> RankedList:
        if self.batcher is None:
            return (await self._call(self.ranker.rank_requests, [request], timeout_s=timeout_s))[0]
        start = time.monotonic()
        ranked = await asyncio.wait_for(self.batcher.rank(request), timeout_s)
        if not self.in_threads:  # the batch may have run on the event loop past the timeout
            _check_elapsed(self.batcher.rank, start, timeout_s)
        return ranked

    def fallback(self, k: int, excluded: frozenset[int]) -> RankedList:
        model = self.ranker.model
        return RankedList(tuple(model.popular_items(k, excluded)), model.version, backfilled=True)


def _check_elapsed(function: Callable, start: float, timeout_s: float) -> None:
    """Raise TimeoutError for a call that ran on the event loop past its timeout."""
    if time.monotonic() - start > timeout_s:
        raise TimeoutError(f"{getattr(function, '__name__', function)} took longer than {timeout_s:.3f} s")


def _remaining_s(deadline: float, timeout_s: float) -> float:
    return max(0.0, min(timeout_s, deadline - time.monotonic()))


async def recommend(
    calls: StageCalls,
    user_id: int,
    k: int,
    exclude: Iterable[int] = (),
    filters: FilterConfig | None = None,
    timeouts: StageTimeouts | None = None,
    request_id: str = "",
) -> Recommendation:
    """Recommend k items to a user: lookup, candidates, ranking, each within its timeout."""
    filters = filters or FilterConfig()
    timeouts = timeouts or StageTimeouts()
    metrics = get_metrics()
    started = time.monotonic()
    deadline = started + timeouts.request_deadline_s
    degraded: list[str] = []
    excluded = {int(item_id) for item_id in exclude}

    sequence = None
    stage_start = time.monotonic()
    try:
        sequence = await calls.lookup(user_id, _remaining_s(deadline, timeouts.feature_lookup_s))
    except OnlineStoreUnavailable as error:
        degraded.append(ONLINE_STORE_UNAVAILABLE)
        metrics.count_error(FEATURE_LOOKUP, "store_unavailable")
        logger.warning("request %s: %s", request_id, error)
    except TimeoutError:
        degraded.append(FEATURE_LOOKUP_TIMED_OUT)
        metrics.count_error(FEATURE_LOOKUP, "timeout")
    metrics.observe_latency(FEATURE_LOOKUP, time.monotonic() - stage_start)
    cold_start = sequence is None and not degraded

    candidates = CandidateSet((), ())
    if sequence is not None:
        excluded |= bought_items(sequence.item_ids, sequence.behaviors, sequence.timestamps_s, filters)
        stage_start = time.monotonic()
        try:
            candidates = await calls.generate(
                sequence, frozenset(excluded), _remaining_s(deadline, timeouts.candidate_generation_s)
            )
            degraded.extend(candidates.degraded)
        except TimeoutError:
            degraded.append(CANDIDATE_GENERATION_TIMED_OUT)
            metrics.count_error(CANDIDATE_GENERATION, "timeout")
        metrics.observe_latency(CANDIDATE_GENERATION, time.monotonic() - stage_start)
        for source in set(candidates.sources):
            metrics.count_candidates(source, candidates.count(source))

    request = RankRequest(sequence, candidates.item_ids, k, frozenset(excluded))
    stage_start = time.monotonic()
    try:
        ranked = await calls.rank(request, _remaining_s(deadline, timeouts.ranking_s))
    except TimeoutError:
        degraded.append(RANKING_TIMED_OUT)
        metrics.count_error(RANKING, "timeout")
        ranked = calls.fallback(k, frozenset(excluded))
    metrics.observe_latency(RANKING, time.monotonic() - stage_start)

    recommendation = Recommendation(
        user_id=user_id,
        items=ranked.items,
        model_version=ranked.model_version,
        cold_start=cold_start,
        backfilled=ranked.backfilled,
        degraded=tuple(dict.fromkeys(degraded)),
        latest_event_timestamp_s=sequence.latest_timestamp_s if sequence is not None else None,
    )
    _record_outcome(recommendation, request_id, time.monotonic() - started)
    return recommendation


def _record_outcome(recommendation: Recommendation, request_id: str, elapsed_s: float) -> None:
    metrics = get_metrics()
    metrics.observe_latency(REQUEST, elapsed_s)
    if recommendation.cold_start:
        metrics.count_fallback("cold_start")
    if recommendation.backfilled:
        metrics.count_fallback("backfilled")
    for reason in recommendation.degraded:
        metrics.count_fallback(reason)
    if recommendation.degraded:
        logger.warning(
            "request %s: user %d served degraded (%s) in %.1f ms",
            request_id,
            recommendation.user_id,
            ", ".join(recommendation.degraded),
            elapsed_s * 1000,
        )
