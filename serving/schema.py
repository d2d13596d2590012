"""HTTP request and response bodies of the recommendation API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 100


class RecommendRequest(BaseModel):
    """Body of ``POST /v1/recommend``."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(..., strict=True, description="raw user id, as in the event log")
    k: int = Field(10, strict=True, ge=1, le=MAX_K, description=f"number of items to return, 1 to {MAX_K}")


class RecommendedItem(BaseModel):
    item_id: int
    score: float
    source: str = Field(description="'model' for a model score, 'popularity' for an event count")


class RecommendResponse(BaseModel):
    """Body of a ``POST /v1/recommend`` answer."""

    user_id: int
    items: list[RecommendedItem]
    model_version: str
    cold_start: bool = Field(description="the user has no sequence, so the list is the popularity fallback")
    backfilled: bool = Field(description="fewer than k candidates were found; popular items fill the rest")
    request_id: str
