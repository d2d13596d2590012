"""Feature pipeline benchmark: the Ray Data job against the same transformation in DuckDB SQL.

For each size, generated events (``training.generator``) are written once as canonical events
Parquet into a cache folder, then both engines read those files and write the four offline
sources: user_sequence and user_stats snapshots, item_stats and item_neighbors daily snapshots,
with the same per-user cap. Each engine runs in a fresh child process, so its memory is its own.

Memory is sampled every 50 ms from /proc through psutil:

- ``driver_peak_rss_mib``: resident memory of the child process. For Ray, that is the driver that
  plans the job and collects the per-bucket counts; for DuckDB, the whole in-process engine.
- ``tree_peak_rss_mib`` (Ray only): the summed resident memory of the driver and every process it
  started (raylet, GCS, workers). Shared object-store pages count once per process that maps them,
  so this overstates the true total.

Usage:
    flock /tmp/seqrec-bench.lock python benchmarks/features.py --sizes 1000000 10000000 30000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from training.features import BEHAVIOR_WEIGHTS, FeatureConfig  # noqa: E402
from training.generator import GeneratorConfig, generate_events  # noqa: E402
from training.schema import (  # noqa: E402
    BEHAVIORS,
    EVENTS_SCHEMA,
    OFFLINE_VIEWS,
    STATS_WINDOWS_DAYS,
    count_field,
    ratio_field,
)

RESULTS_PATH = PROJECT_ROOT / "benchmarks" / "results" / "features.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "seqrec-bench-features"
EVENTS_PER_USER = 100.0  # about the Taobao UserBehavior mean (100M events, 1M users)
EVENTS_PER_ITEM = 25  # about Taobao's 100M events over 4M items
ROWS_PER_FILE = 1_000_000
SAMPLE_INTERVAL_S = 0.05


def cached_events(num_events: int, cache_dir: Path) -> Path:
    """Generate about ``num_events`` events once as canonical Parquet files; return their folder."""
    folder = cache_dir / f"events-{num_events}"
    if (folder / "_SUCCESS").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    num_items = max(1_000, num_events // EVENTS_PER_ITEM)
    config = GeneratorConfig(
        num_users=max(10, round(num_events / EVENTS_PER_USER)),
        num_items=num_items,
        num_categories=min(5_000, num_items // 10),
        mean_events_per_user=EVENTS_PER_USER,
        seed=1,
    )
    table = generate_events(config)
    events = pa.table(
        {
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            "category_id": table["category_id"],
            "behavior": table["behavior_type"],
            "event_timestamp": pa.array(table["timestamp"].to_numpy() * 1_000_000).cast(pa.timestamp("us", tz="UTC")),
            "event_position": pa.array(np.arange(table.num_rows), pa.int64()),
        },
        schema=EVENTS_SCHEMA,
    )
    del table
    for index, start in enumerate(range(0, events.num_rows, ROWS_PER_FILE)):
        pq.write_table(events.slice(start, ROWS_PER_FILE), folder / f"part-{index:04d}.parquet")
    (folder / "_SUCCESS").write_text(json.dumps({"events": events.num_rows, "users": config.num_users}))
    return folder


def run_ray(events_dir: str, output_dir: str) -> dict:
    import ray

    from training.features import run_feature_job

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    run_feature_job(events_dir, output_dir, FeatureConfig())
    finished = time.perf_counter()
    ray.shutdown()
    return {"startup_s": started - start, "job_s": finished - started}


def _weight_case() -> str:
    cases = " ".join(f"WHEN '{name}' THEN {weight}" for name, weight in BEHAVIOR_WEIGHTS.items())
    return f"CASE behavior {cases} END"


def duckdb_statements(events_dir: str, output_dir: str, config: FeatureConfig) -> list[str]:
    """Write the feature job as DuckDB SQL statements, with the rules and outputs of training.features."""
    day = 86_400
    out = Path(output_dir)
    capped = f"""
        CREATE TEMP TABLE capped AS
        SELECT user_id, item_id, category_id, behavior, ts, pos FROM (
            SELECT user_id, item_id, category_id, behavior, epoch_us(event_timestamp) // 1000000 AS ts,
                   event_position AS pos,
                   row_number() OVER (PARTITION BY user_id ORDER BY event_timestamp DESC, event_position DESC) AS newer
            FROM read_parquet('{events_dir}/*.parquet'))
        WHERE newer <= {config.max_events_per_user}"""
    window = f"PARTITION BY user_id ORDER BY ts, pos ROWS BETWEEN {config.sequence_length - 1} PRECEDING AND CURRENT ROW"
    sequences = f"""
        COPY (SELECT user_id, to_timestamp(ts) AS event_timestamp, item_ids, category_ids, behaviors, timestamps_s
              FROM (SELECT user_id, ts,
                           list(item_id) OVER w AS item_ids, list(category_id) OVER w AS category_ids,
                           list(behavior) OVER w AS behaviors, list(ts) OVER w AS timestamps_s,
                           lead(ts) OVER (PARTITION BY user_id ORDER BY ts, pos) AS next_ts
                    FROM capped WINDOW w AS ({window}))
              WHERE next_ts IS NULL OR next_ts <> ts)
        TO '{out / "user_sequence"}' (FORMAT parquet, PER_THREAD_OUTPUT true)"""
    count_columns = ",\n".join(
        f"count(*) FILTER (WHERE behavior = '{behavior}') OVER (PARTITION BY user_id ORDER BY ts "
        f"RANGE BETWEEN {days * day - 1} PRECEDING AND CURRENT ROW) AS {count_field(behavior, days)}"
        for days in STATS_WINDOWS_DAYS
        for behavior in BEHAVIORS
    )
    user_stats = f"""
        COPY (SELECT * EXCLUDE (next_ts, ts) FROM (
                SELECT user_id, to_timestamp(ts) AS event_timestamp, {count_columns}, ts AS last_event_s, ts,
                       lead(ts) OVER (PARTITION BY user_id ORDER BY ts, pos) AS next_ts
                FROM capped)
              WHERE next_ts IS NULL OR next_ts <> ts)
        TO '{out / "user_stats"}' (FORMAT parquet, PER_THREAD_OUTPUT true)"""
    daily = ", ".join(f"count(*) FILTER (WHERE behavior = '{b}') AS {b}" for b in BEHAVIORS)
    window_sums = ", ".join(
        f"sum(CASE WHEN shift < {days} THEN {behavior} ELSE 0 END) AS {count_field(behavior, days)}"
        for days in STATS_WINDOWS_DAYS
        for behavior in BEHAVIORS
    )
    ratios = ", ".join(
        f"CASE WHEN {count_field('pv', days)} > 0 THEN {count_field(behavior, days)} / {count_field('pv', days)} "
        f"ELSE 0.0 END AS {ratio_field(behavior, days)}"
        for days in STATS_WINDOWS_DAYS
        for behavior in BEHAVIORS[1:]
    )
    item_stats = f"""
        COPY (WITH daily AS (
                  SELECT item_id, epoch_us(event_timestamp) // 1000000 // {day} AS day, {daily}
                  FROM read_parquet('{events_dir}/*.parquet') GROUP BY ALL),
              windows AS (
                  SELECT item_id, day + shift AS snapshot_day, {window_sums}
                  FROM daily, range(0, {max(STATS_WINDOWS_DAYS) + 1}) AS shifts(shift) GROUP BY ALL)
              SELECT item_id, to_timestamp((snapshot_day + 1) * {day}) AS event_timestamp, * EXCLUDE (item_id, snapshot_day),
                     {ratios}
              FROM windows)
        TO '{out / "item_stats"}' (FORMAT parquet, PER_THREAD_OUTPUT true)"""
    steps = []
    for step in range(1, config.covisit_window + 1):
        steps.append(
            f"""SELECT item_id AS earlier, later_item_{step} AS later, later_ts_{step} // {day} AS day,
                       floor(later_weight_{step} / {step} * pow(2, -(later_ts_{step} - ts) / {config.covisit_half_life_s})
                             * 1000000 + 0.5)::BIGINT AS score
                FROM ordered
                WHERE later_ts_{step} - ts <= {config.covisit_max_gap_s} AND later_item_{step} <> item_id"""
        )
    leads = ", ".join(
        f"lead(item_id, {s}) OVER w AS later_item_{s}, lead(ts, {s}) OVER w AS later_ts_{s}, "
        f"lead({_weight_case()}, {s}) OVER w AS later_weight_{s}"
        for s in range(1, config.covisit_window + 1)
    )
    covisits = f"""
        CREATE TEMP TABLE covisits AS
        WITH ordered AS (SELECT item_id, ts, {leads} FROM capped WINDOW w AS (PARTITION BY user_id ORDER BY ts, pos)),
             one_way AS ({" UNION ALL ".join(steps)}),
             both_ways AS (SELECT earlier AS item_id, later AS neighbor_id, day, score FROM one_way
                           UNION ALL SELECT later, earlier, day, score FROM one_way)
        SELECT item_id, neighbor_id, day, sum(score) AS score FROM both_ways GROUP BY ALL"""
    neighbors = f"""
        COPY (WITH snapshots AS (SELECT DISTINCT item_id, day AS snapshot_day FROM covisits),
              cumulative AS (
                  SELECT s.item_id, s.snapshot_day, c.neighbor_id, sum(c.score) AS score
                  FROM snapshots s JOIN covisits c ON c.item_id = s.item_id AND c.day <= s.snapshot_day
                  GROUP BY ALL),
              ranked AS (
                  SELECT *, row_number() OVER (PARTITION BY item_id, snapshot_day ORDER BY score DESC, neighbor_id) AS rank
                  FROM cumulative)
              SELECT item_id, to_timestamp((snapshot_day + 1) * {day}) AS event_timestamp,
                     list(neighbor_id ORDER BY rank) AS neighbor_ids,
                     list(score / 1000000.0 ORDER BY rank) AS neighbor_scores
              FROM ranked WHERE rank <= {config.neighbors_per_item} GROUP BY item_id, snapshot_day)
        TO '{out / "item_neighbors"}' (FORMAT parquet, PER_THREAD_OUTPUT true)"""
    return [capped, sequences, user_stats, item_stats, covisits, neighbors]


def run_duckdb(events_dir: str, output_dir: str) -> dict:
    import duckdb

    start = time.perf_counter()
    connection = duckdb.connect()
    connection.execute("SET threads = 2")
    connection.execute(f"SET temp_directory = '{Path(output_dir) / '_spill'}'")
    connection.execute("SET preserve_insertion_order = false")
    for statement in duckdb_statements(events_dir, output_dir, FeatureConfig()):
        connection.execute(statement)
    connection.close()
    return {"startup_s": 0.0, "job_s": time.perf_counter() - start}


def _output_rows(output_dir: Path) -> dict[str, int]:
    rows = {}
    for view in OFFLINE_VIEWS:
        files = sorted((output_dir / view).rglob("*.parquet"))
        rows[view] = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    return rows


def measure(engine: str, events_dir: Path, output_dir: Path) -> dict:
    """Run one engine in a child process and sample its memory while it runs."""
    import psutil

    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", engine, str(events_dir), str(output_dir)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    process = psutil.Process(child.pid)
    peaks = {"driver": 0, "tree": 0}

    def sample() -> None:
        while child.poll() is None:
            try:
                driver = process.memory_info().rss
                tree = driver
                for descendant in process.children(recursive=True):
                    try:
                        tree += descendant.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peaks["driver"] = max(peaks["driver"], driver)
            peaks["tree"] = max(peaks["tree"], tree)
            time.sleep(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{engine} run failed with exit code {child.returncode}")
    timings = json.loads(stdout.strip().splitlines()[-1])
    result = {
        **timings,
        "driver_peak_rss_mib": round(peaks["driver"] / 2**20),
        "output_rows": _output_rows(output_dir),
    }
    if engine == "ray":
        result["tree_peak_rss_mib"] = round(peaks["tree"] / 2**20)
    return result


def machine() -> dict:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000], help="events per run")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="folder for generated events and outputs")
    parser.add_argument("--engines", nargs="+", default=["ray", "duckdb"], choices=["ray", "duckdb"])
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON file for the figures")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "EVENTS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        engine, events_dir, output_dir = args.child
        timings = (run_ray if engine == "ray" else run_duckdb)(events_dir, output_dir)
        print(json.dumps(timings))
        return

    import duckdb
    import ray

    results = {
        "command": "flock /tmp/seqrec-bench.lock python benchmarks/features.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "versions": {"ray": ray.__version__, "duckdb": duckdb.__version__, "pyarrow": pa.__version__},
        "config": {"sequence_length": FeatureConfig().sequence_length, "max_events_per_user": FeatureConfig().max_events_per_user},
        "runs": [],
    }
    for size in args.sizes:
        generated = time.perf_counter()
        events_dir = cached_events(size, args.cache_dir)
        info = json.loads((events_dir / "_SUCCESS").read_text())
        print(f"{info['events']} events, {info['users']} users ready in {time.perf_counter() - generated:.0f} s", flush=True)
        run = {"requested_events": size, **info}
        for engine in args.engines:
            output_dir = Path(tempfile.mkdtemp(prefix=f"{engine}-", dir=args.cache_dir))
            try:
                run[engine] = measure(engine, events_dir, output_dir)
            finally:
                subprocess.run(["rm", "-rf", str(output_dir)], check=False)
            run[engine]["events_per_s"] = round(info["events"] / run[engine]["job_s"])
            print(f"  {engine}: {json.dumps(run[engine])}", flush=True)
        if "ray" in run and "duckdb" in run:
            run["ray_to_duckdb_time"] = round(run["ray"]["job_s"] / run["duckdb"]["job_s"], 2)
            run["same_row_counts"] = run["ray"]["output_rows"] == run["duckdb"]["output_rows"]
        results["runs"].append(run)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
