"""Ray Serve application: HTTP ingress -> FeatureLookup -> CandidateGenerator -> Ranker.

``POST /v1/events`` goes from the ingress to SequenceUpdater, which pushes the new events into the
online store, so the next ``POST /v1/recommend`` for that user reads them.

Build it with ``serve run serving.app:build_app feature_repo=<path> model_dir=<path>``. The
``topology`` argument sets how many stages run in their own deployments:

- ``graph``: lookup, candidate generation and ranking each in a deployment (three handle calls);
- ``ranker``: lookup and candidates inside the ingress, the batched ranker in a deployment (one);
- ``single``: every stage inside the ingress (no handle calls); concurrent requests share a model call.

Each deployment wraps one plain class from ``serving.stages``. Deployments that hold a model take
``user_config: {model_version: ...}``; changing it swaps the model in place without restarting
replicas or failing requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Literal

from ray import serve
from ray.serve import Application
from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.api import (
    Overloaded,
    RecommendationService,
    create_api,
    process_service,
    set_process_service,
    wait_with_timeout,
)
from serving.candidates import CandidateConfig, CandidateSet, FilterConfig
from serving.flow import LocalStageCalls, StageTimeouts
from serving.metrics import get_metrics
from serving.stages import (
    POPULAR_ITEMS_CACHED,
    STORE_ERRORS,
    BehaviorEvent,
    CandidateGenerator,
    FeatureLookup,
    OnlineStoreUnavailable,
    RankedList,
    Ranker,
    RankRequest,
    SequenceUpdater,
    ServingModel,
    UserSequence,
)
from training import storage

logger = logging.getLogger("seqrec.serving")

Topology = Literal["graph", "ranker", "single"]
TOPOLOGIES = ("graph", "ranker", "single")
DEFAULT_TOPOLOGY: Topology = "ranker"

api = create_api(process_service)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ``user_config`` of deployments that hold a model."""

    model_version: str = "latest"
    max_batch_size: int = 16
    """Most requests the ranker scores in one model call."""
    batch_wait_timeout_s: float = 0.002
    """How long the ranker deployment waits to fill a batch once the first request has arrived.

    A ranker inside the ingress (``single`` topology) never waits: its batch contains the requests
    that reached ranking meanwhile (``serving.flow.RankBatcher``)."""

    def __post_init__(self) -> None:
        if not self.model_version:
            raise ValueError("model_version must name a version folder or be 'latest'")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be at least 0, got {self.batch_wait_timeout_s}")


class SwappableModel:
    """Loads model versions named by ``user_config`` and hands each new one to ``on_load``."""

    def __init__(self, model_dir: str, config: dict | None, on_load) -> None:
        self.model_dir = model_dir
        self.config = ModelConfig(**(config or {}))
        self.on_load = on_load
        self.on_load(ServingModel.load(model_dir, self.config.model_version))

    async def reconfigure(self, config: dict | None) -> ModelConfig:
        """Load the version in ``config`` off the event loop, then switch to it in one assignment."""
        new = ModelConfig(**(config or {}))
        if new.model_version != self.config.model_version:
            model = await asyncio.to_thread(ServingModel.load, self.model_dir, new.model_version)
            self.on_load(model)
            logger.info("Swapped to model version %s", model.version)
        self.config = new
        return new


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class FeatureLookupDeployment:
    def __init__(self, feature_repo: str) -> None:
        self.stage = FeatureLookup(feature_repo)

    def lookup(self, user_id: int) -> tuple[UserSequence | None, str | None]:
        """Return the user's sequence, or None and the reason the store read failed."""
        try:
            return self.stage.lookup([user_id])[0], None
        except OnlineStoreUnavailable as error:
            return None, str(error)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class CandidateGeneratorDeployment:
    def __init__(self, feature_repo: str, model_dir: str, config: dict | None = None, model_config: dict | None = None) -> None:
        self.feature_repo = feature_repo
        self.candidate_config = CandidateConfig(**(config or {}))
        self.stage: CandidateGenerator | None = None
        self.model = SwappableModel(model_dir, model_config, self._set_model)

    def _set_model(self, model: ServingModel) -> None:
        if self.stage is None:
            self.stage = CandidateGenerator(self.feature_repo, model, self.candidate_config)
        else:
            self.stage.set_model(model)

    async def reconfigure(self, config: dict) -> None:
        await self.model.reconfigure(config)

    def generate(self, sequence: UserSequence, excluded: frozenset[int]) -> CandidateSet:
        return self.stage.generate(sequence, excluded)


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """The output for one request of a batch whose own ranking raised."""

    message: str


class RankingFailed(RuntimeError):
    """Ranking one request raised; the other requests of its batch are not affected."""


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class RankerDeployment:
    def __init__(self, model_dir: str, model_config: dict | None = None) -> None:
        self.stage: Ranker | None = None
        self.model = SwappableModel(model_dir, model_config, self._set_model)
        self._apply_batch_config(self.model.config)

    def _set_model(self, model: ServingModel) -> None:
        if self.stage is None:
            self.stage = Ranker(model)
        else:
            self.stage.model = model

    def _apply_batch_config(self, config: ModelConfig) -> None:
        self._rank_batch.set_max_batch_size(config.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def reconfigure(self, config: dict) -> None:
        self._apply_batch_config(await self.model.reconfigure(config))

    async def rank(self, request: RankRequest) -> RankedList:
        """Rank one request. A malformed request fails here, before it can enter a batch."""
        if not isinstance(request, RankRequest):
            raise TypeError(f"rank() takes a RankRequest, got {type(request).__name__}")
        outcome = await self._rank_batch(request)
        if isinstance(outcome, RankFailure):
            raise RankingFailed(outcome.message)
        return outcome

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, requests: list[RankRequest]) -> list[RankedList | RankFailure]:
        # Exactly one output per request. Requests that clients abandoned never get here: Serve
        # drops cancelled requests from a batch before calling this method.
        get_metrics().observe_batch_size(len(requests))
        return [
            RankFailure(f"{type(output).__name__}: {output}") if isinstance(output, Exception) else output
            for output in self.stage.rank_each(requests)
        ]

    def popular(self, k: int) -> RankedList:
        return RankedList(tuple(self.stage.popular_items(k)), self.stage.model_version, backfilled=True)

    def describe(self) -> tuple[str, dict]:
        return self.stage.model_version, self.stage.artifact.metrics


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class SequenceUpdaterDeployment:
    def __init__(self, feature_repo: str) -> None:
        self.stage = SequenceUpdater(feature_repo)

    def append(self, events: list[BehaviorEvent]) -> tuple[dict[int, int] | None, str | None]:
        """Append the events; return the new sequence lengths, or None and the store's error."""
        try:
            return self.stage.append(events), None
        except (OnlineStoreUnavailable, *STORE_ERRORS) as error:
            return None, str(error)


async def _call(method, *args, timeout_s: float):
    """Call a deployment method within ``timeout_s``; a full queue raises Overloaded."""
    try:
        return await wait_with_timeout(method.remote(*args), timeout_s)
    except BackPressureError as error:
        raise Overloaded(str(error)) from error


class ServeStageCalls:
    """Stage calls of the ingress: through a deployment handle, or to a stage in this replica."""

    def __init__(self, lookup, generator, ranker, local: LocalStageCalls) -> None:
        self.lookup_target = lookup
        self.generator_target = generator
        self.ranker_target = ranker
        self.local = local
        self._popular: RankedList | None = None
        self._refresh: asyncio.Task | None = None

    async def lookup(self, user_id: int, timeout_s: float) -> UserSequence | None:
        if not isinstance(self.lookup_target, DeploymentHandle):
            return await self.local.lookup(user_id, timeout_s)
        sequence, error = await _call(self.lookup_target.lookup, user_id, timeout_s=timeout_s)
        if error is not None:
            raise OnlineStoreUnavailable(error)
        return sequence

    async def generate(self, sequence: UserSequence, excluded: frozenset[int], timeout_s: float) -> CandidateSet:
        if not isinstance(self.generator_target, DeploymentHandle):
            return await self.local.generate(sequence, excluded, timeout_s)
        return await _call(self.generator_target.generate, sequence, excluded, timeout_s=timeout_s)

    async def rank(self, request: RankRequest, timeout_s: float) -> RankedList:
        if not isinstance(self.ranker_target, DeploymentHandle):
            return await self.local.rank(request, timeout_s)
        if self._popular is None:
            self._start_refresh()
        ranked = await _call(self.ranker_target.rank, request, timeout_s=timeout_s)
        if self._popular is not None and self._popular.model_version != ranked.model_version:
            self._start_refresh()
        return ranked

    def _start_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_popular())

    async def _refresh_popular(self) -> None:
        try:
            self._popular = await self.ranker_target.popular.remote(POPULAR_ITEMS_CACHED)
        except Exception as error:  # the cache is a fallback; the next ranked response retries
            logger.warning("Refreshing the popular-items fallback failed: %s", error)

    def fallback(self, k: int, excluded: frozenset[int]) -> RankedList:
        if not isinstance(self.ranker_target, DeploymentHandle):
            return self.local.fallback(k, excluded)
        if self._popular is None:
            # Only until the first fetch of popular items finishes: there is nothing else to serve.
            return RankedList((), "unavailable", backfilled=True)
        items = tuple(item for item in self._popular.items if item.item_id not in excluded)[:k]
        return RankedList(items, self._popular.model_version, backfilled=True)

    async def describe(self) -> tuple[str, dict]:
        if isinstance(self.ranker_target, DeploymentHandle):
            return await self.ranker_target.describe.remote()
        return self.local.ranker.model_version, self.local.ranker.artifact.metrics


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    """HTTP routes of ``serving.api``; stages not given as handles run inside this replica."""

    def __init__(self, options: dict, updater, lookup=None, generator=None, ranker=None, model_config: dict | None = None) -> None:
        feature_repo, model_dir = options["feature_repo"], options["model_dir"]
        local_lookup = lookup if isinstance(lookup, DeploymentHandle) else FeatureLookup(feature_repo)
        self.local_ranker: Ranker | None = None
        self.local_generator: CandidateGenerator | None = None
        self.model = None
        if not isinstance(generator, DeploymentHandle) or not isinstance(ranker, DeploymentHandle):
            self.model = SwappableModel(model_dir, model_config, self._set_model)
            if not isinstance(generator, DeploymentHandle):
                self.local_generator = CandidateGenerator(
                    feature_repo, self._model, CandidateConfig(**options.get("candidates", {}))
                )
        local = LocalStageCalls(
            local_lookup if isinstance(local_lookup, FeatureLookup) else None,
            self.local_generator,
            self.local_ranker,
            max_batch_size=self.model.config.max_batch_size if self.model is not None else 1,
        )
        self.calls = ServeStageCalls(
            lookup if isinstance(lookup, DeploymentHandle) else local_lookup,
            generator if isinstance(generator, DeploymentHandle) else self.local_generator,
            ranker if isinstance(ranker, DeploymentHandle) else self.local_ranker,
            local,
        )
        self.updater = updater
        set_process_service(RecommendationService(
            calls=self.calls,
            append_events=self._append_events,
            describe_model=self.calls.describe,
            filters=FilterConfig(**options.get("filters", {})),
            timeouts=StageTimeouts(**options.get("timeouts", {})),
        ))

    def _set_model(self, model: ServingModel) -> None:
        self._model = model
        if self.local_ranker is None:
            self.local_ranker = Ranker(model)
        else:
            self.local_ranker.model = model
        if self.local_generator is not None:
            self.local_generator.set_model(model)

    async def reconfigure(self, config: dict) -> None:
        if self.model is not None:
            new = await self.model.reconfigure(config)
            self.calls.local.set_max_batch_size(new.max_batch_size)

    async def _append_events(self, events: list[BehaviorEvent], timeout_s: float) -> dict[int, int]:
        lengths, error = await _call(self.updater.append, events, timeout_s=timeout_s)
        if error is not None:
            raise OnlineStoreUnavailable(error)
        return lengths


def direct_ingress_url(app_name: str, timeout_s: float = 120) -> str:
    """Return the URL of an application's ingress replica under Serve's direct ingress.

    With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` Serve starts no proxy, and each ingress replica
    serves HTTP on a port of its own. This reads the first such replica from the Serve
    controller's routing targets, from a driver connected to the Ray instance, and waits up to
    ``timeout_s`` for one to start.
    """
    import ray
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
        # Without direct ingress the targets are the proxies, so only replicas count here.
        ports = [
            target.port
            for group in groups
            if group.protocol.name == "HTTP"
            for target in group.targets
            if target.name.startswith(REPLICA_ID_FULL_ID_STR_PREFIX)
        ]
        if ports:
            return f"http://127.0.0.1:{ports[0]}"
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no replica of {app_name!r} serves HTTP after {timeout_s} s; direct ingress needs "
                "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment of the Ray instance"
            )
        time.sleep(0.5)


def deployment_names(topology: Topology) -> set[str]:
    """Names of the deployments that ``build_app`` binds for a topology."""
    names = {Ingress.name, SequenceUpdaterDeployment.name}
    if topology in ("graph", "ranker"):
        names.add(RankerDeployment.name)
    if topology == "graph":
        names |= {FeatureLookupDeployment.name, CandidateGeneratorDeployment.name}
    return names


def _model_config(args: dict[str, Any]) -> dict:
    return {"model_version": args.get("model_version", "latest")}


def build_app(args: dict) -> Application:
    """Build the serving graph from ``feature_repo``, ``model_dir`` and optional settings.

    ``feature_repo`` is a local folder with ``feature_store.yaml``. ``model_dir`` is a local path
    or a URI such as ``s3://bucket/models``. Optional: ``model_version`` (default latest),
    ``topology`` (graph, ranker or single; default ranker), and ``candidates``, ``filters`` and
    ``timeouts`` as mappings of CandidateConfig, FilterConfig and StageTimeouts fields.
    """
    missing = [name for name in ("feature_repo", "model_dir") if not args.get(name)]
    if missing:
        raise ValueError(f"missing application arguments {missing}; pass e.g. feature_repo=feature_repo")
    topology = args.get("topology", DEFAULT_TOPOLOGY)
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {list(TOPOLOGIES)}, got {topology!r}")
    options = {
        "feature_repo": str(Path(args["feature_repo"]).resolve()),
        "model_dir": storage.normalize(args["model_dir"]),
        "candidates": dict(args.get("candidates") or {}),
        "filters": dict(args.get("filters") or {}),
        "timeouts": dict(args.get("timeouts") or {}),
    }
    # Validate the settings here, where a mistake is reported at deploy time, not in a replica.
    CandidateConfig(**options["candidates"])
    FilterConfig(**options["filters"])
    StageTimeouts(**options["timeouts"])
    model_config = _model_config(args)
    ModelConfig(**model_config)

    updater = SequenceUpdaterDeployment.bind(options["feature_repo"])
    lookup = generator = ranker = None
    if topology == "graph":
        lookup = FeatureLookupDeployment.bind(options["feature_repo"])
        generator = CandidateGeneratorDeployment.options(user_config=model_config).bind(
            options["feature_repo"], options["model_dir"], options["candidates"], model_config
        )
    if topology in ("graph", "ranker"):
        ranker = RankerDeployment.options(user_config=model_config).bind(options["model_dir"], model_config)
    ingress = Ingress if topology == "graph" else Ingress.options(user_config=model_config)
    return ingress.bind(options, updater, lookup, generator, ranker, model_config)
