import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from training.events import (
    INVALID_INTEGER,
    MALFORMED,
    NON_POSITIVE_TIMESTAMP,
    UNKNOWN_BEHAVIOR,
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
