"""Ray Data job that turns canonical events into Feast offline sources.

Outputs, one Parquet folder each under ``<feature repo>/data/offline/``:

- ``user_sequence``: per user, the last ``SEQUENCE_LENGTH`` events as list features, oldest first;
- ``item_stats``: per item, event counts by behaviour and the buy/pv ratio;
- ``item_neighbors``: per item, the top ``NEIGHBORS_PER_ITEM`` co-visited items with scores.

Per-user work is done on user buckets: events are grouped by ``hash(user_id) % num_buckets``, and each
bucket is processed with vectorized Arrow and NumPy code. No step gathers events on the driver or
calls Python once per user.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from training import storage
from training.cluster import connect_ray
from training.schema import (
    BEHAVIOR,
    BEHAVIORS,
    CATEGORY_ID,
    EVENT_POSITION,
    EVENT_TIMESTAMP,
    ITEM_ID,
    ITEM_NEIGHBORS_VIEW,
    ITEM_STATS_VIEW,
    NEIGHBOR_IDS,
    NEIGHBOR_SCORES,
    NEIGHBORS_PER_ITEM,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_CATEGORY_IDS,
    SEQUENCE_ITEM_IDS,
    SEQUENCE_LENGTH,
    SEQUENCE_TIMESTAMPS_S,
    USER_ID,
    USER_SEQUENCE_VIEW,
)

logger = logging.getLogger(__name__)

_BUCKET = "_bucket"
_NEIGHBOR_ID = "neighbor_id"
_SCORE = "score"

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
    rows_per_bucket: int = 2_000_000
    """Target number of events in one user bucket: bounds a worker's memory."""

    def __post_init__(self) -> None:
        for name in ("sequence_length", "neighbors_per_item", "covisit_window", "covisit_max_gap_s", "rows_per_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def sort_user_events(events: pa.Table) -> pa.Table:
    """Sort events by user, then time, then position in the source file."""
    keys = [(USER_ID, "ascending"), (EVENT_TIMESTAMP, "ascending"), (EVENT_POSITION, "ascending")]
    return events.take(pc.sort_indices(events, keys))


def build_user_sequences(events: pa.Table, sequence_length: int) -> pa.Table:
    """Build the user_sequence rows of one user bucket: the last events of each user as lists.

    Each row's ``event_timestamp`` is the time of the user's last event, so the row is the sequence
    known at that moment.
    """
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    if len(user_ids) == 0:
        return _empty_sequences()
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    ends = np.r_[starts[1:], len(user_ids)]
    events_after = np.repeat(ends, ends - starts) - np.arange(len(user_ids)) - 1
    kept = events.filter(pa.array(events_after < sequence_length))
    lengths = np.minimum(ends - starts, sequence_length)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)], pa.int32())
    timestamps_s = pc.cast(pc.divide(pc.cast(kept[EVENT_TIMESTAMP], pa.int64()), 1_000_000), pa.int64())
    return pa.table(
        {
            USER_ID: pa.array(user_ids[starts], pa.int64()),
            EVENT_TIMESTAMP: events[EVENT_TIMESTAMP].take(pa.array(ends - 1)),
            SEQUENCE_ITEM_IDS: _to_lists(offsets, kept[ITEM_ID]),
            SEQUENCE_CATEGORY_IDS: _to_lists(offsets, kept[CATEGORY_ID]),
            SEQUENCE_BEHAVIORS: _to_lists(offsets, kept[BEHAVIOR]),
            SEQUENCE_TIMESTAMPS_S: _to_lists(offsets, timestamps_s),
        }
    )


def _to_lists(offsets: pa.Array, values: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return pa.ListArray.from_arrays(offsets, values)


def _empty_sequences() -> pa.Table:
    return pa.table(
        {
            USER_ID: pa.array([], pa.int64()),
            EVENT_TIMESTAMP: pa.array([], pa.timestamp("us", tz="UTC")),
            SEQUENCE_ITEM_IDS: pa.array([], pa.list_(pa.int64())),
            SEQUENCE_CATEGORY_IDS: pa.array([], pa.list_(pa.int64())),
            SEQUENCE_BEHAVIORS: pa.array([], pa.list_(pa.string())),
            SEQUENCE_TIMESTAMPS_S: pa.array([], pa.list_(pa.int64())),
        }
    )


def count_covisits(events: pa.Table, window: int, max_gap_s: int) -> pa.Table:
    """Count weighted co-visits of item pairs in one user bucket.

    Two events of the same user up to ``window`` steps and ``max_gap_s`` seconds apart add
    ``behavior weight of the later event / steps apart`` to the pair, in both directions.
    The same item seen twice in a row is not a pair.
    """
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    item_ids = events[ITEM_ID].to_numpy()
    seconds = pc.cast(events[EVENT_TIMESTAMP], pa.int64()).to_numpy() // 1_000_000
    weights = np.asarray(
        pc.fill_null(
            pc.index_in(events[BEHAVIOR], pa.array(list(BEHAVIOR_WEIGHTS))), 0
        ).to_numpy(zero_copy_only=False)
    )
    behavior_weight = np.asarray(list(BEHAVIOR_WEIGHTS.values()))[weights]

    sources, targets, scores = [], [], []
    for steps in range(1, window + 1):
        same_user = user_ids[steps:] == user_ids[:-steps]
        close = seconds[steps:] - seconds[:-steps] <= max_gap_s
        different = item_ids[steps:] != item_ids[:-steps]
        pair = same_user & close & different
        earlier, later = item_ids[:-steps][pair], item_ids[steps:][pair]
        score = behavior_weight[steps:][pair] / steps
        sources += [earlier, later]
        targets += [later, earlier]
        scores += [score, score]
    pairs = pa.table(
        {
            ITEM_ID: np.concatenate(sources) if sources else np.array([], np.int64),
            _NEIGHBOR_ID: np.concatenate(targets) if targets else np.array([], np.int64),
            _SCORE: np.concatenate(scores) if scores else np.array([], np.float64),
        }
    )
    return pairs.group_by([ITEM_ID, _NEIGHBOR_ID]).aggregate([(_SCORE, "sum")]).rename_columns(
        [ITEM_ID, _NEIGHBOR_ID, _SCORE]
    )


def top_neighbors(pairs: pa.Table, k: int, as_of: pa.Scalar) -> pa.Table:
    """Keep the ``k`` highest-scoring neighbours of each item, as list features.

    Ties in score are broken by the smaller neighbour id, so the output is deterministic.
    """
    pairs = pairs.group_by([ITEM_ID, _NEIGHBOR_ID]).aggregate([(_SCORE, "sum")]).rename_columns(
        [ITEM_ID, _NEIGHBOR_ID, _SCORE]
    )
    order = pc.sort_indices(pairs, [(ITEM_ID, "ascending"), (_SCORE, "descending"), (_NEIGHBOR_ID, "ascending")])
    pairs = pairs.take(order)
    item_ids = pairs[ITEM_ID].to_numpy()
    if len(item_ids) == 0:
        return pa.table(
            {
                ITEM_ID: pa.array([], pa.int64()),
                "event_timestamp": pa.array([], pa.timestamp("us", tz="UTC")),
                NEIGHBOR_IDS: pa.array([], pa.list_(pa.int64())),
                NEIGHBOR_SCORES: pa.array([], pa.list_(pa.float64())),
            }
        )
    starts = np.flatnonzero(np.r_[True, item_ids[1:] != item_ids[:-1]])
    rank = np.arange(len(item_ids)) - np.repeat(starts, np.diff(np.r_[starts, len(item_ids)]))
    kept = pairs.filter(pa.array(rank < k))
    kept_items = kept[ITEM_ID].to_numpy()
    kept_starts = np.flatnonzero(np.r_[True, kept_items[1:] != kept_items[:-1]])
    offsets = pa.array(np.r_[kept_starts, len(kept_items)], pa.int32())
    return pa.table(
        {
            ITEM_ID: pa.array(kept_items[kept_starts], pa.int64()),
            EVENT_TIMESTAMP: pa.array([as_of.as_py()] * len(kept_starts), pa.timestamp("us", tz="UTC")),
            NEIGHBOR_IDS: _to_lists(offsets, kept[_NEIGHBOR_ID]),
            NEIGHBOR_SCORES: _to_lists(offsets, kept[_SCORE]),
        }
    )


def count_item_behaviors(events: pa.Table) -> pa.Table:
    """Count each item's events by behaviour in one block: partial sums for ``item_stats``."""
    columns = {ITEM_ID: events[ITEM_ID]}
    for behavior in BEHAVIORS:
        columns[f"{behavior}_count"] = pc.cast(pc.equal(events[BEHAVIOR], behavior), pa.int64())
    return pa.table(columns)


def item_stats_rows(counts: pa.Table, as_of: pa.Scalar) -> pa.Table:
    """Finish ``item_stats`` rows from summed behaviour counts: add buy/pv and the feature timestamp."""
    counts = counts.rename_columns([name.removeprefix("sum(").removesuffix(")") for name in counts.column_names])
    pv = pc.cast(counts["pv_count"], pa.float64())
    buy_per_pv = pc.if_else(pc.greater(pv, 0), pc.divide(pc.cast(counts["buy_count"], pa.float64()), pv), 0.0)
    return counts.append_column("buy_per_pv", buy_per_pv).append_column(
        EVENT_TIMESTAMP, pa.array([as_of.as_py()] * counts.num_rows, pa.timestamp("us", tz="UTC"))
    )


def _add_bucket(batch: pa.Table, key: str, num_buckets: int) -> pa.Table:
    # Multiplicative hashing spreads dense and sparse ids alike over the buckets.
    hashed = (batch[key].to_numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return batch.append_column(_BUCKET, pa.array((hashed % np.uint64(num_buckets)).astype(np.int64)))


def run_feature_job(events_path: str, output_dir: str, config: FeatureConfig | None = None) -> dict[str, str]:
    """Build the offline sources from canonical events and return their paths by feature view.

    Connects to the running Ray instance, or starts a local one.
    """
    config = config or FeatureConfig()
    events_path = storage.normalize(events_path)
    events = ray.data.read_parquet(events_path)
    num_events = events.count()
    if num_events == 0:
        raise ValueError(f"no events in {events_path}; ingest a non-empty events file first")
    as_of = pa.scalar(events.max(EVENT_TIMESTAMP), pa.timestamp("us", tz="UTC"))
    num_buckets = max(1, -(-num_events // config.rows_per_bucket))
    logger.info("Building features from %d events in %d user buckets, as of %s", num_events, num_buckets, as_of)

    paths = {name: storage.join(output_dir, name) for name in (USER_SEQUENCE_VIEW, ITEM_STATS_VIEW, ITEM_NEIGHBORS_VIEW)}
    by_user = events.map_batches(
        _add_bucket, fn_kwargs={"key": USER_ID, "num_buckets": num_buckets}, batch_format="pyarrow"
    ).groupby(_BUCKET)

    sequence_length = config.sequence_length
    by_user.map_groups(
        lambda bucket: build_user_sequences(bucket.drop_columns([_BUCKET]), sequence_length),
        batch_format="pyarrow",
    ).write_parquet(paths[USER_SEQUENCE_VIEW], mode="overwrite")

    count_columns = [f"{behavior}_count" for behavior in BEHAVIORS]
    events.map_batches(count_item_behaviors, batch_format="pyarrow").groupby(ITEM_ID).sum(count_columns).map_batches(
        item_stats_rows, fn_kwargs={"as_of": as_of}, batch_format="pyarrow"
    ).write_parquet(paths[ITEM_STATS_VIEW], mode="overwrite")

    window, max_gap_s, k = config.covisit_window, config.covisit_max_gap_s, config.neighbors_per_item
    covisits = by_user.map_groups(lambda bucket: count_covisits(bucket, window, max_gap_s), batch_format="pyarrow")
    covisits.map_batches(
        _add_bucket, fn_kwargs={"key": ITEM_ID, "num_buckets": num_buckets}, batch_format="pyarrow"
    ).groupby(_BUCKET).map_groups(
        lambda bucket: top_neighbors(bucket.drop_columns([_BUCKET]), k, as_of), batch_format="pyarrow"
    ).write_parquet(paths[ITEM_NEIGHBORS_VIEW], mode="overwrite")

    logger.info("Wrote offline sources to %s", storage.normalize(output_dir))
    return paths


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
    config = FeatureConfig(sequence_length=args.sequence_length)
    paths = run_feature_job(report.events_path, storage.join(args.data_dir, "offline"), config)
    for view, path in paths.items():
        print(f"{view}: {path}")


if __name__ == "__main__":
    main()
