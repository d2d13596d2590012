import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from training.features import (
    FeatureConfig,
    build_item_stats,
    build_neighbor_snapshots,
    build_user_sequences,
    build_user_stats,
    cap_user_history,
    count_covisits,
    count_item_days,
    latest_rows,
    run_feature_job,
    sort_user_events,
)
from training.schema import (
    EVENTS_SCHEMA,
    ITEM_NEIGHBORS_VIEW,
    ITEM_STATS_VIEW,
    USER_SEQUENCE_VIEW,
    USER_STATS_VIEW,
)

T0 = 1_511_544_000  # 2017-11-24 17:20 UTC
DAY = 86_400
MIDNIGHT_AFTER_T0 = 1_511_568_000  # 2017-11-25 00:00 UTC
KEYS = {USER_SEQUENCE_VIEW: "user_id", USER_STATS_VIEW: "user_id", ITEM_STATS_VIEW: "item_id", ITEM_NEIGHBORS_VIEW: "item_id"}


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


def random_events(num_users=30, events_per_user=25, seed=0, span_s=4 * DAY):
    rng = np.random.default_rng(seed)
    behaviors = np.array(["pv", "pv", "pv", "cart", "fav", "buy"])
    rows = []
    for user in range(1, num_users + 1):
        times = np.sort(rng.integers(0, span_s, events_per_user))
        # Repeat some seconds, so that ties are common.
        times[1::4] = times[0::4][: len(times[1::4])]
        times.sort()
        for t in times:
            rows.append((user, int(rng.integers(1, 40)), 1, str(rng.choice(behaviors)), int(t)))
    order = rng.permutation(len(rows))
    return make_events([rows[i] for i in order])


def at(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def rows_by(table: pa.Table, key: str) -> dict:
    return {row[key]: row for row in table.to_pylist()}


def as_of(table: pa.Table, key: str, moment: datetime.datetime) -> dict:
    """The latest row of each key stamped at or before ``moment``: a point-in-time read."""
    known = table.filter(pc.less_equal(table["event_timestamp"], pa.scalar(moment, pa.timestamp("us", tz="UTC"))))
    return rows_by(latest_rows(known, key), key)


def read_sorted(path: str, key: str) -> list[dict]:
    table = pq.read_table(path)
    return table.take(pc.sort_indices(table, [(key, "ascending"), ("event_timestamp", "ascending")])).to_pylist()


def test_sequence_snapshot_per_event_time():
    events = make_events([(1, 13, 3, "pv", 30), (1, 11, 1, "pv", 10), (1, 12, 2, "cart", 20), (2, 20, 5, "buy", 5)])
    rows = build_user_sequences(events, sequence_length=2).to_pylist()
    user_1 = [row for row in rows if row["user_id"] == 1]
    assert [row["event_timestamp"] for row in user_1] == [at(T0 + 10), at(T0 + 20), at(T0 + 30)]
    assert [row["item_ids"] for row in user_1] == [[11], [11, 12], [12, 13]]
    assert user_1[-1]["category_ids"] == [2, 3]
    assert user_1[-1]["behaviors"] == ["cart", "pv"]
    assert user_1[-1]["timestamps_s"] == [T0 + 20, T0 + 30]


def test_sequence_snapshot_holds_every_event_of_its_second():
    events = make_events([(1, 30, 1, "pv", 10), (1, 10, 1, "pv", 10), (1, 20, 1, "pv", 10), (1, 40, 1, "pv", 11)])
    rows = build_user_sequences(events, sequence_length=50).to_pylist()
    assert len(rows) == 2
    assert rows[0]["item_ids"] == [30, 10, 20]
    assert rows[1]["item_ids"] == [30, 10, 20, 40]


def test_user_stats_count_trailing_windows():
    events = make_events(
        [(1, 10, 1, "pv", 0), (1, 11, 1, "buy", 2 * DAY), (1, 12, 1, "pv", 5 * DAY), (1, 13, 1, "cart", 5 * DAY + 9)]
    )
    rows = build_user_stats(events).to_pylist()
    assert [row["last_event_s"] for row in rows] == [T0, T0 + 2 * DAY, T0 + 5 * DAY, T0 + 5 * DAY + 9]
    last = rows[-1]
    assert (last["pv_count_1d"], last["cart_count_1d"], last["buy_count_1d"]) == (1, 1, 0)
    assert (last["pv_count_3d"], last["cart_count_3d"], last["buy_count_3d"]) == (1, 1, 0)
    # The buy at day 2 is 3 days and 9 seconds before the last event.
    assert (last["pv_count_7d"], last["cart_count_7d"], last["buy_count_7d"]) == (2, 1, 1)
    assert rows[1]["buy_count_1d"] == 1
    assert rows[1]["pv_count_1d"] == 0
    assert rows[1]["pv_count_3d"] == 1


def test_user_stats_window_excludes_its_lower_bound():
    events = make_events([(1, 10, 1, "pv", 0), (1, 11, 1, "pv", DAY)])
    rows = build_user_stats(events).to_pylist()
    assert rows[-1]["pv_count_1d"] == 1
    assert rows[-1]["pv_count_3d"] == 2


def test_heavy_user_history_capped_to_latest_events():
    rows = [(1, 100 + step, 1, "pv", step) for step in range(10)] + [(2, 7, 1, "pv", 3)]
    events, dropped = cap_user_history(sort_user_events(make_events(rows)), max_events_per_user=4)
    assert dropped == 6
    assert events.filter(pc.equal(events["user_id"], 1))["item_ids" if False else "item_id"].to_pylist() == [
        106,
        107,
        108,
        109,
    ]
    assert events.filter(pc.equal(events["user_id"], 2)).num_rows == 1


def test_heavy_user_of_a_million_events_stays_bounded():
    count = 1_000_000
    events = pa.table(
        {
            "user_id": pa.array(np.full(count, 5), pa.int64()),
            "item_id": pa.array(np.arange(count) % 997, pa.int64()),
            "category_id": pa.array(np.ones(count), pa.int64()),
            "behavior": pa.array(np.full(count, "pv")),
            "event_timestamp": pc.cast(pa.array((T0 + np.arange(count) // 10) * 1_000_000), pa.timestamp("us", tz="UTC")),
            "event_position": pa.array(np.arange(count), pa.int64()),
        },
        schema=EVENTS_SCHEMA,
    )
    config = FeatureConfig(max_events_per_user=1_000)
    capped, dropped = cap_user_history(sort_user_events(events), config.max_events_per_user)
    sequences = build_user_sequences(capped, config.sequence_length)
    assert dropped == count - 1_000
    assert sequences.num_rows == 100  # one snapshot per distinct second of the kept events
    assert sequences["timestamps_s"][-1].as_py()[-1] == T0 + (count - 1) // 10


def test_covisits_weight_by_behavior_steps_and_gap():
    config = FeatureConfig(covisit_window=2, covisit_half_life_s=10)
    events = make_events([(1, 1, 1, "pv", 0), (1, 2, 1, "buy", 0), (1, 3, 1, "pv", 10)])
    pairs = {(r["item_id"], r["neighbor_id"]): r["score_micros"] for r in count_covisits(events, config).to_pylist()}
    assert pairs[(1, 2)] == 3_000_000  # buy weight, one step, no gap
    assert pairs[(2, 1)] == 3_000_000
    assert pairs[(2, 3)] == 500_000  # pv weight, one step, one half-life apart
    assert pairs[(1, 3)] == 250_000  # pv weight, two steps, one half-life apart


def test_covisits_ignore_other_users_long_gaps_and_repeats():
    events = make_events([(1, 1, 1, "pv", 0), (1, 1, 1, "pv", 5), (1, 2, 1, "pv", 10_000), (2, 3, 1, "pv", 10_001)])
    assert count_covisits(events, FeatureConfig()).num_rows == 0


def test_covisits_fall_on_day_of_later_event():
    events = make_events([(1, 1, 1, "pv", MIDNIGHT_AFTER_T0 - T0 - 5), (1, 2, 1, "pv", MIDNIGHT_AFTER_T0 - T0 + 5)])
    days = set(count_covisits(events, FeatureConfig()).column("day").to_pylist())
    assert days == {MIDNIGHT_AFTER_T0 // DAY}


def pairs_table(rows):
    item, neighbor, day, score = zip(*rows)
    return pa.table(
        {
            "item_id": pa.array(item, pa.int64()),
            "neighbor_id": pa.array(neighbor, pa.int64()),
            "day": pa.array(day, pa.int64()),
            "score_micros": pa.array(score, pa.int64()),
        }
    )


def test_neighbor_snapshots_accumulate_by_day_with_id_tiebreak():
    day = 17_500
    pairs = pairs_table(
        [(1, 5, day, 1_000_000), (1, 4, day, 2_000_000), (1, 3, day + 2, 2_000_000), (1, 5, day + 2, 2_500_000), (2, 1, day, 1)]
    )
    rows = build_neighbor_snapshots(pairs, k=2).to_pylist()
    item_1 = [row for row in rows if row["item_id"] == 1]
    assert [row["event_timestamp"] for row in item_1] == [at((day + 1) * DAY), at((day + 3) * DAY)]
    assert item_1[0]["neighbor_ids"] == [4, 5]
    assert item_1[1]["neighbor_ids"] == [5, 3]  # 5: 3.5 in total; 3 and 4 tie at 2.0
    assert item_1[1]["neighbor_scores"] == [3.5, 2.0]
    assert [row["neighbor_ids"] for row in rows if row["item_id"] == 2] == [[1]]


def test_item_stats_windows_ratios_and_expiry():
    events = make_events([(1, 7, 1, "pv", 0), (1, 7, 1, "pv", 1), (2, 7, 1, "buy", DAY), (2, 8, 1, "cart", 0)])
    rows = [row for row in build_item_stats(count_item_days(events)).to_pylist() if row["item_id"] == 7]
    first_day_end = MIDNIGHT_AFTER_T0
    assert rows[0]["event_timestamp"] == at(first_day_end)
    assert (rows[0]["pv_count_1d"], rows[0]["buy_count_1d"], rows[0]["buy_per_pv_1d"]) == (2, 0, 0.0)
    assert rows[1]["event_timestamp"] == at(first_day_end + DAY)
    assert (rows[1]["pv_count_1d"], rows[1]["buy_count_1d"], rows[1]["buy_per_pv_1d"]) == (0, 1, 0.0)
    assert (rows[1]["pv_count_3d"], rows[1]["buy_count_3d"], rows[1]["buy_per_pv_3d"]) == (2, 1, 0.5)
    # A week after the last active day every count is back to 0.
    assert rows[-1]["event_timestamp"] == at(first_day_end + 8 * DAY)
    assert all(rows[-1][name] == 0 for name in rows[-1] if "_count_" in name)


def test_feature_config_rejects_zero_length():
    with pytest.raises(ValueError, match="sequence_length"):
        FeatureConfig(sequence_length=0)


def test_feature_job_writes_every_offline_source(ray_instance, tmp_path):
    events = random_events()
    pq.write_table(events, tmp_path / "events.parquet")
    config = FeatureConfig(sequence_length=5)
    paths = run_feature_job(str(tmp_path / "events.parquet"), str(tmp_path / "offline"), config)
    assert set(paths) == set(KEYS)

    sequences = pq.read_table(paths[USER_SEQUENCE_VIEW])
    assert sequences.to_pylist() == build_user_sequences(events, 5).to_pylist()
    assert pq.read_table(paths[USER_STATS_VIEW]).to_pylist() == build_user_stats(events).to_pylist()

    stats = latest_rows(pq.read_table(paths[ITEM_STATS_VIEW]), "item_id")
    assert set(stats["item_id"].to_pylist()) == set(events["item_id"].to_pylist())
    neighbors = latest_rows(pq.read_table(paths[ITEM_NEIGHBORS_VIEW]), "item_id").to_pylist()
    assert neighbors
    assert all(1 <= len(row["neighbor_ids"]) <= config.neighbors_per_item for row in neighbors)
    assert all(row["item_id"] not in row["neighbor_ids"] for row in neighbors)
    assert not (tmp_path / "offline" / "_covisits").exists()


def write_blocks(table: pa.Table, folder, rows_per_file: int) -> str:
    folder.mkdir(parents=True)
    for index, start in enumerate(range(0, table.num_rows, rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), folder / f"part-{index:03d}.parquet")
    return str(folder)


def test_feature_job_output_independent_of_blocks(ray_instance, tmp_path):
    events = random_events(num_users=40, seed=3)
    reversed_rows = events.take(list(range(events.num_rows - 1, -1, -1)))
    outputs = []
    for name, table, rows_per_file in (("one", events, events.num_rows), ("many", reversed_rows, 37), ("tiny", events, 5)):
        folder = write_blocks(table, tmp_path / name / "events", rows_per_file)
        config = FeatureConfig(sequence_length=5, rows_per_bucket=200)
        paths = run_feature_job(folder, str(tmp_path / name / "offline"), config)
        outputs.append({view: read_sorted(path, KEYS[view]) for view, path in paths.items()})
    assert len(list((tmp_path / "many" / "events").iterdir())) > 10
    for view in KEYS:
        assert outputs[0][view], view
        assert outputs[0][view] == outputs[1][view], view
        assert outputs[0][view] == outputs[2][view], view


def test_future_events_never_reach_point_in_time_features(ray_instance, tmp_path):
    """Features read at time T are the same with and without events after T."""
    cutoff_s = T0 + 2 * DAY + 1_234
    events = random_events(seed=5)
    seconds = pc.divide(pc.cast(events["event_timestamp"], pa.int64()), 1_000_000)
    past = events.filter(pc.less_equal(seconds, cutoff_s))
    assert 0 < past.num_rows < events.num_rows

    results = []
    for name, table in (("all", events), ("past", past)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        paths = run_feature_job(str(tmp_path / f"{name}.parquet"), str(tmp_path / name), FeatureConfig(sequence_length=6))
        results.append({view: as_of(pq.read_table(path), KEYS[view], at(cutoff_s)) for view, path in paths.items()})
    for view in KEYS:
        assert results[0][view], view
        assert results[0][view] == results[1][view], view

    sequences = results[0][USER_SEQUENCE_VIEW]
    assert all(max(row["timestamps_s"]) <= cutoff_s for row in sequences.values())
    # The last midnight before the cutoff bounds what the item views have seen.
    midnight = at(cutoff_s - (cutoff_s % DAY))
    assert all(row["event_timestamp"] <= midnight for row in results[0][ITEM_NEIGHBORS_VIEW].values())


def test_example_sequence_matches_events_before_it():
    """Every snapshot contains exactly the last L events at or before its own timestamp."""
    events = random_events(num_users=10, seed=7)
    length = 4
    snapshots = build_user_sequences(events, length).to_pylist()
    ordered = sort_user_events(events).to_pylist()
    for snapshot in snapshots:
        moment = snapshot["event_timestamp"]
        history = [row for row in ordered if row["user_id"] == snapshot["user_id"] and row["event_timestamp"] <= moment]
        assert snapshot["item_ids"] == [row["item_id"] for row in history[-length:]]
