import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import datetime

import pyarrow as pa

from training.events import (
    DUPLICATE,
    INVALID_INTEGER,
    MALFORMED,
    NON_POSITIVE_TIMESTAMP,
    OUTSIDE_WINDOW,
    SYNTHETIC_START_S,
    TAOBAO_WINDOW,
    UNKNOWN_BEHAVIOR,
    TimeWindow,
    ingest_events,
    ingest_taobao_csv,
    read_events,
)
from training.schema import EVENTS_SCHEMA

from conftest import real_data_path

VALID_ROWS = [
    "1,10,100,pv,1511544070",
    "1,11,100,cart,1511544071",
    "2,10,100,buy,1511544072",
]
BAD_ROWS = {
    "3,12,100,pv": MALFORMED,
    "3,12,100,pv,1511544073,extra": MALFORMED,
    "x,12,100,pv,1511544073": INVALID_INTEGER,
    "3,12.5,100,pv,1511544073": INVALID_INTEGER,
    "3,12,100,pv,0": NON_POSITIVE_TIMESTAMP,
    "3,12,100,pv,-5": NON_POSITIVE_TIMESTAMP,
    "3,12,100,click,1511544073": UNKNOWN_BEHAVIOR,
}


@pytest.fixture
def mixed_csv(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("\n".join(VALID_ROWS[:2] + list(BAD_ROWS) + VALID_ROWS[2:]) + "\n")
    return path


def test_ingest_accepts_valid_rows(mixed_csv, tmp_path):
    report = ingest_taobao_csv(mixed_csv, tmp_path / "out")
    events = read_events(report.events_path)
    assert events.schema == EVENTS_SCHEMA
    assert events.num_rows == len(VALID_ROWS)
    assert events["user_id"].to_pylist() == [1, 1, 2]
    assert events["behavior"].to_pylist() == ["pv", "cart", "buy"]
    assert events["event_timestamp"][0].as_py().timestamp() == 1511544070


def test_ingest_counts_every_rejected_row_by_reason(mixed_csv, tmp_path):
    report = ingest_taobao_csv(mixed_csv, tmp_path / "out")
    expected: dict[str, int] = {}
    for reason in BAD_ROWS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report.rejected == expected
    assert report.rows_read == len(VALID_ROWS) + len(BAD_ROWS)
    assert report.rows_accepted + report.rows_rejected == report.rows_read
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert saved["rejected"] == expected


def test_ingest_quarantines_raw_rows_with_reasons(mixed_csv, tmp_path):
    report = ingest_taobao_csv(mixed_csv, tmp_path / "out")
    quarantine = pacsv.read_csv(report.quarantine_path).to_pylist()
    assert sorted((row["raw"], row["reason"]) for row in quarantine) == sorted(BAD_ROWS.items())


def test_ingest_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ingest_taobao_csv(tmp_path / "nope.csv", tmp_path / "out")


def test_ingest_real_taobao_sample(tmp_path):
    path = real_data_path("taobao_userbehavior/UserBehavior_head.csv")
    report = ingest_taobao_csv(path, tmp_path / "out")
    # The sample's last line is cut after four fields, and 35 events fall outside the data set's
    # declared days in China time.
    assert report.rejected == {MALFORMED: 1, OUTSIDE_WINDOW: 35}
    assert report.rows_accepted == 84_440
    events = pq.read_table(report.events_path)
    assert events.schema == EVENTS_SCHEMA
    assert len(set(events["user_id"].to_pylist())) == 815


@pytest.mark.parametrize(
    "source_format, text, expected_users, expected_items",
    [
        ("sequences", "7 10 11 12\n8 13\n", [7, 7, 7, 8], [10, 11, 12, 13]),
        ("pairs", "7 10\n7 11\n8 13\n", [7, 7, 8], [10, 11, 13]),
        (
            "recbole",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t10\t4\t881250949.0\n8\t11\t3\t881250950\n",
            [7, 8],
            [10, 11],
        ),
    ],
)
def test_ingest_line_formats(tmp_path, source_format, text, expected_users, expected_items):
    (tmp_path / "log.txt").write_text(text)
    report = ingest_events(tmp_path / "log.txt", tmp_path / "out", source_format)
    events = read_events(report.events_path)
    assert report.rejected == {}
    assert events["user_id"].to_pylist() == expected_users
    assert events["item_id"].to_pylist() == expected_items
    assert set(events["behavior"].to_pylist()) == {"pv"}


def test_synthetic_timestamps_keep_file_order(tmp_path):
    (tmp_path / "log.txt").write_text("7 10 11\n8 12\n")
    events = read_events(ingest_events(tmp_path / "log.txt", tmp_path / "out", "sequences").events_path)
    seconds = [ts.timestamp() for ts in events["event_timestamp"].to_pylist()]
    assert seconds == [SYNTHETIC_START_S, SYNTHETIC_START_S + 1, SYNTHETIC_START_S + 2]


def test_recbole_keeps_whole_seconds(tmp_path):
    (tmp_path / "a.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n7\t10\t881250949.7\n")
    events = read_events(ingest_events(tmp_path / "a.inter", tmp_path / "out", "recbole").events_path)
    assert events["event_timestamp"][0].as_py().timestamp() == 881250949


def test_recbole_header_without_timestamp_is_rejected(tmp_path):
    (tmp_path / "a.inter").write_text("user_id:token\titem_id:token\n7\t10\n")
    with pytest.raises(ValueError, match="timestamp"):
        ingest_events(tmp_path / "a.inter", tmp_path / "out", "recbole")


def test_sequence_line_without_items_is_malformed(tmp_path):
    (tmp_path / "log.txt").write_text("7 10 11\n9\n")
    report = ingest_events(tmp_path / "log.txt", tmp_path / "out", "sequences")
    assert report.rejected == {MALFORMED: 1}
    assert report.rows_accepted == 2


def test_item_categories_fill_category_column(tmp_path):
    (tmp_path / "log.txt").write_text("7 10 11\n")
    report = ingest_events(tmp_path / "log.txt", tmp_path / "out", "sequences", item_categories={10: 3})
    assert read_events(report.events_path)["category_id"].to_pylist() == [3, 0]


def test_unknown_format_names_choices(tmp_path):
    (tmp_path / "log.txt").write_text("7 10\n")
    with pytest.raises(ValueError, match="sequences"):
        ingest_events(tmp_path / "log.txt", tmp_path / "out", "xml")


@pytest.mark.parametrize(
    "relative, source_format, users, items, events",
    [
        ("amazon_s3rec/Beauty.txt", "sequences", 22_363, 12_101, 198_502),
        ("amazon_beauty_bert4rec/beauty.txt", "pairs", 40_226, 54_542, 353_962),
        ("ml-100k_recbole/ml-100k.inter", "recbole", 943, 1_682, 100_000),
    ],
)
def test_ingest_real_public_data(tmp_path, relative, source_format, users, items, events):
    report = ingest_events(real_data_path(relative), tmp_path / "out", source_format)
    table = read_events(report.events_path)
    assert report.rejected == {}
    assert table.num_rows == events
    assert len(set(table["user_id"].to_pylist())) == users
    assert len(set(table["item_id"].to_pylist())) == items


# 2017-11-25 00:00 and 2017-12-04 00:00 in China time (UTC+8), as Unix seconds.
TAOBAO_FIRST_S = 1_511_539_200
TAOBAO_END_S = 1_512_316_800


def test_taobao_window_is_china_time():
    assert TAOBAO_WINDOW.bounds_s() == (TAOBAO_FIRST_S, TAOBAO_END_S)


def test_taobao_window_bounds_judged_in_china_time(tmp_path):
    rows = {
        f"1,10,100,pv,{TAOBAO_FIRST_S - 1}": OUTSIDE_WINDOW,  # 2017-11-24 23:59:59 China time
        f"1,11,100,pv,{TAOBAO_FIRST_S}": None,
        f"1,12,100,pv,{TAOBAO_END_S - 1}": None,  # 2017-12-03 23:59:59 China time
        f"1,13,100,pv,{TAOBAO_END_S}": OUTSIDE_WINDOW,
    }
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    report = ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "out")
    events = read_events(report.events_path)
    assert report.rejected == {OUTSIDE_WINDOW: 2}
    assert events["item_id"].to_pylist() == [11, 12]
    assert events["event_timestamp"][0].as_py() == datetime.datetime(2017, 11, 24, 16, tzinfo=datetime.timezone.utc)
    assert events.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")


def test_explicit_window_applies_to_any_format(tmp_path):
    (tmp_path / "a.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n7\t10\t86400\n7\t11\t200000\n")
    window = TimeWindow(datetime.date(1970, 1, 2), datetime.date(1970, 1, 2), "UTC")
    report = ingest_events(tmp_path / "a.inter", tmp_path / "out", "recbole", window=window)
    assert report.rejected == {OUTSIDE_WINDOW: 1}


def test_time_window_rejects_unknown_zone():
    with pytest.raises(ValueError, match="Mars/Olympus"):
        TimeWindow(datetime.date(2017, 11, 25), datetime.date(2017, 12, 3), "Mars/Olympus")


def test_exact_duplicates_keep_first_occurrence(tmp_path):
    lines = [
        "1,10,100,pv,1511544070",
        "1,11,100,pv,1511544070",
        "1,10,100,pv,1511544070",  # exact duplicate of the first line
        "1,10,100,cart,1511544070",  # differs in behaviour: kept
        "2,10,100,pv,1511544070",  # differs in user: kept
        "1,10,100,pv,1511544070",  # second duplicate
    ]
    (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
    report = ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "out")
    events = read_events(report.events_path)
    assert report.rejected == {DUPLICATE: 2}
    assert report.rows_accepted == 4
    assert events["event_position"].to_pylist() == [0, 1, 3, 4]
    quarantine = pacsv.read_csv(report.quarantine_path).to_pylist()
    assert quarantine == [{"reason": DUPLICATE, "raw": lines[0]}] * 2


def test_duplicates_found_across_spill_partitions(tmp_path, monkeypatch):
    import training.events as events_module

    monkeypatch.setattr(events_module, "_DEDUP_PARTITION_BYTES", 40)
    lines = [f"{user},10,100,pv,1511544070" for user in (1, 2, 3, 4, 1, 2)]
    (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
    report = ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "out")
    events = read_events(report.events_path)
    assert report.rejected == {DUPLICATE: 2}
    assert sorted(events["event_position"].to_pylist()) == [0, 1, 2, 3]


def test_equal_timestamps_keep_source_order(tmp_path):
    lines = ["1,30,100,pv,1511544070", "1,10,100,pv,1511544070", "1,20,100,pv,1511544070"]
    (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
    events = read_events(ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "out").events_path)
    assert events["item_id"].to_pylist() == [30, 10, 20]
    assert events["event_position"].to_pylist() == [0, 1, 2]


def test_parquet_source_validated_like_csv(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array([1, 1, 2, 2, 3], pa.int64()),
            "item_id": pa.array([10, 11, 10, 10, 12], pa.int64()),
            "category_id": pa.array([100, 100, 100, 100, None], pa.int64()),
            "behavior_type": ["pv", "buy", "click", "pv", "pv"],
            "timestamp": pa.array([1511544070, 1511544071, 1511544072, -1, 1511544073], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "events.parquet")
    report = ingest_events(tmp_path / "events.parquet", tmp_path / "out", "parquet")
    events = read_events(report.events_path)
    assert report.rejected == {UNKNOWN_BEHAVIOR: 1, NON_POSITIVE_TIMESTAMP: 1, INVALID_INTEGER: 1}
    assert events["item_id"].to_pylist() == [10, 11]
    assert events["event_timestamp"][1].as_py().timestamp() == 1511544071


def test_parquet_source_reads_timestamp_type(tmp_path):
    moment = datetime.datetime(2017, 11, 26, 3, 4, 5, 600_000, tzinfo=datetime.timezone.utc)
    table = pa.table(
        {
            "user_id": pa.array([1], pa.int64()),
            "item_id": pa.array([10], pa.int64()),
            "behavior": ["cart"],
            "timestamp": pa.array([moment], pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, tmp_path / "events.parquet")
    events = read_events(ingest_events(tmp_path / "events.parquet", tmp_path / "out", "parquet").events_path)
    assert events["event_timestamp"][0].as_py() == moment.replace(microsecond=0)
    assert events["behavior"].to_pylist() == ["cart"]
    assert events["category_id"].to_pylist() == [0]


def test_parquet_source_rejects_float_timestamps(tmp_path):
    table = pa.table({"user_id": [1], "item_id": [10], "timestamp": [1511544070.5]})
    pq.write_table(table, tmp_path / "events.parquet")
    with pytest.raises(ValueError, match="timestamp"):
        ingest_events(tmp_path / "events.parquet", tmp_path / "out", "parquet")
