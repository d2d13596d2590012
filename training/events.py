"""Ingestion of raw behaviour events into the canonical events schema.

Every row that fails validation goes to a quarantine file with its reason, and the ingest report
counts rejected rows by reason, so no row is dropped silently.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import shutil
import tempfile
import zoneinfo
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
PARQUET = "parquet"
SEQUENCES = "sequences"
PAIRS = "pairs"
RECBOLE = "recbole"
FORMATS = (TAOBAO, PARQUET, SEQUENCES, PAIRS, RECBOLE)

# Synthetic clock for formats without timestamps: 2001-09-09 UTC, then one second per event.
SYNTHETIC_START_S = 1_000_000_000

# Reasons a row is rejected, as they appear in the report and the quarantine file.
MALFORMED = "malformed"
INVALID_INTEGER = "invalid_integer"
NON_POSITIVE_TIMESTAMP = "non_positive_timestamp"
OUTSIDE_WINDOW = "outside_window"
UNKNOWN_BEHAVIOR = "unknown_behavior"
DUPLICATE = "duplicate"

_INTEGER_PATTERN = r"^[+-]?[0-9]{1,18}$"
_READ_BLOCK_SIZE_BYTES = 16 << 20
# Source bytes per spill partition of the duplicate check: one partition is read back whole.
_DEDUP_PARTITION_BYTES = 512 << 20
_DEDUP_KEY = (USER_ID, EVENT_TIMESTAMP, ITEM_ID, CATEGORY_ID, BEHAVIOR)

QUARANTINE_SCHEMA = pa.schema([pa.field("reason", pa.string()), pa.field("raw", pa.string())])


@dataclasses.dataclass(frozen=True)
class TimeWindow:
    """Calendar days, both inclusive, in which a source declares its events, in the source's time zone."""

    first_day: datetime.date
    last_day: datetime.date
    time_zone: str

    def __post_init__(self) -> None:
        if self.last_day < self.first_day:
            raise ValueError(f"last_day {self.last_day} is before first_day {self.first_day}")
        try:
            zoneinfo.ZoneInfo(self.time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.time_zone!r}; use an IANA name such as 'Asia/Shanghai'") from None

    def bounds_s(self) -> tuple[int, int]:
        """Return the window as UTC Unix seconds: the first second inside it and the first after it."""
        zone = zoneinfo.ZoneInfo(self.time_zone)
        start = datetime.datetime.combine(self.first_day, datetime.time(), zone)
        end = datetime.datetime.combine(self.last_day + datetime.timedelta(days=1), datetime.time(), zone)
        return int(start.timestamp()), int(end.timestamp())


# Taobao UserBehavior covers 2017-11-25 to 2017-12-03 in China time. The file contains a few events
# outside those days, which are quarantined.
TAOBAO_WINDOW = TimeWindow(datetime.date(2017, 11, 25), datetime.date(2017, 12, 3), "Asia/Shanghai")
DECLARED_WINDOWS: dict[str, TimeWindow] = {TAOBAO: TAOBAO_WINDOW}
"""Time window of each source format that declares one; other formats accept any positive time."""


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
    window: TimeWindow | None = None,
) -> IngestReport:
    """Convert an event log into canonical events Parquet.

    Formats (``FORMATS``):

    - ``taobao``: CSV without a header, ``user_id,item_id,category_id,behavior_type,timestamp``
      with Unix seconds;
    - ``parquet``: columns ``user_id``, ``item_id``, optional ``category_id``, ``behavior_type``
      (or ``behavior``) and ``timestamp`` (integer Unix seconds, or a timestamp type);
    - ``sequences``: one user per line, ``user_id item_id item_id ...``, oldest first;
    - ``pairs``: ``user_id item_id`` per line, in time order per user;
    - ``recbole``: a RecBole atomic ``.inter`` file, tab-separated with a typed header such as
      ``user_id:token item_id:token rating:float timestamp:float``.

    Formats without timestamps get synthetic ones, ``SYNTHETIC_START_S`` plus the event's position
    in the file, which keeps each user's order. Formats without categories take them from
    ``item_categories`` (raw item id to raw category id), else 0, and formats without behaviour
    types get ``default_behavior``.

    Rows are rejected, in this order of precedence: lines that do not parse (``malformed``),
    fields that are not integers (``invalid_integer``), timestamps at or below 0
    (``non_positive_timestamp``), timestamps outside ``window`` (``outside_window``; by default the
    format's entry in ``DECLARED_WINDOWS``, judged in the source's time zone), unknown behaviour
    types (``unknown_behavior``), and exact duplicates (``duplicate``): an event equal to an earlier
    one in user, item, category, behaviour and second. The first occurrence in the file is kept.

    Writes ``events.parquet``, ``quarantine.csv`` and ``ingest_report.json`` into ``output_dir``
    and returns the report. Both locations may be local paths or URIs. The file is read in blocks
    and spilled to local temporary partitions by user for the duplicate check, so memory stays
    bounded by one partition (about ``_DEDUP_PARTITION_BYTES`` of source text) whatever the size.
    Events keep their order in the source within a partition; ``event_position`` records it.
    """
    if source_format not in FORMATS:
        raise ValueError(f"unknown source format {source_format!r}; expected one of {FORMATS}")
    if default_behavior not in BEHAVIORS:
        raise ValueError(f"default_behavior must be one of {BEHAVIORS}, got {default_behavior!r}")
    source, output_dir = storage.normalize(source), storage.normalize(output_dir)
    if not storage.exists(source):
        raise FileNotFoundError(f"events file not found: {source}")
    window = window or DECLARED_WINDOWS.get(source_format)
    storage.make_dirs(output_dir)
    report = IngestReport(
        source=source,
        events_path=storage.join(output_dir, "events.parquet"),
        quarantine_path=storage.join(output_dir, "quarantine.csv"),
    )
    events_fs, events_path = storage.resolve(report.events_path)
    quarantine_fs, quarantine_path = storage.resolve(report.quarantine_path)
    defaults = _Defaults(item_categories or {}, default_behavior)
    source_fs, source_path = storage.resolve(source)
    num_partitions = max(1, math.ceil(source_fs.get_file_info(source_path).size / _DEDUP_PARTITION_BYTES))

    malformed_lines: list[str] = []
    spill_dir = Path(tempfile.mkdtemp(prefix="seqrec-ingest-"))
    try:
        with (
            quarantine_fs.open_output_stream(quarantine_path) as quarantine_stream,
            pacsv.CSVWriter(quarantine_stream, QUARANTINE_SCHEMA) as quarantine_writer,
        ):
            with _Partitions(spill_dir, num_partitions) as partitions:
                for table in _raw_batches(source, source_format, malformed_lines, defaults):
                    first_position = report.rows_read
                    report.rows_read += table.num_rows
                    events, rejected = _validate_batch(table, report, first_position, window)
                    partitions.write(events)
                    if rejected.num_rows:
                        quarantine_writer.write_table(rejected)
            with pq.ParquetWriter(events_path, EVENTS_SCHEMA, filesystem=events_fs) as events_writer:
                for events in partitions.read():
                    events, duplicates = split_duplicates(events)
                    events_writer.write_table(events)
                    report.rows_accepted += events.num_rows
                    if duplicates.num_rows:
                        report.add_rejected(DUPLICATE, duplicates.num_rows)
                        quarantine_writer.write_table(_quarantine_rows(duplicates, DUPLICATE))
            if malformed_lines:
                report.rows_read += len(malformed_lines)
                report.add_rejected(MALFORMED, len(malformed_lines))
                quarantine_writer.write_table(
                    pa.table({"reason": [MALFORMED] * len(malformed_lines), "raw": malformed_lines}, QUARANTINE_SCHEMA)
                )
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

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


def split_duplicates(events: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split events into the first occurrence of each event and its later exact duplicates.

    Two events are duplicates when user, item, category, behaviour and timestamp are all equal.
    The one with the smallest ``event_position`` is kept. Both outputs are in position order.
    """
    if events.num_rows == 0:
        return events, events
    order = pc.sort_indices(events, [(name, "ascending") for name in (*_DEDUP_KEY, EVENT_POSITION)])
    ordered = events.take(order)
    same_as_previous = np.zeros(ordered.num_rows, dtype=bool)
    same_as_previous[1:] = True
    for name in _DEDUP_KEY:
        values = ordered[name]
        if values.type == pa.string():
            values = pc.dictionary_encode(values.combine_chunks()).indices
        values = pc.cast(values, pa.int64()).to_numpy()
        same_as_previous[1:] &= values[1:] == values[:-1]
    kept, duplicates = ordered.filter(pa.array(~same_as_previous)), ordered.filter(pa.array(same_as_previous))
    by_position = [(EVENT_POSITION, "ascending")]
    return kept.take(pc.sort_indices(kept, by_position)), duplicates.take(pc.sort_indices(duplicates, by_position))


class _Partitions:
    """Local Parquet spill files of validated events, partitioned by user so duplicates meet."""

    def __init__(self, folder: Path, num_partitions: int) -> None:
        self.paths = [folder / f"part-{index:05d}.parquet" for index in range(num_partitions)]
        self.writers: list[pq.ParquetWriter] = []

    def __enter__(self) -> "_Partitions":
        self.writers = [pq.ParquetWriter(path, EVENTS_SCHEMA) for path in self.paths]
        return self

    def __exit__(self, *exc_info) -> None:
        for writer in self.writers:
            writer.close()

    def write(self, events: pa.Table) -> None:
        if len(self.writers) == 1:
            self.writers[0].write_table(events)
            return
        partition = events[USER_ID].to_numpy() % len(self.writers)
        for index, writer in enumerate(self.writers):
            writer.write_table(events.filter(pa.array(partition == index)))

    def read(self):
        for path in self.paths:
            yield pq.read_table(path)


def _quarantine_rows(events: pa.Table, reason: str) -> pa.Table:
    """Quarantine rows for canonical events, with ``raw`` in the Taobao CSV layout."""
    seconds = pc.divide(pc.cast(events[EVENT_TIMESTAMP], pa.int64()), 1_000_000)
    fields = [events[USER_ID], events[ITEM_ID], events[CATEGORY_ID], events[BEHAVIOR], seconds]
    raw = pc.binary_join_element_wise(*[pc.cast(field, pa.string()) for field in fields], ",")
    return pa.table({"reason": pa.array([reason] * events.num_rows, pa.string()), "raw": raw}, QUARANTINE_SCHEMA)


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
    if source_format == PARQUET:
        yield from _parquet_batches(filesystem, path, defaults)
        return
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


def _parquet_batches(filesystem, path: str, defaults: _Defaults):
    """Yield blocks of a Parquet event log as string columns named ``TAOBAO_COLUMNS``."""
    parquet_file = pq.ParquetFile(path, filesystem=filesystem)
    names = set(parquet_file.schema_arrow.names)
    behavior_column = "behavior_type" if "behavior_type" in names else BEHAVIOR
    missing = {USER_ID, ITEM_ID, "timestamp"} - names
    if missing:
        raise ValueError(f"Parquet events in {path} lack columns {sorted(missing)}; found {sorted(names)}")
    timestamp_type = parquet_file.schema_arrow.field("timestamp").type
    if not (pa.types.is_integer(timestamp_type) or pa.types.is_timestamp(timestamp_type)):
        raise ValueError(
            f"column 'timestamp' of {path} has type {timestamp_type}; expected integer Unix seconds or a timestamp"
        )
    for batch in parquet_file.iter_batches(batch_size=1 << 20):
        table = pa.Table.from_batches([batch])
        timestamps = table["timestamp"]
        if pa.types.is_timestamp(timestamp_type):
            # Whole seconds since the epoch, rounded down, whatever the unit.
            timestamps = pc.cast(pc.cast(timestamps, pa.timestamp("s", tz="UTC"), safe=False), pa.int64())
        columns = {
            USER_ID: pc.cast(table[USER_ID], pa.string()),
            ITEM_ID: pc.cast(table[ITEM_ID], pa.string()),
            CATEGORY_ID: (
                pc.cast(table[CATEGORY_ID], pa.string())
                if CATEGORY_ID in names
                else defaults.categories(pc.cast(table[ITEM_ID], pa.string()).combine_chunks())
            ),
            "behavior_type": (
                pc.cast(table[behavior_column], pa.string())
                if behavior_column in names
                else pa.array([defaults.behavior] * table.num_rows, pa.string())
            ),
            "timestamp": pc.cast(timestamps, pa.string()),
        }
        yield pa.table(columns)


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


def _validate_batch(
    table: pa.Table, report: IngestReport, first_position: int, window: TimeWindow | None
) -> tuple[pa.Table, pa.Table]:
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
    in_window = pa.array(np.ones(table.num_rows, dtype=bool))
    if window is not None:
        start_s, end_s = window.bounds_s()
        in_window = pc.and_(pc.greater_equal(timestamps_s, start_s), pc.less(timestamps_s, end_s))
    is_known_behavior = pc.fill_null(pc.is_in(table["behavior_type"], pa.array(BEHAVIORS)), False)

    reasons = pc.case_when(
        pc.make_struct(
            pc.invert(is_integer), pc.invert(is_positive), pc.invert(in_window), pc.invert(is_known_behavior)
        ),
        INVALID_INTEGER,
        NON_POSITIVE_TIMESTAMP,
        OUTSIDE_WINDOW,
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
