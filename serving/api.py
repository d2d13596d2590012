"""The HTTP API: one set of FastAPI routes for the Serve ingress and for the plain in-process service.

``create_api`` takes a function that returns the process's ``RecommendationService``, which
contains the stage calls. The Serve ingress and ``serving.local`` differ only in the service they give it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.candidates import FilterConfig
from serving.flow import StageCalls, StageTimeouts, recommend
from serving.schema import (
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    ModelResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    UserSequenceLength,
)
from serving.stages import STORE_ERRORS, BehaviorEvent, OnlineStoreUnavailable

logger = logging.getLogger("seqrec.serving")

REQUEST_ID_HEADER = "X-Request-ID"
# Clients should wait this long after a 503 before trying again.
RETRY_AFTER_S = 1.0


class Overloaded(Exception):
    """A stage rejected the call because its queue is full."""


@dataclasses.dataclass
class RecommendationService:
    """The backend of the routes: stage calls, the event writer and the model description."""

    calls: StageCalls
    append_events: Callable[[list[BehaviorEvent], float], Awaitable[dict[int, int]]]
    """Writes events to the online store within a timeout in seconds; returns new sequence lengths."""
    describe_model: Callable[[], Awaitable[tuple[str, dict]]]
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    timeouts: StageTimeouts = dataclasses.field(default_factory=StageTimeouts)
    events_timeout_s: float = 2.0


_process_service: RecommendationService | None = None


def set_process_service(service: RecommendationService) -> None:
    """Register the service of this process for routes built with ``create_api(process_service)``.

    Serve copies a deployment class and its closures into each replica, so a module global of
    the deployment's own module is not shared with the routes. This module is imported by name
    in the replica, so its global is.
    """
    global _process_service
    _process_service = service


def process_service() -> RecommendationService:
    if _process_service is None:
        raise RuntimeError("no RecommendationService registered in this process; construct the Ingress first")
    return _process_service


def _request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def _unavailable(message: str, request_id: str) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"detail": message},
        headers={"Retry-After": str(math.ceil(RETRY_AFTER_S)), REQUEST_ID_HEADER: request_id},
    )


OVERLOAD_RESPONSES = {503: {"model": ErrorResponse, "description": "overloaded or the online store is unavailable; see Retry-After"}}


def create_api(get_service: Callable[[], RecommendationService]) -> FastAPI:
    """Build the FastAPI app whose routes call ``get_service()``."""
    api = FastAPI(
        title="seqrec",
        description="Next-item recommendations from behaviour sequences. Invalid input gets 422 with the "
        "field's location; overload gets 503 with Retry-After.",
    )

    @api.post("/v1/recommend", response_model=RecommendResponse, responses=OVERLOAD_RESPONSES)
    async def recommend_items(body: RecommendRequest, request: Request):
        """Recommend up to k items to a user, ranked by the model, with every degraded path flagged."""
        service = get_service()
        request_id = _request_id(request)
        try:
            result = await recommend(
                service.calls, body.user_id, body.k, body.exclude_item_ids, service.filters, service.timeouts, request_id
            )
        except Overloaded as error:
            logger.warning("request %s: rejected, %s", request_id, error)
            return _unavailable(f"the service is overloaded ({error}); retry later", request_id)
        return RecommendResponse(
            user_id=result.user_id,
            items=[RecommendedItem(**dataclasses.asdict(item)) for item in result.items],
            model_version=result.model_version,
            cold_start=result.cold_start,
            backfilled=result.backfilled,
            degraded=list(result.degraded),
            latest_event_timestamp=result.latest_event_timestamp_s,
            request_id=request_id,
        )

    @api.post(
        "/v1/events",
        response_model=EventsResponse,
        responses={**OVERLOAD_RESPONSES, 504: {"model": ErrorResponse, "description": "the write timed out"}},
    )
    async def post_events(body: EventsRequest, request: Request):
        """Append behaviour events to users' online sequences; they are used by the next recommendation."""
        service = get_service()
        request_id = _request_id(request)
        events = [BehaviorEvent(e.user_id, e.item_id, e.category_id, e.behavior, e.timestamp) for e in body.events]
        try:
            lengths = await service.append_events(events, service.events_timeout_s)
        except Overloaded as error:
            return _unavailable(f"the service is overloaded ({error}); retry later", request_id)
        except (OnlineStoreUnavailable, *STORE_ERRORS) as error:
            logger.warning("request %s: events not written: %s", request_id, error)
            return _unavailable("the online store is unavailable; the events were not written, retry later", request_id)
        except TimeoutError:
            logger.warning("request %s: writing %d events timed out", request_id, len(events))
            return JSONResponse(
                status_code=504,
                content={"detail": f"writing the events took longer than {service.events_timeout_s} s; "
                         "they may or may not be stored"},
                headers={REQUEST_ID_HEADER: request_id},
            )
        logger.info("request %s: appended %d events for %d users", request_id, len(events), len(lengths))
        return EventsResponse(
            accepted=len(events),
            users=[UserSequenceLength(user_id=user, sequence_length=length) for user, length in lengths.items()],
            request_id=request_id,
        )

    @api.get("/v1/model", response_model=ModelResponse)
    async def model() -> ModelResponse:
        """The model version being served and its offline metrics."""
        version, metrics = await get_service().describe_model()
        return ModelResponse(model_version=version, metrics=metrics)

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return api


async def wait_with_timeout(awaitable: Awaitable, timeout_s: float):
    """Await with a timeout; a TimeoutError cancels the awaited call."""
    return await asyncio.wait_for(_as_coroutine(awaitable), timeout_s)


async def _as_coroutine(awaitable: Awaitable):
    return await awaitable
