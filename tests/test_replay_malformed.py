"""``metarec replay FILE`` on malformed files never ends in a traceback.

A bad record (one line or row) is a dead letter, counted by reason in the
summary, and the valid records around it are still learned (exit 0). A file that
cannot be read at all is one line on stderr naming the file and where in it
reading stopped (exit 2).

Each case runs the command's entry point (``streamer.cli.main``) in this
process, so an exception that escapes it fails the test; two cases also run the
real command in a subprocess, to hold the exit codes and stderr of the program
itself (a process costs some 8 s of CPU, mostly importing torch).
"""

from __future__ import annotations

import contextlib
import csv
import decimal
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

T0 = 1_700_000_000.5
VALID: list[dict[str, Any]] = [
    {"type": "impression", "impression_id": f"ok-{n}", "user_id": f"u{n % 3}",
     "item_id": f"i{n}", "timestamp": T0 + 60 * n, "clicked": n % 2 == 0,
     "context": {"platform": "web"}, "item_features": {"genre": ["a", "b"]}}
    for n in range(8)
]
SMALL = ["--item-buckets", "1024", "--feature-buckets", "512", "--dim", "8",
         "--metrics-port", "0"]


@dataclass(frozen=True)
class Learned:
    """Exit 0: exactly these dead letters by reason, and a prediction for each of
    the first ``valid`` VALID events, which the file holds."""

    dead: dict[str, int]
    valid: int = len(VALID)


@dataclass(frozen=True)
class Refused:
    """Exit 2: a single line on stderr with the file's name and ``where``."""

    where: str


Build = Callable[[Path], object]


def bad(**changes: Any) -> dict[str, Any]:
    return {**VALID[0], "impression_id": "bad", **changes}


def jsonl(*bad_lines: bytes | dict[str, Any], newline: bytes = b"\n",
          prefix: bytes = b"") -> Build:
    """VALID as JSON lines, ``bad_lines`` in the middle (a dict is dumped as JSON)."""
    def build(path: Path) -> None:
        extra = [b if isinstance(b, bytes) else json.dumps(b).encode() for b in bad_lines]
        lines = [json.dumps(e).encode() for e in VALID]
        path.write_bytes(prefix + b"".join(
            line + newline for line in lines[:4] + extra + lines[4:]))
    return build


COLUMNS = ["type", "impression_id", "user_id", "item_id", "timestamp", "clicked",
           "context.platform", "item_features.genre"]


def csv_fields(event: dict[str, Any]) -> list[str]:
    return [event["type"], event["impression_id"], event["user_id"], event["item_id"],
            repr(event["timestamp"]), str(event["clicked"]).lower(),
            event["context"]["platform"], "|".join(event["item_features"]["genre"])]


def csv_text(*bad_rows: list[str], rows: int = len(VALID)) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    body = [csv_fields(e) for e in VALID[:rows]]
    w.writerows(body[:4] + list(bad_rows) + body[4:])
    return out.getvalue()


def write_csv(*bad_rows: list[str], rows: int = len(VALID)) -> Build:
    return lambda path: path.write_text(csv_text(*bad_rows, rows=rows))


def write_bytes(data: bytes) -> Build:
    return lambda path: path.write_bytes(data)


def non_utf8_csv(path: Path) -> None:
    text = csv_text(csv_fields(bad(context={"platform": "caf\xe9"}, item_features={
        "genre": ["a"]})))
    path.write_bytes(text.encode("latin-1"))  # the bad row is line 6: header, 4 rows


def parquet(rows: list[dict[str, Any]], schema: pa.Schema, row_group_size: int = 64) -> Build:
    return lambda path: pq.write_table(pa.Table.from_pylist(rows, schema=schema), path,
                                       row_group_size=row_group_size)


def flat(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """An event as flat Parquet columns."""
    row = {k: v for k, v in event.items() if k not in ("context", "item_features")}
    return {**row, "context.platform": event["context"]["platform"],
            "item_features.genre": event["item_features"]["genre"], **changes}


def middle(rows: list[dict[str, Any]], *bad_rows: dict[str, Any]) -> list[dict[str, Any]]:
    return rows[:4] + list(bad_rows) + rows[4:]


BASE_SCHEMA = [("type", pa.string()), ("impression_id", pa.string()),
               ("user_id", pa.string()), ("item_id", pa.string()),
               ("timestamp", pa.float64()), ("clicked", pa.bool_()),
               ("context.platform", pa.string()), ("item_features.genre", pa.list_(pa.string()))]


def schema(**types: pa.DataType) -> pa.Schema:
    """BASE_SCHEMA with some columns' types changed or columns added."""
    fields = dict(BASE_SCHEMA)
    fields.update(types)
    return pa.schema(list(fields.items()))


def binary_ids(path: Path) -> None:
    rows = [flat(e, user_id=e["user_id"].encode(), item_id=e["item_id"].encode())
            for e in VALID]
    parquet(middle(rows, flat(bad(), item_id=b"\xff\xfe")),
            schema(user_id=pa.binary(), item_id=pa.binary()))(path)


def decimals(path: Path) -> None:
    rows = [flat(e, timestamp=decimal.Decimal(repr(e["timestamp"])),
                 **{"item_features.price": decimal.Decimal("9.99")}) for e in VALID]
    parquet(rows, schema(timestamp=pa.decimal128(16, 3),
                         **{"item_features.price": pa.decimal128(5, 2)}))(path)


def temporal(path: Path) -> None:
    """Event time in nanoseconds (to_pylist would need pandas for those), a date and
    a timestamp without a time zone (taken as UTC) as features."""
    rows = [flat(e, timestamp=int(e["timestamp"] * 2) * 500_000_000,
                 **{"context.day": 19675, "user_features.signup": 1_600_000_000_000_000})
            for e in VALID]
    parquet(rows, schema(timestamp=pa.timestamp("ns", tz="UTC"),
                         **{"context.day": pa.date32(),
                            "user_features.signup": pa.timestamp("us")}))(path)


def lists(path: Path) -> None:
    """Integers in a list are feature values (as text); booleans or lists are not."""
    rows = [flat(e, **{"item_features.tags": [1, 2]}) for e in VALID]
    parquet(middle(rows, flat(bad(impression_id="b1"), **{"item_features.flags": [True]}),
                   flat(bad(impression_id="b2"), **{"item_features.nested": [["x"]]})),
            schema(**{"item_features.tags": pa.list_(pa.int64()),
                      "item_features.flags": pa.list_(pa.bool_()),
                      "item_features.nested": pa.list_(pa.list_(pa.string()))}))(path)


def nulls(path: Path) -> None:
    """A null cell (or struct field) is an absent value; a null id or list item is not."""
    rows = [flat(e, **{"context.platform": None if n % 2 else "web"},
                 user_features={"age": "30", "gender": None})
            for n, e in enumerate(VALID)]
    structs = pa.struct([("age", pa.string()), ("gender", pa.string())])
    parquet(middle(rows, flat(bad(impression_id="b1"), user_id=None),
                   flat(bad(impression_id="b2"), **{"item_features.genre": ["a", None]})),
            schema(user_features=structs))(path)


def truncated_parquet(path: Path) -> None:
    parquet([flat(e) for e in VALID], schema())(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_second_row_group(path: Path) -> None:
    """Rows 1-4 are intact, the page header of rows 5-8 is overwritten."""
    parquet([flat(e) for e in VALID], schema(), row_group_size=4)(path)
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def garbage_lines(path: Path) -> None:
    """Three lines of random bytes between the valid lines."""
    rng = random.Random(7)
    lines = [bytes(b for b in rng.randbytes(1000) if b not in b"\r\n") for _ in range(3)]
    jsonl(*lines)(path)


def directory(path: Path) -> None:
    path.mkdir()
    (path / "events.jsonl").write_text("")


def unreadable(path: Path) -> None:
    jsonl()(path)
    path.chmod(0)


DEEP = "[" * 10_000 + "]" * 10_000
CASES = [
    # JSON lines
    pytest.param("surrogate_ids.jsonl", jsonl(bad(user_id="\ud800"), bad(item_id="\udfff"),
                                              bad(impression_id="x\ud83d")),
                 Learned({"schema": 3}), id="jsonl-lone-surrogates-in-ids"),
    pytest.param("surrogate_features.jsonl",
                 jsonl(bad(context={"\udc80": "x"}), bad(item_features={"g": ["\ud800"]})),
                 Learned({"schema": 2}), id="jsonl-lone-surrogates-in-features"),
    pytest.param("deep.jsonl", jsonl(DEEP.encode(), json.dumps(bad()).replace(
        '"web"', DEEP).encode()), Learned({"not_json": 2}), id="jsonl-nested-10000-deep"),
    pytest.param("empty.jsonl", write_bytes(b""), Learned({}, valid=0), id="jsonl-empty"),
    pytest.param("garbage.jsonl", garbage_lines, Learned({"not_json": 3}),
                 id="jsonl-binary-garbage"),
    pytest.param("crlf.jsonl", jsonl(newline=b"\r\n"), Learned({}), id="jsonl-crlf"),
    pytest.param("bom.jsonl", jsonl(prefix=b"\xef\xbb\xbf"), Learned({}), id="jsonl-utf8-bom"),
    pytest.param("array.jsonl", jsonl(json.dumps([bad(), bad()]).encode()),
                 Learned({"schema": 1}), id="jsonl-array-on-one-line"),
    pytest.param("huge_line.jsonl", jsonl(b'"' + b"x" * (20 << 20) + b'"'),
                 Learned({"oversized": 1}), id="jsonl-20-MiB-line"),
    pytest.param("events_dir", directory, Refused("is a directory"), id="directory"),
    pytest.param("unreadable.jsonl", unreadable, Refused("Permission denied"),
                 id="no-read-permission",
                 marks=pytest.mark.skipif(os.geteuid() == 0,
                                          reason="root reads files without permission")),
    # CSV
    pytest.param("latin1.csv", non_utf8_csv, Refused("line 6"), id="csv-not-utf8"),
    pytest.param("long_field.csv",
                 write_csv(csv_fields(bad(context={"platform": "x" * (200 << 10)}))),
                 Learned({"oversized": 1}), id="csv-200-KiB-field"),
    pytest.param("extra_fields.csv", write_csv([*csv_fields(bad()), "surplus"]),
                 Learned({"schema": 1}), id="csv-more-fields-than-header"),
    pytest.param("fewer_fields.csv", write_csv(csv_fields(bad())[:-2]),
                 Learned({"schema": 1}), id="csv-fewer-fields-than-header"),
    pytest.param("empty.csv", write_bytes(b""), Learned({}, valid=0), id="csv-empty"),
    pytest.param("header_only.csv", write_csv(rows=0), Learned({}, valid=0),
                 id="csv-header-only"),
    pytest.param("bom.csv", lambda p: p.write_bytes(b"\xef\xbb\xbf" + csv_text().encode()),
                 Learned({}), id="csv-utf8-bom"),
    pytest.param("clicked_yes.csv", write_csv([*csv_fields(bad())[:5], "yes",
                                               *csv_fields(bad())[6:]]),
                 Learned({"schema": 1}), id="csv-clicked-yes"),
    pytest.param("cr_only.csv", lambda p: p.write_text(csv_text().replace("\n", "\r")),
                 Learned({}), id="csv-bare-cr-line-ends"),
    # Parquet
    pytest.param("not.parquet", jsonl(), Refused("row 1"), id="parquet-not-parquet"),
    pytest.param("empty.parquet", write_bytes(b""), Refused("row 1"), id="parquet-empty"),
    pytest.param("truncated.parquet", truncated_parquet, Refused("row 1"),
                 id="parquet-truncated"),
    pytest.param("corrupt.parquet", corrupt_second_row_group, Refused("row 5"),
                 id="parquet-corrupt-row-group"),
    pytest.param("binary.parquet", binary_ids, Learned({"schema": 1}), id="parquet-binary"),
    pytest.param("decimal.parquet", decimals, Learned({}), id="parquet-decimal"),
    pytest.param("temporal.parquet", temporal, Learned({}), id="parquet-timestamps-dates"),
    pytest.param("lists.parquet", lists, Learned({"schema": 2}), id="parquet-nested-lists"),
    pytest.param("nulls.parquet", nulls, Learned({"schema": 2}), id="parquet-nulls"),
]


@dataclass(frozen=True)
class Ran:
    path: Path
    returncode: int
    stderr: str


def replay_args(path: Path) -> list[str]:
    out = path.parent / "run"
    out.mkdir(exist_ok=True)
    return ["replay", str(path), *SMALL, "--summary-json", str(out / "summary.json"),
            "--predictions-out", str(out / "predictions.jsonl")]


def run_replay(path: Path) -> Ran:
    from streamer.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(replay_args(path))
    return Ran(path, code, err.getvalue())


def run_replay_process(path: Path) -> Ran:
    cmd = [sys.executable, "-m", "streamer.cli", *replay_args(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    return Ran(path, done.returncode, done.stderr)


@pytest.mark.parametrize(("name", "build", "expect"), CASES)
def test_a_malformed_file_is_dead_letters_or_one_line(
        name: str, build: Build, expect: Learned | Refused, tmp_path: Path) -> None:
    path = tmp_path / name
    build(path)
    check(run_replay(path), expect)


IN_A_PROCESS = ("csv-more-fields-than-header", "parquet-not-parquet")


@pytest.mark.parametrize(("name", "build", "expect"), [c for c in CASES if c.id in IN_A_PROCESS])
def test_the_command_itself_exits_cleanly(name: str, build: Build, expect: Learned | Refused,
                                          tmp_path: Path) -> None:
    path = tmp_path / name
    build(path)
    check(run_replay_process(path), expect)


def check(ran: Ran, expect: Learned | Refused) -> None:
    name = ran.path.name
    assert "Traceback" not in ran.stderr, ran.stderr
    if isinstance(expect, Refused):
        assert ran.returncode == 2, ran.stderr
        [message] = ran.stderr.strip().splitlines()
        assert name in message and expect.where in message, message
        return
    assert ran.returncode == 0, ran.stderr
    out = ran.path.parent / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dead_letters"] == expect.dead
    assert summary["predictions"] == expect.valid
    learned = {(p["user_id"], p["item_id"], p["timestamp"])
               for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert learned == {(e["user_id"], e["item_id"], e["timestamp"])
                       for e in VALID[:expect.valid]}
