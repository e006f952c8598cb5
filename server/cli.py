"""Command line -> Settings -> App, and the signal handling around it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path

import uvloop

from fleetserve.server.admin_client import TOKEN_ENV, add_admin_parser, run_admin
from fleetserve.server.config import Settings
from fleetserve.server.errors import ServerError
from fleetserve.server.eviction import POLICIES
from fleetserve.server.feedback_export import add_feedback_parser, run_feedback
from fleetserve.server.sinks import SINKS

log = logging.getLogger("fleetserve")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}  # fmt: skip


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return value


def parse_age(text: str) -> float:
    """Durations: 3600, 90s, 45m, 12h, 7d."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 7d, 12h, 3600)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def parse_size(text: str) -> int:
    """Human sizes: 512, 64MiB, 4GiB, 1.5GB."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 4GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = argparse.ArgumentParser(prog="fleetserve", description="Multi-model inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model repository over REST and gRPC")
    serve.add_argument(
        "--model-repository", type=Path, required=True, help="Triton-layout directory"
    )
    serve.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    serve.add_argument(
        "--http-port", type=int, default=d.http_port, help="REST port (0 = any free)"
    )
    serve.add_argument(
        "--grpc-port", type=int, default=d.grpc_port, help="gRPC port (0 = any free, -1 = off)"
    )
    serve.add_argument(
        "--metrics-port", type=int, default=d.metrics_port, help="Prometheus port (-1 = off)"
    )
    serve.add_argument(
        "--max-request-size", type=parse_size, default=d.max_request_bytes,
        help="largest request body accepted (default 64MiB)",
    )  # fmt: skip
    serve.add_argument(
        "--default-max-batch-size", type=int, default=d.default_max_batch_size,
        help="max_batch_size for models without config.pbtxt that can batch",
    )  # fmt: skip
    serve.add_argument(
        "--dynamic-batching", action=argparse.BooleanOptionalAction, default=d.dynamic_batching,
        help="batch requests to models without config.pbtxt (as `dynamic_batching {}`; "
        "models with a config batch when it says so). Default: off",
    )  # fmt: skip
    serve.add_argument(
        "--max-queue-size", type=positive_int, default=d.max_queue_size,
        help="requests a batching model version may queue when its config sets no "
        "max_queue_size; more are refused with 503 / UNAVAILABLE",
    )  # fmt: skip
    serve.add_argument(
        "--max-loaded-bytes", type=parse_size, default=d.max_loaded_bytes,
        help="memory budget for loaded models, e.g. 4GiB (default: no limit)",
    )  # fmt: skip
    serve.add_argument(
        "--max-loaded-models", type=int, default=d.max_loaded_models,
        help="most model versions loaded at once (default: no limit)",
    )  # fmt: skip
    serve.add_argument(
        "--eviction-policy", choices=sorted(POLICIES), default=d.eviction_policy,
        help="which idle models make room: lru (default) or cost (reload cost per byte)",
    )  # fmt: skip
    serve.add_argument(
        "--preload", action="store_true",
        help="load every servable version at startup (default: on first use)",
    )  # fmt: skip
    serve.add_argument(
        "--repository-poll-secs", type=float, default=d.repository_poll_s,
        help="rescan the model repository this often (default 0: on index/load calls only)",
    )  # fmt: skip
    serve.add_argument(
        "--admin-token-file", type=Path, default=None,
        help="file holding the admin API's bearer token (or set FLEETSERVE_ADMIN_TOKEN); "
        "without one, the admin API and repository control answer loopback clients only",
    )  # fmt: skip
    serve.add_argument(
        "--data-dir", type=Path, default=None,
        help="where routing state is kept (default: MODEL_REPOSITORY/.fleetserve)",
    )  # fmt: skip
    serve.add_argument(
        "--max-upload-size", type=parse_size, default=d.max_upload_bytes,
        help="largest model file the admin API accepts (default 4GiB)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-sample-rate", type=fraction, default=d.feedback_sample_rate,
        help="share of predictions logged to the feedback sink (0..1; a model's config "
        'parameter "feedback_sample_rate" overrides it; default 0: off)',
    )  # fmt: skip
    serve.add_argument(
        "--feedback-sink", choices=[*SINKS, "none"], default=d.feedback_sink,
        help="where logged predictions and ground truth go (default sqlite, in --data-dir)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-flush-secs", type=positive_float, default=d.feedback_flush_s,
        help="the sink commits at least this often: at most this much is lost if the "
        "process is killed (default 0.5)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-buffer", type=positive_int, default=d.feedback_buffer,
        help="records buffered for the sink (default 10000)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-when-full", choices=("drop", "block"), default="drop",
        help="a full buffer drops records (counted) or makes requests wait up to one "
        "flush interval (default drop)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-fsync", action="store_true",
        help="commit with fsync: survive power loss too, not only a killed process",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-retention", type=parse_age, default=d.feedback_max_age_s,
        help="drop records older than this, e.g. 7d, 12h, 3600 (default: keep)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-max-size", type=parse_size, default=d.feedback_max_bytes,
        help="drop the oldest records past this size, e.g. 10GiB (default: no limit)",
    )  # fmt: skip
    serve.add_argument("--run-threads", type=int, default=d.run_threads, help="model run pool size")
    serve.add_argument("--load-threads", type=int, default=d.load_threads, help="parallel loads")
    serve.add_argument(
        "--intra-op-threads", type=int, default=d.intra_op_threads,
        help="onnxruntime threads per run, unless a model's config says otherwise",
    )  # fmt: skip
    serve.add_argument(
        "--inline-run-us", type=float, default=None,
        help="run models faster than this on the event loop (default: measured thread hop)",
    )  # fmt: skip
    serve.add_argument(
        "--shutdown-timeout", type=float, default=d.shutdown_timeout_s,
        help="seconds to let in-flight requests finish on SIGTERM",
    )  # fmt: skip
    serve.add_argument("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING, ERROR")
    add_admin_parser(sub)
    add_feedback_parser(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        model_repository=args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        max_request_bytes=args.max_request_size,
        default_max_batch_size=args.default_max_batch_size,
        dynamic_batching=args.dynamic_batching,
        max_queue_size=args.max_queue_size,
        max_loaded_bytes=args.max_loaded_bytes,
        max_loaded_models=args.max_loaded_models,
        eviction_policy=args.eviction_policy,
        preload=args.preload,
        repository_poll_s=args.repository_poll_secs,
        run_threads=args.run_threads,
        load_threads=args.load_threads,
        intra_op_threads=args.intra_op_threads,
        inline_run_us=args.inline_run_us,
        shutdown_timeout_s=args.shutdown_timeout,
        admin_token=admin_token(args.admin_token_file),
        data_dir=args.data_dir,
        max_upload_bytes=args.max_upload_size,
        feedback_sink=args.feedback_sink,
        feedback_sample_rate=args.feedback_sample_rate,
        feedback_buffer=args.feedback_buffer,
        feedback_flush_s=args.feedback_flush_secs,
        feedback_block=args.feedback_when_full == "block",
        feedback_fsync=args.feedback_fsync,
        feedback_max_age_s=args.feedback_retention,
        feedback_max_bytes=args.feedback_max_size,
        log_level=args.log_level.upper(),
    )


def admin_token(path: Path | None) -> str | None:
    """The admin token from a file (stripped), else FLEETSERVE_ADMIN_TOKEN, else None."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"fleetserve: cannot read --admin-token-file {path}: {exc}") from None
        if not token:
            raise SystemExit(f"fleetserve: --admin-token-file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    from fleetserve.server.app import App

    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        await stop.wait()
        log.info("signal received: draining")
    finally:
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        return run_admin(args)
    if args.command == "feedback":
        return run_feedback(args)
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not settings.model_repository.is_dir():
        log.error("model repository %s is not a directory", settings.model_repository)
        return 2
    try:
        uvloop.run(serve(settings))
    except ServerError as exc:  # e.g. a malformed routing state file: say which, plainly
        log.error("cannot start: %s", exc.message)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
