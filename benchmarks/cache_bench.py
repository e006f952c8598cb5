"""Model cache benchmark: registry cost, Zipf traffic through the cache, warm hits under loads.

A benchmark, not a test (CI does not run it). It starts its own servers,
`python -m fleetserve serve ... --host 127.0.0.1`, and sends load only to them.

(a) Startup and registry cost. For N in --startup-models (plus N = 1 as the reference) it
    writes a repository of N model directories (the same small MLP bytes in each), starts
    the server with lazy loading and measures the time from process start to the
    "fleetserve ready" log line, and the process's resident memory (VmRSS in
    /proc/PID/status) read as soon as that line appears. Registry cost = RSS(N) - RSS(1).

(b) Zipf traffic. N models (--zipf-models), a model-count budget of --budget-fraction of
    them (--max-loaded-models), model ranks drawn from a Zipf law (p(k) ~ k^-s, s = 1.1,
    k = 1..N, numpy, fixed seed; rank -> model through a fixed random permutation), a
    closed loop of --concurrency aiohttp clients for --requests requests. 90% of the
    models are the 16->64->4 MLP (5.6 KB), every 10th is a 16->512->512->4 MLP (1.1 MB),
    so reload costs differ and the cost-aware policy has something to weigh. The same
    stream runs once per --policies (lru, cost), each on a fresh server.

    Hit rate, server side: 1 - loads / requests, from the server's metrics
    (fleetserve_model_loads_total and fleetserve_requests_total, before and after).

    Cold start or hit, per request: the server logs every completed load
    ("loaded NAME:1 in ...s", with a millisecond timestamp). A request for model M is a
    cold start iff a load of M completed between the moment it was sent and the moment
    its answer arrived (allowing 2 ms for the log's truncated timestamps). This is exact
    in both directions up to that tolerance: a request that found M unloaded (or loading)
    waits for that load to complete, so the completion falls inside its window; a request
    that found M loaded holds a lease on it, so M cannot be evicted and reloaded while it
    runs. (The one blind spot, M evicted and reloaded between the request leaving the
    client and reaching the server, makes a hit look cold; it needs the model to be both
    least recently used and requested at that instant.) Single flight means several
    requests can share one load, so cold requests >= loads.

    Memory: VmRSS sampled every 0.5 s (ready, end, max), against the budget and the
    fleetserve_loaded_bytes gauge.

(c) Warm hits under concurrent loads: the same stream on a server with every model
    preloaded (--preload, no budget), so every request is a hit; compared with the hits
    of the LRU run, which ran while cold loads were going on.

The machine has 2 cores: the server, its load threads and this client share them.

    python benchmarks/cache_bench.py                       # the defaults below
    python benchmarks/cache_bench.py --startup-models 1000 --zipf-models 1000 --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from report import git_commit, machine_info  # noqa: E402

from fleetserve.loaders import testing  # noqa: E402

READY = re.compile(r"fleetserve ready: http [\w.:]+:(\d+) grpc \S+ metrics [\w.:]+:(-?\d+)")
LOADED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO server\.cache: loaded (\S+):(\d+) in "
)
ZIPF_S = 1.1
SEED = 20261127


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- models and repositories -----------------------------------------------------------------


@dataclass
class Kinds:
    """The model files used, and the answer each gives to the benchmark's one input."""

    small: bytes
    large: bytes
    x: np.ndarray
    body: bytes
    expected: dict[str, np.ndarray]  # kind -> OUTPUT0, flat FP32

    @staticmethod
    def build() -> Kinds:
        import onnxruntime as ort

        small = testing.mlp(seed=1)
        large = testing.mlp(layers=[16, 512, 512, 4], seed=2)
        x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
        expected = {}
        for kind, blob in (("small", small), ("large", large)):
            session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
            out = session.run(None, {"INPUT0": x})[0]
            expected[kind] = out.ravel()
        body = json.dumps(
            {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                         "data": x.ravel().tolist()}]}
        ).encode()  # fmt: skip
        return Kinds(small, large, x, body, expected)


def model_name(i: int) -> str:
    return f"m{i:05d}"


def kind_of(i: int, mixed: bool) -> str:
    return "large" if mixed and i % 10 == 0 else "small"


def write_repository(root: Path, n: int, kinds: Kinds, mixed: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        version = root / model_name(i) / "1"
        version.mkdir(parents=True)
        blob = kinds.large if kind_of(i, mixed) == "large" else kinds.small
        (version / "model.onnx").write_bytes(blob)
    return root


# -- a server process --------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Server:
    repo: Path
    args: list[str]
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    ready_s: float = float("nan")
    ready_rss: int = 0
    ports: tuple[int, int] | None = None
    loads: dict[str, list[float]] = field(default_factory=dict)  # model -> completion times
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "fleetserve", "serve", "--model-repository", str(self.repo),
            "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
            "--host", "127.0.0.1", *self.args,
        ]  # fmt: skip

    def start(self) -> Server:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            match = LOADED.match(line)
            if match:
                stamp = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp()
                self.loads.setdefault(match[3], []).append(stamp + int(match[2]) / 1000)
                continue
            if self.ports is None:
                ready = READY.search(line)
                if ready:
                    self.ready_s = time.perf_counter() - self.started
                    self.ready_rss = rss_bytes(self.proc.pid)
                    self.ports = (int(ready[1]), int(ready[2]))
                    self._ready.set()
            if "evicting" not in line:
                self.lines.append(line)
        self._ready.set()

    def wait_ready(self, timeout: float = 600) -> Server:
        if not self._ready.wait(timeout) or self.ports is None:
            raise RuntimeError("server not ready:\n" + "".join(self.lines[-30:]))
        return self

    @property
    def url(self) -> str:
        assert self.ports is not None
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def metrics_url(self) -> str:
        assert self.ports is not None
        return f"http://127.0.0.1:{self.ports[1]}/metrics"

    def rss(self) -> int:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(30)  # every log line read (the load times)


def scrape(server: Server) -> dict[str, float]:
    """The cache's metrics, and fleetserve_requests_total summed over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {"requests": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fleetserve_requests_total":
                out["requests"] += s.value
            elif s.name.startswith(("fleetserve_model", "fleetserve_loaded")) and not s.labels:
                out[s.name] = s.value
    return out


# -- traffic ------------------------------------------------------------------------------------


@dataclass
class Sample:
    model: str
    sent: float  # wall clock, to compare with the server's log
    received: float
    latency: float  # perf_counter difference
    outcome: str  # ok | wrong | no_room | unavailable | http_<status>


def zipf_stream(n: int, requests: int, seed: int = SEED) -> list[str]:
    ranks = np.arange(1, n + 1, dtype=np.float64)
    p = ranks**-ZIPF_S
    p /= p.sum()
    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(n)  # rank k -> model index
    drawn = rng.choice(n, size=requests, p=p)
    return [model_name(int(by_rank[k])) for k in drawn]


async def drive(
    server: Server, stream: list[str], kinds: Kinds, mixed: bool, concurrency: int
) -> tuple[list[Sample], float, list[int]]:
    """Closed loop: `concurrency` clients send the stream in order, each its next request
    when its previous answer arrives. Returns samples, wall seconds and RSS samples."""
    import aiohttp
    import orjson

    todo = iter(stream)
    samples: list[Sample] = []
    rss: list[int] = []
    done = asyncio.Event()

    async def sample_rss() -> None:
        while not done.is_set():
            rss.append(server.rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for model in todo:
                want = kinds.expected[kind_of(int(model[1:]), mixed)]
                sent, t0 = time.time(), time.perf_counter()
                async with session.post(
                    f"{server.url}/v2/models/{model}/infer", data=kinds.body, headers=headers
                ) as resp:
                    body = await resp.read()
                    latency = time.perf_counter() - t0
                    if resp.status == 200:
                        data = orjson.loads(body)["outputs"][0]["data"]
                        got = np.asarray(data, dtype=np.float32)
                        outcome = "ok" if np.array_equal(got, want) else "wrong"
                    elif resp.status == 503:
                        error = orjson.loads(body)["error"]
                        outcome = "no_room" if "no room" in error else "unavailable"
                    else:
                        outcome = f"http_{resp.status}"
                samples.append(Sample(model, sent, time.time(), latency, outcome))

        sampler = asyncio.create_task(sample_rss())
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        done.set()
        await sampler
    rss.append(server.rss())
    return samples, wall, rss


def is_cold(sample: Sample, loads: dict[str, list[float]], slack: float = 0.002) -> bool:
    times = loads.get(sample.model)
    if not times:
        return False
    i = bisect.bisect_left(times, sample.sent - slack)
    return i < len(times) and times[i] <= sample.received + slack


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q)) * 1000  # ms


def summarize(
    label: str,
    server: Server,
    samples: list[Sample],
    wall: float,
    rss: list[int],
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    for times in server.loads.values():
        times.sort()
    outcomes = Counter(s.outcome for s in samples)
    ok = [s for s in samples if s.outcome == "ok"]
    cold = [s for s in ok if is_cold(s, server.loads)]
    cold_ids = {id(s) for s in cold}
    hits = [s for s in ok if id(s) not in cold_ids]
    half = samples[len(samples) // 2 :]
    half_ok = [s for s in half if s.outcome == "ok"]
    half_cold = sum(1 for s in half_ok if id(s) in cold_ids)
    requests = after["requests"] - before["requests"]
    loads = after["fleetserve_model_loads_total"] - before["fleetserve_model_loads_total"]
    load_s = (
        after["fleetserve_model_load_duration_seconds_sum"]
        - before["fleetserve_model_load_duration_seconds_sum"]
    )
    return {
        "label": label,
        "requests": len(samples),
        "outcomes": dict(outcomes),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(samples) / wall, 1),
        "server_requests": int(requests),
        "server_loads": int(loads),
        "server_evictions": int(
            after["fleetserve_model_evictions_total"] - before["fleetserve_model_evictions_total"]
        ),
        "server_load_failures": int(
            after["fleetserve_model_load_failures_total"]
            - before["fleetserve_model_load_failures_total"]
        ),
        "server_hit_rate": round(1 - loads / requests, 4) if requests else float("nan"),
        "load_seconds_total": round(load_s, 2),
        "load_ms_mean": round(1000 * load_s / loads, 2) if loads else float("nan"),
        "cold_requests": len(cold),
        "client_hit_rate": round(len(hits) / len(ok), 4) if ok else float("nan"),
        "client_hit_rate_second_half": round(1 - half_cold / len(half_ok), 4)
        if half_ok
        else float("nan"),
        "all_p50_ms": round(pct([s.latency for s in ok], 50), 3),
        "all_p99_ms": round(pct([s.latency for s in ok], 99), 3),
        "hit_p50_ms": round(pct([s.latency for s in hits], 50), 3),
        "hit_p99_ms": round(pct([s.latency for s in hits], 99), 3),
        "cold_p50_ms": round(pct([s.latency for s in cold], 50), 3),
        "cold_p99_ms": round(pct([s.latency for s in cold], 99), 3),
        "rss_ready_mib": round(server.ready_rss / 2**20, 1),
        "rss_end_mib": round(rss[-1] / 2**20, 1),
        "rss_max_mib": round(max(rss) / 2**20, 1),
        "loaded_models_end": int(after["fleetserve_loaded_models"]),
        "loaded_bytes_end_mib": round(after["fleetserve_loaded_bytes"] / 2**20, 2),
    }


# -- the parts -----------------------------------------------------------------------------------


def part_startup(work: Path, kinds: Kinds, sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    repos = {}
    for n in sorted({1, *sizes}):
        t0 = time.perf_counter()
        repos[n] = write_repository(work / f"startup-{n}", n, kinds, mixed=False)
        log(f"(a) wrote {n} models in {time.perf_counter() - t0:.1f}s")
    runs: dict[int, list[tuple[float, int]]] = {n: [] for n in repos}
    for r in range(repeat):  # interleaved, so drift on the machine hits every size alike
        for n, repo in repos.items():
            server = Server(repo, []).start()
            try:
                server.wait_ready()
                runs[n].append((server.ready_s, server.ready_rss))
            finally:
                server.stop()
            log(f"(a) round {r + 1} N={n}: ready {server.ready_s:.2f}s RSS "
                f"{server.ready_rss / 2**20:.1f} MiB")  # fmt: skip
    base_rss = statistics.median(rss for _, rss in runs[1])
    out = []
    for n, values in runs.items():
        ready = statistics.median(s for s, _ in values)
        rss = statistics.median(r for _, r in values)
        out.append(
            {
                "models": n,
                "ready_s_median": round(ready, 3),
                "ready_s_all": [round(s, 3) for s, _ in values],
                "rss_mib_median": round(rss / 2**20, 1),
                "registry_mib": round((rss - base_rss) / 2**20, 2),
                "registry_bytes_per_model": round((rss - base_rss) / n) if n > 1 else 0,
            }
        )
    for repo in repos.values():
        shutil.rmtree(repo, ignore_errors=True)
    return out


def part_zipf(
    work: Path, kinds: Kinds, n: int, args: argparse.Namespace, with_preload: bool
) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    repo = write_repository(work / f"zipf-{n}", n, kinds, mixed=True)
    log(f"(b) wrote {n} models in {time.perf_counter() - t0:.1f}s")
    budget = max(1, int(n * args.budget_fraction))
    stream = zipf_stream(n, args.requests)
    distinct = len(set(stream))
    log(f"(b) N={n}: {len(stream)} requests over {distinct} distinct models, budget {budget}")
    runs = [(f"{p}", ["--max-loaded-models", str(budget), "--eviction-policy", p])
            for p in args.policies]  # fmt: skip
    if with_preload:
        runs.append(("preload", ["--preload"]))
    out = []
    for label, extra in runs:
        server = Server(repo, extra).start()
        try:
            server.wait_ready()
            before = scrape(server)
            samples, wall, rss = asyncio.run(drive(server, stream, kinds, True, args.concurrency))
            after = scrape(server)
        finally:
            server.stop()
        row = summarize(label, server, samples, wall, rss, before, after)
        row.update(
            models=n,
            budget_models=budget if label != "preload" else None,
            distinct_models=distinct,
            ready_s=round(server.ready_s, 2),
            server_args=extra,
        )
        log(f"(b) N={n} {label}: {json.dumps(row)}")
        out.append(row)
    shutil.rmtree(repo, ignore_errors=True)
    return out


# -- reporting -----------------------------------------------------------------------------------


def print_tables(report: dict[str, Any]) -> None:
    print("\n(a) startup and registry cost (lazy loading; median of rounds)")
    print("| models | ready s | RSS MiB | registry MiB | bytes/model |")
    print("|---|---|---|---|---|")
    for r in report["startup"]:
        print(f"| {r['models']} | {r['ready_s_median']:.3f} | {r['rss_mib_median']} | "
              f"{r['registry_mib']} | {r['registry_bytes_per_model']} |")  # fmt: skip
    print("\n(b, c) Zipf s=1.1 traffic, closed loop")
    cols = ["models", "label", "budget_models", "throughput_rps", "server_hit_rate",
            "client_hit_rate", "client_hit_rate_second_half", "server_loads", "cold_requests",
            "load_seconds_total", "hit_p50_ms", "hit_p99_ms", "cold_p50_ms", "cold_p99_ms",
            "rss_ready_mib", "rss_end_mib", "rss_max_mib", "loaded_bytes_end_mib"]  # fmt: skip
    print("| " + " | ".join(cols) + " | outcomes |")
    print("|" + "---|" * (len(cols) + 1))
    for r in report["zipf"]:
        print("| " + " | ".join(str(r[c]) for c in cols) + f" | {r['outcomes']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--startup-models", default="1000,10000", help="N for part (a), comma list")
    ap.add_argument("--startup-repeat", type=int, default=3)
    ap.add_argument("--zipf-models", default="1000", help="N for part (b), comma list")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--budget-fraction", type=float, default=0.1)
    ap.add_argument("--policies", default="lru,cost")
    ap.add_argument("--no-preload", action="store_true", help="skip part (c)")
    ap.add_argument("--out", help="JSON report (default benchmarks/out/<UTC time>-cache.json)")
    args = ap.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]

    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine_info(),
        "command": " ".join(["python", "benchmarks/cache_bench.py", *(argv or sys.argv[1:])]),
        "zipf_s": ZIPF_S,
        "seed": SEED,
    }
    kinds = Kinds.build()
    report["model_bytes"] = {"small": len(kinds.small), "large": len(kinds.large)}
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        work = Path(tmp)
        sizes = [int(s) for s in args.startup_models.split(",") if s]
        report["startup"] = part_startup(work, kinds, sizes, args.startup_repeat) if sizes else []
        report["zipf"] = []
        for i, n in enumerate(int(s) for s in args.zipf_models.split(",") if s):
            preload = not args.no_preload and i == 0
            report["zipf"] += part_zipf(work, kinds, n, args, with_preload=preload)
    report["elapsed_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    out = Path(args.out) if args.out else (
        HERE / "out" / f"{started.strftime('%Y%m%dT%H%M%SZ')}-cache.json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nreport: {out} ({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
