"""The Serve application in Serve's direct-ingress mode: the ingress replica serves HTTP itself.

``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` starts no proxy. The replica listens on a port that Serve
picks, and the Serve controller's routing targets name it. docs/benchmarks.md measures this mode.
"""

import datetime

import httpx
import pandas as pd
import pytest

from conftest import _free_port
from helpers import write_random_artifact
from serving.app import build_app, direct_ingress_url
from serving_support import PATIENT_TIMEOUTS, applied_redis_store
from training.schema import USER_SEQUENCE_VIEW

NOW = datetime.datetime(2017, 12, 3, tzinfo=datetime.timezone.utc)
ITEMS = list(range(201, 231))
REDIS_DB = 4
APP = "seqrec-direct"


@pytest.fixture(scope="module")
def replica_url(tmp_path_factory, redis_url):
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("direct")
    repo, store = applied_redis_store(root / "feature_repo", redis_url, REDIS_DB)
    store.write_to_online_store(
        USER_SEQUENCE_VIEW,
        pd.DataFrame(
            {
                "user_id": [1, 2],
                "event_timestamp": [NOW, NOW],
                "item_ids": [[201, 202, 203], [210]],
                "category_ids": [[1, 1, 2], [2]],
                "behaviors": [["pv", "pv", "cart"], ["pv"]],
                "timestamps_s": [[10, 20, 30], [40]],
            }
        ),
    )
    models = root / "models"
    write_random_artifact(models, ITEMS, [1, 2], item_counts={item: 100 - i for i, item in enumerate(ITEMS)})

    with pytest.MonkeyPatch.context() as env:
        # Serve reads the switch in the processes that Ray starts, so it is set before ray.init.
        env.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        args = {"feature_repo": str(repo), "model_dir": str(models), "topology": "single", "timeouts": PATIENT_TIMEOUTS}
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield direct_ingress_url(APP)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_replica_serves_ranked_recommendations(replica_url):
    response = httpx.post(f"{replica_url}/v1/recommend", json={"user_id": 1, "k": 5}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert len(body["items"]) == 5
    assert body["model_version"] == "v0"
    assert body["degraded"] == []
    assert not body["cold_start"]
    assert {item["item_id"] for item in body["items"]} <= set(ITEMS)


def test_replica_uses_posted_event_next(replica_url):
    event = {"user_id": 2, "item_id": 220, "category_id": 1, "behavior": "pv", "timestamp": 1_700_000_000}
    with httpx.Client(base_url=replica_url, timeout=30) as client:
        assert client.post("/v1/events", json={"events": [event]}).status_code == 200
        body = client.post("/v1/recommend", json={"user_id": 2, "k": 3}).json()
    assert body["latest_event_timestamp"] == 1_700_000_000


def test_replica_validates_input_reports_model(replica_url):
    with httpx.Client(base_url=replica_url, timeout=30) as client:
        invalid = client.post("/v1/recommend", json={"user_id": 1, "k": 0})
        model = client.get("/v1/model")
        health = client.get("/healthz")
    assert invalid.status_code == 422
    assert "k" in str(invalid.json()["detail"])
    assert model.status_code == 200
    assert model.json()["model_version"] == "v0"
    assert health.status_code == 200
