"""`fleetserve admin ...` against a tiny real HTTP server that records what it receives,
and `route` (a read-modify-write) against a real fleetserve.

The recording server answers canned JSON per (method, path); the tests check the exact
requests the command line sends, what it prints and its exit codes: 0 done, 1 server error
or unreachable, 2 usage error (SystemExit from the parser, before any request is sent).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import json
import re
import socket
import threading
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fleetserve.loaders import testing
from fleetserve.server.admin_client import RouteChange, add_admin_parser, run_admin
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTING = {"aliases": {"stable": 3, "canary": 4}, "weights": {"3": 90, "4": 10},
           "shadow": {"version": 4, "fraction": 0.1}}  # fmt: skip
ROUTING_LINE = "aliases stable=3 canary=4; weights 3=90 4=10; shadow version 4 fraction 0.1"
MLP = {
    "name": "mlp",
    "versions": [
        {"version": "3", "state": "READY", "reason": "", "servable": True, "pinned": True},
        {
            "version": "4",
            "state": "UNAVAILABLE",
            "reason": "load failed: bad file",
            "servable": False,
            "pinned": False,
        },
    ],
    "routing": ROUTING,
}
KEEP_BODY = 1 << 20  # larger bodies are only hashed, so the server does not hold them


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sha256: str


@dataclass
class FakeServer:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    answers: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)


class Handler(BaseHTTPRequestHandler):
    fake: FakeServer

    def answer(self) -> None:
        remaining, digest, kept = int(self.headers.get("Content-Length", 0)), hashlib.sha256(), []
        while remaining:
            chunk = self.rfile.read(min(65536, remaining))
            remaining -= len(chunk)
            digest.update(chunk)
            if sum(map(len, kept)) < KEEP_BODY:
                kept.append(chunk)
        body = b"".join(kept)
        self.fake.requests.append(
            Recorded(self.command, self.path, dict(self.headers), body, digest.hexdigest())
        )
        status, document = self.fake.answers.get((self.command, self.path), (200, {}))
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"fake": fake}))
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETSERVE_URL", raising=False)
    monkeypatch.delenv("FLEETSERVE_ADMIN_TOKEN", raising=False)


def admin(server: FakeServer, *argv: str) -> int:
    """Run `fleetserve admin --url <server> ARGV...` as cli.py will."""
    parser = argparse.ArgumentParser(prog="fleetserve")
    add_admin_parser(parser.add_subparsers(dest="command"))
    return run_admin(parser.parse_args(["admin", "--url", server.url, *argv]))


def usage_error(server: FakeServer, *argv: str) -> None:
    with pytest.raises(SystemExit) as exc:
        admin(server, *argv)
    assert exc.value.code == 2
    assert server.requests == []


# ---------------------------------------------------------------- requests and output


def test_status_prints_a_table_and_the_routing(server, capsys):
    server.answers["GET", "/v2/admin/models"] = (200, {"models": [MLP]})
    assert admin(server, "status") == 0
    [req] = server.requests
    assert (req.method, req.path, req.body) == ("GET", "/v2/admin/models", b"")
    assert "Authorization" not in req.headers
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "PINNED", "SERVABLE", "REASON"]
    assert lines[1].split() == ["mlp", "3", "READY", "yes", "yes"]
    assert lines[2].split() == [
        "mlp",
        "4",
        "UNAVAILABLE",
        "no",
        "no",
        "load",
        "failed:",
        "bad",
        "file",
    ]
    assert lines[-1] == f"routing of mlp: {ROUTING_LINE}"


def test_status_of_one_model_quotes_its_name_and_json_prints_the_raw_answer(server, capsys):
    server.answers["GET", "/v2/admin/models/a%2Fb%20c"] = (200, MLP)
    assert admin(server, "status", "a/b c", "--json") == 0
    assert json.loads(capsys.readouterr().out) == MLP


@pytest.mark.parametrize(
    ("action", "done"),
    [("load", "loaded"), ("unload", "unloaded"), ("pin", "pinned"), ("unpin", "unpinned")],
)
def test_lifecycle_actions_post(server, capsys, action, done):
    assert admin(server, action, "mlp", "4") == 0
    [req] = server.requests
    assert (req.method, req.path, req.body) == (
        "POST",
        f"/v2/admin/models/mlp/versions/4/{action}",
        b"",
    )
    assert capsys.readouterr().out == f"{done} mlp version 4\n"


def test_delete(server, capsys):
    assert admin(server, "delete", "mlp", "4") == 0
    assert [(r.method, r.path) for r in server.requests] == [
        ("DELETE", "/v2/admin/models/mlp/versions/4")
    ]
    assert capsys.readouterr().out == "deleted mlp version 4\n"


def test_upload_sends_the_config_and_the_model_file_in_one_request(server, capsys, tmp_path):
    (tmp_path / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    (tmp_path / "model.onnx").write_bytes(b"\x00onnx" * 100)
    server.answers["PUT", "/v2/admin/models/mlp/versions/4"] = (
        201,
        {"name": "mlp", "version": "4", "bytes": 500},
    )
    argv = [
        "upload",
        "mlp",
        "4",
        str(tmp_path / "model.onnx"),
        "--config",
        str(tmp_path / "config.pbtxt"),
    ]
    assert admin(server, *argv) == 0
    [upload] = server.requests  # one request: both are added, or neither
    assert (upload.method, upload.path) == ("PUT", "/v2/admin/models/mlp/versions/4")
    assert upload.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert upload.headers["Content-Length"] == str(len(upload.body))
    assert "Transfer-Encoding" not in upload.headers
    head = f"Content-Type: {upload.headers['Content-Type']}\r\n\r\n".encode()
    parts = email.message_from_bytes(head + upload.body, policy=email.policy.HTTP)
    config, model = parts.iter_parts()
    assert config.get_param("name", header="content-disposition") == "config"
    assert config.get_content() == 'platform: "onnxruntime_onnx"\n'
    assert model.get_param("name", header="content-disposition") == "model"
    assert model.get_content_type() == "application/octet-stream"
    assert model.get_content() == b"\x00onnx" * 100
    assert capsys.readouterr().out.splitlines() == ["uploaded mlp version 4 (500 bytes)"]


def test_upload_streams_the_model_file(server, tmp_path):
    size = 32 << 20
    path = tmp_path / "big.onnx"
    with path.open("wb") as f:
        f.truncate(size)  # sparse: zeros
    tracemalloc.start()
    try:
        assert admin(server, "upload", "big", "1", str(path)) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [req] = server.requests
    assert req.headers["Content-Length"] == str(size)
    assert req.sha256 == hashlib.sha256(bytes(size)).hexdigest()
    assert peak < size // 8  # the file was sent in blocks, never held whole


def test_route_without_options_shows_the_routing(server, capsys):
    server.answers["GET", "/v2/admin/models/mlp/routing"] = (200, ROUTING)
    assert admin(server, "route", "mlp") == 0
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/v2/admin/models/mlp/routing")
    ]
    assert capsys.readouterr().out == f"routing of mlp: {ROUTING_LINE}\n"


def test_route_clear_puts_an_empty_routing(server, capsys):
    server.answers["PUT", "/v2/admin/models/mlp/routing"] = (200, {})
    assert admin(server, "route", "mlp", "--clear") == 0
    [req] = server.requests
    assert (req.method, req.path, json.loads(req.body)) == (
        "PUT",
        "/v2/admin/models/mlp/routing",
        {},
    )
    assert "If-Match" not in req.headers
    assert capsys.readouterr().out == "cleared routing of mlp: none\n"


def test_route_changes_nothing_on_a_server_that_sends_no_etag(server, capsys):
    server.answers["GET", "/v2/admin/models/mlp/routing"] = (200, ROUTING)
    assert admin(server, "route", "mlp", "--shadow", "3:0.5") == 1
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/v2/admin/models/mlp/routing")
    ]
    err = capsys.readouterr().err
    assert "without an ETag" in err and "nothing was changed" in err


# ---------------------------------------------------------------- token and url


def test_token_from_the_environment(server, capsys, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    assert admin(server, "delete", "mlp", "1") == 0
    assert server.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in "".join(capsys.readouterr())


def test_token_file_beats_the_environment(server, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", "other")
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert admin(server, "--token-file", str(tmp_path / "token"), "delete", "mlp", "1") == 0
    assert server.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in "".join(capsys.readouterr())


def test_url_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_URL", server.url + "/")
    parser = argparse.ArgumentParser()
    add_admin_parser(parser.add_subparsers(dest="command"))
    assert run_admin(parser.parse_args(["admin", "unpin", "mlp", "1"])) == 0
    assert server.requests[0].path == "/v2/admin/models/mlp/versions/1/unpin"


# ---------------------------------------------------------------- usage errors (exit 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--alias", "stable"], "expected NAME=VERSION"),
        (["--alias", "=3"], "expected NAME=VERSION"),
        (["--alias", "stable=x"], "version must be a non-negative integer"),
        (["--weight", "3"], "expected VERSION=WEIGHT"),
        (["--weight", "3=-1"], "weight must be a non-negative integer"),
        (["--weight", "3=1", "--weight", "3=2"], "weight for version 3 given twice"),
        (["--shadow", "4"], "expected VERSION:FRACTION"),
        (["--shadow", "4:0"], "fraction must be > 0 and <= 1"),
        (["--shadow", "4:1.5"], "fraction must be > 0 and <= 1"),
        (["--shadow", "4:nan"], "fraction must be > 0 and <= 1"),
        (["--clear", "--alias", "a=1"], "--clear cannot be combined"),
        (["--clear", "--no-shadow"], "--clear cannot be combined"),
        (["--weight", "3=1", "--no-weights"], "--weight cannot be combined with --no-weights"),
        (["--shadow", "4:0.5", "--no-shadow"], "--shadow cannot be combined with --no-shadow"),
        (["--alias", "a=1", "--remove-alias", "a"], "alias a is both set and removed"),
    ],
)
def test_malformed_route_options_are_usage_errors(server, capsys, options, message):
    usage_error(server, "route", "mlp", *options)
    assert message in capsys.readouterr().err


def test_upload_of_a_missing_file_is_a_usage_error(server, capsys, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    usage_error(
        server, "upload", "mlp", "1", str(tmp_path / "model.onnx"), "--config", "nope.pbtxt"
    )
    assert "no such file: nope.pbtxt" in capsys.readouterr().err
    usage_error(server, "upload", "mlp", "1", str(tmp_path / "missing.onnx"))


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["load", "mlp"], ["--timeout", "0", "status"],
                                  ["--token-file", "/nonexistent/token", "status"]])  # fmt: skip
def test_other_usage_errors(server, argv):
    usage_error(server, *argv)


def test_bad_url_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser()
    add_admin_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exc:
        run_admin(parser.parse_args(["admin", "--url", "localhost:8000", "status"]))
    assert exc.value.code == 2
    assert "--url must look like http://HOST:PORT" in capsys.readouterr().err


# ---------------------------------------------------------------- server errors (exit 1)


def test_server_error_message_and_status(server, capsys):
    server.answers["DELETE", "/v2/admin/models/mlp/versions/3"] = (
        409,
        {"error": "version 3 is named by its routing"},
    )
    assert admin(server, "delete", "mlp", "3") == 1
    assert capsys.readouterr().err == "error: version 3 is named by its routing (HTTP 409)\n"


def test_401_hints_at_the_token(server, capsys, monkeypatch):
    server.answers["DELETE", "/v2/admin/models/mlp/versions/1"] = (401, {"error": "bad token"})
    assert admin(server, "delete", "mlp", "1") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: bad token (HTTP 401)\nhint: ")
    assert "--token-file" in err and "FLEETSERVE_ADMIN_TOKEN" in err
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    assert admin(server, "delete", "mlp", "1") == 1
    err = capsys.readouterr().err
    assert "refused the token from FLEETSERVE_ADMIN_TOKEN" in err and TOKEN not in err


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        ({"error": "no route GET /v2/admin/models"}, True),  # fleetserve without the admin API
        (b"<html>Not Found</html>", True),  # some other server
        ({"error": "unknown model 'mlp'"}, False),  # the admin API's own 404
    ],
)
def test_404_hints_at_a_missing_admin_api_only_when_it_is(server, capsys, answer, hint):
    server.answers["GET", "/v2/admin/models"] = (404, answer)
    assert admin(server, "status") == 1
    err = capsys.readouterr().err
    assert "(HTTP 404)" in err
    assert (f"hint: the server has no admin API at {server.url}" in err) is hint


def test_connection_refused(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        assert admin(FakeServer(url), "status") == 1
    assert capsys.readouterr().err == f"error: cannot reach {url}: is the server running?\n"


# ---------------------------------------------------------------- route against a real server


REAL_MODELS = ("compose", "race", "busy", "alias", "raw")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("routes")
    for name in REAL_MODELS:
        for v in (1, 2, 3):
            testing.write_model(root, name, testing.fixed_shape((2,), factor=float(v)), version=v)
    running = start_server(test_settings(root, preload=False, admin_token=TOKEN))
    yield running
    stop_server(running)


def real_admin(real: RunningServer, *argv: str) -> int:
    return admin(FakeServer(real.http_url), *argv)


def routing_of(real: RunningServer, model: str) -> tuple[dict[str, Any], str]:
    request = urllib.request.Request(
        f"{real.http_url}/v2/admin/models/{model}/routing", headers=AUTH
    )
    with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
        return json.loads(reply.read()), reply.headers["ETag"]


def put_routing(
    real: RunningServer, model: str, doc: dict[str, Any], if_match: str | None = None
) -> tuple[int, dict[str, Any], str | None]:
    headers = {**AUTH, **({"If-Match": if_match} if if_match is not None else {})}
    request = urllib.request.Request(
        f"{real.http_url}/v2/admin/models/{model}/routing", json.dumps(doc).encode(),
        headers, method="PUT",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            return reply.status, json.loads(reply.read()), reply.headers["ETag"]
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers["ETag"]


def test_successive_route_commands_change_only_what_they_name(real, capsys, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    steps = [
        (["--alias", "stable=2", "--alias", "canary=3", "--weight", "2=90", "--weight", "3=10"],
         {"aliases": {"stable": 2, "canary": 3}, "weights": {"2": 90, "3": 10}, "shadow": None}),
        (["--shadow", "1:0.25"],
         {"aliases": {"stable": 2, "canary": 3}, "weights": {"2": 90, "3": 10},
          "shadow": {"version": 1, "fraction": 0.25}}),
        (["--weight", "3=1"],  # the weights given are the whole split
         {"aliases": {"stable": 2, "canary": 3}, "weights": {"3": 1},
          "shadow": {"version": 1, "fraction": 0.25}}),
        (["--alias", "stable=3", "--remove-alias", "canary", "--no-shadow"],
         {"aliases": {"stable": 3}, "weights": {"3": 1}, "shadow": None}),
        (["--no-weights"], {"aliases": {"stable": 3}, "weights": {}, "shadow": None}),
        (["--clear"], {"aliases": {}, "weights": {}, "shadow": None}),
    ]  # fmt: skip
    assert real_admin(real, "pin", "compose", "1") == 0
    for options, expected in steps:
        assert real_admin(real, "route", "compose", *options) == 0, options
        assert routing_of(real, "compose")[0] == expected, options
    assert capsys.readouterr().out.splitlines()[-1] == "cleared routing of compose: none"
    [model] = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{real.http_url}/v2/admin/models/compose", headers=AUTH), timeout=WAIT_S).read()
    )["versions"][:1]  # fmt: skip
    assert model["pinned"] is True  # no route command touched the pins


def test_removing_an_alias_the_model_lacks_changes_nothing(real, capsys, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    assert real_admin(real, "route", "alias", "--alias", "stable=1") == 0
    before = routing_of(real, "alias")
    assert real_admin(real, "route", "alias", "--remove-alias", "canary", "--weight", "2=1") == 1
    assert "alias has no alias canary (aliases: stable)" in capsys.readouterr().err
    assert routing_of(real, "alias") == before


def test_a_change_made_between_read_and_write_is_kept_and_ours_redone(real, capsys, monkeypatch):
    """Another operator's change lands after our read: our PUT gets 412, we read again."""
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    assert real_admin(real, "route", "race", "--weight", "1=1") == 0
    capsys.readouterr()
    apply, calls = RouteChange.apply, []

    def apply_after_a_concurrent_change(self, routing, model):
        calls.append(routing)
        if len(calls) == 1:
            status, _, _ = put_routing(real, "race", {**routing, "aliases": {"theirs": 2}})
            assert status == 200
        return apply(self, routing, model)

    monkeypatch.setattr(RouteChange, "apply", apply_after_a_concurrent_change)
    assert real_admin(real, "route", "race", "--shadow", "3:0.5") == 0
    assert [c["aliases"] for c in calls] == [{}, {"theirs": 2}]  # read twice
    assert routing_of(real, "race")[0] == {
        "aliases": {"theirs": 2}, "weights": {"1": 1}, "shadow": {"version": 3, "fraction": 0.5}
    }  # fmt: skip
    assert capsys.readouterr().out == (
        "changed routing of race: aliases theirs=2; weights 1=1; shadow version 3 fraction 0.5\n"
    )


def test_a_routing_that_keeps_changing_is_left_alone_after_a_few_tries(real, capsys, monkeypatch):
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    apply, weights = RouteChange.apply, iter(range(1, 100))

    def apply_while_others_keep_changing(self, routing, model):
        assert put_routing(real, "busy", {"weights": {"1": next(weights)}})[0] == 200
        return apply(self, routing, model)

    monkeypatch.setattr(RouteChange, "apply", apply_while_others_keep_changing)
    assert real_admin(real, "route", "busy", "--alias", "mine=2") == 1
    assert "changed while this change was being made, 5 times in a row" in capsys.readouterr().err
    assert routing_of(real, "busy")[0] == {"aliases": {}, "weights": {"1": 5}, "shadow": None}


def test_routing_writes_are_conditional_on_the_etag_when_asked(real):
    doc, etag = routing_of(real, "raw")
    assert re.fullmatch(r'"[0-9a-f]{16}"', etag)
    status, body_after, new_etag = put_routing(real, "raw", {"weights": {"2": 1}}, if_match=etag)
    assert (status, body_after) == (200, {**doc, "weights": {"2": 1}})
    assert new_etag != etag and routing_of(real, "raw")[1] == new_etag
    status, body, _ = put_routing(real, "raw", {"weights": {"3": 1}}, if_match=etag)  # stale
    assert status == 412
    assert "routing of 'raw' changed since it was read" in body["error"]
    assert routing_of(real, "raw") == (body_after, new_etag)
    assert put_routing(real, "raw", {}, if_match=f'"x", {new_etag}')[0] == 200  # one of a list
    assert put_routing(real, "raw", {"weights": {"3": 1}}, if_match="*")[0] == 200
    assert put_routing(real, "raw", {})[0] == 200  # no If-Match: unconditional, as before
    assert routing_of(real, "raw")[0] == {"aliases": {}, "weights": {}, "shadow": None}
