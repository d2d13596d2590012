"""The Serve application over HTTP, with Redis as the online store and small generated models."""

import asyncio
import datetime
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest

from conftest import _free_port
from helpers import write_random_artifact
from serving.stages import (
    ONLINE_STORE_UNAVAILABLE,
    RANKING_TIMED_OUT,
    FeatureLookup,
    RankedList,
    RankRequest,
    UserSequence,
)
from serving_support import PATIENT_TIMEOUTS, applied_redis_store, unreachable_redis_repo
from training.schema import ITEM_NEIGHBORS_VIEW, USER_SEQUENCE_VIEW

NOW = datetime.datetime(2017, 12, 3, tzinfo=datetime.timezone.utc)
ITEMS = list(range(101, 161))
CATEGORIES = [1, 2, 3]
USERS = list(range(1, 21))
REDIS_DB = 2
APP = "seqrec-http"


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_url):
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    root = tmp_path_factory.mktemp("http")
    repo, store = applied_redis_store(root / "feature_repo", redis_url, REDIS_DB)
    store.write_to_online_store(
        USER_SEQUENCE_VIEW,
        pd.DataFrame(
            {
                "user_id": USERS,
                "event_timestamp": [NOW] * len(USERS),
                "item_ids": [[ITEMS[u], ITEMS[u + 1], ITEMS[u + 2]] for u in USERS],
                "category_ids": [[1, 2, 3]] * len(USERS),
                "behaviors": [["pv", "cart", "buy"]] * len(USERS),
                "timestamps_s": [[10, 20, 30]] * len(USERS),
            }
        ),
    )
    store.write_to_online_store(
        ITEM_NEIGHBORS_VIEW,
        pd.DataFrame(
            {
                "item_id": ITEMS[:30],
                "event_timestamp": [NOW] * 30,
                "neighbor_ids": [[ITEMS[(i + 5) % 60], ITEMS[(i + 7) % 60]] for i in range(30)],
                "neighbor_scores": [[2.0, 1.0]] * 30,
            }
        ),
    )
    models = root / "models"
    counts = {item: 1000 - index for index, item in enumerate(ITEMS)}
    write_random_artifact(models, ITEMS, CATEGORIES, item_counts=counts, seed=0)
    write_random_artifact(models, ITEMS, CATEGORIES, item_counts=counts, seed=1)

    port, metrics_port = _free_port(), _free_port()
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = _get_global_client()

    def deploy(applications):
        """Apply a Serve config, as `serve deploy` does, and wait until every app runs."""
        config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": applications}
        client.deploy_apps(ServeDeploySchema(**config))
        # Replicas import torch and Feast and load the model; on a busy 2-core machine that can
        # take minutes.
        deadline = time.monotonic() + 600
        while True:
            statuses = {name: app.status for name, app in serve.status().applications.items()}
            if statuses and all(status == "RUNNING" for status in statuses.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve applications not running after 600 s: {statuses}")
            time.sleep(0.5)

    def app_config(name, prefix, model_version="v0", repo_path=repo, **extra):
        args = {"feature_repo": str(repo_path), "model_dir": str(models), "timeouts": PATIENT_TIMEOUTS,
                **extra.pop("args", {})}
        model_config = {"model_version": model_version}
        deployments = [{"name": "Ingress", "user_config": model_config, **extra.pop("ingress", {})}]
        if args.get("topology", "ranker") != "single":
            deployments.append({"name": "RankerDeployment", "user_config": model_config})
        return {"name": name, "route_prefix": prefix, "import_path": "serving.app:build_app", "args": args,
                "deployments": deployments}

    main = app_config(APP, "/")
    deploy([main])
    yield {
        "url": f"http://127.0.0.1:{port}",
        "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
        "repo": repo,
        "root": root,
        "deploy": deploy,
        "app_config": app_config,
        "main": main,
    }
    serve.shutdown()
    ray.shutdown()


def post(client, user_id, k=5, **body):
    return client.post("/v1/recommend", json={"user_id": user_id, "k": k, **body})


def test_recommend_ranks_with_model(served):
    with httpx.Client(base_url=served["url"], timeout=30) as client:
        response = client.post("/v1/recommend", json={"user_id": 3, "k": 5}, headers={"X-Request-ID": "abc123"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "abc123"
    assert body["model_version"] == "v0"
    assert body["degraded"] == []
    assert body["cold_start"] is False
    assert body["latest_event_timestamp"] == 30
    assert len(body["items"]) == 5
    assert all(item["source"] == "model" for item in body["items"])
    # Item ITEMS[5] was bought by user 3, so the default policy keeps it out.
    assert ITEMS[5] not in {item["item_id"] for item in body["items"]}


def test_recommend_honours_exclusions(served):
    with httpx.Client(base_url=served["url"], timeout=30) as client:
        first = post(client, 3, k=10).json()
        excluded = [item["item_id"] for item in first["items"][:4]]
        second = post(client, 3, k=10, exclude_item_ids=excluded).json()
    assert len(second["items"]) == 10
    assert not set(excluded) & {item["item_id"] for item in second["items"]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": 1, "k": 101}, ["body", "k"]),
        ({"user_id": "1", "k": 3}, ["body", "user_id"]),
        ({"user_id": 1, "exclude_item_ids": [1, "x"]}, ["body", "exclude_item_ids", 1]),
        ({"user_id": 1, "colour": "red"}, ["body", "colour"]),
    ],
    ids=["k-too-large", "user-id-string", "exclusion-string", "unknown-field"],
)
def test_invalid_request_gets_422_naming_field(served, body, field):
    with httpx.Client(base_url=served["url"], timeout=30) as client:
        response = client.post("/v1/recommend", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == field


def test_openapi_documents_routes_and_limits(served):
    with httpx.Client(base_url=served["url"], timeout=30) as client:
        spec = client.get("/openapi.json").json()
    assert {"/v1/recommend", "/v1/events", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "503" in spec["paths"]["/v1/recommend"]["post"]["responses"]
    k = spec["components"]["schemas"]["RecommendRequest"]["properties"]["k"]
    assert k["maximum"] == 100


def test_event_is_used_by_next_recommendation(served):
    user_id = 5_000
    with httpx.Client(base_url=served["url"], timeout=30) as client:
        before = post(client, user_id).json()
        posted = client.post(
            "/v1/events",
            json={"events": [{"user_id": user_id, "item_id": ITEMS[40], "behavior": "pv", "timestamp": 1_512_300_000}]},
        )
        after = post(client, user_id).json()
    assert before["cold_start"] is True
    assert posted.status_code == 200, posted.text
    assert after["cold_start"] is False
    assert after["latest_event_timestamp"] == 1_512_300_000
    assert any(item["source"] == "model" for item in after["items"])


def test_concurrent_event_posts_for_one_user_all_land(served):
    user_id = 5_001
    events = [
        {"user_id": user_id, "item_id": ITEMS[n], "behavior": "pv", "timestamp": 1_512_300_000 + n} for n in range(24)
    ]

    def send(event):
        with httpx.Client(base_url=served["url"], timeout=30) as client:
            return client.post("/v1/events", json={"events": [event]}).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(send, events))
    assert statuses == [200] * len(events)
    stored = FeatureLookup(served["repo"]).lookup([user_id])[0]
    assert sorted(stored.item_ids) == sorted(ITEMS[:24])


def test_model_swap_under_load_fails_no_request(served):
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=served["url"], timeout=30) as client:
            user = 0
            while not stop.is_set():
                user = user % len(USERS) + 1
                response = post(client, user)
                version = response.json()["model_version"] if response.status_code == 200 else None
                results.append((response.status_code, version))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        served["deploy"]([served["app_config"](APP, "/", model_version="v1")])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not results or results[-1][1] != "v1"):
            time.sleep(0.2)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        served["deploy"]([served["main"]])
    statuses = [status for status, _ in results]
    versions = [version for _, version in results]
    assert len(results) > 50
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert versions[0] == "v0"
    assert versions[-1] == "v1"
    # Once a request has seen v1, later ones see v1 too, except those already in flight then.
    first_v1 = versions.index("v1")
    assert versions[first_v1 + 8 :].count("v0") == 0


def test_abandoned_requests_do_not_stall_ranker(served):
    with httpx.Client(base_url=served["url"], timeout=0.002) as hasty:
        for user in USERS:
            with pytest.raises(httpx.TimeoutException):
                post(hasty, user)

    def send(user):
        with httpx.Client(base_url=served["url"], timeout=10) as client:
            return post(client, user).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(send, USERS))
    assert statuses == [200] * len(USERS)
    assert time.monotonic() - started < 10


def test_bad_rank_request_does_not_fail_its_batch(served):
    from ray import serve

    handle = serve.get_deployment_handle("RankerDeployment", app_name=APP)
    sequence = UserSequence(1, (ITEMS[1], ITEMS[2]), (1, 1), ("pv", "pv"), (1, 2))
    good = [RankRequest(sequence, tuple(ITEMS[10:30]), k=3) for _ in range(6)]
    # Passes RankRequest's checks but overflows int64 inside the model call.
    overflowing = RankRequest(sequence, (2**70,), k=3)

    async def send_all():
        responses = [handle.rank.remote(request) for request in [*good[:3], overflowing, "not a request", *good[3:]]]
        return await asyncio.gather(*responses, return_exceptions=True)

    outputs = asyncio.run(send_all())
    assert [isinstance(output, RankedList) for output in outputs] == [True, True, True, False, False, True, True, True]
    assert all(len(output.items) == 3 for output in outputs if isinstance(output, RankedList))
    assert "RankingFailed" in type(outputs[3]).__name__ or "OverflowError" in str(outputs[3])
    assert "TypeError" in type(outputs[4]).__name__ or "RankRequest" in str(outputs[4])


def test_degraded_paths_are_flagged_not_failed(served):
    broken = unreachable_redis_repo(served["repo"], served["root"] / "broken_repo", _free_port())
    apps = [
        served["main"],
        served["app_config"]("broken", "/broken", repo_path=broken, args={"topology": "single"}),
        served["app_config"]("slow", "/slow", args={"topology": "single", "timeouts": {**PATIENT_TIMEOUTS, "ranking_s": 1e-6}}),
    ]
    served["deploy"](apps)
    try:
        with httpx.Client(base_url=served["url"], timeout=30) as client:
            unreachable = client.post("/broken/v1/recommend", json={"user_id": 3, "k": 4})
            slow = client.post("/slow/v1/recommend", json={"user_id": 3, "k": 4, "exclude_item_ids": [ITEMS[0]]})
    finally:
        served["deploy"]([served["main"]])
    assert unreachable.status_code == 200, unreachable.text
    assert unreachable.json()["degraded"] == [ONLINE_STORE_UNAVAILABLE]
    assert len(unreachable.json()["items"]) == 4
    assert slow.status_code == 200, slow.text
    assert slow.json()["degraded"] == [RANKING_TIMED_OUT]
    assert [item["item_id"] for item in slow.json()["items"]] == ITEMS[1:5]


def test_overload_gets_503_with_retry_after(served):
    tight = served["app_config"](
        "tight",
        "/tight",
        args={"topology": "single"},
        ingress={"max_ongoing_requests": 1, "max_queued_requests": 1, "backpressure_config": {"retry_after_s": 2}},
    )
    served["deploy"]([served["main"], tight])

    def send(user):
        with httpx.Client(base_url=served["url"], timeout=30) as client:
            response = client.post("/tight/v1/recommend", json={"user_id": user, "k": 100})
            return response.status_code, response.headers.get("retry-after")

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = list(pool.map(send, USERS * 3))
    finally:
        served["deploy"]([served["main"]])
    statuses = [status for status, _ in outcomes]
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0
    assert statuses.count(200) > 0
    assert {retry for status, retry in outcomes if status == 503} == {"2"}


def test_graph_topology_serves_same_api(served):
    graph = served["app_config"]("graph", "/graph", args={"topology": "graph"})
    graph["deployments"].append({"name": "CandidateGeneratorDeployment", "user_config": {"model_version": "v0"}})
    graph["deployments"] = [d for d in graph["deployments"] if d["name"] != "Ingress"]
    served["deploy"]([served["main"], graph])
    try:
        with httpx.Client(base_url=served["url"], timeout=30) as client:
            body = client.post("/graph/v1/recommend", json={"user_id": 3, "k": 5}).json()
            model = client.get("/graph/v1/model").json()
    finally:
        served["deploy"]([served["main"]])
    assert body["degraded"] == []
    assert len(body["items"]) == 5
    assert all(item["source"] == "model" for item in body["items"])
    assert model["model_version"] == "v0"


def test_stage_metrics_reach_ray_metrics_endpoint(served):
    with httpx.Client(base_url=served["url"], timeout=30) as client:
        for user in USERS[:5]:
            assert post(client, user).status_code == 200
    # Ray's metrics agent exports on an interval, so poll for a while.
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(served["metrics_url"], timeout=10).text
        if "seqrec_rank_batch_size" in text and "seqrec_stage_latency_s" in text:
            break
        time.sleep(2)
    assert "seqrec_stage_latency_s" in text
    assert "seqrec_rank_batch_size" in text
    assert "seqrec_candidates_total" in text
