"""The same API and pipeline in one plain uvicorn process, without Ray.

This is what a team would run instead of the Serve graph, and the reference the graph is
measured against. It also exposes ``GET /metrics`` in the Prometheus text format.

Example::

    python -m serving.local --feature-repo feature_repo --model-dir feature_repo/data/models --port 8300
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import prometheus_client
import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from serving.api import RecommendationService, create_api
from serving.candidates import CandidateConfig, FilterConfig
from serving.flow import LocalStageCalls, StageTimeouts
from serving.stages import BehaviorEvent, CandidateGenerator, FeatureLookup, Ranker, SequenceUpdater, ServingModel


def create_local_app(
    feature_repo: str,
    model_dir: str,
    model_version: str = "latest",
    candidates: CandidateConfig | None = None,
    filters: FilterConfig | None = None,
    timeouts: StageTimeouts | None = None,
    max_batch_size: int = 16,
) -> FastAPI:
    """Build the in-process service: every stage in this process, called directly.

    Concurrent requests that reach ranking together share one model call of up to
    ``max_batch_size`` requests; 1 ranks each request alone.
    """
    model = ServingModel.load(model_dir, model_version)
    ranker = Ranker(model)
    calls = LocalStageCalls(
        FeatureLookup(feature_repo),
        CandidateGenerator(feature_repo, model, candidates),
        ranker,
        max_batch_size=max_batch_size,
    )
    updater = SequenceUpdater(feature_repo)

    async def append_events(events: list[BehaviorEvent], timeout_s: float) -> dict[int, int]:
        return await asyncio.wait_for(asyncio.to_thread(updater.append, events), timeout_s)

    async def describe_model() -> tuple[str, dict]:
        return ranker.model_version, ranker.artifact.metrics

    service = RecommendationService(
        calls=calls,
        append_events=append_events,
        describe_model=describe_model,
        filters=filters or FilterConfig(),
        timeouts=timeouts or StageTimeouts(),
    )
    app = create_api(lambda: service)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return prometheus_client.generate_latest().decode()

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve seqrec in one process with uvicorn, without Ray.")
    parser.add_argument("--feature-repo", required=True, help="folder of the Feast repository")
    parser.add_argument("--model-dir", required=True, help="model artefact folder or URI")
    parser.add_argument("--model-version", default="latest", help="version folder to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8300, help="port to listen on")
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="most concurrent requests ranked in one model call; 1 turns batching off"
    )
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_local_app(args.feature_repo, args.model_dir, args.model_version, max_batch_size=args.max_batch_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
