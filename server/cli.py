"""Command line -> Settings -> App, and the signal handling around it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from fleetserve import __version__
from fleetserve.server import logs
from fleetserve.server.admin_client import add_admin_parser, run_admin
from fleetserve.server.errors import ServerError
from fleetserve.server.event_loop import LoopUnavailable, runner
from fleetserve.server.feedback_export import add_feedback_parser, run_feedback

if TYPE_CHECKING:
    from fleetserve.server.settings import Settings

log = logging.getLogger("fleetserve")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage of `serve` alone is a screenful), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: Sequence[str]) -> tuple[Parser, Any]:
    """The fleetserve command line for `argv`, and the settings source of the `serve`
    flags (None unless the command is serve: admin and feedback start without pydantic,
    about 0.2 s of imports)."""
    parser = Parser(prog="fleetserve", description="Multi-model inference server")
    parser.add_argument("--version", action="version", version=f"fleetserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve a model repository over REST and gRPC",
        description="Every option is also a FLEETSERVE_* environment variable and a key of "
        "the --config file; a flag beats the environment, which beats the file.",
    )  # fmt: skip
    cli = None
    if list(argv[:1]) == ["serve"]:
        from fleetserve.server import settings

        cli = settings.add_arguments(serve)
    add_admin_parser(sub)
    add_feedback_parser(sub)
    return parser, cli


async def serve(options: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    from fleetserve.server.app import App

    app = App(options)
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
    argv = sys.argv[1:] if argv is None else argv
    parser, cli = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command == "admin":
        return run_admin(args)
    if args.command == "feedback":
        return run_feedback(args)
    from fleetserve.server import settings

    try:
        options = settings.load(cli, args)
    except settings.SettingsError as exc:
        parser.exit(2, f"fleetserve serve: error: {exc}\n")
    from fleetserve.server.app import CannotListen  # the server's runtime, for serve only

    stop_logging = logs.configure(options.log_level, options.log_format, options.access_log)
    try:
        if not options.model_repository.is_dir():
            log.error("model repository %s is not a directory", options.model_repository)
            return 2
        runner(options.event_loop)(serve(options))
    except LoopUnavailable as exc:
        log.error("cannot start: %s", exc)
        return 2
    except CannotListen as exc:  # a busy port: say which, plainly
        log.error("cannot start: %s", exc)
        return 1
    except ServerError as exc:  # e.g. a malformed routing state file: say which, plainly
        log.error("cannot start: %s", exc.message)
        return 2
    finally:
        stop_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
