"""The whole path on the real Taobao sample: ingest, Ray Data features, Feast, Ray Train, Ray Serve, HTTP."""

import json

import httpx
import pytest

from conftest import real_data_path
from helpers import copy_feature_repo, feast_apply
from serving.client import sample_users
from training.events import ingest_taobao_csv
from training.features import run_feature_job
from training.materialize import materialize
from training.train import TrainingConfig, train

pytestmark = pytest.mark.e2e

SERVE_PORT = 8123
K = 5


@pytest.fixture(scope="module")
def served_stack(ray_instance, tmp_path_factory):
    csv_path = real_data_path("taobao_userbehavior/UserBehavior_head.csv")
    from ray import serve

    from serving.app import build_app

    root = tmp_path_factory.mktemp("e2e")
    repo = copy_feature_repo(root / "feature_repo")
    data = repo / "data"
    report = ingest_taobao_csv(csv_path, data / "events")
    run_feature_job(report.events_path, str(data / "offline"))
    feast_apply(repo)
    materialize(repo)
    artifact = train(
        report.events_path,
        str(data / "models"),
        config=TrainingConfig(epochs=6, learning_rate=0.01, patience=6),
    )

    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(build_app({"feature_repo": str(repo), "model_dir": str(data / "models")}), name="seqrec-e2e")
    yield {"report": report, "artifact": artifact}
    serve.shutdown()


def test_ingest_quarantines_truncated_last_line(served_stack):
    assert served_stack["report"].rejected == {"malformed": 1}


def test_model_beats_popularity_on_same_split(served_stack):
    metrics = json.loads((served_stack["artifact"] / "metrics.json").read_text())
    assert metrics["users_evaluated"] == 815
    assert metrics["sasrec"]["test"]["ndcg@10"] > metrics["popularity"]["test"]["ndcg@10"]
    assert metrics["sasrec"]["test"]["hr@10"] > metrics["popularity"]["test"]["hr@10"]


def test_http_recommendations_for_real_users(served_stack):
    users = sample_users(served_stack["report"].events_path, 3)
    version = served_stack["artifact"].name
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        for user_id in users:
            response = client.post("/v1/recommend", json={"user_id": user_id, "k": K})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["user_id"] == user_id
            assert body["cold_start"] is False
            assert body["model_version"] == version
            assert len(body["items"]) == K
            assert len({item["item_id"] for item in body["items"]}) == K
            model_scores = [item["score"] for item in body["items"] if item["source"] == "model"]
            assert model_scores == sorted(model_scores, reverse=True)


def test_http_unknown_user_gets_flagged_cold_start(served_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        response = client.post("/v1/recommend", json={"user_id": 999_999_999, "k": K})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cold_start"] is True
    assert len(body["items"]) == K
    assert all(item["source"] == "popularity" for item in body["items"])


def test_http_rejects_invalid_k_naming_field(served_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        response = client.post("/v1/recommend", json={"user_id": 1, "k": 0})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "k"]
