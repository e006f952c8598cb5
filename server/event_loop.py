"""Which asyncio event loop serves, chosen once at startup and reported.

uvloop is the default where it is installed: for REST it runs the same aiohttp code
for less CPU than asyncio's loop, and grpc.aio runs about a quarter fewer instructions
per call on it. pyproject keeps uvloop below 0.23: 0.23.0 writes each response to
the socket the moment it is ready, which on a busy server wakes a local reader once
per response instead of once per loop pass and costs 1.3-1.5x the server CPU per REST
request (docs/architecture.md, "Event loop"; benchmarks/loop_compare.py). Where no
uvloop wheel exists (Windows, other Pythons), asyncio's own loop serves.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
from collections.abc import Callable, Coroutine
from typing import Any, Literal

Choice = Literal["auto", "uvloop", "asyncio"]


class LoopUnavailable(RuntimeError):
    """`--event-loop uvloop` where uvloop is not installed."""


def _uvloop() -> Any | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def runner(choice: Choice) -> Callable[[Coroutine[Any, Any, None]], None]:
    """`run(coro)` on the loop `choice` selects: serves until the coroutine is done."""
    uvloop = _uvloop() if choice != "asyncio" else None
    if uvloop is not None:
        return uvloop.run  # type: ignore[no-any-return]
    if choice == "uvloop":
        raise LoopUnavailable("--event-loop uvloop: uvloop is not installed")
    return asyncio.run


def describe(loop: asyncio.AbstractEventLoop) -> tuple[str, str]:
    """(name, version) of a running loop, for the startup log line and the info metric."""
    if type(loop).__module__.split(".")[0] == "uvloop":
        return "uvloop", importlib.metadata.version("uvloop")
    return "asyncio", platform.python_version()
