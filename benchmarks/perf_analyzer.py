"""perf_analyzer, Triton's own load tool, against fleetserve: both protocols, a model that
batches and one that does not.

Starts `python -m fleetserve serve` on free ports over a repository holding one MLP
(`fleetserve.loaders.testing.mlp`) under two configs: `mlp` (max_batch_size 32, no
dynamic_batching: every request runs alone) and `mlp_batched` (the same plus
`dynamic_batching { }`). It checks one real request per model and protocol against
onnxruntime, then runs perf_analyzer as its users do, without `-x` (it finds the version
from the statistics), once per concurrency, protocol and model, interleaved so that the
two models of a comparison run close in time, each with `-f` (CSV). It prints a table
and appends a dated section (date, commit, machine, commands) to benchmarks/RESULTS.md.

    bash benchmarks/setup.sh        # once: perf_analyzer into benchmarks/out/perf_analyzer/
    python benchmarks/perf_analyzer.py --concurrency 1,4,16 --batch-size 1

A benchmark, not a test: CI does not run it. Load goes only to the server it starts on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from loadtest import (  # noqa: E402
    Server,
    build_payload,
    check_grpc,
    check_rest,
    free_port,
    http_status,
    log,
    machine_cpu_seconds,
    tree_cpu_seconds,
    wait_until,
)
from report import git_commit, machine_info  # noqa: E402

PERF_ANALYZER = HERE / "out" / "perf_analyzer" / "perf_analyzer"
MAX_BATCH = 32
MODELS = {"mlp": "", "mlp_batched": "dynamic_batching { }\n"}  # config beyond max_batch_size
# perf_analyzer's CSV columns (times in microseconds) -> ours
COLUMNS = {
    "Inferences/Second": "infer_per_s",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p99 latency": "p99_us",
    "Server Queue": "queue_us",
    "Server Compute Input": "compute_input_us",
    "Server Compute Infer": "compute_infer_us",
    "Server Compute Output": "compute_output_us",
}


@dataclass
class Point:
    protocol: str
    model: str
    batch: int
    concurrency: int
    command: list[str]
    figures: dict[str, float] = field(default_factory=dict)  # COLUMNS' values
    server_cpu_pct: float = 0.0  # of one core, over the whole perf_analyzer run
    perf_analyzer_cpu_pct: float = 0.0
    other_pct: float = 0.0  # the rest of the machine's busy time: someone else's work
    seconds: float = 0.0
    tries: int = 0
    error: str = ""


def write_repository(root: Path, layers: list[int]) -> str:
    from fleetserve.loaders.testing import mlp, write_model

    data = mlp(layers=layers)
    for name, extra in MODELS.items():
        write_model(root, name, data, config=f"max_batch_size: {MAX_BATCH}\n{extra}")
    return f"fleetserve.loaders.testing.mlp(layers={layers})"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_point(server: Server, point: Point, timeout: float) -> None:
    """Run one perf_analyzer; fill the point's figures (or its error) and CPU shares."""
    point.tries += 1
    point.error = ""
    busy0, srv0 = machine_cpu_seconds()[0], tree_cpu_seconds(server.proc.pid)
    pa0, t0 = children_cpu_seconds(), time.monotonic()
    try:
        proc = subprocess.run(point.command, capture_output=True, text=True, timeout=timeout)
        failed, output = proc.returncode != 0, proc.stdout + proc.stderr
        if failed:
            output += f"\nexit status {proc.returncode}"
    except subprocess.TimeoutExpired:  # subprocess.run killed it
        failed, output = True, f"no result within {timeout:.0f} s"
    point.seconds = time.monotonic() - t0
    busy, srv = machine_cpu_seconds()[0] - busy0, tree_cpu_seconds(server.proc.pid) - srv0
    pa = children_cpu_seconds() - pa0
    point.server_cpu_pct = 100 * srv / point.seconds
    point.perf_analyzer_cpu_pct = 100 * pa / point.seconds
    point.other_pct = max(0.0, 100 * (busy - srv - pa) / point.seconds)
    csv_file = Path(point.command[point.command.index("-f") + 1])
    if failed or not csv_file.exists():
        # perf_analyzer says why in its last lines (before our exit status line)
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        point.error = "; ".join(lines[-3:])
        return
    with csv_file.open() as f:
        (row,) = list(csv.DictReader(f))  # one concurrency: one row
    point.figures = {ours: float(row[theirs]) for theirs, ours in COLUMNS.items()}


def table(points: list[Point]) -> list[str]:
    """Markdown rows: one per point, then the batched / unbatched throughput ratios."""
    out = [
        "| proto | model | -b | conc | infer/s | p50 ms | p90 ms | p99 ms | server queue us "
        "| server compute us | server CPU % | perf_analyzer CPU % | other % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        head = f"| {p.protocol} | {p.model} | {p.batch} | {p.concurrency} |"
        cpu = f" {p.server_cpu_pct:.0f} | {p.perf_analyzer_cpu_pct:.0f} | {p.other_pct:.0f} |"
        if p.error:
            out.append(f"{head} FAILED: {p.error} | | | | | |{cpu}")
            continue
        f = p.figures
        compute = f["compute_input_us"] + f["compute_infer_us"] + f["compute_output_us"]
        out.append(
            f"{head} {f['infer_per_s']:.0f} | {f['p50_us'] / 1e3:.3f} | {f['p90_us'] / 1e3:.3f}"
            f" | {f['p99_us'] / 1e3:.3f} | {f['queue_us']:.0f} | {compute:.0f} |{cpu}"
        )
    by_key = {(p.protocol, p.model, p.concurrency): p for p in points if not p.error}
    ratios = []
    for (protocol, model, conc), p in by_key.items():
        other = by_key.get((protocol, "mlp", conc))
        if model == "mlp_batched" and other is not None:
            rps = p.figures["infer_per_s"] / other.figures["infer_per_s"]
            p99 = p.figures["p99_us"] / other.figures["p99_us"]
            ratios.append(f"| {protocol} | {conc} | {rps:.2f} | {p99:.2f} |")
    if ratios:
        out += ["", "mlp_batched / mlp, same run:", "", "| proto | conc | infer/s | p99 |"]
        out += ["|---|---|---|---|", *ratios]
    return out


def results_section(
    args: argparse.Namespace, points: list[Point], model: str, server_cmd: list[str], pa_note: str
) -> str:
    m = machine_info()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(
        f"{k} {m[k]}" for k in ("onnxruntime", "aiohttp", "grpc", "uvloop") if k in m
    )
    example = points[0].command if points else ["perf_analyzer"]
    shown = ["perf_analyzer"] + [Path(a).name if a.endswith(".csv") else a for a in example[1:]]
    repo = server_cmd[server_cmd.index("--model-repository") + 1]
    server = ["python"] + ["MODELS" if a == repo else a for a in server_cmd[1:]]
    lines = [
        f"## perf_analyzer against fleetserve ({date})",
        "",
        f"- **Date:** {date}. **Commit:** `{git_commit()}`.",
        f"- **Machine:** {m['uname'].split()[0]} {m['uname'].split()[-1]}, {m['cpu_model']}, "
        f"{m['nproc']} CPUs ({m['affinity_cpus']} usable), {m['mem_total_gib']} GiB, "
        f"Python {m['python']}, {versions}. perf_analyzer ({pa_note}) runs on the same "
        "cores as the server; its CPU and everything else's are in the table.",
        "- **Command:** `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`",
        "- **Each point:** `" + " ".join(shlex.quote(a) for a in shown) + "` (this model, "
        "protocol, port and concurrency; no `-x`: perf_analyzer picks the version whose "
        "statistics grew)",
        f"- **Server:** `{' '.join(shlex.quote(a) for a in server)}` (MODELS: a temporary "
        "repository)",
        f"- **Models:** `{model}` as `mlp` (max_batch_size {MAX_BATCH}, no dynamic batching) "
        "and `mlp_batched` (the same with `dynamic_batching { }`); perf_analyzer's own "
        "random FP32 inputs, `-b` rows each.",
    ]
    if args.note:
        lines.append(f"- **Note:** {args.note}")
    return "\n".join([*lines, "", *table(points), ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perf-analyzer", default=str(PERF_ANALYZER), help="the binary (setup.sh)")
    ap.add_argument("--protocols", default="http,grpc", help="perf_analyzer's -i values")
    ap.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--concurrency", default="1,4,16", help="one perf_analyzer run each")
    ap.add_argument("--batch-size", type=int, default=1, help="perf_analyzer's -b")
    ap.add_argument("--mlp-layers", default="16,64,4", help="widths, input to output")
    ap.add_argument("--measurement-interval", type=int, default=2000, help="ms (-p)")
    ap.add_argument("--stability-percentage", type=int, default=20, help="(-s)")
    ap.add_argument("--pa-args", default="", help="more perf_analyzer flags, e.g. --async")
    ap.add_argument("--fleetserve-args", default="", help="more `fleetserve serve` flags")
    ap.add_argument("--retries", type=int, default=1, help="more tries for a failed point")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per perf_analyzer run")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="'' to append nowhere")
    ap.add_argument("--note", default="", help="a line for the results, e.g. machine load")
    args = ap.parse_args()

    pa = Path(args.perf_analyzer)
    if not pa.exists():
        sys.exit(f"{pa} not found: run `bash benchmarks/setup.sh` (or pass --perf-analyzer)")
    pa_version = pa.parent / "VERSION"
    pa_note = pa_version.read_text().strip() if pa_version.exists() else str(pa)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    outdir = HERE / "out" / f"perf_analyzer-{stamp}"  # CSVs, server log, JSON report
    outdir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="fleetserve-pa-") as tmp:
        repo = Path(tmp) / "models"
        model = write_repository(repo, [int(w) for w in args.mlp_layers.split(",")])
        http, grpc = free_port(), free_port()
        server_cmd = [
            sys.executable, "-m", "fleetserve", "serve", "--model-repository", str(repo),
            "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", "-1", "--preload", *shlex.split(args.fleetserve_args),
        ]  # fmt: skip
        server = Server("fleetserve", server_cmd, outdir, None)
        points: list[Point] = []
        try:
            ready = f"http://127.0.0.1:{http}/v2/health/ready"
            wait_until("ready", server, lambda: http_status(ready) == 200, 120)
            models = args.models.split(",")
            for name in models:
                payload = build_payload(repo / name / "1" / "model.onnx", name)
                check_rest(f"http://127.0.0.1:{http}/v2/models/{name}/infer", payload)
                check_grpc(f"127.0.0.1:{grpc}", payload)
            for conc in [int(c) for c in args.concurrency.split(",")]:
                for protocol in args.protocols.split(","):
                    url = f"127.0.0.1:{http if protocol == 'http' else grpc}"
                    for name in models:
                        csv_file = outdir / f"{protocol}-{name}-b{args.batch_size}-c{conc}.csv"
                        command = [
                            str(pa), "-m", name, "-i", protocol, "-u", url,
                            "-b", str(args.batch_size), "--concurrency-range", str(conc),
                            "-f", str(csv_file),
                            "--measurement-interval", str(args.measurement_interval),
                            "--stability-percentage", str(args.stability_percentage),
                            *shlex.split(args.pa_args),
                        ]  # fmt: skip
                        point = Point(protocol, name, args.batch_size, conc, command)
                        log(f"{protocol} {name} -b {args.batch_size} c={conc} ...")
                        run_point(server, point, args.timeout)
                        while point.error and point.tries <= args.retries and server.alive():
                            log(f"  {point.error}: again")
                            run_point(server, point, args.timeout)
                        if not server.alive():
                            point.error = f"the server died:\n{server.log_tail()}"
                        points.append(point)
                        log(f"  {point.error or point.figures}")
                        if not server.alive():
                            break
        finally:
            server.stop()
    section = results_section(args, points, model, server_cmd, pa_note)
    print(section)
    report = {"settings": vars(args), "server": server_cmd, "points": [asdict(p) for p in points]}
    (outdir / "report.json").write_text(json.dumps(report, indent=1))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + section)
        log(f"appended to {args.results}; CSVs, server log and report.json in {outdir}")
    return 1 if any(p.error for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
