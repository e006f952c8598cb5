"""`fleetserve admin ...`: the operator's command line for the admin REST API.

Standard library only (urllib, json, argparse), so it runs on any machine with Python and
never imports the server's runtime (aiohttp, onnxruntime, ...). Exit codes: 0 done, 1 the
server answered an error or could not be reached, 2 usage error. Every usage error, from
argparse or from our own checks, goes through the sub-command parser's `error()`, so all of
them print the usage line and raise SystemExit(2) before any request is sent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "FLEETSERVE_URL"
TOKEN_ENV = "FLEETSERVE_ADMIN_TOKEN"
MODELS = "/v2/admin/models"
ROUTE_TRIES = 5  # read-modify-write attempts of `route` before giving up on a busy routing
LIFECYCLE = {"load": "loaded", "unload": "unloaded", "pin": "pinned", "unpin": "unpinned"}


class UsageError(Exception):
    """A local check failed: nothing was sent (exit 2)."""


class AdminError(Exception):
    """The server answered an error or could not be reached (exit 1)."""

    def __init__(self, message: str, hint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.status = status  # the HTTP status, when the server answered


# ---------------------------------------------------------------- the HTTP client


@dataclass(frozen=True)
class Client:
    url: str
    token: str | None
    token_source: str  # where the token came from, for hints: the token itself is never shown
    timeout: float

    def call(
        self,
        method: str,
        path: str,
        body: bytes | BinaryIO | Iterator[bytes] | None = None,
        content_type: str = "application/json",
        length: int | None = None,
    ) -> Any:
        """One request; the decoded JSON answer, or AdminError with the server's message."""
        return self.exchange(method, path, body, content_type, length)[0]

    def exchange(
        self,
        method: str,
        path: str,
        body: bytes | BinaryIO | None = None,
        content_type: str = "application/json",
        length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[Any, Message]:
        """`call` that also sends `headers` and returns the answer's headers."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
            # explicit length: a file object or blocks are then streamed, not chunked or read whole
            size = len(body) if isinstance(body, bytes) else length
            request.add_header("Content-Length", str(size))
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text, head = response.read(), response.headers
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except urllib.error.URLError as err:
            raise self._unreachable(err.reason) from None
        except OSError as err:  # a timeout or reset while reading the answer
            raise self._unreachable(err) from None
        try:
            return (json.loads(text) if text.strip() else {}), head
        except ValueError:
            raise AdminError(f"the server's answer is not JSON: {text[:200]!r}") from None

    def _http_error(self, err: urllib.error.HTTPError) -> AdminError:
        raw = err.read()
        try:
            message, ours = str(json.loads(raw)["error"]), True
        except (ValueError, TypeError, KeyError):
            message, ours = raw.decode("utf-8", "replace").strip()[:200] or str(err.reason), False
        hint = ""
        if err.code == 401:
            hint = (
                f"the server refused the token from {self.token_source}"
                if self.token
                else f"the admin API needs a token: pass --token-file PATH or set {TOKEN_ENV}"
            )
        elif err.code == 404 and (message.startswith("no route") or not ours):
            # fleetserve without the admin API answers "no route ...", another server anything
            hint = f"the server has no admin API at {self.url}"
        return AdminError(f"{message} (HTTP {err.code})", hint, err.code)

    def _unreachable(self, reason: object) -> AdminError:
        if isinstance(reason, ConnectionRefusedError):
            return AdminError(f"cannot reach {self.url}: is the server running?")
        if isinstance(reason, TimeoutError):
            return AdminError(f"no answer from {self.url} within {self.timeout:g} s")
        return AdminError(f"cannot reach {self.url}: {reason}")


def model_path(model: str, version: str | None = None, tail: str = "") -> str:
    """/v2/admin/models/{model}[/versions/{version}][/tail], names URL-quoted."""
    path = f"{MODELS}/{_quote(model)}"
    if version is not None:
        path += f"/versions/{_quote(version)}"
    return path + tail


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


# ---------------------------------------------------------------- output


def describe_routing(routing: dict[str, Any] | None) -> str:
    """One line: aliases, weights and shadow, or "none"."""
    routing = routing or {}
    parts = []
    if aliases := routing.get("aliases"):
        parts.append("aliases " + " ".join(f"{k}={v}" for k, v in aliases.items()))
    if weights := routing.get("weights"):
        parts.append("weights " + " ".join(f"{k}={v}" for k, v in weights.items()))
    if shadow := routing.get("shadow"):
        parts.append(f"shadow version {shadow.get('version')} fraction {shadow.get('fraction')}")
    return "; ".join(parts) or "none"


def format_status(models: list[dict[str, Any]]) -> str:
    """A table of every version, then the routing of each model."""
    if not models:
        return "no models"
    rows = [["MODEL", "VERSION", "STATE", "PINNED", "SERVABLE", "REASON"]]
    for model in models:
        for v in model.get("versions") or [{}]:
            rows.append([
                str(model.get("name", "?")), str(v.get("version", "-")), str(v.get("state", "-")),
                _yes_no(v.get("pinned")), _yes_no(v.get("servable")), str(v.get("reason") or ""),
            ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    lines += [f"routing of {m.get('name')}: {describe_routing(m.get('routing'))}" for m in models]
    return "\n".join(lines)


def _yes_no(value: object) -> str:
    return "-" if value is None else "yes" if value else "no"


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


# ---------------------------------------------------------------- route options


def alias_option(text: str) -> tuple[str, int]:
    """--alias NAME=VERSION."""
    name, sep, version = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VERSION (e.g. stable=3), got {text!r}")
    return name.strip(), _non_negative(version, "version", text)


def weight_option(text: str) -> tuple[str, int]:
    """--weight VERSION=WEIGHT."""
    version, sep, weight = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT (e.g. 3=90), got {text!r}")
    return str(_non_negative(version, "version", text)), _non_negative(weight, "weight", text)


def shadow_option(text: str) -> dict[str, Any]:
    """--shadow VERSION:FRACTION."""
    version, sep, fraction = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected VERSION:FRACTION (e.g. 4:0.1), got {text!r}")
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"fraction must be > 0 and <= 1, got {text!r}")
    return {"version": _non_negative(version, "version", text), "fraction": value}


def _non_negative(text: str, what: str, option: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{what} must be a non-negative integer, in {option!r}")
    return int(text)


@dataclass(frozen=True)
class RouteChange:
    """The parts of a model's routing that `route` options name; the rest is kept."""

    aliases: dict[str, int]  # added or moved
    removed_aliases: tuple[str, ...]
    weights: dict[str, int] | None  # the whole new split; {} removes it; None keeps it
    shadow: dict[str, Any] | None  # the new shadow; None keeps it (or removes it: drop_shadow)
    drop_shadow: bool

    def apply(self, routing: dict[str, Any], model: str) -> dict[str, Any]:
        """The routing to write: `routing` (as read) with this change made."""
        aliases = dict(routing.get("aliases") or {})
        if unknown := [name for name in self.removed_aliases if name not in aliases]:
            raise AdminError(
                f"{model} has no alias {', '.join(unknown)} "
                f"(aliases: {', '.join(aliases) or 'none'})"
            )
        for name in self.removed_aliases:
            del aliases[name]
        aliases.update(self.aliases)
        weights = (routing.get("weights") or {}) if self.weights is None else self.weights
        shadow = None if self.drop_shadow else (self.shadow or routing.get("shadow"))
        return {"aliases": aliases, "weights": weights, "shadow": shadow}


def route_change(args: argparse.Namespace) -> RouteChange | None:
    """What the options change, or None when they change nothing (show, or --clear)."""
    given = [
        args.alias, args.remove_alias, args.weight, args.no_weights, args.shadow, args.no_shadow
    ]  # fmt: skip
    if args.clear:
        if any(given):
            raise UsageError("--clear cannot be combined with other routing options")
        return None
    if not any(given):
        return None
    if args.weight and args.no_weights:
        raise UsageError("--weight cannot be combined with --no-weights")
    if args.shadow is not None and args.no_shadow:
        raise UsageError("--shadow cannot be combined with --no-shadow")
    aliases = _unique(args.alias, "alias")
    if both := sorted(set(aliases) & set(args.remove_alias)):
        raise UsageError(f"alias {both[0]} is both set and removed")
    weights = {} if args.no_weights else _unique(args.weight, "weight for version") or None
    return RouteChange(aliases, tuple(args.remove_alias), weights, args.shadow, args.no_shadow)


def _unique(pairs: list[tuple[str, int]], what: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for key, value in pairs:
        if key in result:
            raise UsageError(f"{what} {key} given twice")
        result[key] = value
    return result


def change_routing(client: Client, model: str, change: RouteChange) -> Any:
    """Read the routing, change it, write it back only if nobody changed it meanwhile
    (If-Match its ETag); when someone did (412), read it again and redo the change."""
    path = model_path(model, tail="/routing")
    for _ in range(ROUTE_TRIES):
        current, head = client.exchange("GET", path)
        etag = head.get("ETag")
        if etag is None:
            raise AdminError(
                f"the server sent the routing of {model} without an ETag, so a change could "
                "silently undo another made at the same time; nothing was changed",
                "the server is older than this client",
            )
        body = json.dumps(change.apply(current, model)).encode()
        try:
            return client.exchange("PUT", path, body, headers={"If-Match": etag})[0]
        except AdminError as err:
            if err.status != 412:
                raise
    raise AdminError(
        f"the routing of {model} changed while this change was being made, {ROUTE_TRIES} "
        "times in a row; nothing was changed: try again"
    )


# ---------------------------------------------------------------- commands


def cmd_status(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("GET", MODELS if args.model is None else model_path(args.model))
    if args.json:
        _print_json(answer)
    else:
        print(format_status(answer.get("models", []) if args.model is None else [answer]))


def cmd_upload(client: Client, args: argparse.Namespace) -> None:
    for path in (args.model_file, args.config):
        if path is not None and not path.is_file():
            raise UsageError(f"no such file: {path}")
    size = args.model_file.stat().st_size
    path = model_path(args.model, args.version)
    with args.model_file.open("rb") as f:
        if args.config is None:
            answer = client.call("PUT", path, f, "application/octet-stream", length=size)
        else:  # one request: the config and the version are added together, or neither
            body, length, content_type = _multipart(args.config.read_bytes(), f, size)
            answer = client.call("PUT", path, body, content_type, length=length)
    print(f"uploaded {args.model} version {args.version} ({answer.get('bytes', size)} bytes)")


def _multipart(config: bytes, model: BinaryIO, size: int) -> tuple[Iterator[bytes], int, str]:
    """multipart/form-data with a "config" part and a streamed "model" part: the body's
    blocks, its length and its content type."""
    boundary = os.urandom(16).hex()

    def head(name: str, filename: str, content_type: str) -> bytes:
        return (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
        ).encode()

    first = head("config", "config.pbtxt", "text/plain") + config + b"\r\n"
    first += head("model", "model.onnx", "application/octet-stream")
    last = f"\r\n--{boundary}--\r\n".encode()

    def blocks() -> Iterator[bytes]:
        yield first
        while block := model.read(1 << 20):
            yield block
        yield last

    return blocks(), len(first) + size + len(last), f"multipart/form-data; boundary={boundary}"


def cmd_lifecycle(client: Client, args: argparse.Namespace) -> None:
    action = args.admin_command
    client.call("POST", model_path(args.model, args.version, f"/{action}"))
    print(f"{LIFECYCLE[action]} {args.model} version {args.version}")


def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    client.call("DELETE", model_path(args.model, args.version))
    print(f"deleted {args.model} version {args.version}")


def cmd_route(client: Client, args: argparse.Namespace) -> None:
    change, path = route_change(args), model_path(args.model, tail="/routing")
    if args.clear:
        routing, verb = client.call("PUT", path, b"{}"), "cleared"
    elif change is None:
        routing, verb = client.call("GET", path), ""
    else:
        routing, verb = change_routing(client, args.model, change), "changed"
    if args.json:
        _print_json(routing)
    else:
        print(f"{verb} routing of {args.model}: {describe_routing(routing)}".lstrip())


# ---------------------------------------------------------------- parser and entry point


def add_admin_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `admin` and its commands to the fleetserve parser (run it with run_admin)."""
    admin = subparsers.add_parser(
        "admin", help="manage a running server: models, versions, routing",
        description="Talk to a running fleetserve's admin REST API.",
    )  # fmt: skip
    admin.add_argument(
        "--url", help=f"server REST address (default: ${URL_ENV}, else {DEFAULT_URL})"
    )
    admin.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the admin token (default: ${TOKEN_ENV})",
    )
    admin.add_argument(
        "--timeout", type=_positive_float, default=60.0, metavar="SECONDS",
        help="seconds to wait on the server at each step (default 60)",
    )  # fmt: skip
    commands = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, summary: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=summary, description=summary)
        parser.set_defaults(admin_run=run, admin_parser=parser)
        return parser

    status = command("status", cmd_status, "show models, versions, states and routing")
    status.add_argument("model", nargs="?", metavar="MODEL", help="one model (default: all)")
    status.add_argument("--json", action="store_true", help="print the server's raw JSON")

    upload = command("upload", cmd_upload, "upload a model version (and its config.pbtxt)")
    _model_version(upload)
    upload.add_argument("model_file", type=Path, metavar="MODEL_FILE", help="e.g. model.onnx")
    upload.add_argument(
        "--config",
        type=Path,
        metavar="CONFIG_FILE",
        help="the model's config.pbtxt, added with the version in one request",
    )

    for action in LIFECYCLE:
        _model_version(command(action, cmd_lifecycle, f"{action} a model version"))
    _model_version(command("delete", cmd_delete, "delete a model version from the repository"))

    route = command(
        "route", cmd_route,
        "show a model's routing, or change the parts the options name (the rest is kept)",
    )  # fmt: skip
    route.add_argument("model", metavar="MODEL")
    route.add_argument(
        "--alias", type=alias_option, action="append", default=[], metavar="NAME=VERSION",
        help="add or move an alias, e.g. stable=3 (repeatable; other aliases are kept)",
    )  # fmt: skip
    route.add_argument(
        "--remove-alias", action="append", default=[], metavar="NAME",
        help="remove an alias (repeatable)",
    )  # fmt: skip
    route.add_argument(
        "--weight", type=weight_option, action="append", default=[], metavar="VERSION=WEIGHT",
        help="traffic share of a version, e.g. 3=90 (repeatable); the weights given replace "
        "the whole split",
    )  # fmt: skip
    route.add_argument(
        "--no-weights", action="store_true",
        help="remove the split: unversioned requests go to the latest version",
    )  # fmt: skip
    route.add_argument(
        "--shadow", type=shadow_option, metavar="VERSION:FRACTION",
        help="mirror this fraction of requests to VERSION, e.g. 4:0.1 (replaces the shadow)",
    )  # fmt: skip
    route.add_argument("--no-shadow", action="store_true", help="remove the shadow")
    route.add_argument("--clear", action="store_true", help="remove all routing (not pins)")
    route.add_argument("--json", action="store_true", help="print the server's raw JSON")


def _model_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("version", metavar="VERSION")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def run_admin(args: argparse.Namespace) -> int:
    """Runs the parsed `admin` command: 0 done, 1 server error or unreachable.

    Usage errors raise SystemExit(2) through the command's parser, like argparse's own.
    """
    try:
        client = _client(args)
        args.admin_run(client, args)
    except UsageError as err:
        args.admin_parser.error(str(err))
    except AdminError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return 1
    return 0


def _client(args: argparse.Namespace) -> Client:
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url must look like http://HOST:PORT, got {url!r}")
    token, source = os.environ.get(TOKEN_ENV) or None, TOKEN_ENV
    if args.token_file is not None:
        try:
            token, source = args.token_file.read_text().strip(), str(args.token_file)
        except OSError as err:
            raise UsageError(f"cannot read --token-file: {err}") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty")
    return Client(url, token, source, args.timeout)
