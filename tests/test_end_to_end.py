"""The whole path on the real Taobao sample: ingest, Ray Data features, Feast, Ray Train, Ray Serve, HTTP."""

import json
import re
from pathlib import Path

import httpx
import pytest

from conftest import real_data_path
from helpers import PROJECT_ROOT, feast_apply
from serving.client import sample_users
from serving_support import copy_redis_feature_repo
from training.events import ingest_taobao_csv
from training.features import run_feature_job
from training.materialize import materialize
from training.train import TrainingConfig, train

pytestmark = pytest.mark.e2e

SERVE_PORT = 8123
K = 5
REDIS_DB = 3


@pytest.fixture(scope="module")
def served_stack(ray_instance, tmp_path_factory, redis_url):
    csv_path = real_data_path("taobao_userbehavior/UserBehavior_head.csv")
    from ray import serve

    from serving.app import build_app

    root = tmp_path_factory.mktemp("e2e")
    repo = copy_redis_feature_repo(root / "feature_repo", redis_url, REDIS_DB)
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


def test_ingest_quarantines_truncated_and_out_of_window(served_stack):
    assert served_stack["report"].rejected == {"malformed": 1, "outside_window": 35}


def test_model_beats_popularity_on_same_split(served_stack):
    metrics = json.loads((Path(served_stack["artifact"]) / "metrics.json").read_text())
    assert metrics["users_evaluated"] == 815
    assert metrics["sasrec"]["test"]["ndcg@10"] > metrics["popularity"]["test"]["ndcg@10"]
    assert metrics["sasrec"]["test"]["hr@10"] > metrics["popularity"]["test"]["hr@10"]


def test_http_recommendations_for_real_users(served_stack):
    users = sample_users(served_stack["report"].events_path, 3)
    version = Path(served_stack["artifact"]).name
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


def json_shape(value):
    """The structure of a JSON value with types in place of values; numbers are one type."""
    if isinstance(value, dict):
        return {key: json_shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_shape(value[0])] if value else []
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def shapes_match(actual, documented) -> bool:
    """Whether two shapes agree, where null in ``actual`` matches any value of a nullable field."""
    if actual == "NoneType":
        return True
    if isinstance(actual, dict) and isinstance(documented, dict):
        return actual.keys() == documented.keys() and all(shapes_match(actual[key], documented[key]) for key in actual)
    if isinstance(actual, list) and isinstance(documented, list):
        return not actual or not documented or shapes_match(actual[0], documented[0])
    return actual == documented


def documented_examples():
    """(method, path, status, request body or None, response body) for each example in docs/api.md."""
    text = (PROJECT_ROOT / "docs" / "api.md").read_text()
    marker = re.compile(r"<!-- example: (GET|POST) (\S+) (\d{3}) -->")
    block = re.compile(r"```json\n(.*?)\n```", re.S)
    examples = []
    for match in marker.finditer(text):
        following = text[match.end() :]
        next_marker = marker.search(following)
        bodies = [json.loads(body) for body in block.findall(following[: next_marker.start() if next_marker else None])]
        method, path, status = match.group(1), match.group(2), int(match.group(3))
        request = bodies[0] if method == "POST" else None
        examples.append((method, path, status, request, bodies[-1]))
    return examples


def test_api_docs_have_examples():
    examples = documented_examples()
    assert len(examples) >= 5
    assert {(method, path) for method, path, *_ in examples} >= {("POST", "/v1/recommend"), ("GET", "/healthz")}


def test_api_docs_examples_match_service(served_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        for method, path, status, request, documented in documented_examples():
            response = client.request(method, path, json=request)
            assert response.status_code == status, (method, path, request, response.text)
            body = response.json()
            assert shapes_match(json_shape(body), json_shape(documented)), (method, path, request, body)
            for item in body.get("items", []):
                assert json_shape(item) == json_shape(documented["items"][0])


def test_http_events_end_cold_start(served_stack):
    user_id = 888_888_888
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        before = client.post("/v1/recommend", json={"user_id": user_id, "k": K}).json()
        before_items = [item["item_id"] for item in before["items"][:2]]
        events = [
            {"user_id": user_id, "item_id": item_id, "behavior": "pv", "timestamp": 1_512_300_000 + n}
            for n, item_id in enumerate(before_items)
        ]
        posted = client.post("/v1/events", json={"events": events})
        after = client.post("/v1/recommend", json={"user_id": user_id, "k": K}).json()
    assert before["cold_start"] is True
    assert posted.status_code == 200, posted.text
    assert posted.json()["users"] == [{"user_id": user_id, "sequence_length": len(before_items)}]
    assert after["cold_start"] is False
    assert any(item["source"] == "model" for item in after["items"])


def test_http_model_reports_served_version(served_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        body = client.get("/v1/model").json()
    assert body["model_version"] == Path(served_stack["artifact"]).name
    assert body["metrics"]["sasrec"]["test"]["count"] == 815


def test_http_rejects_user_id_beyond_int64(served_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30) as client:
        response = client.post("/v1/recommend", json={"user_id": 2**64, "k": 3})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "user_id"]
