"""`fleetserve feedback export`: predictions joined with their ground truth, for training.

    fleetserve feedback export --model M [--version V] [--since T] [--until T]
        --format jsonl|parquet --out PATH [--unmatched PATH]
        (--data-dir DIR | --model-repository DIR)

Reads the SQLite database the feedback sink writes (server/sinks.py), read-only, so it
is safe while the server writes (WAL); both queries run in one read transaction, so they
see one snapshot. Rows are streamed, never all held: fetched a few at a time (fetchmany)
and written as they come.

One row per prediction of the model (and version) with since <= timestamp < until, in
the order they were logged, with the latest ground truth posted for its request id
(the feedback row with the highest id; it joins even if it came before the prediction).

JSON lines (`--format jsonl`), one object per prediction:

    {"request_id": str, "model": str, "version": int, "timestamp": float,
     "inputs": [TENSOR, ...], "outputs": [TENSOR, ...],
     "feedback": null | {"timestamp": float, "label": JSON scalar | null,
                         "truth": [TENSOR, ...] | null, "metadata": object | null}}

TENSOR is the Open Inference Protocol's JSON tensor: {"name", "datatype", "shape",
"data"} with `data` flat in row-major order. Values are lossless: integers exactly
(UINT64 too), floats as the shortest text that reads back to the same double (FP16 and
FP32 widen to double exactly), non-finite floats as the strings "NaN", "Infinity" and
"-Infinity" (protobuf's JSON convention; a NaN's payload bits are not kept). BYTES
elements are UTF-8 strings when every element of the tensor decodes, otherwise the
tensor gets "encoding": "base64" and each element is base64 text.

Parquet (`--format parquet`, needs `pip install "fleetserve[parquet]"`), a row group per
1000 rows (fewer when they are large); the same content, nested parts as JSON text:

    request_id          string   not null
    model               string   not null
    version             int64    not null
    timestamp           float64  not null   seconds since the epoch
    inputs              string   not null   JSON list of TENSOR
    outputs             string   not null   JSON list of TENSOR
    label               string   nullable   the label's JSON text (e.g. `"cat"`, `3`)
    truth               string   nullable   JSON list of TENSOR
    metadata            string   nullable   JSON object text
    feedback_timestamp  float64  nullable   null: no ground truth for this prediction

Unmatched feedback: ground truth of the model whose request id has no prediction of that
model (any version, any time; e.g. it was not sampled, or retention dropped it). It is
counted, and with --unmatched PATH written as JSON lines {"request_id", "model",
"timestamp", "label", "truth", "metadata"}.

Outputs are written to a temporary file beside PATH and renamed when complete, so a
failed export never leaves a truncated file that looks whole.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import os
import sqlite3
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from fleetserve.server.sinks import DB_FILENAME
from fleetserve.server.tensors import byte_elements, unpack_tensors
from fleetserve.server.types import DEFAULT_DATA_DIR, datatype_of

FORMATS = ("jsonl", "parquet")
FETCH_ROWS = 100  # rows fetched from SQLite at a time
# a parquet row group: this many rows, or fewer if their JSON text reaches ROW_GROUP_BYTES
# (memory stays bounded when the tensors are large, e.g. images)
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 32 * 2**20
PARQUET_HINT = 'parquet export needs pyarrow: pip install "fleetserve[parquet]"'

# Rows are found (ids, in order) by one query and read by id, FETCH_ROWS at a time, by
# another: a single `... ORDER BY id` would make SQLite sort every selected row, tensor
# blobs included, into temporary storage before returning the first one.
_PREDICTION_IDS = "SELECT p.id FROM predictions p WHERE p.model = ?{filters} ORDER BY p.id"
_PREDICTIONS = """
SELECT p.request_id, p.model, p.version, p.ts, p.inputs, p.outputs,
       f.ts, f.label, f.truth, f.metadata
FROM predictions p
LEFT JOIN feedback f ON f.id = (
    SELECT max(id) FROM feedback WHERE model = p.model AND request_id = p.request_id
)
WHERE p.id IN ({ids})
ORDER BY p.id
"""
_UNMATCHED = """
FROM feedback f
WHERE f.model = ? AND NOT EXISTS (
    SELECT 1 FROM predictions p WHERE p.model = f.model AND p.request_id = f.request_id
)
"""
_UNMATCHED_IDS = "SELECT f.id" + _UNMATCHED + "ORDER BY f.id"
_FEEDBACK = """
SELECT request_id, model, ts, label, truth, metadata FROM feedback WHERE id IN ({ids})
ORDER BY id
"""
_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


class ExportError(Exception):
    """Something the operator must fix (no database, no pyarrow, unreadable database)."""


@dataclass(frozen=True, slots=True)
class ExportSummary:
    rows: int  # predictions written
    with_feedback: int  # of which joined with ground truth
    unmatched: int  # feedback rows of the model with no prediction


def export(
    db_path: Path,
    model: str,
    out: Path,
    fmt: str,
    version: int | None = None,
    since: float | None = None,
    until: float | None = None,
    unmatched: Path | None = None,
) -> ExportSummary:
    """Writes the model's predictions joined with their latest ground truth to `out`
    (`fmt` "jsonl" or "parquet"), and unmatched feedback to `unmatched` if given."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    pq = _import_parquet() if fmt == "parquet" else None  # fail before touching anything
    if not db_path.is_file():
        raise ExportError(f"no feedback database at {db_path}")
    try:
        uri = f"file:{urllib.parse.quote(str(db_path))}?mode=ro"  # a path may hold ? or #
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as err:
        raise ExportError(f"cannot open {db_path}: {err}") from None
    try:
        db.execute("BEGIN")  # one snapshot for both queries while the server writes
        filters, params = "", [model]
        for clause, value in (("p.version = ?", version), ("p.ts >= ?", since),
                              ("p.ts < ?", until)):  # fmt: skip
            if value is not None:
                filters += f" AND {clause}"
                params.append(value)
        chunks = _chunks(db, _PREDICTION_IDS.format(filters=filters), params, _PREDICTIONS)
        with _replacing(out) as tmp:
            if pq is None:
                rows, joined = _write_jsonl(chunks, tmp)
            else:
                rows, joined = _write_parquet(pq, chunks, tmp)
        if unmatched is None:
            (count,) = db.execute("SELECT count(*)" + _UNMATCHED, (model,)).fetchone()
        else:
            with _replacing(unmatched) as tmp:
                count = _write_unmatched(_chunks(db, _UNMATCHED_IDS, [model], _FEEDBACK), tmp)
    except sqlite3.Error as err:
        raise ExportError(f"cannot read {db_path}: {err}") from None
    finally:
        db.close()
    return ExportSummary(rows, joined, count)


def tensors_json(blob: bytes | None) -> list[dict[str, Any]] | None:
    """A `pack_tensors` blob as a list of Open Inference Protocol JSON tensors."""
    if blob is None:
        return None
    return [_tensor_json(name, array) for name, array in unpack_tensors(blob).items()]


def _tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    datatype = datatype_of(array.dtype)
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if datatype == "BYTES":
        items = byte_elements(array)
        try:
            tensor["data"] = [item.decode() for item in items]
        except UnicodeDecodeError:
            tensor["data"] = [base64.b64encode(item).decode("ascii") for item in items]
            tensor["encoding"] = "base64"
    elif array.dtype.kind == "f" and not np.isfinite(array).all():
        # orjson would write null for these: lossy
        tensor["data"] = [
            x if math.isfinite(x) else _NONFINITE.get(x, "NaN") for x in array.ravel().tolist()
        ]
    else:
        tensor["data"] = array.ravel().tolist()  # Python ints and floats: exact
    return tensor


def _chunks(
    db: sqlite3.Connection, ids_sql: str, params: list[Any], rows_sql: str
) -> Iterator[list[Any]]:
    """The rows of `rows_sql` for the ids `ids_sql` finds, FETCH_ROWS at a time, in order."""
    ids = db.execute(ids_sql, params)
    while batch := ids.fetchmany(FETCH_ROWS):
        sql = rows_sql.format(ids=",".join("?" * len(batch)))
        yield db.execute(sql, [i for (i,) in batch]).fetchall()  # FETCH_ROWS rows at most


def _json(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _write_jsonl(chunks: Iterable[list[Any]], path: Path) -> tuple[int, int]:
    rows = joined = 0
    with path.open("wb") as out:
        for chunk in chunks:
            for rid, model, version, ts, inputs, outputs, fts, label, truth, meta in chunk:
                feedback = None
                if fts is not None:
                    joined += 1
                    feedback = {"timestamp": fts, "label": _json(label),
                                "truth": tensors_json(truth), "metadata": _json(meta)}  # fmt: skip
                out.write(orjson.dumps({
                    "request_id": rid, "model": model, "version": version, "timestamp": ts,
                    "inputs": tensors_json(inputs), "outputs": tensors_json(outputs),
                    "feedback": feedback,
                }, option=orjson.OPT_APPEND_NEWLINE))  # fmt: skip
            rows += len(chunk)
    return rows, joined


def _write_parquet(pq: Any, chunks: Iterable[list[Any]], path: Path) -> tuple[int, int]:
    import pyarrow as pa

    schema = pa.schema([
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("timestamp", pa.float64(), nullable=False),
        pa.field("inputs", pa.string(), nullable=False),
        pa.field("outputs", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("truth", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("feedback_timestamp", pa.float64()),
    ])  # fmt: skip
    rows = joined = size = 0
    group: list[tuple[Any, ...]] = []

    def write_group() -> None:
        columns = dict(zip(schema.names, zip(*group, strict=True), strict=True))
        writer.write_table(pa.Table.from_pydict(columns, schema=schema))

    with pq.ParquetWriter(str(path), schema) as writer:
        for chunk in chunks:
            for rid, model, version, ts, inputs, outputs, fts, label, truth, meta in chunk:
                truth_json = None if truth is None else _dumps(tensors_json(truth))
                row = (rid, model, version, ts, _dumps(tensors_json(inputs)),
                       _dumps(tensors_json(outputs)), label, truth_json, meta, fts)  # fmt: skip
                group.append(row)
                size += len(row[4]) + len(row[5]) + len(row[7] or "")
                joined += fts is not None
                if len(group) >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
                    write_group()
                    rows, group, size = rows + len(group), [], 0
        if group:
            write_group()
            rows += len(group)
    return rows, joined


def _write_unmatched(chunks: Iterable[list[Any]], path: Path) -> int:
    count = 0
    with path.open("wb") as out:
        for chunk in chunks:
            for rid, model, ts, label, truth, meta in chunk:
                out.write(orjson.dumps({
                    "request_id": rid, "model": model, "timestamp": ts, "label": _json(label),
                    "truth": tensors_json(truth), "metadata": _json(meta),
                }, option=orjson.OPT_APPEND_NEWLINE))  # fmt: skip
            count += len(chunk)
    return count


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _import_parquet() -> Any:
    """pyarrow is optional: only parquet export needs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(PARQUET_HINT) from None
    return pq


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it only if the block succeeds."""
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: no directory {path.parent}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_time(text: str) -> float:
    """Seconds since the epoch, or ISO-8601 (2026-11-27, 2026-11-27T10:00:00+01:00);
    a time without a zone is UTC."""
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a time: {text!r} (seconds since the epoch, or ISO-8601 such as "
                "2026-11-27 or 2026-11-27T10:00:00+00:00)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a time: {text!r}")
    return value


def add_feedback_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `feedback` and its `export` command to the fleetserve parser (run it with
    run_feedback)."""
    feedback = subparsers.add_parser(
        "feedback", help="export logged predictions with their ground truth",
        description="Work with the predictions and ground truth the server logged.",
    )  # fmt: skip
    commands = feedback.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    summary = "write a model's predictions joined with their latest ground truth"
    exp = commands.add_parser("export", help=summary, description=summary)
    exp.set_defaults(feedback_parser=exp)
    exp.add_argument("--model", required=True, help="model name")
    exp.add_argument("--version", type=int, help="only this version (default: all)")
    exp.add_argument(
        "--since", type=parse_time, metavar="TIME",
        help="predictions at or after TIME: epoch seconds or ISO-8601 (no zone = UTC)",
    )  # fmt: skip
    exp.add_argument("--until", type=parse_time, metavar="TIME", help="predictions before TIME")
    exp.add_argument("--format", required=True, choices=FORMATS, help="output format")
    exp.add_argument("--out", required=True, type=Path, metavar="PATH", help="output file")
    exp.add_argument(
        "--unmatched", type=Path, metavar="PATH",
        help="also write the model's ground truth that has no prediction, as JSON lines",
    )  # fmt: skip
    where = exp.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--data-dir", type=Path, metavar="DIR", help=f"the server's --data-dir (has {DB_FILENAME})"
    )
    where.add_argument(
        "--model-repository", type=Path, metavar="DIR",
        help=f"the server's model repository, when it ran without --data-dir "
        f"(uses DIR/{DEFAULT_DATA_DIR})",
    )  # fmt: skip


def database_path(args: argparse.Namespace) -> Path:
    """Where the server keeps its feedback database, as the server would pick it."""
    data_dir = args.data_dir or args.model_repository / DEFAULT_DATA_DIR
    return data_dir / DB_FILENAME


def run_feedback(args: argparse.Namespace) -> int:
    """Runs the parsed `feedback` command: 0 done (even with no rows), 1 error.

    Usage errors raise SystemExit(2) through the command's parser, like argparse's own.
    """
    if args.since is not None and args.until is not None and args.since >= args.until:
        args.feedback_parser.error("--since must be before --until")
    if args.unmatched is not None and args.unmatched.resolve() == args.out.resolve():
        args.feedback_parser.error("--unmatched must differ from --out")
    try:
        summary = export(
            database_path(args), args.model, args.out, args.format, version=args.version,
            since=args.since, until=args.until, unmatched=args.unmatched,
        )  # fmt: skip
    except (ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    which = f"model {args.model!r}" + ("" if args.version is None else f" version {args.version}")
    if summary.rows:
        print(
            f"exported {summary.rows} predictions of {which} to {args.out} "
            f"({summary.with_feedback} with ground truth)",
            file=sys.stderr,
        )
    else:
        print(f"no predictions of {which} matched; wrote an empty {args.out}", file=sys.stderr)
    if summary.unmatched:
        where = f"written to {args.unmatched}" if args.unmatched else "--unmatched PATH writes them"
        print(
            f"{summary.unmatched} ground truth rows have no prediction ({where})", file=sys.stderr
        )
    return 0
