"""The cluster path: how entry points pick the cluster to join, and a private `ray start --head`
cluster that runs the training entry point via `ray job submit`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import _free_port
from helpers import PROJECT_ROOT
from training.cluster import cluster_address
from training.events import ingest_taobao_csv
from training.generator import GeneratorConfig, generate_events, write_taobao_csv

START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600
RAY = str(Path(sys.executable).with_name("ray"))


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    # The job's driver and workers must run this environment's Python, as the demo's do.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # `ray start --head` turns on token authentication in Ray 2.60; clients send the token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.pop("RAY_ADDRESS", None)
    return env


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes of this cluster that outlived their group, found by the cluster's temp folder."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in command_line:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on free loopback ports, with its own temp folder; yields the dashboard URL."""
    temp_dir = tempfile.mkdtemp(prefix="seqrec-ray-")
    ports = {
        "--port": _free_port(),
        "--dashboard-port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }
    command = [
        RAY, "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    process = subprocess.Popen(
        command, env=_cluster_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    dashboard_url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()}")
            try:
                if httpx.get(f"{dashboard_url}/api/version", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard at {dashboard_url} did not answer within {START_TIMEOUT_S} s")
            time.sleep(1)
        yield dashboard_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        _kill_leftovers(temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submitted_training_job_writes_artifact(ray_cluster, tmp_path):
    write_taobao_csv(
        generate_events(GeneratorConfig(num_users=100, num_items=200, num_categories=10, mean_events_per_user=12)),
        tmp_path / "events.csv",
    )
    events = ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "events").events_path
    model_dir = tmp_path / "models"
    command = [
        RAY, "job", "submit", "--address", ray_cluster, "--working-dir", str(PROJECT_ROOT), "--",
        "python", "-m", "training.train", "--events", str(events), "--model-dir", str(model_dir),
        "--epochs", "2", "--patience", "2", "--hidden-size", "16", "--max-length", "20", "--time-gap",
    ]
    result = subprocess.run(
        command, env=_cluster_env(), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout

    location = model_dir / (model_dir / "LATEST").read_text().strip()
    for name in ("model.pt", "config.json", "metrics.json", "training_curve.png"):
        assert (location / name).is_file(), name
    metrics = json.loads((location / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2]
    assert metrics["users_evaluated"] == 100
    config = json.loads((location / "config.json").read_text())
    assert config["model"]["use_time_gap"] is True


def test_live_address_file_is_joined(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(tmp_path / "absent") is None
    with socket.create_server(("127.0.0.1", 0)) as server:
        address_file = tmp_path / "ray_current_cluster"
        address_file.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert cluster_address(address_file) == "auto"


def test_stale_address_file_is_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address_file = tmp_path / "ray_current_cluster"
    address_file.write_text(f"127.0.0.1:{_free_port()}\n")
    assert cluster_address(address_file) == "local"
    assert str(address_file) in caplog.text
    assert "ray stop" in caplog.text
    # RAY_ADDRESS takes precedence over the file, and Ray reads it itself.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert cluster_address(address_file) is None
