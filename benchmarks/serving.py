"""Load benchmark of the recommendation service: Ray Serve settings against one plain uvicorn process.

Two steps, so that the slow data preparation stays outside the benchmark lock:

    nice -n 10 .venv/bin/python benchmarks/serving.py prepare --work-dir /tmp/seqrec-serving-bench
    flock /tmp/seqrec-bench.lock .venv/bin/python benchmarks/serving.py run --work-dir /tmp/seqrec-serving-bench

``prepare`` generates events, builds the Feast offline sources with Ray Data and trains SASRec with
Ray Train, on a private local Ray instance. ``run`` starts a private redis-server, materializes
the features into it, and loads each service with wrk at each concurrency: a no-op endpoint (the
calibration), the in-process pipeline in one uvicorn process, and the Serve application with each
setting in turn. Then it measures the time from an event post to the first recommendation that
uses the event. Every server listens on 127.0.0.1: on a free port, or, for the ingress replica
in the direct-ingress mode, on the port Serve picks for it (30000 and up).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRK = shutil.which("wrk") or "/usr/bin/wrk"
CONCURRENCY = (1, 4, 16, 64)
K = 10
SERVE_APP = "seqrec-bench"

# Each Serve setting: application arguments and per-deployment overrides of the Serve config.
SETTINGS = {
    "graph": {
        "description": "3 handle calls (lookup, candidates, ranker), ranker batches up to 16",
        "args": {"topology": "graph"},
        "deployments": {},
    },
    "ranker": {
        "description": "1 handle call to the ranker, batches up to 16 with a 2 ms wait",
        "args": {"topology": "ranker"},
        "deployments": {},
    },
    "ranker-no-batching": {
        "description": "1 handle call to the ranker, max_batch_size 1",
        "args": {"topology": "ranker"},
        "deployments": {"RankerDeployment": {"user_config": {"max_batch_size": 1}}},
    },
    "ranker-ingress-ongoing-8": {
        "description": "1 handle call to the ranker, ingress max_ongoing_requests 8 (default 64)",
        "args": {"topology": "ranker"},
        "deployments": {"Ingress": {"max_ongoing_requests": 8}},
    },
    "single": {
        "description": "0 handle calls: every stage inside the ingress replica, concurrent requests ranked together",
        "args": {"topology": "single"},
        "deployments": {},
    },
    "single-no-batching": {
        "description": "0 handle calls, each request ranked alone (max_batch_size 1)",
        "args": {"topology": "single"},
        "deployments": {"Ingress": {"user_config": {"max_batch_size": 1}}},
    },
    "single-2-replicas": {
        "description": "0 handle calls, 2 ingress replicas",
        "args": {"topology": "single"},
        "deployments": {"Ingress": {"num_replicas": 2}},
    },
}

# Serve switches that apply to a whole Ray instance, each loaded with the settings listed.
DIRECT_INGRESS = "direct-ingress"
RAY_MODES = {
    "grpc-proxy": {
        "description": "the proxy talks gRPC to the replicas (RAY_SERVE_PROXY_USE_GRPC=1)",
        "env": {"RAY_SERVE_PROXY_USE_GRPC": "1"},
        "settings": ["single", "single-2-replicas"],
    },
    "throughput-optimized": {
        "description": "Serve's throughput-optimized mode with the proxy kept: user code on the replica's "
        "event loop, gRPC from the proxy, buffered request logs",
        "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
        "settings": ["single"],
    },
    DIRECT_INGRESS: {
        "description": "Serve's throughput-optimized mode: the ingress replica serves HTTP itself on a "
        "port of its own, with no proxy (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)",
        "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        "settings": ["single"],
    },
}

WRK_SCRIPT = """
local users = {%(users)s}
local k = %(k)d
local method = "%(method)s"
local threads = {}
math.randomseed(%(seed)d)
degraded = 0
setup = function(thread)
  table.insert(threads, thread)
end
request = function()
  if method == "GET" then
    return wrk.format("GET", "%(path)s")
  end
  local user = users[math.random(#users)]
  local body = '{"user_id": ' .. user .. ', "k": ' .. k .. '}'
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  -- A degraded response is cheaper than a full one, so it is counted apart.
  if string.find(body, '"degraded":[', 1, true) and not string.find(body, '"degraded":[]', 1, true) then
    degraded = degraded + 1
  end
end
done = function(summary, latency, requests)
  local errors = summary.errors
  local total_degraded = 0
  for _, thread in ipairs(threads) do
    total_degraded = total_degraded + thread:get("degraded")
  end
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p95_us": %%d, "p99_us": %%d, ' ..
    '"non_2xx": %%d, "timeouts": %%d, "socket_errors": %%d, "degraded": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), errors.status, errors.timeout, errors.connect + errors.read + errors.write,
    total_degraded))
end
"""

NOOP_APP = textwrap.dedent(
    """
    from fastapi import FastAPI
    import uvicorn, sys
    app = FastAPI()

    @app.post("/v1/recommend")
    async def noop() -> dict:
        return {}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up within {timeout_s} s")
        time.sleep(0.5)


def run_wrk(url: str, users: list[int], concurrency: int, duration_s: int, path: str, method: str) -> dict:
    """Load ``url`` with wrk at a fixed number of open connections; return its figures in ms and req/s."""
    script = WRK_SCRIPT % {
        "users": ", ".join(map(str, users)), "k": K, "seed": concurrency, "path": path, "method": method
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        command = [WRK, "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{duration_s}s",
                   "--timeout", "5s", "-s", handle.name, url]
        output = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    finally:
        os.unlink(handle.name)
    line = next(line for line in output.splitlines() if line.startswith("WRKJSON "))
    raw = json.loads(line.removeprefix("WRKJSON "))
    return {
        "concurrency": concurrency,
        "requests_per_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p95_ms": raw["p95_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "requests": raw["requests"],
        "non_2xx": raw["non_2xx"],
        "degraded": raw["degraded"],
        "timeouts": raw["timeouts"],
        "socket_errors": raw["socket_errors"],
    }


def load_series(url: str, users: list[int], duration_s: int, path: str = "/v1/recommend", method: str = "POST") -> list[dict]:
    run_wrk(url, users, 4, 2, path, method)  # warm-up, not recorded
    series = []
    for level in CONCURRENCY:
        figures = run_wrk(url, users, level, duration_s, path, method)
        print(f"    c={level:<3} {figures['requests_per_s']:>7.1f} req/s  p50 {figures['p50_ms']:.1f} ms  "
              f"p95 {figures['p95_ms']:.1f} ms  p99 {figures['p99_ms']:.1f} ms  non-2xx {figures['non_2xx']}  "
              f"degraded {figures['degraded']}", flush=True)
        series.append(figures)
    return series


# ---------------------------------------------------------------------------------------------
# Data preparation


def feature_repo_for(work_dir: Path) -> Path:
    return work_dir / "feature_repo"


def write_redis_repo_config(repo: Path, redis_port: int) -> None:
    config = (ROOT / "platform" / "feature_store" / "feature_store.redis.yaml").read_text()
    connection = f"127.0.0.1:{redis_port},db=0,retry=null"
    (repo / "feature_store.yaml").write_text(config.replace("${SEQREC_REDIS_CONNECTION_STRING}", connection))


def feast_apply(repo: Path) -> None:
    feast = Path(sys.executable).with_name("feast")
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, capture_output=True, text=True, timeout=600)


def prepare(work_dir: Path, epochs: int) -> None:
    """Generate events, build features, register them and train a model into ``work_dir``."""
    import ray

    from training.events import TAOBAO, ingest_events
    from training.features import run_feature_job
    from training.generator import GeneratorConfig, generate_events, write_taobao_csv
    from training.train import TrainingConfig, train

    repo = feature_repo_for(work_dir)
    data = repo / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "feature_repo" / "features.py", repo / "features.py")
    write_redis_repo_config(repo, 6379)  # the port is rewritten by `run`; apply only needs a valid file

    csv_path = work_dir / "events.csv"
    write_taobao_csv(generate_events(GeneratorConfig()), csv_path)
    report = ingest_events(csv_path, data / "events", TAOBAO)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_feature_job(report.events_path, str(data / "offline"))
        feast_apply(repo)
        train(report.events_path, str(data / "models"), config=TrainingConfig(epochs=epochs, patience=epochs))
    finally:
        ray.shutdown()
    (work_dir / "events_path").write_text(report.events_path)
    print(f"Prepared {work_dir}")


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclasses.dataclass
class Processes:
    """Servers this benchmark started, stopped by their own process ids at the end."""

    started: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def start(self, command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                self.stop(process)


def sample_users(events_path: str, count: int) -> list[int]:
    from serving.client import sample_users as most_active

    return most_active(events_path, count)


def serve_config(repo: Path, models: Path, port: int, setting: dict) -> dict:
    deployments = [{"name": name, **override} for name, override in setting["deployments"].items()]
    return {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": SERVE_APP,
                "route_prefix": "/",
                "import_path": "serving.app:build_app",
                "args": {"feature_repo": str(repo), "model_dir": str(models), **setting["args"]},
                "deployments": deployments,
            }
        ],
    }


def deploy(config: dict) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # The same call that `serve deploy` makes through the dashboard.
    _get_global_client().deploy_apps(ServeDeploySchema(**config))
    deadline = time.monotonic() + 300
    while True:
        status = serve.status().applications.get(SERVE_APP)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying {SERVE_APP} failed: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{SERVE_APP} not running after 300 s")
        time.sleep(0.5)


def event_freshness(url: str, user_ids: list[int], trials: int) -> dict:
    """Time from posting an event to the first recommendation whose newest event is that event."""
    times_ms, attempts = [], []
    with httpx.Client(base_url=url, timeout=10) as client:
        for trial in range(trials):
            user_id = user_ids[trial % len(user_ids)]
            timestamp = int(time.time()) + 1_000_000 + trial
            event = {"user_id": user_id, "item_id": 1, "behavior": "pv", "timestamp": timestamp}
            started = time.perf_counter()
            client.post("/v1/events", json={"events": [event]}).raise_for_status()
            tries = 0
            while True:
                tries += 1
                body = client.post("/v1/recommend", json={"user_id": user_id, "k": K}).json()
                if body.get("latest_event_timestamp") == timestamp:
                    break
                if time.perf_counter() - started > 10:
                    raise TimeoutError(f"event of user {user_id} not used after 10 s")
            times_ms.append((time.perf_counter() - started) * 1000)
            attempts.append(tries)
    return {
        "trials": trials,
        "p50_ms": round(statistics.median(times_ms), 2),
        "max_ms": round(max(times_ms), 2),
        "max_recommend_calls": max(attempts),
    }


def machine() -> dict:
    import ray
    import torch

    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "wrk": subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.splitlines()[0:1],
    }


def summarize(results: dict) -> dict:
    # The reference at each concurrency is the faster plain process, with batching or without.
    plain: dict[int, dict] = {}
    for row in results["plain_uvicorn"] + results.get("plain_uvicorn_no_batching", []):
        if row["requests_per_s"] > plain.get(row["concurrency"], {}).get("requests_per_s", 0):
            plain[row["concurrency"]] = row
    summary = {"peak_plain_requests_per_s": max(row["requests_per_s"] for row in plain.values()), "settings": {}}
    for name, series in results["serve"].items():
        by_level = {row["concurrency"]: row for row in series}
        peak = max(row["requests_per_s"] for row in series)
        summary["settings"][name] = {
            "peak_requests_per_s": peak,
            "peak_ratio_to_plain": round(peak / summary["peak_plain_requests_per_s"], 3),
            "ratio_to_plain_by_concurrency": {
                level: round(by_level[level]["requests_per_s"] / plain[level]["requests_per_s"], 3) for level in by_level
            },
            "p50_ms_at_c1": by_level[1]["p50_ms"] if 1 in by_level else None,
            "p99_ms_at_c16": by_level[16]["p99_ms"] if 16 in by_level else None,
        }
    return summary


def run(
    work_dir: Path, duration_s: int, settings: list[str], output: Path, freshness_setting: str, ray_modes: list[str]
) -> None:
    import ray
    from ray import serve

    from serving.app import direct_ingress_url
    from training.materialize import materialize

    repo = feature_repo_for(work_dir)
    models = repo / "data" / "models"
    events_path = (work_dir / "events_path").read_text().strip()
    users = sample_users(events_path, 500)
    processes = Processes()
    redis_dir = tempfile.mkdtemp(prefix="seqrec-bench-redis-")
    redis_port = free_port()
    processes.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", redis_dir])
    results: dict = {
        "machine": machine(),
        "duration_s_per_level": duration_s,
        "k": K,
        "settings": {name: SETTINGS[name]["description"] for name in settings},
        "ray_modes": {name: RAY_MODES[name]["description"] for name in ray_modes},
        "serve": {},
    }
    try:
        time.sleep(0.5)
        write_redis_repo_config(repo, redis_port)
        feast_apply(repo)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        materialize(repo)
        results["candidates_per_request"] = candidates_per_request(repo, models, users[:20])

        print("no-op endpoint (one uvicorn process)", flush=True)
        port = free_port()
        noop = processes.start([sys.executable, "-c", NOOP_APP, str(port)])
        wait_until_up(f"http://127.0.0.1:{port}/docs")
        results["noop_uvicorn"] = load_series(f"http://127.0.0.1:{port}", users, duration_s)
        processes.stop(noop)

        print("plain: the same pipeline in one uvicorn process, without Ray", flush=True)
        port = free_port()
        plain = processes.start([sys.executable, "-m", "serving.local", "--feature-repo", str(repo),
                                 "--model-dir", str(models), "--port", str(port)], cwd=ROOT)
        wait_until_up(f"http://127.0.0.1:{port}/healthz")
        results["plain_uvicorn"] = load_series(f"http://127.0.0.1:{port}", users, duration_s)
        # One response of the most active user, as a sample of what the load received.
        results["sample_response"] = httpx.post(
            f"http://127.0.0.1:{port}/v1/recommend", json={"user_id": users[0], "k": 2}, timeout=10
        ).json()
        processes.stop(plain)

        print("plain, each request ranked alone (--max-batch-size 1)", flush=True)
        port = free_port()
        plain = processes.start([sys.executable, "-m", "serving.local", "--feature-repo", str(repo),
                                 "--model-dir", str(models), "--port", str(port), "--max-batch-size", "1"], cwd=ROOT)
        wait_until_up(f"http://127.0.0.1:{port}/healthz")
        results["plain_uvicorn_no_batching"] = load_series(f"http://127.0.0.1:{port}", users, duration_s)
        processes.stop(plain)

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for name in settings:
            print(f"serve: {name}", flush=True)
            deploy(serve_config(repo, models, port, SETTINGS[name]))
            wait_until_up(f"{url}/healthz")
            results["serve"][name] = load_series(url, users, duration_s)
            if name == freshness_setting:
                results["event_freshness"] = {"setting": name, **event_freshness(url, users[:10], trials=20)}
                print(f"    event to recommendation: {results['event_freshness']}", flush=True)
        print("serve: no-op route (GET /healthz through the proxy and the ingress)", flush=True)
        results["serve_noop_healthz"] = load_series(url, users, duration_s, path="/healthz", method="GET")
        for mode in ray_modes:
            # Serve reads these switches when Ray starts, so each mode takes a fresh Ray instance.
            serve.shutdown()
            ray.shutdown()
            for variable in {name for other in RAY_MODES.values() for name in other["env"]}:
                os.environ.pop(variable, None)
            os.environ.update(RAY_MODES[mode]["env"])
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for setting in RAY_MODES[mode]["settings"]:
                name = f"{setting}-{mode}"
                print(f"serve: {name}", flush=True)
                deploy(serve_config(repo, models, port, SETTINGS[setting]))
                target = direct_ingress_url(SERVE_APP) if mode == DIRECT_INGRESS else url
                wait_until_up(f"{target}/healthz")
                results["serve"][name] = load_series(target, users, duration_s)
                if mode == DIRECT_INGRESS:
                    results["event_freshness_direct_ingress"] = event_freshness(target, users[:10], trials=20)
                    print(f"    event to recommendation: {results['event_freshness_direct_ingress']}", flush=True)
                    print(f"serve: no-op route of {name}", flush=True)
                    results["serve_noop_healthz_direct_ingress"] = load_series(
                        target, users, duration_s, path="/healthz", method="GET"
                    )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            processes.stop_all()
            shutil.rmtree(redis_dir, ignore_errors=True)
    results["summary"] = summarize(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(f"Wrote {output}")


def candidates_per_request(repo: Path, models: Path, users: list[int]) -> float:
    """Mean number of candidates the ranker scores per request, from the in-process stages."""
    from serving.stages import CandidateGenerator, FeatureLookup, ServingModel

    model = ServingModel.load(models)
    lookup, generator = FeatureLookup(repo), CandidateGenerator(repo, model)
    sizes = [len(generator.generate(sequence).item_ids) for sequence in lookup.lookup(users) if sequence]
    return round(statistics.mean(sizes), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    prepare_parser = sub.add_parser("prepare", help="generate events, build features and train a model")
    prepare_parser.add_argument("--work-dir", type=Path, required=True, help="folder for the data and the model")
    prepare_parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    run_parser = sub.add_parser("run", help="load every service and write the results")
    run_parser.add_argument("--work-dir", type=Path, required=True, help="folder that `prepare` filled")
    run_parser.add_argument("--duration-s", type=int, default=8, help="seconds of load per concurrency level")
    run_parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                            help="Serve settings to load, in order")
    run_parser.add_argument("--freshness-setting", default="ranker", choices=list(SETTINGS),
                            help="Serve setting on which to time an event post to its first use")
    run_parser.add_argument("--ray-modes", nargs="*", default=list(RAY_MODES), choices=list(RAY_MODES),
                            help="Ray-wide Serve switches, each loaded on a fresh Ray instance with its own "
                            "settings; none to skip")
    run_parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json",
                            help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.work_dir.resolve(), args.epochs)
    else:
        run(args.work_dir.resolve(), args.duration_s, args.settings, args.output, args.freshness_setting,
            args.ray_modes)


if __name__ == "__main__":
    main()
