"""One online-store suite, run against sqlite and a real redis-server.

Each backend gets its own Feast repository with features built by the Ray Data job, registered
with `feast apply` and materialized with Feast's Ray compute engine up to ``MIDDLE_S``. Users 1-10
are only read; users 11-20 receive the events after ``MIDDLE_S`` through real-time appends.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from feast import FeatureStore
from feast.data_source import PushMode

from helpers import copy_feature_repo
from training import schema
from training.features import FeatureConfig, build_user_sequences, run_feature_job
from training.materialize import materialize
from training.online import SequenceAppender, SequenceEvent, StoredSequence, merge_sequence, user_entity_key

T0 = 1_511_568_000  # 2017-11-25 00:00 UTC
MIDDLE_S = T0 + 2 * 86_400 + 1  # no event falls on an odd second
END_S = T0 + 5 * 86_400
LENGTH = 6
READ_USERS = list(range(1, 11))
PUSH_USERS = list(range(11, 21))
UNKNOWN_USERS = [900_001, 900_002]
SEQUENCE_FEATURES = [f"{schema.USER_SEQUENCE_VIEW}:{name}" for name in schema.SEQUENCE_FIELDS]


def make_events(seed: int = 0) -> pa.Table:
    """Events of users 1-20 over five days, on even seconds, with some equal timestamps."""
    rng = np.random.default_rng(seed)
    users, items, behaviors, seconds = [], [], [], []
    for user in READ_USERS + PUSH_USERS:
        count = int(rng.integers(3, 15))
        times = T0 + 2 * np.sort(rng.integers(0, (END_S - T0) // 2, count))
        times[1::3] = times[0::3][: len(times[1::3])]
        users += [user] * count
        items += rng.integers(100, 130, count).tolist()
        behaviors += rng.choice(np.array(["pv", "pv", "cart", "fav", "buy"]), count).tolist()
        seconds += sorted(times.tolist())
    return pa.table(
        {
            schema.USER_ID: pa.array(users, pa.int64()),
            schema.ITEM_ID: pa.array(items, pa.int64()),
            schema.CATEGORY_ID: pa.array([item // 10 for item in items], pa.int64()),
            schema.BEHAVIOR: pa.array(behaviors, pa.string()),
            schema.EVENT_TIMESTAMP: pc.cast(pa.array(np.asarray(seconds) * 1_000_000), pa.timestamp("us", tz="UTC")),
            schema.EVENT_POSITION: pa.array(np.arange(len(users)), pa.int64()),
        },
        schema=schema.EVENTS_SCHEMA,
    )


def online_store_yaml(backend: str, redis_url: str | None) -> str:
    if backend == "sqlite":
        return "online_store:\n  type: sqlite\n  path: data/online_store.db\n"
    address = urlparse(redis_url)
    return f"online_store:\n  type: redis\n  connection_string: {address.hostname}:{address.port}\n"


def write_repo(root: Path, backend: str, redis_url: str | None) -> Path:
    repo = copy_feature_repo(root / "feature_repo")
    # A project of its own keeps this run's Redis keys apart from any other user of the server.
    project = f"seqrec_test_{uuid.uuid4().hex[:10]}"
    (repo / "feature_store.yaml").write_text(
        f"project: {project}\nprovider: local\nregistry: data/registry.db\n"
        f"offline_store:\n  type: ray\n  storage_path: {root / 'retrieval'}\nbatch_engine:\n  type: ray.engine\n  write_concurrency: 1\n"
        + online_store_yaml(backend, redis_url)
        + "entity_key_serialization_version: 3\n"
    )
    return repo


def feast_apply(repo: Path, offline_dir: Path) -> None:
    feast = Path(sys.executable).with_name("feast")
    env = {**os.environ, "SEQREC_OFFLINE_DIR": str(offline_dir)}
    result = subprocess.run([str(feast), "apply"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def online(request, ray_instance, tmp_path_factory):
    backend = request.param
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    root = tmp_path_factory.mktemp(backend)
    repo = write_repo(root, backend, redis_url)
    events = make_events()
    pq.write_table(events, root / "events.parquet")
    offline = repo / "data" / "offline"
    run_feature_job(str(root / "events.parquet"), str(offline), FeatureConfig(sequence_length=LENGTH))
    feast_apply(repo, offline)
    materialize(repo, end=datetime.datetime.fromtimestamp(MIDDLE_S, datetime.UTC))
    store = FeatureStore(repo_path=str(repo))
    return {"backend": backend, "repo": repo, "store": store, "events": events, "redis_url": redis_url}


def read_sequences(store: FeatureStore, user_ids) -> dict[str, list]:
    return store.get_online_features(
        features=SEQUENCE_FEATURES, entity_rows=[{schema.USER_ID: user_id} for user_id in user_ids]
    ).to_dict()


def expected_sequence(events: pa.Table, user_id: int, until_s: int) -> dict | None:
    seconds = pc.divide(pc.cast(events[schema.EVENT_TIMESTAMP], pa.int64()), 1_000_000)
    mask = pc.and_(pc.equal(events[schema.USER_ID], user_id), pc.less_equal(seconds, until_s))
    rows = build_user_sequences(events.filter(mask), LENGTH).to_pylist()
    return rows[-1] if rows else None


def offline_point_in_time(store: FeatureStore, user_ids, moment_s: int) -> pd.DataFrame:
    entity_df = pd.DataFrame(
        {
            schema.USER_ID: pd.array(user_ids, dtype="int64"),
            schema.EVENT_TIMESTAMP: pd.to_datetime([moment_s] * len(user_ids), unit="s", utc=True),
        }
    )
    frame = store.get_historical_features(entity_df=entity_df, features=SEQUENCE_FEATURES).to_df()
    return frame.set_index(schema.USER_ID).loc[list(user_ids)]


def as_list(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return [item.item() if hasattr(item, "item") else item for item in value]


def test_unknown_users_get_nulls_in_request_order(online):
    request = [READ_USERS[1], UNKNOWN_USERS[0], READ_USERS[0], UNKNOWN_USERS[1]]
    rows = read_sequences(online["store"], request)
    assert rows[schema.USER_ID] == request
    for position, user_id in enumerate(request):
        expected = expected_sequence(online["events"], user_id, MIDDLE_S)
        for name in schema.SEQUENCE_FIELDS:
            assert rows[name][position] == (expected[name] if expected else None), (user_id, name)
    assert rows[schema.SEQUENCE_ITEM_IDS][1] is None
    assert rows[schema.SEQUENCE_ITEM_IDS][3] is None


def test_entity_keys_are_int64_on_every_path(online):
    store = online["store"]
    user_id = READ_USERS[2]
    from_int = read_sequences(store, [user_id])
    from_numpy = read_sequences(store, [np.int64(user_id)])
    assert from_int[schema.SEQUENCE_ITEM_IDS][0]
    assert from_numpy[schema.SEQUENCE_ITEM_IDS] == from_int[schema.SEQUENCE_ITEM_IDS]
    key = user_entity_key(user_id)
    assert key.entity_values[0].WhichOneof("val") == "int64_val"
    assert stored_key_types(online) == {"int64_val"}


def stored_key_types(online) -> set[str]:
    """Value kinds of every user entity key the online store holds for this project."""
    from feast.infra.key_encoding_utils import deserialize_entity_key

    store = online["store"]
    version = store.config.entity_key_serialization_version
    if online["backend"] == "sqlite":
        import sqlite3

        from feast.infra.online_stores.sqlite import SqliteOnlineStore

        with sqlite3.connect(SqliteOnlineStore._get_db_path(store.config)) as connection:
            blobs = [row[0] for row in connection.execute(f'SELECT entity_key FROM "{store.config.project}_user_sequence"')]
    else:
        import redis

        address = urlparse(online["redis_url"])
        client = redis.Redis(host=address.hostname, port=address.port)
        suffix = store.config.project.encode()
        blobs = [key[: -len(suffix)] for key in client.scan_iter(match=b"*" + suffix)]
    assert blobs
    kinds = set()
    for blob in blobs:
        key = deserialize_entity_key(blob, entity_key_serialization_version=version)
        if list(key.join_keys) == [schema.USER_ID]:
            kinds.add(key.entity_values[0].WhichOneof("val"))
    return kinds


def test_empty_sequence_round_trips(online):
    store = online["store"]
    user_id = 700_001
    row = pd.DataFrame(
        {
            schema.USER_ID: pd.array([user_id], dtype="int64"),
            schema.EVENT_TIMESTAMP: pd.to_datetime([END_S], unit="s", utc=True),
            schema.SEQUENCE_ITEM_IDS: [[]],
            schema.SEQUENCE_CATEGORY_IDS: [[]],
            schema.SEQUENCE_BEHAVIORS: [[]],
            schema.SEQUENCE_TIMESTAMPS_S: [[]],
        }
    )
    store.push(schema.USER_SEQUENCE_PUSH_SOURCE, row, to=PushMode.ONLINE)
    rows = read_sequences(store, [user_id, UNKNOWN_USERS[0]])
    for name in schema.SEQUENCE_FIELDS:
        assert rows[name][0] == [], name
        assert rows[name][1] is None, name


def test_online_sequence_equals_offline_point_in_time(online):
    store = online["store"]
    users = READ_USERS + UNKNOWN_USERS[:1]
    offline = offline_point_in_time(store, users, MIDDLE_S)
    rows = read_sequences(store, users)
    for position, user_id in enumerate(users):
        for name in schema.SEQUENCE_FIELDS:
            offline_value = as_list(offline.at[user_id, name])
            if expected_sequence(online["events"], user_id, MIDDLE_S) is None:
                # Feast's Ray offline store returns an empty list where no row is known yet.
                assert rows[name][position] is None, (user_id, name)
                assert offline_value == [], (user_id, name)
            else:
                assert rows[name][position] == offline_value, (user_id, name)
    assert rows[schema.SEQUENCE_ITEM_IDS][-1] is None
    assert sum(1 for user_id in READ_USERS if expected_sequence(online["events"], user_id, MIDDLE_S)) >= 5


def test_appends_reach_the_batch_sequence(online):
    """Events after the materialized moment, appended in real time, give the batch result."""
    store, events = online["store"], online["events"]
    appender = SequenceAppender(store, sequence_length=LENGTH)
    seconds = pc.divide(pc.cast(events[schema.EVENT_TIMESTAMP], pa.int64()), 1_000_000)
    later = events.filter(pc.and_(pc.greater(seconds, MIDDLE_S), pc.is_in(events[schema.USER_ID], pa.array(PUSH_USERS))))
    rows = later.to_pylist()
    # Requests of one or two events, in time order per user, as the HTTP edge receives them.
    for start in range(0, len(rows), 2):
        by_user: dict[int, list[SequenceEvent]] = {}
        for row in rows[start : start + 2]:
            by_user.setdefault(row[schema.USER_ID], []).append(
                SequenceEvent(
                    row[schema.ITEM_ID],
                    row[schema.CATEGORY_ID],
                    row[schema.BEHAVIOR],
                    int(row[schema.EVENT_TIMESTAMP].timestamp()),
                )
            )
        for user_id, user_events in by_user.items():
            appender.append(user_id, user_events)

    online_rows = read_sequences(store, PUSH_USERS)
    offline = offline_point_in_time(store, PUSH_USERS, END_S)
    for position, user_id in enumerate(PUSH_USERS):
        expected = expected_sequence(events, user_id, END_S)
        for name in schema.SEQUENCE_FIELDS:
            assert online_rows[name][position] == expected[name], (user_id, name)
            assert online_rows[name][position] == as_list(offline.at[user_id, name]), (user_id, name)


def test_append_truncates_and_orders_ties(online):
    appender = SequenceAppender(online["store"], sequence_length=3)
    user_id = 700_002
    appender.append(user_id, [SequenceEvent(1, 1, "pv", T0 + 10), SequenceEvent(2, 1, "pv", T0 + 20)])
    stored = appender.append(user_id, [SequenceEvent(3, 1, "cart", T0 + 20), SequenceEvent(4, 1, "pv", T0 + 15)])
    assert stored == StoredSequence((4, 2, 3), (1, 1, 1), ("pv", "pv", "cart"), (T0 + 15, T0 + 20, T0 + 20))
    rows = read_sequences(online["store"], [user_id])
    assert rows[schema.SEQUENCE_ITEM_IDS] == [[4, 2, 3]]
    assert rows[schema.SEQUENCE_BEHAVIORS] == [["pv", "pv", "cart"]]


def append_many(repo: str, user_id: int, writer: int, count: int, sequence_length: int) -> None:
    appender = SequenceAppender(FeatureStore(repo_path=repo), sequence_length=sequence_length, timeout_s=120)
    for index in range(count):
        item_id = writer * 1_000 + index
        appender.append(user_id, [SequenceEvent(item_id, 1, "pv", T0 + index)])


def test_concurrent_appends_from_processes_lose_nothing(online):
    writers, appends = 6, 15
    user_id = 700_003
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=append_many, args=(str(online["repo"]), user_id, writer, appends, 1_000))
        for writer in range(writers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * writers
    rows = read_sequences(online["store"], [user_id])
    items = rows[schema.SEQUENCE_ITEM_IDS][0]
    assert len(items) == writers * appends
    assert sorted(items) == sorted(writer * 1_000 + index for writer in range(writers) for index in range(appends))
    assert rows[schema.SEQUENCE_TIMESTAMPS_S][0] == sorted(rows[schema.SEQUENCE_TIMESTAMPS_S][0])


def test_merge_sequence_follows_batch_rule():
    """Appending a log event by event gives the batch pipeline's last snapshot, ties included."""
    events = make_events(seed=3)
    for user_id in READ_USERS[:5]:
        rows = events.filter(pc.equal(events[schema.USER_ID], user_id)).to_pylist()
        merged = StoredSequence()
        for start in range(0, len(rows), 3):
            batch = [
                SequenceEvent(r[schema.ITEM_ID], r[schema.CATEGORY_ID], r[schema.BEHAVIOR], int(r[schema.EVENT_TIMESTAMP].timestamp()))
                for r in rows[start : start + 3]
            ]
            merged = merge_sequence(merged, batch, LENGTH)
        expected = expected_sequence(events, user_id, END_S)
        assert list(merged.item_ids) == expected[schema.SEQUENCE_ITEM_IDS], user_id
        assert list(merged.timestamps_s) == expected[schema.SEQUENCE_TIMESTAMPS_S], user_id
        assert list(merged.behaviors) == expected[schema.SEQUENCE_BEHAVIORS], user_id


def test_sequence_event_rejects_unknown_behavior():
    with pytest.raises(ValueError, match="click"):
        SequenceEvent(1, 1, "click", T0)


def test_sequence_event_rejects_float_timestamp():
    with pytest.raises(ValueError, match="timestamp_s"):
        SequenceEvent(1, 1, "pv", 1.5)
