"""Ray Serve application: HTTP ingress -> FeatureLookup -> CandidateGenerator -> Ranker.

``POST /v1/events`` goes from the ingress to SequenceUpdater, which pushes the new events into the
online store, so the next ``POST /v1/recommend`` for that user reads them.

Build it with ``serve run serving.app:build_app feature_repo=<path> model_dir=<path>``.
Each deployment wraps one plain class from ``serving.stages`` and requests a fraction of a CPU,
so the whole graph fits on a 2-core machine.
"""


import dataclasses
import logging
import uuid
from pathlib import Path

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from serving.schema import (
    EventsRequest,
    EventsResponse,
    ModelResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    UserSequenceLength,
)
from serving.stages import (
    BehaviorEvent,
    CandidateConfig,
    CandidateGenerator,
    FeatureLookup,
    Ranker,
    Recommendation,
    SequenceUpdater,
    UserSequence,
    cold_start,
    complete,
)
from training import storage

logger = logging.getLogger("seqrec.serving")

api = FastAPI(title="seqrec", description="Next-item recommendations from behaviour sequences.")


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class FeatureLookupDeployment:
    def __init__(self, feature_repo: str) -> None:
        self.stage = FeatureLookup(feature_repo)

    def lookup(self, user_id: int) -> UserSequence | None:
        return self.stage.lookup([user_id])[0]


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class CandidateGeneratorDeployment:
    def __init__(self, feature_repo: str, config: dict | None = None) -> None:
        self.stage = CandidateGenerator(feature_repo, CandidateConfig(**(config or {})))

    def generate(self, sequence: UserSequence) -> list[int]:
        return self.stage.generate(sequence)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class RankerDeployment:
    def __init__(self, model_dir: str, model_version: str = "latest") -> None:
        self.stage = Ranker.from_model_dir(model_dir, model_version)
        logger.info("Loaded model version %s from %s", self.stage.model_version, model_dir)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rank(self, requests: list[tuple[UserSequence, list[int], int]]) -> list[list]:
        # One model call for the whole batch, and exactly one output per request.
        k_max = max(k for _, _, k in requests)
        ranked = self.stage.rank([r[0] for r in requests], [r[1] for r in requests], k_max)
        return [items[:k] for items, (_, _, k) in zip(ranked, requests)]

    def describe(self) -> tuple[str, dict]:
        return self.stage.model_version, self.stage.artifact.metrics

    def cold_start(self, user_id: int, k: int) -> Recommendation:
        return cold_start(self.stage, user_id, k)

    def complete(self, user_id: int, ranked: list, k: int) -> Recommendation:
        return complete(self.stage, user_id, ranked, k)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class SequenceUpdaterDeployment:
    def __init__(self, feature_repo: str) -> None:
        self.stage = SequenceUpdater(feature_repo)

    def append(self, events: list[BehaviorEvent]) -> dict[int, int]:
        return self.stage.append(events)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(self, lookup, generator, ranker, updater) -> None:
        self.lookup = lookup
        self.generator = generator
        self.ranker = ranker
        self.updater = updater

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        request_id = uuid.uuid4().hex
        sequence = await self.lookup.lookup.remote(request.user_id)
        if sequence is None:
            recommendation = await self.ranker.cold_start.remote(request.user_id, request.k)
            logger.info("request %s: user %d has no sequence, serving cold start", request_id, request.user_id)
        else:
            candidates = await self.generator.generate.remote(sequence)
            ranked = await self.ranker.rank.remote((sequence, candidates, request.k))
            recommendation = await self.ranker.complete.remote(request.user_id, ranked, request.k)
        return RecommendResponse(
            user_id=recommendation.user_id,
            items=[RecommendedItem(**dataclasses.asdict(item)) for item in recommendation.items],
            model_version=recommendation.model_version,
            cold_start=recommendation.cold_start,
            backfilled=recommendation.backfilled,
            request_id=request_id,
        )

    @api.post("/v1/events", response_model=EventsResponse)
    async def events(self, request: EventsRequest) -> EventsResponse:
        request_id = uuid.uuid4().hex
        events = [
            BehaviorEvent(e.user_id, e.item_id, e.category_id, e.behavior, e.timestamp) for e in request.events
        ]
        lengths = await self.updater.append.remote(events)
        logger.info("request %s: appended %d events for %d users", request_id, len(events), len(lengths))
        return EventsResponse(
            accepted=len(events),
            users=[UserSequenceLength(user_id=user, sequence_length=length) for user, length in lengths.items()],
            request_id=request_id,
        )

    @api.get("/v1/model", response_model=ModelResponse)
    async def model(self) -> ModelResponse:
        version, metrics = await self.ranker.describe.remote()
        return ModelResponse(model_version=version, metrics=metrics)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}


def build_app(args: dict) -> Application:
    """Build the serving graph from ``feature_repo``, ``model_dir`` and optional ``model_version``.

    ``feature_repo`` is a local folder with ``feature_store.yaml``. ``model_dir`` is a local path
    or a URI such as ``s3://bucket/models``.
    """
    missing = [name for name in ("feature_repo", "model_dir") if not args.get(name)]
    if missing:
        raise ValueError(f"missing application arguments {missing}; pass e.g. feature_repo=feature_repo")
    feature_repo = str(Path(args["feature_repo"]).resolve())
    model_dir = storage.normalize(args["model_dir"])
    return Ingress.bind(
        FeatureLookupDeployment.bind(feature_repo),
        CandidateGeneratorDeployment.bind(feature_repo),
        RankerDeployment.bind(model_dir, args.get("model_version", "latest")),
        SequenceUpdaterDeployment.bind(feature_repo),
    )
