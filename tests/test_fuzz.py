"""Property-based fuzzing of both edges against a real server (Hypothesis).

Each test draws a few hundred requests from one generator of tests/fuzz_cases.py (V2
JSON bodies, ground truth, binary-extension bodies, raw HTTP, gRPC messages,
undecodable gRPC bytes), sends them over real sockets to a server on ephemeral ports,
and has tests/fuzz_oracle.py judge every answer: no 5xx (but 503 / 504), INTERNAL or
UNKNOWN; a JSON error (or gRPC message) naming the problem, without server paths;
well-formed successes. A valid REST and gRPC request must still succeed afterwards.

A new problem fails the example at once, and Hypothesis shrinks it to a minimal case.
Problems of the kinds issue 12 fixed (by its item numbers) are gathered over the whole
run instead and reported at its end as `KnownDefect` (the smallest case per item), so a
regression shows every kind at once. Runs are reproducible (derandomized, no example database) and
bounded: about a minute for the whole file on the 2-core dev machine.
benchmarks/fuzz_run.py runs the same generators for longer, with a seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.conftest import start_server, stop_server, test_settings
from tests.fuzz_cases import ADMIN_TOKEN, build_repository
from tests.fuzz_oracle import GENERATORS, KNOWN, KnownDefect, Target

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
    # no explain phase: it traces every line (Python < 3.12), minutes for these cases
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
EXAMPLES = {"json": 250, "feedback": 100, "binary": 200, "http": 250, "grpc": 250,
            "grpc_bytes": 150}  # fmt: skip


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    repo = build_repository(root / "models")
    running = start_server(
        test_settings(repo, data_dir=root / "data", admin_token=ADMIN_TOKEN,
                      feedback_flush_secs=0.05)
    )  # fmt: skip
    target = Target(running.app.http_port, running.grpc, [str(root), str(root.resolve())])
    try:
        target.route()
        target.assert_serves()
        yield target
    finally:
        target.close()
        stop_server(running)


@pytest.mark.parametrize(
    "generator",
    list(EXAMPLES),
)  # fmt: skip
def test_fuzz(fuzz: Target, generator: str) -> None:
    """Send the cases; fail at once on a new problem, and at the end on known ones."""
    strategy, method = GENERATORS[generator]
    check = getattr(fuzz, method)
    known: dict[int, tuple[str, str]] = {}

    @settings(FUZZ, max_examples=EXAMPLES[generator])
    @given(case=strategy)
    def prop(case: Any) -> None:
        for verdict in check(case):
            if verdict.problem and verdict.item is None:
                raise AssertionError(f"{verdict.problem}\ncase: {case!r:.2000}")
            if verdict.item is not None:
                text = f"{case!r:.2000}"
                if verdict.item not in known or len(text) < len(known[verdict.item][1]):
                    known[verdict.item] = (verdict.problem, text)

    prop()
    fuzz.assert_serves()
    if known:
        raise KnownDefect(
            "\n".join(
                f"issue 12 item {item} ({KNOWN[item]}): {problem}\n  smallest case: {case}"
                for item, (problem, case) in sorted(known.items())
            )
        )
