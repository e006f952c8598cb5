"""A long fuzzing run: tests/test_fuzz.py's generators, N examples each, one seed.

A benchmark, not a test (CI runs the short, derandomized version in tests/test_fuzz.py).
It starts its own server, `python -m fleetserve serve` on ephemeral ports over the fuzz
repository (tests/fuzz_cases.py), sends every generated case to it, has
tests/fuzz_oracle.py judge each answer, and never stops at a problem: it counts
outcomes per generator, counts problems by issue 12 item (known) or by message (new),
keeps the smallest case of each, and checks after each generator that a valid REST and
gRPC request still gets its answer. The server's RSS is read at the start and the end.

    python benchmarks/fuzz_run.py --examples 2000 --seed 12 [--generators json,grpc]
        [--out benchmarks/out/fuzz.json]

Exit status 1 when a new problem was found (or the server stopped serving).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from report import git_commit, machine_info  # noqa: E402

from tests.fuzz_cases import ADMIN_TOKEN, build_repository  # noqa: E402
from tests.fuzz_oracle import GENERATORS, KNOWN, Target  # noqa: E402
from tests.server_process import Server, environment  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fuzz(target: Target, name: str, examples: int, seed_: int) -> dict[str, Any]:
    """Run one generator for `examples` cases; never stops at a problem."""
    strategy, method = GENERATORS[name]
    check = getattr(target, method)
    outcomes: Counter[str] = Counter()
    problems: dict[str, dict[str, Any]] = {}  # "item N" or the problem's first words
    started = time.monotonic()

    @seed(seed_)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
    @given(case=strategy)
    def prop(case: Any) -> None:
        for verdict in check(case):
            outcomes[verdict.outcome] += 1
            if verdict.problem:
                key = f"item {verdict.item}" if verdict.item else verdict.problem[:48]
                text = f"{case!r:.1500}"
                found = problems.setdefault(key, {"count": 0, "problem": "", "case": ""})
                found["count"] += 1
                if not found["case"] or len(text) < len(found["case"]):
                    found["problem"], found["case"] = verdict.problem[:500], text
        done = sum(outcomes.values())
        if done % 1000 == 0:
            print(f"  {name}: {done} answers, {time.monotonic() - started:.0f} s", flush=True)

    prop()
    target.assert_serves()
    seconds = round(time.monotonic() - started, 1)
    return {"generator": name, "examples": examples, "seconds": seconds,
            "outcomes": dict(outcomes.most_common()), "problems": problems}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per generator")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--generators", default=",".join(GENERATORS))
    parser.add_argument("--out", type=Path, default=HERE / "out" / "fuzz.json")
    args = parser.parse_args()
    names = args.generators.split(",")
    unknown = set(names) - set(GENERATORS)
    if unknown:
        parser.error(f"unknown generators {sorted(unknown)}; known: {', '.join(GENERATORS)}")

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        repo = build_repository(root / "models")
        server = Server(
            "--model-repository", str(repo), "--host", "127.0.0.1", "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "-1", "--data-dir", str(root / "data"),
            "--max-request-size", "1MiB", "--feedback-flush-secs", "0.05", "--preload",
            env=environment(FLEETSERVE_ADMIN_TOKEN=ADMIN_TOKEN),
        )  # fmt: skip
        with server:
            http, grpc_port, _ = server.wait_ready()
            target = Target(http, f"127.0.0.1:{grpc_port}", [str(root), str(root.resolve())])
            target.route()
            target.assert_serves()
            rss_start = rss_kib(server.proc.pid)
            runs = []
            for name in names:
                print(f"{name}: {args.examples} examples, seed {args.seed}", flush=True)
                runs.append(fuzz(target, name, args.examples, args.seed))
            rss_end = rss_kib(server.proc.pid)
            target.close()
        tracebacks = sum("Traceback" in line for line in server.lines)

    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "seed": args.seed,
        "examples_per_generator": args.examples,
        "server_rss_kib": {"start": rss_start, "end": rss_end},
        "server_tracebacks_logged": tracebacks,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    new = 0
    for run in runs:
        print(f"\n{run['generator']}: {run['examples']} examples in {run['seconds']} s")
        for outcome, count in run["outcomes"].items():
            print(f"  {count:7d}  {outcome}")
        for key, found in run["problems"].items():
            known = key.startswith("item ")
            new += not known
            label = f"KNOWN issue 12 {key} ({KNOWN[int(key[5:])]})" if known else "NEW"
            print(f"  {label}: {found['count']}x {found['problem'][:160]}")
            print(f"    smallest case: {found['case'][:600]}")
    print(f"\nserver RSS {rss_start} -> {rss_end} KiB; {tracebacks} tracebacks logged; "
          f"report in {args.out}")  # fmt: skip
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
