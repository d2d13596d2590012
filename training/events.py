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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from training import storage
from training.schema import (
    BEHAVIOR,
    BEHAVIORS,
    CATEGORY_ID,
    EVENT_POSITION,
    EVENT_TIMESTAMP,
    EVENTS_SCHEMA,
    ITEM_ID,
    USER_ID,
)

logger = logging.getLogger(__name__)

TAOBAO_COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID, "behavior_type", "timestamp")

# Source formats that ``ingest_events`` reads.
TAOBAO = "taobao"
SEQUENCES = "sequences"
PAIRS = "pairs"
RECBOLE = "recbole"
FORMATS = (TAOBAO, SEQUENCES, PAIRS, RECBOLE)

# Synthetic clock for formats without timestamps: 2001-09-09 UTC, then one second per event.
SYNTHETIC_START_S = 1_000_000_000

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
    """Convert a Taobao UserBehavior CSV into canonical events Parquet; see ``ingest_events``."""
    return ingest_events(source, output_dir, TAOBAO)


def ingest_events(
    source: str | Path,
    output_dir: str | Path,
    source_format: str = TAOBAO,
    item_categories: dict[int, int] | None = None,
    default_behavior: str = "pv",
) -> IngestReport:
    """Convert an event log into canonical events Parquet.

    Formats (``FORMATS``):

    - ``taobao``: CSV without a header, ``user_id,item_id,category_id,behavior_type,timestamp``
      with Unix seconds;
    - ``sequences``: one user per line, ``user_id item_id item_id ...``, oldest first;
    - ``pairs``: ``user_id item_id`` per line, in time order per user;
    - ``recbole``: a RecBole atomic ``.inter`` file, tab-separated with a typed header such as
      ``user_id:token item_id:token rating:float timestamp:float``.

    Formats without timestamps get synthetic ones, ``SYNTHETIC_START_S`` plus the event's position
    in the file, which keeps each user's order. Formats without categories take them from
    ``item_categories`` (raw item id to raw category id), else 0, and formats without behaviour
    types get ``default_behavior``. Writes ``events.parquet``, ``quarantine.csv`` and
    ``ingest_report.json`` into ``output_dir`` and returns the report. Both locations may be local
    paths or URIs. The file is read in blocks, so memory stays bounded whatever its size.
    """
    if source_format not in FORMATS:
        raise ValueError(f"unknown source format {source_format!r}; expected one of {FORMATS}")
    if default_behavior not in BEHAVIORS:
        raise ValueError(f"default_behavior must be one of {BEHAVIORS}, got {default_behavior!r}")
    source, output_dir = storage.normalize(source), storage.normalize(output_dir)
    if not storage.exists(source):
        raise FileNotFoundError(f"events file not found: {source}")
    storage.make_dirs(output_dir)
    report = IngestReport(
        source=source,
        events_path=storage.join(output_dir, "events.parquet"),
        quarantine_path=storage.join(output_dir, "quarantine.csv"),
    )
    events_fs, events_path = storage.resolve(report.events_path)
    quarantine_fs, quarantine_path = storage.resolve(report.quarantine_path)
    defaults = _Defaults(item_categories or {}, default_behavior)

    malformed_lines: list[str] = []
    with (
        pq.ParquetWriter(events_path, EVENTS_SCHEMA, filesystem=events_fs) as events_writer,
        quarantine_fs.open_output_stream(quarantine_path) as quarantine_stream,
        pacsv.CSVWriter(quarantine_stream, QUARANTINE_SCHEMA) as quarantine_writer,
    ):
        for table in _raw_batches(source, source_format, malformed_lines, defaults):
            first_position = report.rows_read
            report.rows_read += table.num_rows
            events, rejected = _validate_batch(table, report, first_position)
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


@dataclasses.dataclass
class _Defaults:
    """Values for the columns that a source format lacks, and the synthetic clock."""

    item_categories: dict[int, int]
    behavior: str
    next_timestamp_s: int = SYNTHETIC_START_S

    def categories(self, item_ids: pa.Array) -> pa.Array:
        if not self.item_categories:
            return pa.array(["0"] * len(item_ids), pa.string())
        keys = pa.array([str(item) for item in self.item_categories], pa.string())
        values = pa.array([str(category) for category in self.item_categories.values()], pa.string())
        return pc.fill_null(pc.take(values, pc.index_in(item_ids, keys)), "0")

    def timestamps(self, count: int) -> pa.Array:
        start = self.next_timestamp_s
        self.next_timestamp_s += count
        return pa.array([str(value) for value in range(start, start + count)], pa.string())


def _raw_batches(source: str, source_format: str, malformed_lines: list[str], defaults: _Defaults):
    """Yield blocks of the source as string columns named ``TAOBAO_COLUMNS``."""

    def keep_malformed(row: pacsv.InvalidRow) -> str:
        malformed_lines.append(row.text)
        return "skip"

    filesystem, path = storage.resolve(source)
    skip_rows, delimiter, column_names = 0, ",", list(TAOBAO_COLUMNS)
    if source_format == RECBOLE:
        with filesystem.open_input_stream(path) as stream:
            header = stream.read(65_536).decode("utf-8", errors="replace").split("\n", 1)[0].rstrip("\r")
        column_names = [field.split(":")[0] for field in header.split("\t")]
        missing = {USER_ID, ITEM_ID, "timestamp"} - set(column_names)
        if missing:
            raise ValueError(f"RecBole header of {source} lacks fields {sorted(missing)}: {header!r}")
        skip_rows, delimiter = 1, "\t"
    elif source_format == PAIRS:
        delimiter, column_names = " ", [USER_ID, ITEM_ID]
    elif source_format == SEQUENCES:
        # No line contains the unit separator, so each line arrives whole in one column.
        delimiter, column_names = "\x1f", ["line"]

    with filesystem.open_input_stream(path) as stream:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(
                column_names=column_names, skip_rows=skip_rows, block_size=_READ_BLOCK_SIZE_BYTES, use_threads=False
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=keep_malformed),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in column_names}),
        )
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if source_format == TAOBAO:
                yield table
            elif source_format == SEQUENCES:
                yield _explode_sequences(table, malformed_lines, defaults)
            else:
                if source_format == RECBOLE:
                    # RecBole stores times as floats; whole seconds are kept.
                    timestamps = pc.replace_substring_regex(table["timestamp"], r"\.[0-9]*$", "")
                else:
                    timestamps = defaults.timestamps(table.num_rows)
                yield _with_defaults(table[USER_ID], table[ITEM_ID], timestamps, defaults)


def _explode_sequences(lines: pa.Table, malformed_lines: list[str], defaults: _Defaults) -> pa.Table:
    tokens = pc.split_pattern(pc.utf8_trim_whitespace(lines["line"]), " ")
    too_short = pc.less(pc.list_value_length(tokens), 2).to_numpy(zero_copy_only=False)
    malformed_lines.extend(lines["line"].filter(pa.array(too_short)).to_pylist())
    tokens = tokens.filter(pa.array(~too_short)).combine_chunks()
    users = pc.list_element(tokens, 0)
    items = pc.list_flatten(pc.list_slice(tokens, 1))
    parents = pc.list_parent_indices(pc.list_slice(tokens, 1))
    return _with_defaults(pc.take(users, parents), items, defaults.timestamps(len(items)), defaults)


def _with_defaults(users, items, timestamps, defaults: _Defaults) -> pa.Table:
    items = items.combine_chunks() if isinstance(items, pa.ChunkedArray) else items
    return pa.table(
        {
            USER_ID: users,
            ITEM_ID: items,
            CATEGORY_ID: defaults.categories(items),
            "behavior_type": pa.array([defaults.behavior] * len(items), pa.string()),
            "timestamp": timestamps,
        }
    )


def _validate_batch(table: pa.Table, report: IngestReport, first_position: int) -> tuple[pa.Table, pa.Table]:
    """Split one block of string columns into canonical events and quarantined rows.

    ``first_position`` is the position of the block's first row in the source.
    """
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
            EVENT_POSITION: pa.array(np.arange(first_position, first_position + table.num_rows)).filter(is_valid),
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
