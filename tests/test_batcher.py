"""The batcher driven step by step: real ONNX models, a real thread pool, no sleeps.

A `Gate` wraps a loaded model so the test decides when a run may finish: while the gate
is shut, the first batch holds the model's only instance and later requests queue, so
which requests merge is fully determined by the test, not by timing. Every result is
compared bit for bit with an unbatched run of the same model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleetserve.loaders import testing
from fleetserve.loaders.base import LoadedModel, LoadOptions
from fleetserve.loaders.onnx import OnnxLoader
from fleetserve.server.batcher import Batcher
from fleetserve.server.config import BatchPolicy
from fleetserve.server.errors import DeadlineExceeded, InvalidArgument, Unavailable
from fleetserve.server.metrics import Metrics
from fleetserve.server.stats import ModelStats
from tests.helpers import NUMPY, WAIT_S, Gate


def load(tmp_path: Path, model: bytes) -> LoadedModel:
    path = tmp_path / f"model{len(list(tmp_path.iterdir()))}.onnx"
    path.write_bytes(model)
    return OnnxLoader(path, LoadOptions(intra_op_threads=1)).load()


def gather_model() -> bytes:
    """OUTPUT0[b, 1] = table[INDEX[b, 0]]: an index past the table fails the run."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "INDEX"], ["G"], axis=0),
         helper.make_node("Squeeze", ["G", "axes"], ["OUTPUT0"])],
        "gather",
        [helper.make_tensor_value_info("INDEX", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.arange(10, dtype=np.float32).reshape(10, 1), "table"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
        ],
    )  # fmt: skip
    return testing._finish(graph)


class Harness:
    """One batcher over a gated model, as the inference core builds it."""

    def __init__(self, model: LoadedModel, **policy: Any) -> None:
        self.gate = Gate(model)
        self.model = model
        self.policy = BatchPolicy(**{"max_batch_size": 8, **policy})
        self.pool = ThreadPoolExecutor(4)
        self.stats = ModelStats()
        self.metrics = Metrics()
        self.leases = 0
        self.batcher = Batcher(
            "m", "1", self.gate, self.policy, self.pool, lambda rows: False,
            self.stats, self.metrics, hold=self._hold, release=self._release,
        )  # fmt: skip

    def _hold(self) -> None:
        self.leases += 1

    def _release(self) -> None:
        self.leases -= 1

    def submit(self, inputs: dict[str, np.ndarray], **kw: Any) -> asyncio.Task[Any]:
        rows = next(iter(inputs.values())).shape[0]
        return asyncio.ensure_future(self.batcher.submit(inputs, kw.pop("names", None), rows, **kw))

    async def wait_started(self, runs: int) -> None:
        """Until `runs` model runs have started (in the pool)."""
        for _ in range(runs):
            got = await asyncio.to_thread(self.gate.started.acquire, True, WAIT_S)
            assert got, "a run did not start"

    def rejections(self, reason: str) -> int:
        return self.metrics.rejections.counts.get(("m", "1", reason), 0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), WAIT_S))


async def settle() -> None:
    """Let every ready callback on the loop run (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


def floats(rows: int, seed: int, width: int = 16) -> dict[str, np.ndarray]:
    return {"INPUT0": np.random.default_rng(seed).standard_normal((rows, width), np.float32)}


def same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert np.array_equal(got[name], want[name]), name


def test_requests_queued_behind_a_running_batch_merge_into_one_run(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.mlp()), max_batch_size=16)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)  # the lone request ran at once: the model was idle
        requests = [floats(rows, seed) for seed, rows in enumerate([1, 3, 2, 1], start=1)]
        queued = [h.submit(r) for r in requests]
        await settle()
        assert h.batcher.depth == 4 and h.batcher.running == 1
        h.gate.open()
        results = await asyncio.gather(first, *queued)
        for req, got in zip([floats(1, 0), *requests], results, strict=True):
            same(got, h.model.run(req))  # bit-identical to running it alone
        assert h.gate.runs == [{"INPUT0": (1, 16)}, {"INPUT0": (7, 16)}]
        assert h.stats.execution_count == 2 and h.stats.batches.keys() == {1, 7}
        runs = h.stats.to_dict("m", "1", 0)["batch_stats"]
        infer_ns = {r["batch_size"]: r["compute_infer"]["ns"] for r in runs}
        # each of the five requests carries its batch's compute time, as in Triton
        assert h.stats.compute_infer_ns == infer_ns[1] + 4 * infer_ns[7] and h.leases == 0

    run(test)


def test_a_lone_request_on_an_idle_model_does_not_wait_for_the_delay(tmp_path: Path) -> None:
    # a delay far beyond the test's own time limit: waiting it out would fail the test
    h = Harness(load(tmp_path, testing.mlp()), max_delay_s=3600, preferred=(8,))
    h.gate.open()

    async def test() -> None:
        same(await h.submit(floats(1, 0)), h.model.run(floats(1, 0)))

    run(test)


def test_a_free_instance_waits_for_the_preferred_size_while_another_runs(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.mlp()), instances=2, max_delay_s=3600, preferred=(3,))

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        second = h.submit(floats(1, 1))
        await settle()
        # one instance is free, but a batch is running: wait for 3 rows (or the delay)
        assert h.batcher.running == 1 and h.batcher.depth == 1
        third = h.submit(floats(2, 2))
        await h.wait_started(1)  # 3 rows queued: the second instance starts at once
        assert h.batcher.running == 2 and h.batcher.depth == 0
        h.gate.open()
        await asyncio.gather(first, second, third)
        assert h.gate.runs[1] == {"INPUT0": (3, 16)}

    run(test)


def test_the_delay_starts_a_short_batch_when_the_preferred_size_never_comes(
    tmp_path: Path,
) -> None:
    h = Harness(load(tmp_path, testing.mlp()), instances=2, max_delay_s=0.001, preferred=(8,))

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        second = h.submit(floats(1, 1))
        await h.wait_started(1)  # started by the delay timer, with only one row
        h.gate.open()
        same(await second, h.model.run(floats(1, 1)))
        await first

    run(test)


def test_ragged_requests_run_in_their_own_batch_in_arrival_order(tmp_path: Path) -> None:
    model = load(tmp_path, testing.identity("FP32", dims=(-1, -1)))
    h = Harness(model, max_batch_size=8)

    async def test() -> None:
        first = h.submit({"INPUT0": np.ones((1, 4), np.float32)})
        await h.wait_started(1)
        widths = [4, 2, 4, 2, 3]
        reqs = [{"INPUT0": np.full((1, w), i, np.float32)} for i, w in enumerate(widths)]
        tasks = [h.submit(r) for r in reqs]
        await settle()
        h.gate.open()
        results = await asyncio.gather(first, *tasks)
        for req, got in zip(reqs, results[1:], strict=True):
            same(got, {"OUTPUT0": req["INPUT0"]})
        # the oldest waiting request (width 4) goes first, with its compatible peers
        assert [r["INPUT0"] for r in h.gate.runs] == [(1, 4), (2, 4), (2, 2), (1, 3)]

    run(test)


def test_requests_that_are_batches_count_with_their_rows_and_never_split(
    tmp_path: Path,
) -> None:
    h = Harness(load(tmp_path, testing.mlp()), max_batch_size=8)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        sizes = [5, 2, 4, 1, 8]
        reqs = [floats(rows, seed) for seed, rows in enumerate(sizes, start=1)]
        tasks = [h.submit(r) for r in reqs]
        await settle()
        h.gate.open()
        results = await asyncio.gather(first, *tasks)
        for req, got in zip(reqs, results[1:], strict=True):
            same(got, h.model.run(req))
        # 5+2 fit; 4 does not fit after them and heads the next batch (4+1); 8 alone
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 7, 5, 8]

    run(test)


def test_inputs_sent_in_a_different_order_merge_by_name(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.add_sub("FP32")))
    rng = np.random.default_rng(0)
    a, b, c, d = (rng.standard_normal((1, 16), np.float32) for _ in range(4))

    async def test() -> None:
        first = h.submit({"INPUT0": a, "INPUT1": b})
        await h.wait_started(1)
        straight = h.submit({"INPUT0": a, "INPUT1": b})
        swapped = h.submit({"INPUT1": d, "INPUT0": c})
        await settle()
        h.gate.open()
        await first
        same(await straight, h.model.run({"INPUT0": a, "INPUT1": b}))
        same(await swapped, h.model.run({"INPUT0": c, "INPUT1": d}))
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 2]

    run(test)


def test_close_fails_every_waiting_request_and_runs_none(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.mlp()), timeout_s=3600)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        waiting = [h.submit(floats(2, seed)) for seed in (1, 2)]
        await settle()
        h.batcher.close("was unloaded")
        for task in waiting:
            with pytest.raises(Unavailable, match="was unloaded"):
                await task
        assert h.batcher.depth == 0
        h.gate.open()
        await first
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1]

    run(test)


def test_different_requested_outputs_do_not_merge(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.add_sub("FP32")))

    def pair(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {n: rng.standard_normal((1, 16), np.float32) for n in ("INPUT0", "INPUT1")}

    async def test() -> None:
        first = h.submit(pair(0))
        await h.wait_started(1)
        a = h.submit(pair(1), names=["OUTPUT0"])
        b = h.submit(pair(2), names=["OUTPUT1"])
        c = h.submit(pair(3), names=["OUTPUT0"])
        await settle()
        h.gate.open()
        await first
        same(await a, h.model.run(pair(1), ["OUTPUT0"]))
        same(await b, h.model.run(pair(2), ["OUTPUT1"]))
        same(await c, h.model.run(pair(3), ["OUTPUT0"]))
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 2, 1]

    run(test)


@pytest.mark.parametrize("datatype", list(testing.V2_DATATYPES))
def test_batched_results_equal_unbatched_for_every_datatype(tmp_path: Path, datatype: str) -> None:
    h = Harness(load(tmp_path, testing.identity(datatype)))

    def tensor(seed: int, rows: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        if datatype == "BYTES":
            values = [f"r{seed}-{i}-é".encode() for i in range(rows * 4)]
            return {"INPUT0": np.array(values, dtype=object).reshape(rows, 4)}
        if datatype == "BOOL":
            return {"INPUT0": rng.integers(0, 2, (rows, 4)).astype(bool)}
        return {"INPUT0": (rng.standard_normal((rows, 4)) * 100).astype(NUMPY[datatype])}

    async def test() -> None:
        first = h.submit(tensor(0, 1))
        await h.wait_started(1)
        reqs = [tensor(seed, rows) for seed, rows in enumerate([1, 2, 3], start=1)]
        tasks = [h.submit(r) for r in reqs]
        await settle()
        h.gate.open()
        results = await asyncio.gather(first, *tasks)
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 6]
        for req, got in zip(reqs, results[1:], strict=True):
            same(got, h.model.run(req))

    run(test)


def test_a_full_queue_refuses_at_once_and_keeps_what_it_holds(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.mlp()), max_queue_size=2)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        queued = [h.submit(floats(1, 1)), h.submit(floats(1, 2))]
        await settle()
        with pytest.raises(Unavailable, match="queue full") as refused:
            await h.submit(floats(1, 3))
        assert refused.value.retry_after
        assert h.rejections("queue_full") == 1
        h.gate.open()
        await asyncio.gather(first, *queued)

    run(test)


def test_a_request_timed_out_in_the_queue_is_rejected_and_never_runs(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.mlp()), timeout_s=3600)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        late = h.submit(floats(2, 1), timeout_s=0.001)  # shortens the policy's timeout
        kept = h.submit(floats(1, 2))
        with pytest.raises(DeadlineExceeded, match="timed out"):
            await late
        h.gate.open()
        await asyncio.gather(first, kept)
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 1]  # the 2-row one never ran
        assert h.rejections("timeout") == 1

    run(test)


def test_a_request_may_not_override_the_timeout_when_the_policy_says_so(
    tmp_path: Path,
) -> None:
    h = Harness(load(tmp_path, testing.mlp()), allow_timeout_override=False)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        waits = h.submit(floats(1, 1), timeout_s=0.001)
        await asyncio.sleep(0.01)  # well past its own timeout, which is not honoured
        assert not waits.done()
        h.gate.open()
        await asyncio.gather(first, waits)

    run(test)


def test_timeout_action_delay_puts_a_late_request_behind_the_timely_ones(
    tmp_path: Path,
) -> None:
    h = Harness(load(tmp_path, testing.mlp()), delay_on_timeout=True)

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        late = h.submit(floats(3, 1), timeout_s=0.001)
        await asyncio.sleep(0.01)  # its timeout passes: it moves behind later arrivals
        timely = [h.submit(floats(1, seed)) for seed in (2, 3)]
        await settle()
        h.gate.open()
        results = await asyncio.gather(first, late, *timely)
        same(results[1], h.model.run(floats(3, 1)))  # it still runs, after the others
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 2, 3]
        assert h.rejections("timeout") == 0

    run(test)


def test_a_cancelled_request_leaves_the_queue(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, testing.mlp()))

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        gone = h.submit(floats(3, 1))
        kept = h.submit(floats(1, 2))
        await settle()
        gone.cancel()
        await settle()
        assert h.batcher.depth == 1 and h.rejections("cancelled") == 1
        h.gate.open()
        await asyncio.gather(first, kept)
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 1]  # the 3 rows never ran

    run(test)


def test_a_request_past_its_client_deadline_is_dropped_when_its_batch_forms(
    tmp_path: Path,
) -> None:
    h = Harness(load(tmp_path, testing.mlp()))

    async def test() -> None:
        first = h.submit(floats(1, 0))
        await h.wait_started(1)
        late = h.submit(floats(2, 1), deadline=0.0)  # monotonic 0: long past
        kept = h.submit(floats(1, 2))
        await settle()
        h.gate.open()
        await asyncio.gather(first, kept)
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await late
        assert [r["INPUT0"][0] for r in h.gate.runs] == [1, 1]
        assert h.rejections("deadline") == 1

    run(test)


def test_a_bad_request_fails_alone_not_its_batch(tmp_path: Path) -> None:
    h = Harness(load(tmp_path, gather_model()))

    def index(i: int) -> dict[str, np.ndarray]:
        return {"INDEX": np.array([[i]], dtype=np.int64)}

    async def test() -> None:
        first = h.submit(index(0))
        await h.wait_started(1)
        good, bad, other = h.submit(index(3)), h.submit(index(99)), h.submit(index(7))
        await settle()
        h.gate.open()
        await first
        assert (await good)["OUTPUT0"].tolist() == [[3.0]]
        assert (await other)["OUTPUT0"].tolist() == [[7.0]]
        with pytest.raises(InvalidArgument, match="out of data bounds"):
            await bad
        # the merged run failed; each request then ran alone
        assert [r["INDEX"][0] for r in h.gate.runs] == [1, 3, 1, 1, 1]
        assert h.leases == 0

    run(test)


def test_requests_merged_by_the_batcher_still_run_on_a_model_that_cannot_batch_them(
    tmp_path: Path,
) -> None:
    # runtime_failure: batch 1 works, any bigger batch fails inside onnxruntime
    h = Harness(load(tmp_path, testing.runtime_failure()))
    x = {"INPUT0": np.arange(4, dtype=np.float32).reshape(1, 4)}

    async def test() -> None:
        first = h.submit(x)
        await h.wait_started(1)
        tasks = [h.submit(x) for _ in range(3)]
        await settle()
        h.gate.open()
        for got in await asyncio.gather(first, *tasks):
            same(got, {"OUTPUT0": x["INPUT0"]})

    run(test)
