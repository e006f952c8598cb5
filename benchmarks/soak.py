"""Soak: a server under mixed traffic and operator changes for a long while (10 minutes).

A benchmark, not a test. It starts `python -m fleetserve serve` on ephemeral ports over a
repository of --models models (cache_bench.py's: the 16->64->4 MLP, every 10th a
16->512->512->4 one), with a small memory budget (--max-loaded-mib: a tenth of what the
models take loaded, but room for every request in flight), feedback logging
on (--feedback-sample-rate) and an admin token, then for --duration seconds:

- --rest-clients aiohttp and --grpc-clients grpc.aio clients, each in a closed loop, pick
  models by a Zipf law (s = 1.1, cache_bench.py's, seeded) and check every answer;
- an operator flips the routing of the most popular model between its versions 1 and 2
  (--flip-every), and uploads a new version of the second most popular one (served at
  once: the latest version) and deletes the one before the last (--upload-every).

Every --interval it records the server's resident memory (VmRSS), the model cache's
loaded bytes, loads and evictions, the feedback log's counters, and per protocol the
requests, errors and p50 / p99 latency. It writes the JSON report and a PNG of RSS and
p99 over time, prints the RSS plateau (the rise over the second half of the run, and
its slope), and exits 1 if any request got a 5xx (or its gRPC equivalent: INTERNAL,
UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) or a wrong answer.

    python benchmarks/soak.py [--duration 600] [--out benchmarks/out/soak.json]
        [--plot benchmarks/plots/soak.png]

The server, its load threads and the clients share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from cache_bench import SEED, ZIPF_S, Kinds, kind_of, model_name, rss_bytes, write_repository  # noqa: E402
from loadtest import machine_cpu_seconds, tree_cpu_seconds  # noqa: E402
from plot import save_png  # noqa: E402
from report import git_commit, machine_info  # noqa: E402

from tests.server_process import Server, environment  # noqa: E402

TOKEN = "soak-admin-token"
SERVER_ERRORS = {"500", "501", "502", "503", "504", "507", "INTERNAL", "UNKNOWN", "UNAVAILABLE",
                 "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}  # fmt: skip
ROUTINGS = [{"weights": {"1": 100}}, {"weights": {"2": 100}}, {"weights": {"1": 50, "2": 50}}]


class Zipf:
    """Model names drawn by popularity rank (p(k) ~ k^-s), rank -> model fixed by the seed."""

    def __init__(self, n: int, seed: int = SEED) -> None:
        p = np.arange(1, n + 1, dtype=np.float64) ** -ZIPF_S
        self._p = p / p.sum()
        self._rng = np.random.default_rng(seed)
        self.by_rank = [model_name(int(i)) for i in self._rng.permutation(n)]
        self._drawn: list[int] = []

    def __next__(self) -> str:
        if not self._drawn:
            self._drawn = self._rng.choice(len(self._p), size=4096, p=self._p).tolist()
        return self.by_rank[self._drawn.pop()]


class Interval:
    """What the clients saw since the last sample."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {"rest": [], "grpc": []}
        self.outcomes: Counter[str] = Counter()

    def add(self, protocol: str, latency: float, outcome: str) -> None:
        self.latencies[protocol].append(latency)
        self.outcomes[f"{protocol} {outcome}"] += 1


class Soak:
    def __init__(self, args: argparse.Namespace, server: Server, kinds: Kinds) -> None:
        self.args, self.server, self.kinds = args, server, kinds
        http, grpc_port, metrics = server.wait_ready(600)
        self.url, self.grpc = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.zipf = Zipf(args.models)
        self.routed, self.uploaded = self.zipf.by_rank[0], self.zipf.by_rank[1]
        self.interval = Interval()
        self.totals: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self.admin: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.stop = asyncio.Event()

    def failed(self, model: str, outcome: str, message: str) -> None:
        """Keep the first failures' messages for the report (what they were, and when)."""
        if len(self.failures) < 50:
            t_s = round(time.monotonic() - self.started, 1)
            self.failures.append({"t_s": t_s, "model": model, "outcome": outcome,
                                  "message": message[:500]})  # fmt: skip

    def expected(self, model: str) -> np.ndarray:
        return self.kinds.expected[kind_of(int(model[1:]), mixed=True)]

    async def rest_client(self, session: Any) -> None:
        import orjson

        while not self.stop.is_set():
            model = next(self.zipf)
            t0 = time.perf_counter()
            async with session.post(f"{self.url}/v2/models/{model}/infer",
                                    data=self.kinds.body) as resp:  # fmt: skip
                body = await resp.read()
            outcome = str(resp.status)
            if resp.status == 200:
                got = np.asarray(orjson.loads(body)["outputs"][0]["data"], np.float32)
                outcome = "ok" if np.array_equal(got, self.expected(model)) else "wrong"
            else:
                self.failed(model, outcome, body.decode(errors="replace"))
            self.interval.add("rest", time.perf_counter() - t0, outcome)

    async def grpc_client(self, stub: Any) -> None:
        import grpc

        from fleetserve.protos import grpc_service_pb2 as pb

        raw = self.kinds.x.tobytes()
        while not self.stop.is_set():
            model = next(self.zipf)
            request = pb.ModelInferRequest(model_name=model, raw_input_contents=[raw])
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
            t0 = time.perf_counter()
            try:
                answer = pb.ModelInferResponse.FromString(
                    await stub(request.SerializeToString(), timeout=60)
                )
                got = np.frombuffer(answer.raw_output_contents[0], np.float32)
                outcome = "ok" if np.array_equal(got, self.expected(model)) else "wrong"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
                self.failed(model, outcome, exc.details() or "")
            self.interval.add("grpc", time.perf_counter() - t0, outcome)

    async def operator(self, session: Any) -> None:
        """Routing flips and uploads (each followed by deleting the version before last)."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        admin = f"{self.url}/v2/admin/models"
        started, flips, version = time.monotonic(), 0, 1
        next_flip, next_upload = self.args.flip_every, self.args.upload_every
        while not self.stop.is_set():
            await asyncio.sleep(1)
            elapsed = time.monotonic() - started
            if elapsed >= next_flip:
                next_flip += self.args.flip_every
                flips += 1
                routing = ROUTINGS[flips % len(ROUTINGS)]
                async with session.put(f"{admin}/{self.routed}/routing", json=routing,
                                       headers=headers) as r:  # fmt: skip
                    self.admin[f"route {r.status}"] += 1
            if elapsed >= next_upload:
                next_upload += self.args.upload_every
                version += 1
                blob = self.kinds.large if kind_of(int(self.uploaded[1:]), True) == "large" \
                    else self.kinds.small  # fmt: skip
                async with session.put(f"{admin}/{self.uploaded}/versions/{version}",
                                       data=blob, headers=headers) as r:  # fmt: skip
                    self.admin[f"upload {r.status}"] += 1
                if version > 2:
                    async with session.delete(f"{admin}/{self.uploaded}/versions/{version - 2}",
                                              headers=headers) as r:  # fmt: skip
                        self.admin[f"delete {r.status}"] += 1

    async def sampler(self, session: Any) -> None:
        """Every --interval: memory, the cache and feedback counters, CPU (the server's,
        the clients', the rest of the machine's: other sessions), latency and outcomes."""
        pid, started = self.server.proc.pid, time.monotonic()
        cpu = (time.monotonic(), tree_cpu_seconds(pid), time.process_time(),
               machine_cpu_seconds()[0])  # fmt: skip
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.interval)
            if self.stop.is_set():  # a part interval, with the clients stopping: not kept
                self.totals.update(self.interval.outcomes)
                return
            interval, self.interval = self.interval, Interval()
            self.totals.update(interval.outcomes)
            now = (time.monotonic(), tree_cpu_seconds(pid), time.process_time(),
                   machine_cpu_seconds()[0])  # fmt: skip
            wall, server, clients, machine = (b - a for a, b in zip(cpu, now, strict=True))
            cpu = now
            requests = sum(len(v) for v in interval.latencies.values())
            row: dict[str, Any] = {
                "t_s": round(now[0] - started, 1), "rss_mib": round(rss_bytes(pid) / 2**20, 1),
                "server_cpu_pct": round(100 * server / wall), "clients_cpu_pct":
                round(100 * clients / wall), "other_cpu_pct":
                round(100 * max(0.0, machine - server - clients) / wall),
                "server_cpu_us_per_request": round(1e6 * server / max(requests, 1)),
            }  # fmt: skip
            async with session.get(self.metrics_url) as r:
                row.update(_metrics(await r.text()))
            for protocol, latencies in interval.latencies.items():
                errors = sum(n for k, n in interval.outcomes.items()
                             if k.startswith(protocol) and not k.endswith(" ok"))  # fmt: skip
                row[protocol] = {"requests": len(latencies), "errors": errors,
                                 **_percentiles(latencies)}  # fmt: skip
            row["outcomes"] = dict(interval.outcomes)
            self.samples.append(row)
            print(f"  {row['t_s']:4.0f}s rss {row['rss_mib']:.1f} MiB loaded "
                  f"{row['loaded_mib']:.1f} MiB, server {row['server_cpu_pct']}% "
                  f"({row['server_cpu_us_per_request']} us/req) other {row['other_cpu_pct']}%, "
                  f"rest {row['rest']}, grpc {row['grpc']}", flush=True)  # fmt: skip

    async def run(self) -> None:
        import aiohttp
        import grpc

        path = "/inference.GRPCInferenceService/ModelInfer"
        connector = aiohttp.TCPConnector(limit=self.args.rest_clients + 4)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            grpc.aio.insecure_channel(self.grpc) as channel,
        ):
            stub = channel.unary_unary(path)
            tasks = [asyncio.create_task(self.sampler(session)),
                     asyncio.create_task(self.operator(session))]  # fmt: skip
            tasks += [asyncio.create_task(self.rest_client(session))
                      for _ in range(self.args.rest_clients)]  # fmt: skip
            tasks += [asyncio.create_task(self.grpc_client(stub))
                      for _ in range(self.args.grpc_clients)]  # fmt: skip
            await asyncio.sleep(self.args.duration)
            self.stop.set()
            await asyncio.gather(*tasks)


def _metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"fleetserve_loaded_bytes": "loaded_mib", "fleetserve_loaded_models": "loaded",
              "fleetserve_model_loads_total": "loads",
              "fleetserve_model_evictions_total": "evictions",
              "fleetserve_feedback_written_total": "feedback_written",
              "fleetserve_feedback_dropped_total": "feedback_dropped"}  # fmt: skip
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted and not s.labels:
                out[wanted[s.name]] = s.value
    out["loaded_mib"] = round(out.get("loaded_mib", 0) / 2**20, 1)
    return out


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if len(latencies) < 2:
        return {"p50_ms": None, "p99_ms": None}
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": round(cuts[49] * 1e3, 2), "p99_ms": round(cuts[98] * 1e3, 2)}


def plateau(samples: list[dict[str, Any]]) -> dict[str, float]:
    """RSS over the run's second half: its range and its least-squares slope."""
    half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 2]
    t = np.array([s["t_s"] for s in half]) / 60
    rss = np.array([s["rss_mib"] for s in half])
    slope = float(np.polyfit(t, rss, 1)[0]) if len(half) > 2 else float("nan")
    return {"first_half_max_mib": max(s["rss_mib"] for s in samples if s not in half),
            "second_half_min_mib": float(rss.min()), "second_half_max_mib": float(rss.max()),
            "second_half_slope_mib_per_min": round(slope, 3)}  # fmt: skip


def draw(report: dict[str, Any], path: Path) -> None:
    """Three panels over time: RSS (and the cache's count), p99, throughput with CPU."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    samples, s = report["samples"], report["settings"]
    t = [x["t_s"] / 60 for x in samples]
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    rss_ax, p99_ax, rate_ax = fig.subplots(1, 3)
    rss_ax.plot(t, [x["rss_mib"] for x in samples], color="#1f77b4", label="server RSS")
    rss_ax.plot(t, [x["loaded_mib"] for x in samples], color="#2ca02c",
                label="loaded models (the cache's count)")  # fmt: skip
    rss_ax.axhline(s["max_loaded_mib"], color="#2ca02c", ls=":", label="memory budget")
    rss_ax.set_ylabel("MiB")
    rss_ax.set_ylim(bottom=0)
    for protocol, colour in (("rest", "#1f77b4"), ("grpc", "#d62728")):
        p99 = [(x["t_s"] / 60, x[protocol]["p99_ms"]) for x in samples
               if x[protocol]["p99_ms"] is not None]  # fmt: skip
        if p99:
            p99_ax.plot(*zip(*p99, strict=True), color=colour, label=f"{protocol} p99")
        rate = [x[protocol]["requests"] / s["interval_s"] for x in samples]
        rate_ax.plot(t, rate, color=colour, label=f"{protocol} requests/s")
    p99_ax.set_ylabel("p99 latency per interval, ms (log scale)")
    p99_ax.set_yscale("log")
    p99_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    p99_ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    rate_ax.set_ylabel("requests per second")
    rate_ax.set_ylim(bottom=0)
    cpu_ax = rate_ax.twinx()
    cpu_ax.plot(t, [x["other_cpu_pct"] for x in samples], color="#7f7f7f", ls="--",
                label="other work on the machine, % of a core")  # fmt: skip
    cpu_ax.set_ylim(0, 200)
    cpu_ax.set_ylabel("% of a core", color="#7f7f7f")
    cpu_ax.legend(fontsize=8, loc="lower right")
    rate_ax.set_ylim(0, 1.4 * max(rate_ax.get_ylim()[1], 1))  # room for the legends
    panels = ((rss_ax, "Resident memory", "center right"), (p99_ax, "Latency", "upper left"),
              (rate_ax, "Throughput", "upper left"))  # fmt: skip
    for ax, title, where in panels:
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("minutes")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc=where)
    m = report["machine"]
    fig.suptitle(
        f"{report['date']}, commit {report['git_commit']}; {m['cpu_model']}, "
        f"{m['affinity_cpus']} CPUs shared by the server, its clients and other sessions\n"
        f"{s['models']} models, Zipf s={ZIPF_S}, budget {s['max_loaded_mib']} MiB, "
        f"{s['rest_clients']} REST + {s['grpc_clients']} gRPC clients, feedback rate "
        f"{s['feedback_sample_rate']}, routing flip every {s['flip_every_s']:g} s, upload "
        f"every {s['upload_every_s']:g} s; one point per {s['interval_s']:g} s",
        fontsize=8, color="#444444",
    )  # fmt: skip
    save_png(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    ap.add_argument("--models", type=int, default=1000)
    # a budget the requests in flight can fill (clients x the largest model, 4.4 MB when
    # measured) answers a newcomer 503 "no room", by design: 40 MiB holds 8 in use
    ap.add_argument("--max-loaded-mib", type=int, default=40, help="the server's budget")
    ap.add_argument("--rest-clients", type=int, default=4)
    ap.add_argument("--grpc-clients", type=int, default=4)
    ap.add_argument("--feedback-sample-rate", type=float, default=0.1)
    ap.add_argument("--flip-every", type=float, default=5, help="seconds between routing flips")
    ap.add_argument("--upload-every", type=float, default=30, help="seconds between uploads")
    ap.add_argument("--interval", type=float, default=10, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "soak.json")
    ap.add_argument("--plot", type=Path, default=HERE / "out" / "soak.png")
    ap.add_argument("--server-log", type=Path, default=HERE / "out" / "soak-server.log",
                    help="the server's log lines (every load and eviction)")  # fmt: skip
    args = ap.parse_args()
    kinds = Kinds.build()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        repo = write_repository(Path(tmp) / "models", args.models, kinds, mixed=True)
        routed = repo / Zipf(args.models).by_rank[0]  # gets a second version, the same file
        (routed / "2").mkdir()
        (routed / "2" / "model.onnx").write_bytes((routed / "1" / "model.onnx").read_bytes())
        server = Server(
            "--model-repository", str(repo), "--host", "127.0.0.1", "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "0", "--data-dir", str(Path(tmp) / "data"),
            "--max-loaded-bytes", f"{args.max_loaded_mib}MiB",
            "--feedback-sample-rate", str(args.feedback_sample_rate),
            env=environment(FLEETSERVE_ADMIN_TOKEN=TOKEN),
        )  # fmt: skip
        with server:
            soak = Soak(args, server, kinds)
            print(f"soak: {args.duration:.0f} s, server pid {server.proc.pid}", flush=True)
            asyncio.run(soak.run())
            exit_code = server.stop()
    args.server_log.parent.mkdir(parents=True, exist_ok=True)
    args.server_log.write_text("\n".join(server.lines) + "\n")
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(), "machine": machine_info(), "command": " ".join(sys.argv),
        "settings": {"duration_s": args.duration, "models": args.models,
                     "max_loaded_mib": args.max_loaded_mib, "rest_clients": args.rest_clients,
                     "grpc_clients": args.grpc_clients,
                     "feedback_sample_rate": args.feedback_sample_rate,
                     "flip_every_s": args.flip_every, "upload_every_s": args.upload_every,
                     "interval_s": args.interval,
                     "routed_model": soak.routed, "uploaded_model": soak.uploaded},
        "outcomes": dict(soak.totals.most_common()), "admin": dict(soak.admin),
        "failures": soak.failures,
        "rss_plateau": plateau(soak.samples), "server_exit_code": exit_code,
        "samples": soak.samples,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    draw(report, args.plot)
    server_errors = {k: n for k, n in soak.totals.items() if k.split()[1] in SERVER_ERRORS}
    wrong = {k: n for k, n in soak.totals.items() if k.endswith(" wrong")}
    for failure in soak.failures:
        print(f"  failed: {failure}")
    print(f"outcomes {report['outcomes']}\nadmin {report['admin']}\n"
          f"RSS plateau {report['rss_plateau']}\nserver exit {exit_code}; "
          f"report {args.out}, plot {args.plot}")  # fmt: skip
    if server_errors or wrong or exit_code != 0:
        print(f"FAILED: 5xx {server_errors}, wrong answers {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
