"""Process logging: text or JSON lines, the access log, and failed requests' lines.

Records go through a bounded buffer to one writer thread, so the event loop never
waits on stderr (a slow pipe or terminal); a full buffer drops records and counts them.
The access log is a logger of its own (`fleetserve.access`) at INFO whatever the level
of the rest, so `--access-log` works with `--log-level warning`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from fleetserve.server.errors import ErrorKind, ServerError

ACCESS = logging.getLogger("fleetserve.access")
log = logging.getLogger("fleetserve.request")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BUFFER_RECORDS = 10_000
WRITE_EVERY_S = 0.05
# what every LogRecord has; anything else on a record came from `extra=`
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                doc[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        return orjson.dumps(doc, default=str).decode()


class _Buffered(logging.Handler):
    """Keeps records for a writer thread that formats and writes them together every
    `WRITE_EVERY_S`: whoever logs pays an append, never a write or a thread wake-up
    (waking a writer per record measured ~60 us of CPU per access line). A full buffer
    drops records, counted."""

    def __init__(self, formatter: logging.Formatter, stream: IO[str]) -> None:
        super().__init__()
        self._formatter, self._stream = formatter, stream
        self._records: deque[logging.LogRecord] = deque()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._records) >= BUFFER_RECORDS:
            self.dropped += 1
            return
        # the message and traceback become text now, while their objects are as logged
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = record.exc_text or self._formatter.formatException(record.exc_info)
            record.exc_info = None
        self._records.append(record)

    def start(self) -> None:
        self._writer.start()

    def _run(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            self._write()
        self._write()

    def _write(self) -> None:
        records, lines = self._records, []
        while records:
            lines.append(self._formatter.format(records.popleft()))
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to say it
                pass

    def close(self) -> None:
        """Write what is buffered and stop the writer."""
        self._stop.set()
        if self._writer.is_alive():
            self._writer.join(5)
        super().close()


def configure(
    level: str, fmt: str, access_log: bool, stream: IO[str] = sys.stderr
) -> Callable[[], None]:
    """Route every logger through the writer thread; returns the function that stops it."""
    # fields our formats never show, not worth computing for every record (the logging
    # HOWTO's "Optimization" section): the caller's file and line (a stack walk),
    # thread and process
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler = _Buffered(formatter, stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if access_log:
        ACCESS.setLevel(logging.INFO)
    handler.start()

    def stop() -> None:
        handler.close()
        direct = logging.StreamHandler(stream)  # whatever is logged after this
        direct.setFormatter(formatter)
        root.handlers[:] = [direct]
        if handler.dropped:
            logging.getLogger("fleetserve").warning(
                "%d log records dropped: the log output was too slow", handler.dropped
            )

    return stop


def access(
    protocol: str, request_id: str, model: str, version: str, status: object, started: float
) -> None:
    """The access log line of one inference request (`started`: perf_counter)."""
    ms = (time.perf_counter() - started) * 1e3
    ACCESS.info(
        "%s %s %s %s %.3fms", protocol, request_id, f"{model}:{version}" if version else model,
        status, ms,
        extra={"request_id": request_id, "model": model, "version": version,
               "protocol": protocol, "status": status, "duration_ms": round(ms, 3)},
    )  # fmt: skip


def failed(protocol: str, request_id: str, status: object, exc: ServerError) -> None:
    """A failed request, with its id: internal errors at ERROR with the traceback of what
    failed; the rest (bad requests, overload, timeouts: the client's answer says it all,
    and a line each would flood the log exactly when the server is overloaded) at DEBUG."""
    if exc.kind is ErrorKind.INTERNAL:
        cause = exc.__cause__ or exc.__context__ or exc
        log.error(
            "%s request %s failed (%s): %s", protocol, request_id, status, exc.message,
            exc_info=cause, extra={"request_id": request_id, "status": status},
        )  # fmt: skip
    else:
        log.debug(
            "%s request %s failed (%s): %s", protocol, request_id, status, exc.message,
            extra={"request_id": request_id, "status": status},
        )  # fmt: skip
