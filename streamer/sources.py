"""Where records come from when they do not come from the live consumer group:
a named dataset, a JSONL, CSV or Parquet file of events, or a range of a Kafka
topic (``kafka:TOPIC``, read without a consumer group, so nothing is committed).

CSV and Parquet rows become the same JSON events as the live stream: columns
``type, impression_id, user_id, item_id, timestamp, clicked`` and, for features,
``context.<name>``, ``user_features.<name>``, ``item_features.<name>`` (a CSV
list value is ``a|b|c``; ``clicked`` is ``true`` or ``false``); Parquet may also
hold them as struct columns, and its bytes (UTF-8), decimals, timestamps and
dates become text, numbers and seconds since the epoch.

Malformed input: a bad line or row is passed on to be dead-lettered, and the rest
of the file is read; a file that cannot be read (not UTF-8 text at some line of a
CSV, not Parquet, unreadable) raises :class:`SourceError` naming the file and
the line or row.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import decimal
import json
import numbers
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydantic_core import from_json

from metarec.datasets import movielens
from metarec.datasets.synthetic import SyntheticStream
from metarec.records import Record
from streamer.cluster import Cluster
from streamer.errors import MissingTopicError, SourceError
from streamer.kafka_io import TopicPoll, TopicRange, read_range

DATASETS = ("movielens-100k", "synthetic")
NESTED = ("context", "user_features", "item_features")
#: a CSV ``clicked`` cell that is a boolean (any case); any other text is refused
CSV_BOOLEANS = {"true": True, "false": False}
#: JSONL lines are cut here (such a record is dead-lettered as oversized unless
#: --max-record-bytes is larger still), and a CSV line or field this long ends the
#: file: it is most likely an unclosed quote
MAX_LINE_BYTES = 16 << 20


def check_source(name: str) -> None:
    """Raise :class:`SourceError` now if ``name`` is a file that cannot be read at
    all (absent, a directory, unreadable, or Parquet without a readable footer):
    before a replay builds and warms up its model, not after."""
    if name in DATASETS or name.startswith("kafka:"):
        return
    path = Path(name)
    if path.is_dir():
        raise SourceError(f"{name} is a directory, not a file of events")
    if not path.is_file():
        raise SourceError(f"{name!r} is neither a dataset ({', '.join(DATASETS)}), "
                          "a kafka:TOPIC, nor a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise SourceError(f"{name}: cannot be read: {exc.strerror}") from None
    if _is_parquet(path):
        _open_parquet(path).close()


def read_source(name: str) -> Iterator[Record]:
    """Records of a dataset or a file, in its order, keyed by user id where one is
    known (a topic is read by :func:`read_topic_batches`)."""
    if name == "movielens-100k":
        yield from (Record(value, key) for key, value in movielens.json_events())
        return
    if name == "synthetic":
        yield from (_record(e) for e in SyntheticStream().events())
        return
    if name.startswith("kafka:"):
        raise SourceError(f"{name}: a topic is a source of replay only")
    check_source(name)
    path = Path(name)
    if path.suffix.lower() == ".csv":
        yield from _read_csv(path)
    elif _is_parquet(path):
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _record(event: dict[str, Any], offset: int = -1) -> Record:
    # ASCII JSON (the rest is escaped), so encoding cannot fail
    return Record(_to_json(event).encode(), key=_key(event.get("user_id")), offset=offset)


def _not_an_event(row: Any, offset: int) -> Record:
    """A row that cannot be turned into an event object goes on as a JSON array,
    which the schema rejects: it is dead-lettered ("schema") and stays readable."""
    return Record(json.dumps(row).encode(), offset=offset)


def _key(user: Any) -> bytes | None:
    """A user id as a partitioning key (none if it is no text)."""
    if user is None:
        return None
    if isinstance(user, bytes):
        return user
    try:
        return str(user).encode()
    except UnicodeEncodeError:  # a lone surrogate; the schema refuses the event anyway
        return None


def _lines(f: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """The file's lines (ends kept), each with whether it was cut at MAX_LINE_BYTES:
    a file without line ends (binary, or one endless line) is never read whole."""
    while line := f.readline(MAX_LINE_BYTES):
        cut = len(line) == MAX_LINE_BYTES and not line.endswith(b"\n")
        if cut:
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
        yield line, cut


def _read_jsonl(path: Path) -> Iterator[Record]:
    """One record per non-blank line. A line cut at MAX_LINE_BYTES goes on cut: it
    is dead-lettered as oversized all the same."""
    with path.open("rb") as f:
        for offset, (line, _) in enumerate(_lines(f)):
            if offset == 0:
                line = line.removeprefix(codecs.BOM_UTF8)  # marks the encoding; not data
            value = line.rstrip(b"\r\n")
            if value.strip():
                yield Record(value, key=_user_key(value), offset=offset)


def _user_key(value: bytes) -> bytes | None:
    # pydantic's parser, as the schema's: it refuses lone surrogates and bounds the
    # nesting depth (json.loads raised RecursionError at 1,000 levels)
    try:
        event = from_json(value)
    except ValueError:
        return None
    return _key(event.get("user_id")) if isinstance(event, dict) else None


def _nest(row: dict[str, Any], split_lists: bool) -> dict[str, Any]:
    """Flat ``group.name`` columns into nested feature maps. Empty cells, and null
    fields of a struct column, are dropped: they say a feature is absent."""
    event: dict[str, Any] = {}
    for column, value in row.items():
        if value is None or value == "":
            continue
        group, _, name = column.partition(".")
        if group in NESTED and name:
            if split_lists and isinstance(value, str) and "|" in value:
                value = value.split("|")
            event.setdefault(group, {})[name] = value
            continue
        if group in NESTED and isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        event[column] = value
    return event


def _read_csv(path: Path) -> Iterator[Record]:
    """One record per row under the header. A row with more or fewer fields than
    the header is dead-lettered (which value is which column would be a guess);
    text that is not UTF-8, or that csv cannot parse, ends the file (SourceError)."""
    # csv's 128 KiB field limit would stop the file at one long field: let it through
    # to be dead-lettered as oversized, like a long JSON line
    if csv.field_size_limit() < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)
    with path.open("rb") as f:
        reader = csv.reader(_csv_lines(f, path))
        try:
            header = next(reader, None)
            if header is None:
                return
            for offset, row in enumerate(row for row in reader if row):  # blank lines skipped
                if len(row) != len(header):
                    yield _not_an_event(row, offset)
                    continue
                event = _nest(dict(zip(header, row, strict=True)), split_lists=True)
                clicked = event.get("clicked")
                if isinstance(clicked, str):  # the schema takes JSON booleans only
                    event["clicked"] = CSV_BOOLEANS.get(clicked.lower(), clicked)
                yield _record(event, offset)
        except csv.Error as exc:
            raise SourceError(f"{path} line {reader.line_num}: not CSV: {exc}") from None


_BARE_CR = re.compile(rb"(?<=\r)(?!\n)")


def _csv_lines(f: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as text for csv, ends kept and a bare CR ending a line too
    (as ``open(newline="")`` gives them), decoded one at a time: so that bytes that
    are not UTF-8 are reported at their line."""
    number = 0
    for chunk, cut in _lines(f):
        if cut:
            raise SourceError(f"{path} line {number + 1}: longer than {MAX_LINE_BYTES} bytes")
        for line in _BARE_CR.split(chunk) if b"\r" in chunk else (chunk,):
            if not line:
                continue
            number += 1
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            try:
                yield line.decode()
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path} line {number}: not UTF-8 text (byte "
                                  f"{line[exc.start]:#04x} at byte {exc.start + 1} of the line)"
                                  ) from None


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _open_parquet(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_error(path, 0, exc) from None


def _parquet_error(path: Path, rows_read: int, exc: Exception) -> SourceError:
    cause = " ".join(str(exc).split())  # Arrow's messages may span lines
    return SourceError(f"{path}: cannot be read as Parquet from row {rows_read + 1} on: {cause}")


def _read_parquet(path: Path) -> Iterator[Record]:
    """One record per row. A value with no JSON form (bytes that are not UTF-8, a
    type to_pylist cannot convert) dead-letters its row; a part of the file that
    cannot be read ends it (SourceError, from the first row not read)."""
    offset = 0
    with _open_parquet(path) as parquet:
        for group in range(parquet.num_row_groups):
            # a row group at a time: the reader reads ahead within one, so an error
            # found there is reported from the group's first row, not from the file's
            yield from _parquet_rows(path, parquet.iter_batches(batch_size=10_000,
                                                                row_groups=[group]), offset)
            offset += parquet.metadata.row_group(group).num_rows


def _parquet_rows(path: Path, batches: Iterator[Any], offset: int) -> Iterator[Record]:
    import pyarrow as pa

    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_error(path, offset, exc) from None
        if batch is None:
            return
        for row in _python_rows(_in_seconds(batch)):
            if isinstance(row, Exception):
                yield _not_an_event([f"no JSON form: {row}"], offset)
            else:
                try:
                    yield _record(_nest(row, split_lists=False), offset)
                except (TypeError, ValueError) as exc:
                    yield _not_an_event([f"no JSON form: {exc}"], offset)
            offset += 1


#: (numerator, denominator) from a temporal column's integers to seconds
_SECONDS = {"s": (1, 1), "ms": (1, 1000), "us": (1, 10**6), "ns": (1, 10**9)}


def _in_seconds(batch: Any) -> Any:
    """Timestamp, date and duration columns as float seconds, as events hold time
    (a timestamp without a time zone is taken as UTC). From their integers, in
    Python: exact, and to_pylist would need pandas for nanoseconds."""
    import pyarrow as pa

    columns, changed = [], False
    for column in batch.columns:
        kind = column.type
        if pa.types.is_timestamp(kind) or pa.types.is_duration(kind):
            num, den = _SECONDS[kind.unit]
        elif pa.types.is_date32(kind):
            num, den = 86400, 1
        elif pa.types.is_date64(kind):
            num, den = 1, 1000
        else:
            columns.append(column)
            continue
        ints = column.view(pa.int32() if pa.types.is_date32(kind) else pa.int64()).to_pylist()
        columns.append(pa.array([None if v is None else v * num / den for v in ints],
                                pa.float64()))
        changed = True
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names) if changed else batch


def _python_rows(batch: Any) -> Iterator[dict[str, Any] | Exception]:
    """The batch's rows as Python values, or for a row that cannot be, why."""
    import pyarrow as pa

    errors = (pa.ArrowException, TypeError, ValueError, OverflowError)
    try:
        rows = batch.to_pylist()
    except errors:
        rows = None
    if rows is not None:
        yield from rows
        return
    for i in range(batch.num_rows):  # only the rows that cannot be converted are lost
        try:
            [row] = batch.slice(i, 1).to_pylist()
        except errors as exc:
            yield exc
        else:
            yield row


def _jsonable(value: Any) -> Any:
    """A Parquet value's form in a JSON event, for the types json.dumps does not know."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise ValueError(f"bytes {value[:32]!r} are not UTF-8 text") from None
    if isinstance(value, decimal.Decimal | numbers.Real):  # numbers.Real: e.g. a float16
        return float(value)
    if isinstance(value, datetime.datetime):  # in a struct or list (columns are converted)
        return (value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time(), datetime.UTC).timestamp()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, datetime.time):  # a time of day is no point in time: kept as text
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} value has no JSON form")


# json.dumps with a default= builds an encoder per call
_to_json = json.JSONEncoder(default=_jsonable).encode


def read_topic_batches(cluster: Cluster, topic: str, rng: TopicRange) -> Iterator[TopicPoll]:
    """A topic range a poll at a time (:func:`streamer.kafka_io.read_range`)."""
    try:
        yield from read_range(cluster, topic, rng)
    except MissingTopicError as exc:
        raise SourceError(str(exc)) from exc


def batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
