"""Ingestion of raw behaviour events into the canonical events schema.

Every row that fails validation goes to a quarantine file with its reason, and the ingest report
counts rejected rows by reason, so no row is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from training import storage
from training.schema import BEHAVIOR, BEHAVIORS, CATEGORY_ID, EVENT_TIMESTAMP, EVENTS_SCHEMA, ITEM_ID, USER_ID

logger = logging.getLogger(__name__)

TAOBAO_COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID, "behavior_type", "timestamp")

# Reasons a row is rejected, as they appear in the report and the quarantine file.
MALFORMED = "malformed"
INVALID_INTEGER = "invalid_integer"
NON_POSITIVE_TIMESTAMP = "non_positive_timestamp"
UNKNOWN_BEHAVIOR = "unknown_behavior"

_INTEGER_PATTERN = r"^[+-]?[0-9]{1,18}$"
_READ_BLOCK_SIZE_BYTES = 16 << 20

QUARANTINE_SCHEMA = pa.schema([pa.field("reason", pa.string()), pa.field("raw", pa.string())])


@dataclasses.dataclass
class IngestReport:
    """Row counts of one ingestion run, with rejected rows counted by reason."""

    source: str
    events_path: str
    quarantine_path: str
    rows_read: int = 0
    rows_accepted: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def add_rejected(self, reason: str, count: int) -> None:
        if count:
            self.rejected[reason] = self.rejected.get(reason, 0) + count

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rows_rejected": self.rows_rejected}


def ingest_taobao_csv(source: str | Path, output_dir: str | Path) -> IngestReport:
    """Convert a Taobao UserBehavior CSV into canonical events Parquet.

    The CSV has no header and the columns ``user_id,item_id,category_id,behavior_type,timestamp``
    (Unix seconds). Writes ``events.parquet``, ``quarantine.csv`` and ``ingest_report.json`` into
    ``output_dir`` and returns the report. Both locations may be local paths or URIs. The file is
    read in blocks, so memory stays bounded whatever its size.
    """
    source, output_dir = storage.normalize(source), storage.normalize(output_dir)
    if not storage.exists(source):
        raise FileNotFoundError(f"events file not found: {source}")
    storage.make_dirs(output_dir)
    report = IngestReport(
        source=source,
        events_path=storage.join(output_dir, "events.parquet"),
        quarantine_path=storage.join(output_dir, "quarantine.csv"),
    )
    source_fs, source_path = storage.resolve(source)
    events_fs, events_path = storage.resolve(report.events_path)
    quarantine_fs, quarantine_path = storage.resolve(report.quarantine_path)

    malformed_lines: list[str] = []

    def keep_malformed(row: pacsv.InvalidRow) -> str:
        malformed_lines.append(row.text)
        return "skip"

    input_stream = source_fs.open_input_stream(source_path)
    reader = pacsv.open_csv(
        input_stream,
        read_options=pacsv.ReadOptions(
            column_names=list(TAOBAO_COLUMNS), block_size=_READ_BLOCK_SIZE_BYTES, use_threads=False
        ),
        parse_options=pacsv.ParseOptions(invalid_row_handler=keep_malformed),
        convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in TAOBAO_COLUMNS}),
    )
    with (
        input_stream,
        pq.ParquetWriter(events_path, EVENTS_SCHEMA, filesystem=events_fs) as events_writer,
        quarantine_fs.open_output_stream(quarantine_path) as quarantine_stream,
        pacsv.CSVWriter(quarantine_stream, QUARANTINE_SCHEMA) as quarantine_writer,
    ):
        for batch in reader:
            report.rows_read += batch.num_rows
            events, rejected = _validate_taobao_batch(pa.Table.from_batches([batch]), report)
            events_writer.write_table(events)
            report.rows_accepted += events.num_rows
            if rejected.num_rows:
                quarantine_writer.write_table(rejected)
        if malformed_lines:
            report.rows_read += len(malformed_lines)
            report.add_rejected(MALFORMED, len(malformed_lines))
            quarantine_writer.write_table(
                pa.table({"reason": [MALFORMED] * len(malformed_lines), "raw": malformed_lines}, QUARANTINE_SCHEMA)
            )

    storage.write_text(storage.join(output_dir, "ingest_report.json"), json.dumps(report.to_dict(), indent=2))
    if report.rows_rejected:
        logger.warning(
            "Quarantined %d of %d rows from %s: %s (see %s)",
            report.rows_rejected,
            report.rows_read,
            source,
            report.rejected,
            report.quarantine_path,
        )
    logger.info("Ingested %d events from %s into %s", report.rows_accepted, source, report.events_path)
    return report


def _validate_taobao_batch(table: pa.Table, report: IngestReport) -> tuple[pa.Table, pa.Table]:
    """Split one block of string columns into canonical events and quarantined rows."""
    integer_columns = (USER_ID, ITEM_ID, CATEGORY_ID, "timestamp")
    is_integer = functools.reduce(
        pc.and_,
        [pc.fill_null(pc.match_substring_regex(table[name], _INTEGER_PATTERN), False) for name in integer_columns],
    )

    # Timestamps are checked only on rows whose integers parsed, so each row gets one reason.
    safe_timestamps = pc.if_else(is_integer, table["timestamp"], "1")
    timestamps_s = pc.cast(safe_timestamps, pa.int64())
    is_positive = pc.greater(timestamps_s, 0)
    is_known_behavior = pc.fill_null(pc.is_in(table["behavior_type"], pa.array(BEHAVIORS)), False)

    reasons = pc.case_when(
        pc.make_struct(pc.invert(is_integer), pc.invert(is_positive), pc.invert(is_known_behavior)),
        INVALID_INTEGER,
        NON_POSITIVE_TIMESTAMP,
        UNKNOWN_BEHAVIOR,
    )
    is_valid = pc.is_null(reasons)

    valid = table.filter(is_valid)
    events = pa.table(
        {
            USER_ID: pc.cast(valid[USER_ID], pa.int64()),
            ITEM_ID: pc.cast(valid[ITEM_ID], pa.int64()),
            CATEGORY_ID: pc.cast(valid[CATEGORY_ID], pa.int64()),
            BEHAVIOR: valid["behavior_type"],
            EVENT_TIMESTAMP: pc.cast(
                pc.multiply(pc.cast(valid["timestamp"], pa.int64()), 1_000_000), pa.timestamp("us", tz="UTC")
            ),
        },
        schema=EVENTS_SCHEMA,
    )

    invalid_mask = pc.invert(is_valid)
    invalid = table.filter(invalid_mask)
    invalid_reasons = reasons.filter(invalid_mask)
    raw = pc.binary_join_element_wise(*[pc.fill_null(invalid[name], "") for name in TAOBAO_COLUMNS], ",")
    rejected = pa.table({"reason": invalid_reasons, "raw": raw}, QUARANTINE_SCHEMA)
    for reason, count in zip(*_value_counts(invalid_reasons)):
        report.add_rejected(reason, count)
    return events, rejected


def _value_counts(values: pa.Array) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(values)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def read_events(location: str | Path) -> pa.Table:
    """Read canonical events Parquet and check that it matches the events schema."""
    filesystem, path = storage.resolve(location)
    table = pq.read_table(path, filesystem=filesystem)
    missing = [name for name in EVENTS_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{location} is missing event columns {missing}; expected {EVENTS_SCHEMA.names}")
    return table.select(EVENTS_SCHEMA.names).cast(EVENTS_SCHEMA)
