"""Ray Data job that turns canonical events into point-in-time Feast offline sources.

Outputs, one Parquet folder each under ``<data dir>/offline/``. Every row is stamped with the
moment it became true, so a point-in-time join at time t reads only what was known at t:

- ``user_sequence``: per user and distinct event time t, the last ``sequence_length`` events at or
  before t as list features, oldest first;
- ``user_stats``: per user and distinct event time t, event counts by behaviour over the trailing
  1, 3 and 7 days up to t, and the time of the latest event;
- ``item_stats``: per item and day end s (UTC midnight), event counts by behaviour over the
  trailing 1, 3 and 7 days before s, with the cart/pv, fav/pv and buy/pv ratios;
- ``item_neighbors``: per item and day end s, the top ``neighbors_per_item`` co-visited items
  counted over every event before s.

Per-user work runs on user buckets of about ``rows_per_bucket`` events, ``hash(user_id) %
num_buckets``: one pass spills each block's events into bucket folders, and one Ray Data task per
bucket then processes it with vectorized Arrow and NumPy code and writes its own Parquet parts.
Item views run the same way on item buckets. The driver receives only counts. Bucket membership depends only on
the user id and the number of events, events are ordered by (user, time, position in the source),
and co-visitation scores are summed as integers, so the output is the same for any block layout.

Heavy users: only each user's last ``max_events_per_user`` events feed user_sequence, user_stats
and co-visitation. Older events of such a user are dropped, counted and logged. item_stats counts
every event.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from training import storage
from training.cluster import connect_ray
from training.schema import (
    BEHAVIOR,
    BEHAVIORS,
    CATEGORY_ID,
    EVENT_POSITION,
    EVENT_TIMESTAMP,
    EVENTS_SCHEMA,
    ITEM_ID,
    ITEM_NEIGHBORS_VIEW,
    ITEM_STATS_VIEW,
    LAST_EVENT_S,
    NEIGHBOR_IDS,
    NEIGHBOR_SCORES,
    NEIGHBORS_PER_ITEM,
    OFFLINE_VIEWS,
    SECONDS_PER_DAY,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_CATEGORY_IDS,
    SEQUENCE_ITEM_IDS,
    SEQUENCE_LENGTH,
    SEQUENCE_TIMESTAMPS_S,
    STATS_WINDOWS_DAYS,
    USER_ID,
    USER_SEQUENCE_VIEW,
    USER_STATS_VIEW,
    count_field,
    ratio_field,
)

logger = logging.getLogger(__name__)

_BUCKET = "_bucket"
_NEIGHBOR_ID = "neighbor_id"
_DAY = "day"
_SCORE_MICROS = "score_micros"
_SHUFFLE_DIR = "_shuffle"
_TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# Co-visitation scores are summed in millionths as int64, so the sum is exact in any order.
_MICROS = 1_000_000
# Bits for the seconds part of a (user, time) search key: enough for 1,000 years of seconds.
_SECONDS_BITS = 35

# Co-visitation weight of each behaviour type: stronger intent counts more.
BEHAVIOR_WEIGHTS: dict[str, float] = {"pv": 1.0, "cart": 2.0, "fav": 2.0, "buy": 3.0}


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Settings of the feature job."""

    sequence_length: int = SEQUENCE_LENGTH
    neighbors_per_item: int = NEIGHBORS_PER_ITEM
    covisit_window: int = 3
    """Events up to this many steps apart in a user's sequence count as co-visits."""
    covisit_max_gap_s: int = 3_600
    """Events further apart than this, in seconds, never count as co-visits."""
    covisit_half_life_s: int = 600
    """A co-visit's weight halves with every this many seconds between its two events."""
    max_events_per_user: int = 10_000
    """Only each user's most recent events, up to this many, feed the per-user features."""
    rows_per_bucket: int = 250_000
    """Target number of events in one user bucket: bounds a worker's memory."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1, got {getattr(self, field.name)}")


def sort_user_events(events: pa.Table) -> pa.Table:
    """Sort events by user, then time, then position in the source file."""
    keys = [(USER_ID, "ascending"), (EVENT_TIMESTAMP, "ascending"), (EVENT_POSITION, "ascending")]
    return events.take(pc.sort_indices(events, keys))


def _user_bounds(user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end indices of each user's run in user-sorted ids."""
    if len(user_ids) == 0:
        return np.array([], np.int64), np.array([], np.int64)
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    return starts, np.r_[starts[1:], len(user_ids)]


def _seconds(timestamps: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.cast(timestamps, pa.int64()).to_numpy() // 1_000_000


def _as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def cap_user_history(events: pa.Table, max_events_per_user: int) -> tuple[pa.Table, int]:
    """Keep each user's last ``max_events_per_user`` events of sorted events; return them and the drop count."""
    starts, ends = _user_bounds(events[USER_ID].to_numpy())
    if len(starts) == 0 or (ends - starts).max() <= max_events_per_user:
        return events, 0
    events_after = np.repeat(ends, ends - starts) - np.arange(events.num_rows) - 1
    keep = events_after < max_events_per_user
    return events.filter(pa.array(keep)), int((~keep).sum())


def _snapshot_rows(user_ids: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Indices of the last event of each (user, second) in sorted events: one snapshot per moment."""
    last = np.ones(len(user_ids), dtype=bool)
    last[:-1] = (user_ids[1:] != user_ids[:-1]) | (seconds[1:] != seconds[:-1])
    return np.flatnonzero(last)


def build_user_sequences(events: pa.Table, sequence_length: int) -> pa.Table:
    """Build the user_sequence snapshots of one user bucket.

    There is one row per user and distinct event second t, stamped t, containing the user's last
    ``sequence_length`` events at or before t, oldest first. Events of the same second are all in
    the row, in source order.
    """
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    if len(user_ids) == 0:
        return _empty_sequences()
    seconds = _seconds(events[EVENT_TIMESTAMP])
    starts, ends = _user_bounds(user_ids)
    user_start = np.repeat(starts, ends - starts)
    rows = _snapshot_rows(user_ids, seconds)
    first = np.maximum(user_start[rows], rows + 1 - sequence_length)
    lengths = rows + 1 - first
    offsets = np.r_[0, np.cumsum(lengths)]
    gather = pa.array(np.repeat(first - offsets[:-1], lengths) + np.arange(offsets[-1]))
    offsets = pa.array(offsets, pa.int32())
    return pa.table(
        {
            USER_ID: pa.array(user_ids[rows], pa.int64()),
            EVENT_TIMESTAMP: _as_array(events[EVENT_TIMESTAMP]).take(pa.array(rows)),
            SEQUENCE_ITEM_IDS: _to_lists(offsets, events[ITEM_ID].take(gather)),
            SEQUENCE_CATEGORY_IDS: _to_lists(offsets, events[CATEGORY_ID].take(gather)),
            SEQUENCE_BEHAVIORS: _to_lists(offsets, events[BEHAVIOR].take(gather)),
            SEQUENCE_TIMESTAMPS_S: _to_lists(offsets, pa.array(seconds).take(gather)),
        }
    )


def latest_rows(table: pa.Table, key: str) -> pa.Table:
    """Keep the row with the latest ``event_timestamp`` of each key, as materialization does."""
    order = pc.sort_indices(table, [(key, "ascending"), (EVENT_TIMESTAMP, "ascending")])
    table = table.take(order)
    keys = table[key].to_numpy()
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    return table.filter(pa.array(last))


def _to_lists(offsets: pa.Array, values: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    return pa.ListArray.from_arrays(offsets, _as_array(values))


def _empty_sequences() -> pa.Table:
    return pa.table(
        {
            USER_ID: pa.array([], pa.int64()),
            EVENT_TIMESTAMP: pa.array([], _TIMESTAMP_TYPE),
            SEQUENCE_ITEM_IDS: pa.array([], pa.list_(pa.int64())),
            SEQUENCE_CATEGORY_IDS: pa.array([], pa.list_(pa.int64())),
            SEQUENCE_BEHAVIORS: pa.array([], pa.list_(pa.string())),
            SEQUENCE_TIMESTAMPS_S: pa.array([], pa.list_(pa.int64())),
        }
    )


def _behavior_codes(behaviors: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Index of each event's behaviour in ``BEHAVIORS``."""
    return np.asarray(pc.index_in(behaviors, pa.array(BEHAVIORS)).to_numpy(zero_copy_only=False), dtype=np.int64)


def build_user_stats(events: pa.Table) -> pa.Table:
    """Build the user_stats rows of one user bucket.

    There is one row per user and distinct event second t, stamped t. ``<behavior>_count_<N>d``
    counts the user's events of that behaviour in (t - N days, t], and ``last_event_s`` is t.
    """
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    seconds = _seconds(events[EVENT_TIMESTAMP]) if len(user_ids) else np.array([], np.int64)
    rows = _snapshot_rows(user_ids, seconds)
    starts, ends = _user_bounds(user_ids)
    user_rank = np.repeat(np.arange(len(starts)), ends - starts)
    first_s = seconds.min() if len(seconds) else 0
    # One sortable key per event: the user's rank, then seconds since the bucket's first event.
    keys = (user_rank << _SECONDS_BITS) + (seconds - first_s)
    codes = _behavior_codes(events[BEHAVIOR])
    cumulative = np.zeros((len(BEHAVIORS), len(user_ids) + 1), dtype=np.int64)
    for code in range(len(BEHAVIORS)):
        cumulative[code, 1:] = np.cumsum(codes == code)

    columns = {USER_ID: pa.array(user_ids[rows], pa.int64()), EVENT_TIMESTAMP: _as_array(events[EVENT_TIMESTAMP]).take(pa.array(rows))}
    for days in STATS_WINDOWS_DAYS:
        window_start = np.searchsorted(keys, keys[rows] - days * SECONDS_PER_DAY, side="right")
        for code, behavior in enumerate(BEHAVIORS):
            counts = cumulative[code, rows + 1] - cumulative[code, window_start]
            columns[count_field(behavior, days)] = pa.array(counts, pa.int64())
    columns[LAST_EVENT_S] = pa.array(seconds[rows], pa.int64())
    return pa.table(columns)


def count_covisits(events: pa.Table, config: FeatureConfig) -> pa.Table:
    """Count weighted co-visits of item pairs in one user bucket, by the day of the later event.

    Two events of the same user up to ``covisit_window`` steps and ``covisit_max_gap_s`` seconds
    apart add ``behavior weight of the later event / steps * 0.5 ** (gap_s / covisit_half_life_s)``
    to the pair, in both directions, on the UTC day of the later event. The same item twice is not
    a pair. Scores are int64 millionths (``score_micros``).
    """
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    item_ids = events[ITEM_ID].to_numpy()
    seconds = _seconds(events[EVENT_TIMESTAMP]) if len(user_ids) else np.array([], np.int64)
    behavior_weight = np.asarray(list(BEHAVIOR_WEIGHTS.values()))[_behavior_codes(events[BEHAVIOR])]

    sources, targets, days, scores = [], [], [], []
    for steps in range(1, config.covisit_window + 1):
        gap_s = seconds[steps:] - seconds[:-steps]
        pair = (
            (user_ids[steps:] == user_ids[:-steps])
            & (gap_s <= config.covisit_max_gap_s)
            & (item_ids[steps:] != item_ids[:-steps])
        )
        earlier, later = item_ids[:-steps][pair], item_ids[steps:][pair]
        weight = behavior_weight[steps:][pair] / steps * np.exp2(-gap_s[pair] / config.covisit_half_life_s)
        score = np.floor(weight * _MICROS + 0.5).astype(np.int64)
        day = seconds[steps:][pair] // SECONDS_PER_DAY
        sources += [earlier, later]
        targets += [later, earlier]
        days += [day, day]
        scores += [score, score]
    pairs = pa.table(
        {
            ITEM_ID: pa.array(np.concatenate(sources) if sources else [], pa.int64()),
            _NEIGHBOR_ID: pa.array(np.concatenate(targets) if targets else [], pa.int64()),
            _DAY: pa.array(np.concatenate(days) if days else [], pa.int64()),
            _SCORE_MICROS: pa.array(np.concatenate(scores) if scores else [], pa.int64()),
        }
    )
    return _sum_by(pairs, [ITEM_ID, _NEIGHBOR_ID, _DAY], [_SCORE_MICROS])


def _sum_by(table: pa.Table, keys: list[str], values: list[str]) -> pa.Table:
    summed = table.group_by(keys, use_threads=False).aggregate([(name, "sum") for name in values])
    return summed.rename_columns([name.removesuffix("_sum") for name in summed.column_names])


def _expand_to_later_days(item_ids: np.ndarray, days: np.ndarray, snapshot_items, snapshot_days) -> tuple[np.ndarray, np.ndarray]:
    """For each (item, day) row, the indices of the item's snapshot days at or after ``day``.

    Snapshots are sorted by (item, day). Returns the row index and the snapshot index of each pair.
    """
    item_rank_values, snapshot_item_rank = np.unique(snapshot_items, return_inverse=True)
    row_item_rank = np.searchsorted(item_rank_values, item_ids)
    day_offset = min(days.min(), snapshot_days.min())
    snapshot_keys = (snapshot_item_rank << _SECONDS_BITS) + (snapshot_days - day_offset)
    row_keys = (row_item_rank << _SECONDS_BITS) + (days - day_offset)
    first = np.searchsorted(snapshot_keys, row_keys, side="left")
    last = np.searchsorted(snapshot_keys, (row_item_rank + 1) << _SECONDS_BITS, side="left")
    counts = last - first
    offsets = np.r_[0, np.cumsum(counts)]
    rows = np.repeat(np.arange(len(item_ids)), counts)
    return rows, np.repeat(first - offsets[:-1], counts) + np.arange(offsets[-1])


def build_neighbor_snapshots(pairs: pa.Table, k: int) -> pa.Table:
    """Build item_neighbors rows from co-visit counts of one item bucket.

    For every item and every UTC day d on which it gained co-visits, one row stamped at the end of
    d contains its ``k`` best neighbours by the score summed over all days up to d. Ties in score go
    to the smaller neighbour id. NOTE: the work grows with each item's neighbours times its days
    with new co-visits, which suits logs of days to weeks; a log of years needs coarser days.
    """
    pairs = _sum_by(pairs, [ITEM_ID, _NEIGHBOR_ID, _DAY], [_SCORE_MICROS])
    if pairs.num_rows == 0:
        return _empty_neighbors()
    snapshots = pairs.group_by([ITEM_ID, _DAY], use_threads=False).aggregate([])
    snapshots = snapshots.take(pc.sort_indices(snapshots, [(ITEM_ID, "ascending"), (_DAY, "ascending")]))
    snapshot_items, snapshot_days = snapshots[ITEM_ID].to_numpy(), snapshots[_DAY].to_numpy()
    rows, snapshot_index = _expand_to_later_days(
        pairs[ITEM_ID].to_numpy(), pairs[_DAY].to_numpy(), snapshot_items, snapshot_days
    )
    expanded = pa.table(
        {
            ITEM_ID: pa.array(snapshot_items[snapshot_index]),
            _DAY: pa.array(snapshot_days[snapshot_index]),
            _NEIGHBOR_ID: pairs[_NEIGHBOR_ID].take(pa.array(rows)),
            _SCORE_MICROS: pairs[_SCORE_MICROS].take(pa.array(rows)),
        }
    )
    cumulative = _sum_by(expanded, [ITEM_ID, _DAY, _NEIGHBOR_ID], [_SCORE_MICROS])
    order = pc.sort_indices(
        cumulative,
        [(ITEM_ID, "ascending"), (_DAY, "ascending"), (_SCORE_MICROS, "descending"), (_NEIGHBOR_ID, "ascending")],
    )
    cumulative = cumulative.take(order)
    items, days = cumulative[ITEM_ID].to_numpy(), cumulative[_DAY].to_numpy()
    new_group = np.r_[True, (items[1:] != items[:-1]) | (days[1:] != days[:-1])]
    position = np.arange(len(items))
    rank = position - np.maximum.accumulate(np.where(new_group, position, 0))
    keep = rank < k
    kept = cumulative.filter(pa.array(keep))
    starts = np.flatnonzero(new_group[keep])
    offsets = pa.array(np.r_[starts, kept.num_rows], pa.int32())
    kept_days = kept[_DAY].to_numpy()[starts]
    scores = pc.divide(pc.cast(kept[_SCORE_MICROS], pa.float64()), float(_MICROS))
    return pa.table(
        {
            ITEM_ID: pa.array(kept[ITEM_ID].to_numpy()[starts], pa.int64()),
            EVENT_TIMESTAMP: _day_ends(kept_days),
            NEIGHBOR_IDS: _to_lists(offsets, kept[_NEIGHBOR_ID]),
            NEIGHBOR_SCORES: _to_lists(offsets, scores),
        }
    )


def _day_ends(days: np.ndarray) -> pa.Array:
    """Convert UTC day numbers to the feature timestamp of the midnight that ends each day."""
    return pc.cast(pa.array((days + 1) * SECONDS_PER_DAY * 1_000_000, pa.int64()), _TIMESTAMP_TYPE)


def _empty_neighbors() -> pa.Table:
    return pa.table(
        {
            ITEM_ID: pa.array([], pa.int64()),
            EVENT_TIMESTAMP: pa.array([], _TIMESTAMP_TYPE),
            NEIGHBOR_IDS: pa.array([], pa.list_(pa.int64())),
            NEIGHBOR_SCORES: pa.array([], pa.list_(pa.float64())),
        }
    )


def count_item_days(events: pa.Table) -> pa.Table:
    """Count each item's events by behaviour and UTC day in one block: partial sums for item_stats."""
    codes = _behavior_codes(events[BEHAVIOR])
    columns = {ITEM_ID: events[ITEM_ID], _DAY: pa.array(_seconds(events[EVENT_TIMESTAMP]) // SECONDS_PER_DAY)}
    for code, behavior in enumerate(BEHAVIORS):
        columns[behavior] = pa.array((codes == code).astype(np.int64))
    return _sum_by(pa.table(columns), [ITEM_ID, _DAY], list(BEHAVIORS))


def build_item_stats(day_counts: pa.Table) -> pa.Table:
    """Build item_stats rows of one item bucket from per-day counts.

    For every item, one row is stamped at each UTC midnight s within 7 days after a day with events.
    ``<behavior>_count_<N>d`` counts the events of the N days before s, and ``<behavior>_per_pv_<N>d``
    divides by the pv count of those days (0 without pv). The row a week after the last active day
    has all counts 0, so a later read never returns a stale count.
    """
    day_counts = _sum_by(day_counts, [ITEM_ID, _DAY], list(BEHAVIORS))
    horizon = max(STATS_WINDOWS_DAYS)
    shift = np.repeat(np.arange(horizon + 1)[None, :], day_counts.num_rows, axis=0).reshape(-1)
    source = np.repeat(np.arange(day_counts.num_rows), horizon + 1)
    columns = {
        ITEM_ID: day_counts[ITEM_ID].take(pa.array(source)),
        _DAY: pa.array(day_counts[_DAY].to_numpy()[source] + shift),
    }
    for behavior in BEHAVIORS:
        counts = day_counts[behavior].to_numpy()[source]
        for days in STATS_WINDOWS_DAYS:
            columns[count_field(behavior, days)] = pa.array(np.where(shift < days, counts, 0))
    count_names = [name for name in columns if name not in (ITEM_ID, _DAY)]
    stats = _sum_by(pa.table(columns), [ITEM_ID, _DAY], count_names)
    stats = stats.take(pc.sort_indices(stats, [(ITEM_ID, "ascending"), (_DAY, "ascending")]))

    output = {ITEM_ID: stats[ITEM_ID], EVENT_TIMESTAMP: _day_ends(stats[_DAY].to_numpy())}
    for days in STATS_WINDOWS_DAYS:
        for behavior in BEHAVIORS:
            output[count_field(behavior, days)] = stats[count_field(behavior, days)]
    for days in STATS_WINDOWS_DAYS:
        pv = pc.cast(stats[count_field("pv", days)], pa.float64())
        for behavior in BEHAVIORS[1:]:
            ratio = pc.divide(pc.cast(stats[count_field(behavior, days)], pa.float64()), pv)
            output[ratio_field(behavior, days)] = pc.if_else(pc.greater(pv, 0), ratio, 0.0)
    return pa.table(output)


def _add_bucket(batch: pa.Table, key: str, num_buckets: int) -> pa.Table:
    # Multiplicative hashing spreads dense and sparse ids alike over the buckets.
    hashed = (batch[key].to_numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return batch.append_column(_BUCKET, pa.array((hashed % np.uint64(num_buckets)).astype(np.int64)))


def _write_part(table: pa.Table, folder: str, name: str) -> None:
    filesystem, path = storage.resolve(folder)
    filesystem.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/{name}.parquet", filesystem=filesystem)


def _write_buckets(table: pa.Table, key: str, num_buckets: int, folder: str, part_name: str) -> None:
    """Write each bucket's rows of ``table`` to ``<folder>/<bucket>/<part_name>.parquet``."""
    table = _add_bucket(table, key, num_buckets)
    buckets = table[_BUCKET].to_numpy()
    order = np.argsort(buckets, kind="stable")
    table, buckets = table.take(pa.array(order)).drop_columns([_BUCKET]), buckets[order]
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]]) if len(buckets) else []
    ends = np.r_[starts[1:], len(buckets)] if len(buckets) else []
    for start, end in zip(starts, ends):
        _write_part(table.slice(start, end - start), storage.join(folder, f"{buckets[start]:05d}"), part_name)


def _read_bucket(folder: str, bucket: int, schema: pa.Schema) -> pa.Table:
    location = storage.join(folder, f"{bucket:05d}")
    if not storage.exists(location):
        return schema.empty_table()
    filesystem, path = storage.resolve(location)
    return pq.read_table(path, filesystem=filesystem, schema=schema)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Folders and bucket counts of one feature job run."""

    views: dict[str, str]
    user_events: str
    item_days: str
    covisits: str
    num_user_buckets: int
    num_item_buckets: int


_DAY_COUNTS_SCHEMA = pa.schema([(ITEM_ID, pa.int64()), (_DAY, pa.int64())] + [(name, pa.int64()) for name in BEHAVIORS])
_COVISITS_SCHEMA = pa.schema(
    [(ITEM_ID, pa.int64()), (_NEIGHBOR_ID, pa.int64()), (_DAY, pa.int64()), (_SCORE_MICROS, pa.int64())]
)


def _partition_block(block: pa.Table, layout: _Layout) -> pa.Table:
    """Spill one block of events into user buckets, and its item-day counts into item buckets."""
    part_name = uuid.uuid4().hex
    events = block.select(EVENTS_SCHEMA.names).cast(EVENTS_SCHEMA)
    _write_buckets(events, USER_ID, layout.num_user_buckets, layout.user_events, part_name)
    _write_buckets(count_item_days(events), ITEM_ID, layout.num_item_buckets, layout.item_days, part_name)
    return pa.table({"events": [events.num_rows]})


def _process_user_buckets(batch: pa.Table, layout: _Layout, config: FeatureConfig) -> pa.Table:
    """Write user_sequence, user_stats and co-visit parts of each user bucket in ``batch``."""
    counts = []
    for bucket in batch["id"].to_pylist():
        events = sort_user_events(_read_bucket(layout.user_events, bucket, EVENTS_SCHEMA))
        events, dropped = cap_user_history(events, config.max_events_per_user)
        name = f"part-{bucket:05d}"
        _write_part(build_user_sequences(events, config.sequence_length), layout.views[USER_SEQUENCE_VIEW], name)
        _write_part(build_user_stats(events), layout.views[USER_STATS_VIEW], name)
        covisits = count_covisits(events, config)
        _write_buckets(covisits, ITEM_ID, layout.num_item_buckets, layout.covisits, name)
        counts.append((events.num_rows, dropped, covisits.num_rows))
    events, capped, covisits = (list(column) for column in zip(*counts))
    return pa.table({"events": events, "capped_events": capped, "covisit_rows": covisits})


def _process_item_buckets(batch: pa.Table, layout: _Layout, config: FeatureConfig) -> pa.Table:
    """Write item_stats and item_neighbors parts of each item bucket in ``batch``."""
    rows = []
    for bucket in batch["id"].to_pylist():
        name = f"part-{bucket:05d}"
        stats = build_item_stats(_read_bucket(layout.item_days, bucket, _DAY_COUNTS_SCHEMA))
        neighbors = build_neighbor_snapshots(
            _read_bucket(layout.covisits, bucket, _COVISITS_SCHEMA), config.neighbors_per_item
        )
        _write_part(stats, layout.views[ITEM_STATS_VIEW], name)
        _write_part(neighbors, layout.views[ITEM_NEIGHBORS_VIEW], name)
        rows.append(stats.num_rows + neighbors.num_rows)
    return pa.table({"rows": rows})


def _reset_dir(location: str) -> None:
    filesystem, path = storage.resolve(location)
    filesystem.create_dir(path, recursive=True)
    filesystem.delete_dir_contents(path)


def _over_buckets(num_buckets: int, fn, layout: _Layout, config: FeatureConfig) -> ray.data.Dataset:
    """Run ``fn`` once per bucket id, one Ray Data task per bucket."""
    return (
        ray.data.range(num_buckets, override_num_blocks=num_buckets)
        .map_batches(fn, batch_size=1, batch_format="pyarrow", fn_kwargs={"layout": layout, "config": config})
        .materialize()
    )


def run_feature_job(events_path: str, output_dir: str, config: FeatureConfig | None = None) -> dict[str, str]:
    """Build the offline sources from canonical events and return their paths by feature view.

    Connects to the running Ray instance, or starts a local one. Three Ray Data passes run: the
    first spills each block's events into user buckets (and item-day counts into item buckets)
    under ``<output_dir>/_shuffle``, the second builds each user bucket's views and co-visits, the
    third each item bucket's views. Each source folder is emptied before the job writes it, and
    the spill folder is deleted at the end.
    """
    config = config or FeatureConfig()
    events_path = storage.normalize(events_path)
    events = ray.data.read_parquet(events_path)
    num_events = events.count()
    if num_events == 0:
        raise ValueError(f"no events in {events_path}; ingest a non-empty events file first")
    num_buckets = max(1, -(-num_events // config.rows_per_bucket))
    shuffle_dir = storage.join(output_dir, _SHUFFLE_DIR)
    layout = _Layout(
        views={name: storage.join(output_dir, name) for name in OFFLINE_VIEWS},
        user_events=storage.join(shuffle_dir, "user_events"),
        item_days=storage.join(shuffle_dir, "item_days"),
        covisits=storage.join(shuffle_dir, "covisits"),
        num_user_buckets=num_buckets,
        num_item_buckets=num_buckets,
    )
    for path in [*layout.views.values(), shuffle_dir]:
        _reset_dir(path)
    logger.info("Building features from %d events in %d user and item buckets", num_events, num_buckets)

    events.map_batches(
        _partition_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"layout": layout}
    ).materialize()
    user_counts = _over_buckets(num_buckets, _process_user_buckets, layout, config)
    capped = user_counts.sum("capped_events")
    if capped:
        logger.warning(
            "Dropped %d events of users with more than %d events from the per-user features",
            capped,
            config.max_events_per_user,
        )
    _over_buckets(num_buckets, _process_item_buckets, layout, config)

    filesystem, path = storage.resolve(shuffle_dir)
    filesystem.delete_dir(path)
    logger.info("Wrote offline sources to %s", storage.normalize(output_dir))
    return dict(layout.views)


def main(argv: list[str] | None = None) -> None:
    from training.events import FORMATS, TAOBAO, ingest_events

    parser = argparse.ArgumentParser(description="Ingest raw events and build the Feast offline sources with Ray Data.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--events", required=True, help="event log to ingest: a path or a URI")
    parser.add_argument("--format", choices=FORMATS, default=TAOBAO, help="format of the event log")
    parser.add_argument(
        "--item-attributes",
        help="JSON object of item id to a list of attribute ids (S3-Rec style); the first becomes the category",
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        help="output folder or URI: events/ gets the canonical events, offline/ the Feast offline sources",
    )
    parser.add_argument("--sequence-length", type=int, default=SEQUENCE_LENGTH, help="events kept per user")
    parser.add_argument(
        "--max-events-per-user",
        type=int,
        default=FeatureConfig.max_events_per_user,
        help="only each user's most recent events, up to this many, feed the per-user features",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    item_categories = None
    if args.item_attributes:
        attributes = json.loads(storage.read_text(args.item_attributes))
        item_categories = {int(item): int(ids[0]) for item, ids in attributes.items() if ids}
    report = ingest_events(args.events, storage.join(args.data_dir, "events"), args.format, item_categories)
    print(
        f"Ingested {report.rows_accepted} of {report.rows_read} rows; rejected by reason: {report.rejected or 'none'}"
    )
    connect_ray()
    config = FeatureConfig(sequence_length=args.sequence_length, max_events_per_user=args.max_events_per_user)
    paths = run_feature_job(report.events_path, storage.join(args.data_dir, "offline"), config)
    for view, path in paths.items():
        print(f"{view}: {path}")


if __name__ == "__main__":
    main()
