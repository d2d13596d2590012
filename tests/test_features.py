import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.features import FeatureConfig, build_user_sequences, count_covisits, run_feature_job, top_neighbors
from training.schema import EVENTS_SCHEMA, ITEM_NEIGHBORS_VIEW, ITEM_STATS_VIEW, USER_SEQUENCE_VIEW

T0 = 1_511_544_000


def make_events(rows):
    """Events from (user, item, category, behavior, seconds after T0) tuples, in source order."""
    users, items, categories, behaviors, times = zip(*rows)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "category_id": pa.array(categories, pa.int64()),
            "behavior": pa.array(behaviors, pa.string()),
            "event_timestamp": pa.array(
                [datetime.datetime.fromtimestamp(T0 + t, datetime.timezone.utc) for t in times],
                pa.timestamp("us", tz="UTC"),
            ),
            "event_position": pa.array(range(len(users)), pa.int64()),
        },
        schema=EVENTS_SCHEMA,
    )


def test_sequences_keep_last_events_oldest_first():
    events = make_events([(1, 13, 3, "pv", 30), (1, 11, 1, "pv", 10), (1, 12, 2, "cart", 20), (2, 20, 5, "buy", 5)])
    rows = {row["user_id"]: row for row in build_user_sequences(events, sequence_length=2).to_pylist()}
    assert rows[1]["item_ids"] == [12, 13]
    assert rows[1]["category_ids"] == [2, 3]
    assert rows[1]["behaviors"] == ["cart", "pv"]
    assert rows[1]["timestamps_s"] == [T0 + 20, T0 + 30]
    assert rows[2]["item_ids"] == [20]


def test_sequence_timestamp_is_last_event_time():
    events = make_events([(1, 11, 1, "pv", 10), (1, 12, 1, "pv", 99)])
    row = build_user_sequences(events, sequence_length=50).to_pylist()[0]
    assert row["event_timestamp"].timestamp() == T0 + 99


def test_sequences_equal_timestamps_follow_source_position():
    events = make_events([(1, 30, 1, "pv", 10), (1, 10, 1, "pv", 10), (1, 20, 1, "pv", 10)])
    row = build_user_sequences(events, sequence_length=50).to_pylist()[0]
    assert row["item_ids"] == [30, 10, 20]


def test_covisits_weight_by_behavior_and_distance():
    events = make_events([(1, 1, 1, "pv", 0), (1, 2, 1, "buy", 10), (1, 3, 1, "pv", 20)])
    pairs = {(r["item_id"], r["neighbor_id"]): r["score"] for r in count_covisits(events, 2, 3600).to_pylist()}
    assert pairs[(1, 2)] == pytest.approx(3.0)  # buy weight, one step apart
    assert pairs[(2, 1)] == pytest.approx(3.0)
    assert pairs[(2, 3)] == pytest.approx(1.0)
    assert pairs[(1, 3)] == pytest.approx(0.5)  # pv weight, two steps apart


def test_covisits_ignore_other_users_long_gaps_and_repeats():
    events = make_events(
        [(1, 1, 1, "pv", 0), (1, 1, 1, "pv", 5), (1, 2, 1, "pv", 10_000), (2, 3, 1, "pv", 10_001)]
    )
    pairs = count_covisits(events, 3, 3600)
    assert pairs.num_rows == 0


def test_top_neighbors_keeps_k_best_with_id_tiebreak():
    pairs = pa.table(
        {
            "item_id": pa.array([1, 1, 1, 1, 2], pa.int64()),
            "neighbor_id": pa.array([5, 4, 3, 5, 1], pa.int64()),
            "score": pa.array([1.0, 2.0, 2.0, 2.5, 1.0]),
        }
    )
    as_of = pa.scalar(datetime.datetime(2017, 12, 3, tzinfo=datetime.timezone.utc), pa.timestamp("us", tz="UTC"))
    rows = {row["item_id"]: row for row in top_neighbors(pairs, 2, as_of).to_pylist()}
    assert rows[1]["neighbor_ids"] == [5, 3]
    assert rows[1]["neighbor_scores"] == [3.5, 2.0]
    assert rows[2]["neighbor_ids"] == [1]


def test_feature_config_rejects_zero_length():
    with pytest.raises(ValueError, match="sequence_length"):
        FeatureConfig(sequence_length=0)


def test_feature_job_writes_every_offline_source(ray_instance, tmp_path):
    events = make_events(
        [(user, 100 + (user * 7 + step) % 13, 1 + step % 3, "pv" if step % 4 else "cart", user * 1000 + step * 30)
         for user in range(1, 41) for step in range(12)]
    )
    pq.write_table(events, tmp_path / "events.parquet")
    paths = run_feature_job(str(tmp_path / "events.parquet"), str(tmp_path / "offline"), FeatureConfig(sequence_length=5))

    sequences = pq.read_table(paths[USER_SEQUENCE_VIEW]).to_pylist()
    assert len(sequences) == 40
    assert all(len(row["item_ids"]) == 5 for row in sequences)
    expected = build_user_sequences(events, 5).to_pylist()
    assert sorted(sequences, key=lambda row: row["user_id"]) == expected

    stats = pq.read_table(paths[ITEM_STATS_VIEW]).to_pandas()
    assert stats[["pv_count", "cart_count", "fav_count", "buy_count"]].to_numpy().sum() == events.num_rows
    assert set(stats["item_id"]) == set(events["item_id"].to_pylist())

    neighbors = pq.read_table(paths[ITEM_NEIGHBORS_VIEW]).to_pylist()
    assert neighbors
    assert all(1 <= len(row["neighbor_ids"]) <= FeatureConfig().neighbors_per_item for row in neighbors)
    assert all(row["item_id"] not in row["neighbor_ids"] for row in neighbors)


def test_feature_job_output_independent_of_blocks(ray_instance, tmp_path):
    # Equal timestamps inside each user, so only the source position orders them.
    rows = [(user, 500 - step, 1, "pv", user * 10) for user in range(1, 31) for step in range(8)]
    events = make_events(rows)
    reversed_blocks = events.take(list(range(events.num_rows - 1, -1, -1)))
    outputs = []
    for name, table, rows_per_file in (("one", events, events.num_rows), ("many", reversed_blocks, 7)):
        folder = tmp_path / name / "events"
        folder.mkdir(parents=True)
        for index, start in enumerate(range(0, table.num_rows, rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), folder / f"part-{index:03d}.parquet")
        paths = run_feature_job(str(folder), str(tmp_path / name / "offline"), FeatureConfig(sequence_length=5))
        sequences = pq.read_table(paths[USER_SEQUENCE_VIEW]).to_pylist()
        outputs.append(sorted(sequences, key=lambda row: row["user_id"]))
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["item_ids"] == [497, 496, 495, 494, 493]
