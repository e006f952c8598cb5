"""Model memory: what a load adds to the process, measured one load at a time.

A load's size is the growth, across its load and warm-up, of the bytes malloc has
handed out (glibc's `mallinfo2`: in use in the heaps plus mapped blocks; resident memory
where there is no mallinfo2). That count is process-wide, so it is the load's own only
if nothing else changes model memory meanwhile: every change of model memory (a load
with its first runs and warm-up, an unload) runs inside one `MemorySection`, one at a
time; reading model files stays outside it (`Loader.prefetch`), so loads still overlap
their file I/O.

Why not resident memory: glibc keeps freed memory in a thread's heap (up to 64 MiB) and
`malloc_trim` does not give a thread heap's top back, so a load's freed temporaries
stayed resident and the next load reused them: sizes came out up to 16 MB too high,
then too low, on 36-96 MB models (measured). Fixing glibc's thresholds instead made
those sizes right but cost 1.4x the CPU of a request with an 8 MiB tensor. The bytes
in use do not move with what the heap keeps: each load of the same model measures the
same to 0.1 MiB, and what unloading it frees.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from fleetserve.loaders.base import LoadedModel

log = logging.getLogger(__name__)
T = TypeVar("T")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# a load waits this long for its turn, then runs unmeasured (counted at its estimate)
TURN_WAIT_S = 120.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")  # ctypes releases the GIL while it calls
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc


_libc = _glibc()


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def allocated_bytes() -> int:
    """The bytes malloc has handed out and not had back (resident memory where glibc's
    mallinfo2 is not there)."""
    if _libc is not None and hasattr(_libc, "mallinfo2"):
        info = _libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    return resident_bytes()


class MemorySection:
    """Changes of model memory, one at a time (called from the load pool only)."""

    def __init__(self) -> None:
        self._turn = threading.Lock()

    def measure(self, what: str, work: Callable[[], T]) -> tuple[T, int | None]:
        """Run `work` alone; returns its result and the growth of `allocated_bytes`
        across it (None when it could not be measured: its turn did not come in time,
        or memory outside the models shrank meanwhile)."""
        if not self._turn.acquire(timeout=TURN_WAIT_S):
            log.warning("%s: no turn to measure within %.0fs; not measured", what, TURN_WAIT_S)
            return work(), None
        try:
            trim_heap()
            before = allocated_bytes()
            result = work()
            trim_heap()  # what the load freed goes back to the OS
            after = allocated_bytes()
        finally:
            self._turn.release()
        return result, after - before if before and after >= before else None

    def free(self, model: LoadedModel) -> None:
        """Unload a model and give what it freed back to the OS."""
        took = self._turn.acquire(timeout=TURN_WAIT_S)
        try:
            model.unload()
            trim_heap()
        finally:
            if took:
                self._turn.release()
