"""Shared fixtures: the real data folder, a local Ray instance per module, small event logs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Keep the test Ray instances on the loopback interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Every Ray client in the tests, and in the commands they run (`feast apply`, the entry points),
# starts its own instance. It joins no cluster that runs on this machine and ignores the address
# file that a killed cluster leaves behind. The cluster tests pass their address explicitly.
os.environ["RAY_ADDRESS"] = "local"

# Folder of the public data sets (Taobao UserBehavior sample, Amazon Beauty, MovieLens-100K).
DATA_DIR_ENV = "SEQREC_DATA_DIR"
# URL of a running Redis server, such as redis://127.0.0.1:6380; .ci/run starts one and sets it.
REDIS_URL_ENV = "SEQREC_REDIS_URL"


def real_data_path(relative: str) -> Path:
    """Path of a file in the real data folder; skips the test where the folder or file is absent."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        pytest.skip(f"{DATA_DIR_ENV} is not set; it names the folder of the real data sets")
    path = Path(root) / relative
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the whole test module, with this machine's 2 CPUs."""
    import ray

    # address="local" starts a new instance even where a demo cluster is running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real Redis server: the one named by SEQREC_REDIS_URL, else a private one.

    Where the variable is unset, a redis-server on PATH is started on a free loopback port for
    the session. Tests skip where neither is available.
    """
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(f"{REDIS_URL_ENV} is not set and redis-server is not installed")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="seqrec-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
