"""HTTP request and response bodies of the recommendation API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 100
MAX_EVENTS_PER_REQUEST = 1_000
MAX_EXCLUDED_ITEMS = 1_000
# Ids are Int64 entity keys in Feast.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

ItemId = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
DegradedReason = Literal[
    "online_store_unavailable", "feature_lookup_timed_out", "candidate_generation_timed_out", "ranking_timed_out"
]


class RecommendRequest(BaseModel):
    """Body of ``POST /v1/recommend``."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(..., strict=True, ge=INT64_MIN, le=INT64_MAX, description="raw user id, as in the event log")
    k: int = Field(10, strict=True, ge=1, le=MAX_K, description=f"number of items to return, 1 to {MAX_K}")
    exclude_item_ids: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDED_ITEMS,
        description=f"raw item ids that must not be recommended, at most {MAX_EXCLUDED_ITEMS}",
    )


class RecommendedItem(BaseModel):
    item_id: int
    score: float
    source: str = Field(description="'model' for a model score, 'popularity' for an event count")


class RecommendResponse(BaseModel):
    """Body of a ``POST /v1/recommend`` response."""

    user_id: int
    items: list[RecommendedItem]
    model_version: str
    cold_start: bool = Field(description="the user has no sequence, so the list is the popularity fallback")
    backfilled: bool = Field(description="fewer than k candidates were ranked; popular items fill the rest")
    degraded: list[DegradedReason] = Field(
        description="known failures worked around for this response: an online store that did not answer, "
        "or a stage that missed its timeout; empty when every stage answered in time"
    )
    latest_event_timestamp: int | None = Field(
        description="Unix seconds of the newest event of the user's sequence that the list is based on; "
        "null without a sequence"
    )
    request_id: str


class ErrorResponse(BaseModel):
    """Body of a 503 or 504 response."""

    detail: str


class BehaviorEventIn(BaseModel):
    """One behaviour event in ``POST /v1/events``."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(..., strict=True, ge=INT64_MIN, le=INT64_MAX, description="raw user id")
    item_id: int = Field(..., strict=True, ge=INT64_MIN, le=INT64_MAX, description="raw item id")
    category_id: int = Field(0, strict=True, ge=INT64_MIN, le=INT64_MAX, description="raw category id of the item")
    behavior: Literal["pv", "cart", "fav", "buy"]
    timestamp: int = Field(..., strict=True, gt=0, le=INT64_MAX, description="event time in Unix seconds")


class EventsRequest(BaseModel):
    """Body of ``POST /v1/events``: events in the order they happened."""

    model_config = ConfigDict(extra="forbid")

    events: list[BehaviorEventIn] = Field(..., min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class UserSequenceLength(BaseModel):
    user_id: int
    sequence_length: int


class EventsResponse(BaseModel):
    """Body of a ``POST /v1/events`` response, sent after the events are in the online store."""

    accepted: int
    users: list[UserSequenceLength]
    request_id: str


class ModelResponse(BaseModel):
    """Body of ``GET /v1/model``."""

    model_version: str
    metrics: dict
