"""`fleetserve feedback export` on real databases written by the server's own SqliteSink.

The tests check what a training pipeline relies on: every datatype comes back bit for
bit, the join picks the latest ground truth (even ground truth that came first), the
filters, unmatched feedback, parquet == jsonl, bounded memory, and the command's exits.
"""

from __future__ import annotations

import argparse
import base64
import sqlite3
import sys
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from fleetserve.server import feedback_export
from fleetserve.server.feedback_export import (
    ROW_GROUP_ROWS,
    ExportError,
    ExportSummary,
    add_feedback_parser,
    export,
    parse_time,
    run_feedback,
)
from fleetserve.server.sinks import SqliteSink
from fleetserve.server.tensors import pack_tensors
from fleetserve.server.types import DTYPES, FeedbackRecord, PredictionRecord


def strings(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


EVERY_TYPE = {
    "bool": np.array([[True, False, True], [False, False, True]]),
    "int8": np.array([-128, 0, 127], np.int8),
    "int16": np.array([-32768, 32767], np.int16),
    "int32": np.array([[-(2**31)], [2**31 - 1]], np.int32),
    "int64": np.array([-(2**63), 2**63 - 1, 2**53 + 1], np.int64),
    "uint8": np.array([0, 255], np.uint8),
    "uint16": np.array([0, 65535], np.uint16),
    "uint32": np.array([0, 2**32 - 1], np.uint32),
    "uint64": np.array([0, 2**63, 2**64 - 1], np.uint64),
    "fp16": np.array([0.1, -65504, 6e-8, -0.0, np.inf], np.float16),  # 6e-8: subnormal
    "fp32": np.array([[0.1, 1e-45, 3.4028235e38], [-0.0, np.nan, -np.inf]], np.float32),
    "fp64": np.array([0.1, 1 / 3, 5e-324, 1.7976931348623157e308], np.float64),
    "text": strings(b"hello", "h\u00e9llo \u2603".encode(), b""),
    "binary": strings(b"\xff\xfe\x00", b"ok"),  # not UTF-8: base64
    "empty": np.zeros((0, 4), np.float32),
}


def prediction(
    rid: str, ts: float, version: int = 1, model: str = "m", x: float = 0.0
) -> PredictionRecord:
    return record(rid, model, version, ts, {"x": np.array([x], np.float32)},
                  {"y": np.array([2 * x])})  # fmt: skip


def record(rid: str, model: str, version: int, ts: float, inputs: dict, outputs: dict) -> Any:
    """A prediction as the server records it: tensors packed."""
    return PredictionRecord(rid, model, version, ts, pack_tensors(inputs), pack_tensors(outputs))


def make_db(directory: Path, *batches: Sequence[Any]) -> Path:
    """A database as the server leaves it: each batch one flushed transaction."""
    sink = SqliteSink(directory)
    for batch in batches:
        sink.write(batch)
        sink.flush()
    sink.close()
    return sink.path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def to_array(tensor: dict[str, Any]) -> np.ndarray:
    """An exported JSON tensor back to numpy, as a consumer of the export would."""
    if tensor["datatype"] == "BYTES":
        b64 = tensor.get("encoding") == "base64"
        items = [base64.b64decode(x) if b64 else x.encode() for x in tensor["data"]]
        return strings(*items).reshape(tensor["shape"])
    return np.array(tensor["data"], DTYPES[tensor["datatype"]]).reshape(tensor["shape"])


def assert_same(tensors: list[dict[str, Any]], expected: dict[str, np.ndarray]) -> None:
    assert [t["name"] for t in tensors] == list(expected)
    for tensor in tensors:
        got, want = to_array(tensor), expected[tensor["name"]]
        assert got.dtype == want.dtype and got.shape == want.shape, tensor["name"]
        if want.dtype == object:
            assert got.tolist() == want.tolist(), tensor["name"]
        else:  # bit for bit: -0.0, NaN, subnormals, uint64 extremes
            assert got.tobytes() == want.tobytes(), tensor["name"]


def test_every_datatype_round_trips(tmp_path: Path) -> None:
    truth = {"t_" + k: v for k, v in EVERY_TYPE.items()}
    db = make_db(
        tmp_path,
        [
            record("r1", "m", 3, 1000.5, EVERY_TYPE, {"out": EVERY_TYPE["fp32"]}),
            FeedbackRecord("r1", "m", 1001.25, label="cat", truth=truth, metadata={"who": "qa"}),
        ],
    )
    out = tmp_path / "out.jsonl"
    assert export(db, "m", out, "jsonl") == ExportSummary(rows=1, with_feedback=1, unmatched=0)
    (row,) = read_jsonl(out)
    assert (row["request_id"], row["model"], row["version"], row["timestamp"]) == (
        "r1", "m", 3, 1000.5,
    )  # fmt: skip
    assert_same(row["inputs"], EVERY_TYPE)
    assert_same(row["outputs"], {"out": EVERY_TYPE["fp32"]})
    feedback = row["feedback"]
    assert (feedback["timestamp"], feedback["label"], feedback["metadata"]) == (
        1001.25, "cat", {"who": "qa"},
    )  # fmt: skip
    assert_same(feedback["truth"], truth)
    by_name = {t["name"]: t for t in row["inputs"]}
    assert by_name["text"]["data"] == ["hello", "h\u00e9llo \u2603", ""]
    assert "encoding" not in by_name["text"]
    assert by_name["binary"]["encoding"] == "base64"
    assert by_name["fp32"]["data"][3:] == [-0.0, "NaN", "-Infinity"]  # JSON has no NaN
    assert by_name["uint64"]["data"] == [0, 2**63, 2**64 - 1]


def test_filters_by_version_and_time(tmp_path: Path) -> None:
    day = datetime(2026, 11, 27, tzinfo=UTC).timestamp()
    db = make_db(
        tmp_path,
        [
            prediction("a", day - 1, version=1),
            prediction("b", day, version=2),
            prediction("c", day + 3600, version=1),
            prediction("d", day + 7200, version=2),
            prediction("e", day, model="other"),
        ],
    )
    out = tmp_path / "out.jsonl"

    def ids(**filters: Any) -> list[str]:
        export(db, "m", out, "jsonl", **filters)
        return [row["request_id"] for row in read_jsonl(out)]

    assert ids() == ["a", "b", "c", "d"]
    assert ids(version=1) == ["a", "c"]
    assert ids(since=parse_time("2026-11-27")) == ["b", "c", "d"]  # since is inclusive
    assert ids(until=day + 3600) == ["a", "b"]  # until is exclusive
    assert ids(version=2, since=day, until=parse_time("2026-11-27T02:00:00+00:00")) == ["b"]
    assert ids(version=9) == []


def test_joins_latest_feedback_even_when_it_came_first(tmp_path: Path) -> None:
    db = make_db(
        tmp_path,
        [FeedbackRecord("late", "m", 10.0, label=1)],  # ground truth before its prediction
        [prediction("r1", 20.0), prediction("late", 21.0), prediction("none", 22.0)],
        [FeedbackRecord("r1", "m", 30.0, label="first", metadata={"n": 1})],
        [
            FeedbackRecord("r1", "m", 40.0, label="second"),
            FeedbackRecord("none", "other", 41.0, label="other model's"),
        ],
    )
    out = tmp_path / "out.jsonl"
    assert export(db, "m", out, "jsonl") == ExportSummary(rows=3, with_feedback=2, unmatched=0)
    rows = {row["request_id"]: row["feedback"] for row in read_jsonl(out)}
    assert rows["r1"] == {"timestamp": 40.0, "label": "second", "truth": None, "metadata": None}
    assert rows["late"]["label"] == 1
    assert rows["none"] is None


def test_unmatched_feedback_counted_and_written(tmp_path: Path) -> None:
    db = make_db(
        tmp_path,
        [prediction("p", 1.0, version=1), prediction("q", 2.0, model="other")],
        [
            FeedbackRecord("p", "m", 3.0, label=True),
            FeedbackRecord("lost", "m", 4.0, label=0.5, truth={"t": np.array([1, 2], np.int8)}),
            FeedbackRecord("q", "m", 5.0, metadata={"k": "v"}),  # q is another model's
            FeedbackRecord("zzz", "other", 6.0, label=1),  # another model's unmatched
        ],
    )
    out, lost = tmp_path / "out.jsonl", tmp_path / "lost.jsonl"
    # any version and any time: p of version 1 outside the window still matches
    summary = export(db, "m", out, "jsonl", version=2, since=100.0, unmatched=lost)
    assert summary == ExportSummary(rows=0, with_feedback=0, unmatched=2)
    assert out.read_bytes() == b""
    first, second = read_jsonl(lost)
    assert (first["request_id"], first["label"], first["timestamp"]) == ("lost", 0.5, 4.0)
    assert_same(first["truth"], {"t": np.array([1, 2], np.int8)})
    assert second == {"request_id": "q", "model": "m", "timestamp": 5.0, "label": None,
                      "truth": None, "metadata": {"k": "v"}}  # fmt: skip
    assert export(db, "m", out, "jsonl").unmatched == 2  # counted without --unmatched too


def parquet_as_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parquet rows in the jsonl shape: the two formats must carry the same content."""
    rows = []
    for r in pq.read_table(path).to_pylist():
        feedback = None
        if r["feedback_timestamp"] is not None:
            feedback = {
                "timestamp": r["feedback_timestamp"],
                "label": None if r["label"] is None else orjson.loads(r["label"]),
                "truth": None if r["truth"] is None else orjson.loads(r["truth"]),
                "metadata": None if r["metadata"] is None else orjson.loads(r["metadata"]),
            }
        rows.append({
            "request_id": r["request_id"], "model": r["model"], "version": r["version"],
            "timestamp": r["timestamp"], "inputs": orjson.loads(r["inputs"]),
            "outputs": orjson.loads(r["outputs"]), "feedback": feedback,
        })  # fmt: skip
    return rows


def test_parquet_has_the_jsonl_content(tmp_path: Path) -> None:
    n = 2 * ROW_GROUP_ROWS + 5
    records: list[Any] = [
        prediction(f"r{i}", float(i), version=1 + i % 2, x=i / 7) for i in range(n)
    ]
    records.append(record("all", "m", 1, n + 0.5, EVERY_TYPE, EVERY_TYPE))
    records += [FeedbackRecord(f"r{i}", "m", 1e4 + i, label=i) for i in range(0, n, 3)]
    records.append(FeedbackRecord("all", "m", 2e4, label="x", truth=EVERY_TYPE, metadata={}))
    db = make_db(tmp_path, records)
    jsonl, parquet = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    assert export(db, "m", jsonl, "jsonl") == export(db, "m", parquet, "parquet")
    assert parquet_as_jsonl(parquet) == read_jsonl(jsonl)
    meta = pq.ParquetFile(parquet)
    assert meta.metadata.num_row_groups == 3  # one per chunk: written as it goes
    types = {f.name: (str(f.type), f.nullable) for f in meta.schema_arrow}
    assert types == {
        "request_id": ("string", False), "model": ("string", False),
        "version": ("int64", False), "timestamp": ("double", False),
        "inputs": ("string", False), "outputs": ("string", False),
        "label": ("string", True), "truth": ("string", True), "metadata": ("string", True),
        "feedback_timestamp": ("double", True),
    }  # fmt: skip
    export(db, "nobody", parquet, "parquet")
    assert pq.read_table(parquet).num_rows == 0  # a valid, empty file


def test_parquet_row_groups_stay_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors make smaller row groups, so memory stays bounded by bytes too."""
    db = make_db(tmp_path, [prediction(f"r{i}", float(i)) for i in range(5)])
    monkeypatch.setattr(feedback_export, "ROW_GROUP_BYTES", 1)  # every row is "large"
    out = tmp_path / "out.parquet"
    assert export(db, "m", out, "parquet").rows == 5
    assert pq.ParquetFile(out).metadata.num_row_groups == 5
    assert pq.read_table(out).column("request_id").to_pylist() == [f"r{i}" for i in range(5)]


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 predictions with 1 KiB of input each: about 25 MiB if held at once."""
    rng = np.random.default_rng(0)
    sink = SqliteSink(tmp_path_factory.mktemp("big"))
    for start in range(0, 20_000, 1000):
        sink.write([
            record(f"r{i}", "m", 1, float(i),
                   {"x": rng.standard_normal((1, 256), np.float32)},
                   {"y": rng.standard_normal((1, 8), np.float32)})
            for i in range(start, start + 1000)
        ])  # fmt: skip
        sink.flush()
    sink.close()
    return sink.path


def peak_bytes(run: Any) -> int:
    """Peak Python heap growth while `run` runs (pyarrow's own pool is not counted)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_streams_in_bounded_memory(big_db: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out.{fmt}"
    assert export(big_db, "m", out, fmt).rows == 20_000  # and warms up imports, caches

    def fetchall() -> None:  # what an export that loads every row would hold at least
        with sqlite3.connect(big_db) as db:
            db.execute("SELECT inputs, outputs FROM predictions").fetchall()

    streamed = peak_bytes(lambda: export(big_db, "m", out, fmt))
    loaded = peak_bytes(fetchall)
    bound = 8 * 2**20
    assert loaded > 2 * bound  # so the bound below does catch a fetchall
    assert streamed < bound, f"export peaked at {streamed / 2**20:.1f} MiB"


def test_export_while_the_server_writes(tmp_path: Path) -> None:
    """The server keeps its connection open mid-transaction; the export reads what was
    committed and does not block it."""
    sink = SqliteSink(tmp_path)
    sink.write([prediction("done", 1.0)])
    sink.flush()
    sink.write([prediction("pending", 2.0)])  # not committed yet
    out = tmp_path / "out.jsonl"
    try:
        assert export(sink.path, "m", out, "jsonl").rows == 1
        sink.flush()
        assert export(sink.path, "m", out, "jsonl").rows == 2
    finally:
        sink.close()


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetserve")
    sub = parser.add_subparsers(dest="command")
    add_feedback_parser(sub)
    args = parser.parse_args(argv)
    assert args.command == "feedback"
    return run_feedback(args)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "models ?#%"  # URI-special characters in the path
    make_db(
        repo / ".fleetserve",
        [prediction("a", 1.0), prediction("b", 2.0), FeedbackRecord("gone", "m", 3.0, label=1)],
        [FeedbackRecord("a", "m", 4.0, label=2)],
    )
    out, lost = tmp_path / "out.parquet", tmp_path / "lost.jsonl"
    args = ["feedback", "export", "--model", "m", "--format", "parquet", "--out", str(out)]
    assert cli([*args, "--model-repository", str(repo), "--unmatched", str(lost)]) == 0
    assert pq.read_table(out).column("request_id").to_pylist() == ["a", "b"]
    assert [r["request_id"] for r in read_jsonl(lost)] == ["gone"]
    err = capsys.readouterr().err
    assert "exported 2 predictions of model 'm' to" in err and "(1 with ground truth)" in err
    assert f"1 ground truth rows have no prediction (written to {lost})" in err

    out = tmp_path / "out.jsonl"
    argv = ["feedback", "export", "--model", "m", "--format", "jsonl", "--out", str(out),
            "--data-dir", str(repo / ".fleetserve"), "--since", "1970-01-01T00:00:02"]  # fmt: skip
    assert cli(argv) == 0
    assert [r["request_id"] for r in read_jsonl(out)] == ["b"]
    assert "--unmatched PATH writes them" in capsys.readouterr().err

    assert cli([*argv[:3], "typo", *argv[4:]]) == 0  # an unknown model: no rows, no error
    assert "no predictions of model 'typo' matched" in capsys.readouterr().err
    assert out.read_bytes() == b""


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    args = ["feedback", "export", "--model", "m", "--format", "jsonl", "--out", str(out)]
    assert cli([*args, "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert f"error: no feedback database at {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert not out.exists()

    make_db(tmp_path, [prediction("a", 1.0)])
    nowhere = tmp_path / "nodir" / "out.jsonl"
    assert cli([*args[:-1], str(nowhere), "--data-dir", str(tmp_path)]) == 1
    assert f"error: cannot write {nowhere}: no directory" in capsys.readouterr().err

    where = ["--data-dir", str(tmp_path)]
    for bad, message in [
        ([*where, "--since", "yesterday"], "not a time: 'yesterday'"),
        ([*where, "--since", "20", "--until", "10"], "--since must be before --until"),
        ([*where, "--unmatched", str(out)], "--unmatched must differ from --out"),
        ([], "one of the arguments --data-dir --model-repository is required"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli([*args, *bad])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_parquet_without_pyarrow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pyarrow is optional: without it the error says how to get it, and nothing is written."""
    db = make_db(tmp_path, [prediction("a", 1.0)])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import` sees when absent
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    out = tmp_path / "out.parquet"
    with pytest.raises(ExportError, match=r'pip install "fleetserve\[parquet\]"'):
        export(db, "m", out, "parquet")
    argv = ["feedback", "export", "--model", "m", "--format", "parquet", "--out", str(out)]
    assert cli([*argv, "--data-dir", str(tmp_path)]) == 1
    assert 'error: parquet export needs pyarrow: pip install "fleetserve[parquet]"' in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_parse_time() -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2026-11-27") == datetime(2026, 11, 27, tzinfo=UTC).timestamp()
    assert parse_time("2026-11-27T10:00:00") == parse_time("2026-11-27T11:00:00+01:00")
    assert parse_time("2026-11-27T10:00:00Z") == parse_time("2026-11-27T10:00:00+00:00")
    for bad in ("", "nan", "27/11/2026"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_time(bad)
