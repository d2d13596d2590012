import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from training.events import (
    INVALID_INTEGER,
    MALFORMED,
    NON_POSITIVE_TIMESTAMP,
    SYNTHETIC_START_S,
    UNKNOWN_BEHAVIOR,
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
    # The sample's last line is cut after four fields.
    assert report.rejected == {MALFORMED: 1}
    assert report.rows_accepted == 84_475
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
