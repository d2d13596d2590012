"""Real-time appends to users' online ``user_sequence`` rows, safe under concurrent writers.

An append reads the stored sequence, adds the new events and writes the result back as one atomic
step, so writers in different processes or on different machines never lose each other's events:

- Redis: an optimistic transaction (WATCH the user's key, then MULTI/EXEC), retried when another
  writer changed the key in between. The key and hash fields are the ones Feast's Redis online
  store reads.
- sqlite: a ``BEGIN IMMEDIATE`` transaction on Feast's table, which holds sqlite's write lock from
  the read to the commit.

The merged sequence follows the batch pipeline's rule (``training.features.build_user_sequences``):
events ordered by time, equal times in arrival order with stored events first, cut to the last
``sequence_length`` events.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
import sqlite3
import time
from collections.abc import Sequence

from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from training.schema import (
    BEHAVIORS,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_CATEGORY_IDS,
    SEQUENCE_FIELDS,
    SEQUENCE_ITEM_IDS,
    SEQUENCE_LENGTH,
    SEQUENCE_TIMESTAMPS_S,
    USER_ID,
    USER_SEQUENCE_VIEW,
)

logger = logging.getLogger(__name__)

# How long one append may wait for other writers of the same user before it fails.
DEFAULT_TIMEOUT_S = 10.0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class AppendConflictError(RuntimeError):
    """Other writers kept changing a user's sequence until the append timed out."""


@dataclasses.dataclass(frozen=True)
class SequenceEvent:
    """One event to append to a user's sequence."""

    item_id: int
    category_id: int
    behavior: str
    timestamp_s: int

    def __post_init__(self) -> None:
        for name in ("item_id", "category_id", "timestamp_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"{name} must be an int64 integer, got {value!r}")
        if self.behavior not in BEHAVIORS:
            raise ValueError(f"behavior must be one of {BEHAVIORS}, got {self.behavior!r}")


@dataclasses.dataclass(frozen=True)
class StoredSequence:
    """A user's sequence as stored online: four aligned lists, oldest event first."""

    item_ids: tuple[int, ...] = ()
    category_ids: tuple[int, ...] = ()
    behaviors: tuple[str, ...] = ()
    timestamps_s: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.item_ids)


def merge_sequence(stored: StoredSequence, events: Sequence[SequenceEvent], sequence_length: int) -> StoredSequence:
    """Append events to a stored sequence and keep the last ``sequence_length`` events by time.

    The sort is stable, so events of equal time keep their order: stored events first, then
    ``events`` in the given order, as the batch pipeline orders them by position in the log.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be at least 1, got {sequence_length}")
    rows = list(zip(stored.timestamps_s, stored.item_ids, stored.category_ids, stored.behaviors))
    rows += [(event.timestamp_s, event.item_id, event.category_id, event.behavior) for event in events]
    rows = sorted(rows, key=lambda row: row[0])[-sequence_length:]
    if not rows:
        return StoredSequence()
    timestamps, items, categories, behaviors = (tuple(column) for column in zip(*rows))
    return StoredSequence(items, categories, behaviors, timestamps)


def user_entity_key(user_id: int) -> EntityKeyProto:
    """Build a user's Int64 entity key in the form that Feast serializes on every path."""
    return EntityKeyProto(join_keys=[USER_ID], entity_values=[ValueProto(int64_val=int(user_id))])


def _to_values(sequence: StoredSequence) -> dict[str, ValueProto]:
    return {
        SEQUENCE_ITEM_IDS: ValueProto(int64_list_val=Int64List(val=sequence.item_ids)),
        SEQUENCE_CATEGORY_IDS: ValueProto(int64_list_val=Int64List(val=sequence.category_ids)),
        SEQUENCE_BEHAVIORS: ValueProto(string_list_val=StringList(val=sequence.behaviors)),
        SEQUENCE_TIMESTAMPS_S: ValueProto(int64_list_val=Int64List(val=sequence.timestamps_s)),
    }


def _from_values(values: dict[str, ValueProto | None]) -> StoredSequence:
    """Rebuild a stored sequence; a user without a row gets an empty one."""
    lists = {}
    for name in SEQUENCE_FIELDS:
        value = values.get(name)
        kind = value.WhichOneof("val") if value is not None else None
        lists[name] = tuple(getattr(value, kind).val) if kind else ()
    return StoredSequence(
        lists[SEQUENCE_ITEM_IDS], lists[SEQUENCE_CATEGORY_IDS], lists[SEQUENCE_BEHAVIORS], lists[SEQUENCE_TIMESTAMPS_S]
    )


def _row_time(sequence: StoredSequence, stored_time_s: int | None) -> int:
    """Feature timestamp of the new row: its latest event, never earlier than the stored row."""
    latest = max(sequence.timestamps_s, default=0)
    return max(latest, stored_time_s or 0)


class SequenceAppender:
    """Appends events to online ``user_sequence`` rows of one Feast store, atomically per user.

    The store's online store must be sqlite or single-node Redis, and ``feast apply`` must have
    created its tables.
    """

    def __init__(self, store, sequence_length: int = SEQUENCE_LENGTH, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be at least 1, got {sequence_length}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.config = store.config
        self.sequence_length = sequence_length
        self.timeout_s = timeout_s
        online_type = self.config.online_store.type
        if online_type == "sqlite":
            self._backend = _SqliteBackend(store, timeout_s)
        elif online_type == "redis":
            self._backend = _RedisBackend(store)
        else:
            raise ValueError(f"real-time appends support the sqlite and redis online stores, not {online_type!r}")

    def append(self, user_id: int, events: Sequence[SequenceEvent]) -> StoredSequence:
        """Append events to one user's online sequence and return the sequence now stored."""
        if not events:
            raise ValueError(f"no events to append for user {user_id}")
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            result = self._backend.try_append(user_id, events, self.sequence_length)
            if result is not None:
                return result
            attempt += 1
            if time.monotonic() > deadline:
                raise AppendConflictError(
                    f"append for user {user_id} failed after {attempt} attempts in {self.timeout_s} s because "
                    "other writers kept changing the sequence; retry the request"
                )
            # Random backoff spreads writers that collided on the same user.
            time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


class _RedisBackend:
    """Feast's Redis layout: one hash per entity key, one field per feature, and ``_ts:<view>``."""

    def __init__(self, store) -> None:
        import redis
        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.infra.online_stores.redis import RedisOnlineStore, RedisType

        online = store.config.online_store
        if online.redis_type != RedisType.redis:
            raise ValueError(f"real-time appends support a single Redis node, not redis_type {online.redis_type!r}")
        nodes, params = RedisOnlineStore._parse_connection_string(online.connection_string)
        self.client = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **params)
        self.project = store.config.project
        self.key_version = store.config.entity_key_serialization_version
        self.key_ttl_s = online.key_ttl_seconds
        self.redis_key = _redis_key
        self.fields = {name: _mmh3(f"{USER_SEQUENCE_VIEW}:{name}") for name in SEQUENCE_FIELDS}
        self.timestamp_field = f"_ts:{USER_SEQUENCE_VIEW}".encode()

    def try_append(self, user_id: int, events, sequence_length: int) -> StoredSequence | None:
        import redis

        key = self.redis_key(self.project, user_entity_key(user_id), entity_key_serialization_version=self.key_version)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                raw = pipe.hmget(key, [*self.fields.values(), self.timestamp_field])
                values = {name: ValueProto.FromString(data) for name, data in zip(self.fields, raw) if data is not None}
                stored_time_s = Timestamp.FromString(raw[-1]).seconds if raw[-1] is not None else None
                merged = merge_sequence(_from_values(values), events, sequence_length)
                row_time = Timestamp(seconds=_row_time(merged, stored_time_s))
                mapping = {self.fields[name]: value.SerializeToString() for name, value in _to_values(merged).items()}
                mapping[self.timestamp_field] = row_time.SerializeToString()
                pipe.multi()
                pipe.hset(key, mapping=mapping)
                if self.key_ttl_s:
                    pipe.expire(key, self.key_ttl_s)
                pipe.execute()
            except redis.WatchError:
                return None
        return merged


class _SqliteBackend:
    """Feast's sqlite layout: one row per (entity key, feature name) in ``<project>_<view>``."""

    def __init__(self, store, timeout_s: float) -> None:
        from feast.infra.online_stores.helpers import compute_table_id
        from feast.infra.online_stores.sqlite import SqliteOnlineStore

        self.path = SqliteOnlineStore._get_db_path(store.config)
        view = store.get_feature_view(USER_SEQUENCE_VIEW)
        self.table = compute_table_id(
            store.config.project, view, store.config.registry.enable_online_feature_view_versioning
        )
        self.key_version = store.config.entity_key_serialization_version
        self.timeout_s = timeout_s

    def try_append(self, user_id: int, events, sequence_length: int) -> StoredSequence:
        from feast.infra.key_encoding_utils import serialize_entity_key

        key = serialize_entity_key(user_entity_key(user_id), entity_key_serialization_version=self.key_version)
        connection = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            # IMMEDIATE takes the write lock before the read, so no writer can slip in between.
            connection.execute("BEGIN IMMEDIATE")
            try:
                rows = connection.execute(
                    f'SELECT feature_name, value, event_ts FROM "{self.table}" WHERE entity_key = ?', (key,)
                ).fetchall()
            except sqlite3.OperationalError as error:
                raise RuntimeError(f"cannot read online table {self.table} in {self.path}: {error}; run feast apply") from error
            values = {name: ValueProto.FromString(data) for name, data, _ in rows if name in SEQUENCE_FIELDS}
            stored_times = [_parse_sqlite_time(event_ts) for _, _, event_ts in rows if event_ts is not None]
            merged = merge_sequence(_from_values(values), events, sequence_length)
            row_time_s = _row_time(merged, max(stored_times, default=None))
            now_s = int(time.time())
            connection.executemany(
                f'INSERT INTO "{self.table}" (entity_key, feature_name, value, event_ts, created_ts) '
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
                "value = excluded.value, event_ts = excluded.event_ts, created_ts = excluded.created_ts",
                [
                    (key, name, value.SerializeToString(), row_time_s, now_s)
                    for name, value in _to_values(merged).items()
                ],
            )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()
        return merged


def _parse_sqlite_time(value) -> int:
    """Unix seconds from an ``event_ts`` cell, which Feast's sqlite store writes as Unix seconds."""
    if isinstance(value, datetime.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
        return int(moment.timestamp())
    return int(value.decode() if isinstance(value, bytes) else value)
