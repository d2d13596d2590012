"""Ray Train runs on generated events: recovery from a killed worker and the metrics report."""

import json
from pathlib import Path

import numpy as np
import pytest

from training.artifacts import TRENDING_FILE
from training.events import ingest_taobao_csv
from training.generator import GeneratorConfig, generate_events, write_taobao_csv
from training.train import FAIL_WORKER_ENV, TrainingConfig, parse_run, resolve_use_gpu, train

FAILED_EPOCH = 3
EPOCHS = 4


@pytest.fixture(scope="module")
def events_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("events")
    config = GeneratorConfig(num_users=150, num_items=300, num_categories=15, mean_events_per_user=15)
    write_taobao_csv(generate_events(config), root / "events.csv")
    return ingest_taobao_csv(root / "events.csv", root / "events").events_path


@pytest.fixture(scope="module")
def failing_ray(tmp_path_factory):
    """A local Ray instance whose training workers kill one worker once, during FAILED_EPOCH."""
    import ray

    marker = tmp_path_factory.mktemp("failure") / "worker-killed"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {FAIL_WORKER_ENV: f"{FAILED_EPOCH}:{marker}"}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def recovered_run(failing_ray, events_path, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models")
    location = train(
        events_path,
        str(model_dir),
        {"hidden_size": 16, "max_length": 20, "use_time_gap": True},
        TrainingConfig(epochs=EPOCHS, patience=EPOCHS, learning_rate=0.01, log_interval_s=1.0),
    )
    return Path(location), failing_ray


def test_killed_worker_resumes_at_saved_epoch(recovered_run):
    location, marker = recovered_run
    metrics = json.loads((location / "metrics.json").read_text())
    assert marker.exists(), "the injected worker failure did not happen"
    assert metrics["resumed_from_epochs"] == [FAILED_EPOCH - 1]
    assert [entry["epoch"] for entry in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert metrics["epochs_run"] == EPOCHS


def test_run_writes_model_metrics_and_curve(recovered_run):
    location, _ = recovered_run
    for name in ("model.pt", "config.json", "metrics.json", "training_curve.png", TRENDING_FILE):
        assert (location / name).is_file(), name
    assert (location / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trending = np.load(location / TRENDING_FILE)
    num_items = json.loads((location / "config.json").read_text())["model"]["num_items"]
    assert trending.dtype == np.int64
    assert ((trending >= 1) & (trending < num_items)).all()


def test_metrics_report_best_epoch_and_baselines(recovered_run):
    location, _ = recovered_run
    metrics = json.loads((location / "metrics.json").read_text())
    history = metrics["history"]
    best = max(history, key=lambda entry: entry["validation"]["ndcg@10"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["sasrec"]["validation"] == best["validation"]
    for name in ("hr@10", "ndcg@10", "recall@10", "mrr@10", "hr@20", "ndcg@20", "recall@20", "mrr@20", "mrr"):
        assert 0.0 <= metrics["sasrec"]["test"][name] <= 1.0, name
    for baseline in ("popularity", "itemcf"):
        assert metrics[baseline]["test"]["count"] == metrics["users_evaluated"], baseline
    assert metrics["users_evaluated"] == 150
    assert metrics["users_not_evaluated"] == {"validation": 0, "test": 0}
    assert all(entry["train_loss"] > 0 for entry in history)
    assert all(entry["sequences_per_s"] > 0 for entry in history)
    assert metrics["timing"]["time_to_best_s"] <= metrics["timing"]["training_time_s"]
    assert metrics["sampled_metrics"] is None
    assert not any(name.startswith("sampled_") for name in metrics["sasrec"]["test"])


def test_block_design_flags_reach_model_options():
    _, defaults, _, _ = parse_run(["--events", "e", "--model-dir", "m"])
    assert defaults["feedforward_size"] is None
    assert defaults["activation"] == "gelu"
    assert defaults["initializer_range"] is None
    flags = ["--feedforward-size", "64", "--activation", "relu", "--num-heads", "1", "--initializer-range", "0.02"]
    _, options, _, _ = parse_run(["--events", "e", "--model-dir", "m", *flags])
    assert options["feedforward_size"] == 64
    assert options["activation"] == "relu"
    assert options["num_heads"] == 1
    assert options["initializer_range"] == 0.02


def test_shuffle_buffer_is_parsed_and_validated():
    _, _, config, _ = parse_run(["--events", "e", "--model-dir", "m", "--shuffle-buffer-rows", "700"])
    assert config.shuffle_buffer_rows == 700
    with pytest.raises(ValueError, match="shuffle_buffer_rows must be at least 1, got 0"):
        TrainingConfig(shuffle_buffer_rows=0)


@pytest.mark.parametrize(
    ("setting", "gpus", "expected"),
    [("auto", 0.0, False), ("auto", 1.0, False), ("auto", 2.0, True), ("yes", 2.0, True), ("no", 2.0, False)],
)
def test_gpu_choice_follows_cluster(monkeypatch, setting, gpus, expected):
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 2.0, "GPU": gpus})
    assert resolve_use_gpu(setting, num_workers=2) is expected


def test_missing_gpus_rejected_with_fix(monkeypatch):
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    with pytest.raises(ValueError, match=r"--use-gpu yes needs 2 GPUs but the Ray cluster has 1; pass --use-gpu auto"):
        resolve_use_gpu("yes", num_workers=2)
