"""The admin API and version routing through a real server with an admin token.

Models are `loaders.testing.fixed_shape((2,), factor=v)`: version v multiplies its
input by v, so every answer says which version computed it (and must agree with the
model_version the response names). Each test uses its own model names.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetserve.loaders import testing
from fleetserve.server.types import ModelId
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, Gate, tree, upload_with_config

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPLOAD_LIMIT = 64 * 1024


def versioned(root: Path, name: str, versions: tuple[int, ...] = (1, 2)) -> None:
    for v in versions:
        testing.write_model(root, name, testing.fixed_shape((2,), factor=float(v)), version=v)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("admin")
    names = ("up", "cfg", "route", "sticky", "shadow", "gone", "pins", "swap", "unl", "routed",
             "split", "withcfg")  # fmt: skip
    for name in names:
        versioned(root, name)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    running = start_server(
        test_settings(repo, preload=False, admin_token=TOKEN, max_upload_size=UPLOAD_LIMIT,
                      inline_run_us=0.0)
    )  # fmt: skip
    yield running
    stop_server(running)


# -- clients -------------------------------------------------------------------------


def call(
    server: RunningServer, method: str, path: str, body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        server.http_url + path,
        data=data,
        method=method,
        headers=AUTH if headers is None else headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            status, head, raw = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, dict(err.headers), err.read()
    return status, head, json.loads(raw) if raw else None


def infer(
    server: RunningServer, model: str, version: str | None = None, key: str | None = None,
    param_key: str | None = None,
) -> tuple[int, str, float]:  # fmt: skip
    """(status, model_version, the factor the answering version applied)."""
    doc: dict[str, Any] = {
        "inputs": [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]
    }
    if param_key is not None:
        doc["parameters"] = {"routing_key": param_key}
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    status, _, reply = call(server, "POST", path, doc, {"X-Routing-Key": key} if key else {})
    if status != 200:
        return status, reply["error"], 0.0
    return status, reply["model_version"], reply["outputs"][0]["data"][0]


def model_bytes(factor: float) -> bytes:
    return testing.fixed_shape((2,), factor=factor)


def listing(repo: Path, name: str) -> list[str]:
    return sorted(p.name for p in (repo / name).iterdir())


# -- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
    ids=["missing", "wrong", "no-scheme", "other-scheme"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v2/admin/models"), ("PUT", "/v2/admin/models/up/versions/9"),
     ("PUT", "/v2/admin/models/route/routing"), ("POST", "/v2/repository/index")],
)  # fmt: skip
def test_admin_and_repository_control_need_the_token(
    server: RunningServer, headers: dict, method: str, path: str
) -> None:
    status, head, body = call(server, method, path, b"{}", headers)
    assert status == 401
    assert head["WWW-Authenticate"].startswith("Bearer")
    assert "admin token" in body["error"] and TOKEN not in body["error"]


def test_the_right_token_is_accepted(server: RunningServer) -> None:
    status, _, body = call(server, "GET", "/v2/admin/models/route")
    assert status == 200
    assert body["name"] == "route"
    assert [v["version"] for v in body["versions"]] == ["1", "2"]
    assert [v["servable"] for v in body["versions"]] == [False, True]  # latest 1
    assert body["routing"] == {"aliases": {}, "weights": {}, "shadow": None}


# -- uploads ---------------------------------------------------------------------------


def test_an_uploaded_version_becomes_the_latest_and_serves(
    server: RunningServer, repo: Path
) -> None:
    status, _, body = call(server, "PUT", "/v2/admin/models/up/versions/3", model_bytes(3.0))
    assert status == 201 and body == {"name": "up", "version": "3", "bytes": len(model_bytes(3))}
    assert listing(repo, "up") == ["1", "2", "3"]  # nothing half-written left behind
    assert infer(server, "up") == (200, "3", 3.0)
    # a new model can be uploaded too
    status, _, _ = call(server, "PUT", "/v2/admin/models/brand_new/versions/1", model_bytes(5))
    assert status == 201 and infer(server, "brand_new") == (200, "1", 5.0)


@pytest.mark.parametrize(
    ("path", "body", "status", "problem"),
    [
        ("/v2/admin/models/up/versions/1", model_bytes(9), 409, "already has version 1"),
        ("/v2/admin/models/up/versions/0", model_bytes(9), 400, "invalid version"),
        ("/v2/admin/models/up/versions/x1", model_bytes(9), 400, "invalid version"),
        ("/v2/admin/models/up/versions/-4", model_bytes(9), 400, "invalid version"),
        ("/v2/admin/models/up..x/versions/4", model_bytes(9), 400, "invalid model name"),
        ("/v2/admin/models/.hidden/versions/4", model_bytes(9), 400, "invalid model name"),
        ("/v2/admin/models/up%2F..%2Fx/versions/4", model_bytes(9), 404, "no route"),
        ("/v2/admin/models/up/versions/4", b"not an onnx model", 400, "not a loadable model"),
        ("/v2/admin/models/fresh/versions/1", b"not an onnx model", 400, "not a loadable model"),
        ("/v2/admin/models/up/versions/4", b"", 400, "empty model file"),
        ("/v2/admin/models/up/versions/4", b"x" * (UPLOAD_LIMIT + 1), 400, "upload limit"),
    ],
    ids=["exists", "zero", "letters", "negative", "dots", "hidden", "slash", "corrupt",
         "corrupt-new-model", "empty", "too-big"],
)  # fmt: skip
def test_a_bad_upload_is_refused_and_changes_nothing(
    server: RunningServer, repo: Path, path: str, body: bytes, status: int, problem: str
) -> None:
    before = tree(repo)
    got, _, reply = call(server, "PUT", path, body)
    assert got == status and problem in reply["error"]
    assert tree(repo) == before


def upload_url(server: RunningServer, name: str, version: int) -> str:
    return f"{server.http_url}/v2/admin/models/{name}/versions/{version}"


# a config the fixed_shape((2,)) models match, and one that names an input they lack
GOOD_CONFIG = 'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
WRONG_CONFIG = GOOD_CONFIG.replace("INPUT0", "IMAGE")


@pytest.mark.parametrize(
    ("name", "version", "model", "config", "problem"),
    [
        ("fresh1", 1, b"not an onnx model", None, "not a loadable model"),
        ("fresh2", 1, b"not an onnx model", GOOD_CONFIG, "not a loadable model"),
        ("fresh3", 1, model_bytes(1), WRONG_CONFIG, "config input 'IMAGE' is not in the model"),
        ("fresh4", 1, model_bytes(1), "response_cache { enable: true }", "response_cache"),
        ("fresh5", 1, model_bytes(1), "max_batch_size: 0\nfoo: 1", '"foo"'),
        ("withcfg", 3, b"not an onnx model", None, "not a loadable model"),
        ("withcfg", 3, b"not an onnx model", GOOD_CONFIG, "not a loadable model"),
        ("withcfg", 3, model_bytes(3), WRONG_CONFIG, "config input 'IMAGE' is not in the model"),
        ("withcfg", 1, model_bytes(3), GOOD_CONFIG, "already has version 1"),
    ],
    ids=["new-model", "new-model-with-config", "new-model-config-mismatch",
         "new-model-unsupported-field", "new-model-unknown-field", "new-version",
         "new-version-with-config", "new-version-config-mismatch", "existing-version"],
)  # fmt: skip
def test_a_refused_upload_leaves_the_repository_exactly_as_it_was(
    server: RunningServer, repo: Path, name: str, version: int, model: bytes,
    config: str | None, problem: str,
) -> None:  # fmt: skip
    before = tree(repo)
    status, reply = upload_with_config(upload_url(server, name, version), model, config, AUTH)
    assert status in (400, 409) and problem in reply["error"], reply
    assert tree(repo) == before  # paths, sizes and contents
    index = call(server, "POST", "/v2/repository/index")[2]
    assert not any(row["name"] == name and "version" not in row for row in index)


def test_a_refused_upload_through_the_cli_leaves_the_repository_as_it_was(
    server: RunningServer, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The defect: `upload --config` put the config first, and a model file that then
    failed its trial load left MODEL/config.pbtxt behind (a model without versions)."""
    from fleetserve.server.cli import main

    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    (tmp_path / "model.onnx").write_bytes(b"not an onnx model")
    (tmp_path / "config.pbtxt").write_text(GOOD_CONFIG)
    before = tree(repo)
    argv = ["admin", "--url", server.http_url, "upload", "clinew", "1",
            str(tmp_path / "model.onnx"), "--config", str(tmp_path / "config.pbtxt")]  # fmt: skip
    assert main(argv) == 1
    assert tree(repo) == before
    (tmp_path / "model.onnx").write_bytes(model_bytes(4))
    assert main(argv) == 0
    assert (repo / "clinew" / "config.pbtxt").read_text() == GOOD_CONFIG
    assert listing(repo, "clinew") == ["1", "config.pbtxt"]
    assert infer(server, "clinew") == (200, "1", 4.0)


def test_an_upload_with_its_config_adds_both(server: RunningServer, repo: Path) -> None:
    status, reply = upload_with_config(upload_url(server, "made", 1), model_bytes(6), GOOD_CONFIG,
                                       AUTH)  # fmt: skip
    assert status == 201 and reply == {"name": "made", "version": "1", "bytes": len(model_bytes(6))}
    assert listing(repo, "made") == ["1", "config.pbtxt"]
    assert (repo / "made" / "config.pbtxt").read_text() == GOOD_CONFIG
    assert not [p for p in repo.iterdir() if p.name.startswith(".upload")]
    assert infer(server, "made") == (200, "1", 6.0)
    # an existing model: the new version is added and the config replaced
    latest_all = GOOD_CONFIG + "version_policy: { all: {} }\n"
    status, _ = upload_with_config(upload_url(server, "withcfg", 3), model_bytes(3), latest_all,
                                   AUTH)  # fmt: skip
    assert status == 201
    assert (repo / "withcfg" / "config.pbtxt").read_text() == latest_all
    assert [infer(server, "withcfg", v)[2] for v in "123"] == [1.0, 2.0, 3.0]


def test_a_config_for_a_model_that_does_not_exist_is_refused(
    server: RunningServer, repo: Path
) -> None:
    before = tree(repo)
    status, _, reply = call(server, "PUT", "/v2/admin/models/nomodel/config", GOOD_CONFIG.encode())
    assert status == 404 and "upload its first version with its config" in reply["error"]
    assert tree(repo) == before


def test_an_upload_to_a_model_whose_config_is_broken_needs_a_new_config(
    server: RunningServer, repo: Path
) -> None:
    versioned(repo, "broken_cfg", (1,))
    (repo / "broken_cfg" / "config.pbtxt").write_text(
        "model_transaction_policy { decoupled: true }"
    )
    before = tree(repo)
    status, reply = upload_with_config(upload_url(server, "broken_cfg", 2), model_bytes(2), None,
                                       AUTH)  # fmt: skip
    assert status == 400 and "model_transaction_policy.decoupled" in reply["error"]
    assert "send a corrected config.pbtxt" in reply["error"]
    assert tree(repo) == before
    status, _ = upload_with_config(upload_url(server, "broken_cfg", 2), model_bytes(2), "", AUTH)
    assert status == 201 and infer(server, "broken_cfg") == (200, "2", 2.0)


@pytest.mark.parametrize(
    ("parts", "problem"),
    [([("model", b"x"), ("config", b"")], "nothing may follow"),
     ([("other", b"x")], 'holds a "model" part'),
     ([("config", b"\xff\xfe"), ("model", b"x")], "must be UTF-8")],
    ids=["config-after-model", "no-model-part", "config-not-utf8"],
)  # fmt: skip
def test_a_malformed_multipart_upload_is_400(
    server: RunningServer, repo: Path, parts: list[tuple[str, bytes]], problem: str
) -> None:
    async def main() -> tuple[int, dict]:
        form = aiohttp.FormData()
        for name, data in parts:
            form.add_field(name, data, filename=name, content_type="application/octet-stream")
        url = upload_url(server, "up", 8)
        async with aiohttp.ClientSession() as http, http.put(url, data=form, headers=AUTH) as r:
            return r.status, await r.json()

    before = tree(repo)
    status, reply = asyncio.run(main())
    assert status == 400 and problem in reply["error"]
    assert tree(repo) == before


def test_an_upload_streamed_past_the_limit_without_a_length_is_refused(
    server: RunningServer, repo: Path
) -> None:
    async def chunks() -> Any:
        for _ in range(3):
            yield b"x" * (UPLOAD_LIMIT // 2)

    async def main() -> tuple[int, dict]:
        url = f"{server.http_url}/v2/admin/models/up/versions/7"
        async with aiohttp.ClientSession() as http, http.put(url, data=chunks(), headers=AUTH) as r:
            return r.status, await r.json()

    before = listing(repo, "up")
    status, reply = asyncio.run(main())
    assert status == 400 and "upload limit" in reply["error"]
    assert listing(repo, "up") == before


def test_a_config_upload_is_checked_then_replaces_the_file(
    server: RunningServer, repo: Path
) -> None:
    path = repo / "cfg" / "config.pbtxt"
    status, _, reply = call(
        server, "PUT", "/v2/admin/models/cfg/config", b"max_batch_size: 0\nfoo: 1"
    )
    assert status == 400 and "foo" in reply["error"] and not path.exists()
    good = b"version_policy: { all: {} }\n"
    assert call(server, "PUT", "/v2/admin/models/cfg/config", good)[0] == 200
    assert path.read_bytes() == good
    assert infer(server, "cfg", "1") == (200, "1", 1.0)  # the new policy serves version 1


# -- routing ---------------------------------------------------------------------------


def test_aliases_name_versions_and_weights_split_unversioned_traffic(
    server: RunningServer,
) -> None:
    routing = {"aliases": {"stable": 1, "canary": 2}, "weights": {"1": 80, "2": 20}}
    status, _, reply = call(server, "PUT", "/v2/admin/models/route/routing", routing)
    assert status == 200 and reply == {**routing, "shadow": None}
    # version 1 is outside the version policy (latest 1) but routed: servable
    assert infer(server, "route", "stable") == (200, "1", 1.0)
    assert infer(server, "route", "canary") == (200, "2", 2.0)
    status, message, _ = infer(server, "route", "beta")
    assert status == 404 and "aliases: canary, stable" in message
    served = Counter(infer(server, "route")[1] for _ in range(1000))
    assert abs(served["2"] - 200) < 5 * 13  # binomial sd = sqrt(1000 * 0.2 * 0.8)
    assert set(served) == {"1", "2"}


def test_a_routing_key_sticks_to_one_version(server: RunningServer) -> None:
    call(server, "PUT", "/v2/admin/models/sticky/routing", {"weights": {"1": 50, "2": 50}})
    for user in ("alice", "bob", "carol", "dave"):
        by_header = {infer(server, "sticky", key=user)[1] for _ in range(20)}
        by_param = {infer(server, "sticky", param_key=user)[1] for _ in range(20)}
        assert len(by_header) == 1 and by_header == by_param
    assert len({infer(server, "sticky", key=f"user{i}")[1] for i in range(40)}) == 2


@pytest.mark.parametrize(
    ("routing", "problem"),
    [({"aliases": {"stable": 9}}, "no version 9"), ({"weights": {"1": 0}}, "not all be 0"),
     ({"aliases": {"2": 1}}, "must start with a letter")],
)  # fmt: skip
def test_bad_routing_is_400_and_keeps_the_old_routing(
    server: RunningServer, routing: dict, problem: str
) -> None:
    before = call(server, "GET", "/v2/admin/models/route/routing")[2]
    status, _, reply = call(server, "PUT", "/v2/admin/models/route/routing", routing)
    assert status == 400 and problem in reply["error"]
    assert call(server, "GET", "/v2/admin/models/route/routing")[2] == before


def test_shadow_copies_never_change_or_hold_up_the_callers_answer(
    server: RunningServer,
) -> None:
    assert call(server, "POST", "/v2/admin/models/shadow/versions/1/load")[0] == 200

    async def gate_v1() -> Gate:
        s = server.app.cache.servable(ModelId("shadow", 1))  # type: ignore[union-attr]
        s.model = Gate(s.model)
        return s.model

    gate: Gate = server.call(gate_v1())  # type: ignore[assignment]
    try:
        routing = {"shadow": {"version": 1, "fraction": 1.0}}
        assert call(server, "PUT", "/v2/admin/models/shadow/routing", routing)[0] == 200
        # the first copy blocks in version 1; the callers keep getting version 2's answers
        answers = [infer(server, "shadow") for _ in range(20)]
        assert answers == [(200, "2", 2.0)] * 20
        assert gate.started.acquire(timeout=WAIT_S)
    finally:
        gate.open()
    metrics = urllib.request.urlopen(server.metrics_url, timeout=WAIT_S).read().decode()
    shadows = 'fleetserve_shadow_requests_total{model="shadow",outcome="%s",version="1"} %s'
    assert shadows % ("dropped", "19.0") in metrics
    # the one copy that ran is compared with what was served: version 1 answers differ
    deadline = time.monotonic() + WAIT_S
    while shadows % ("differ", "1.0") not in metrics:
        assert time.monotonic() < deadline, "the shadow copy never finished"
        time.sleep(0.01)
        metrics = urllib.request.urlopen(server.metrics_url, timeout=WAIT_S).read().decode()


# -- lifecycle -------------------------------------------------------------------------


def test_delete_is_refused_while_routed_then_removes_the_version(
    server: RunningServer, repo: Path
) -> None:
    call(server, "PUT", "/v2/admin/models/gone/routing", {"aliases": {"old": 1}})
    assert infer(server, "gone", "old") == (200, "1", 1.0)  # loaded
    status, _, reply = call(server, "DELETE", "/v2/admin/models/gone/versions/1")
    assert status == 409 and "named by its routing" in reply["error"]
    call(server, "PUT", "/v2/admin/models/gone/routing", {})
    assert call(server, "DELETE", "/v2/admin/models/gone/versions/1")[0] == 200
    assert listing(repo, "gone") == ["2"]
    assert call(server, "DELETE", "/v2/admin/models/gone/versions/1")[0] == 404


def test_pin_loads_and_keeps_a_version_and_unpin_lets_it_go(server: RunningServer) -> None:
    assert call(server, "POST", "/v2/admin/models/pins/versions/2/pin")[0] == 200
    versions = call(server, "GET", "/v2/admin/models/pins")[2]["versions"]
    assert versions[1] == {"version": "2", "state": "READY", "reason": "", "servable": True,
                           "pinned": True}  # fmt: skip
    assert call(server, "POST", "/v2/admin/models/pins/versions/2/unpin")[0] == 200
    assert call(server, "GET", "/v2/admin/models/pins")[2]["versions"][1]["pinned"] is False
    status, _, reply = call(server, "POST", "/v2/admin/models/pins/versions/2/explode")
    assert status == 404 and "no admin action" in reply["error"]


def test_an_admin_unload_takes_one_version_out_of_service_until_it_is_loaded(
    server: RunningServer,
) -> None:
    assert infer(server, "unl") == (200, "2", 2.0)
    assert call(server, "POST", "/v2/admin/models/unl/versions/2/unload")[0] == 200
    for version in (None, "2"):  # unversioned requests go to the latest version: 2
        status, message, _ = infer(server, "unl", version)
        assert status == 503 and "model unl:2 was unloaded" in message
    ready = urllib.request.Request(f"{server.http_url}/v2/models/unl/versions/2/ready")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(ready, timeout=WAIT_S)
    assert err.value.code == 400
    state = call(server, "GET", "/v2/admin/models/unl")[2]["versions"][1]
    assert (state["state"], state["reason"]) == ("UNAVAILABLE", "unloaded")
    assert call(server, "POST", "/v2/admin/models/unl/versions/2/load")[0] == 200
    assert infer(server, "unl") == (200, "2", 2.0)
    assert urllib.request.urlopen(ready, timeout=WAIT_S).status == 200


@pytest.mark.parametrize(
    "routing",
    [{"weights": {"1": 50, "2": 50}}, {"shadow": {"version": 1, "fraction": 0.5}},
     {"aliases": {"old": 1}}],
    ids=["weight", "shadow", "alias"],
)  # fmt: skip
def test_an_admin_unload_is_refused_while_routing_names_the_version(
    server: RunningServer, routing: dict
) -> None:
    assert call(server, "PUT", "/v2/admin/models/routed/routing", routing)[0] == 200
    status, _, reply = call(server, "POST", "/v2/admin/models/routed/versions/1/unload")
    assert status == 409 and "route traffic away from it before unloading it" in reply["error"]
    assert call(server, "PUT", "/v2/admin/models/routed/routing", {})[0] == 200
    assert call(server, "POST", "/v2/admin/models/routed/versions/1/unload")[0] == 200
    assert call(server, "POST", "/v2/admin/models/routed/versions/1/load")[0] == 200


def test_a_repository_unload_takes_a_split_model_out_whole_until_it_is_loaded(
    server: RunningServer,
) -> None:
    split = {"weights": {"1": 1, "2": 1}}
    assert call(server, "PUT", "/v2/admin/models/split/routing", split)[0] == 200
    assert {infer(server, "split", key=f"k{i}")[1] for i in range(40)} == {"1", "2"}
    assert call(server, "POST", "/v2/repository/models/split/unload")[0] == 200
    answers = {infer(server, "split", key=f"k{i}")[:2] for i in range(40)}
    assert {status for status, _ in answers} == {503}
    assert {m.split(" was ")[0] for _, m in answers} == {"model split:1", "model split:2"}
    # the routing stays, and applies again once the model is loaded
    assert call(server, "GET", "/v2/admin/models/split/routing")[2]["weights"] == split["weights"]
    assert call(server, "POST", "/v2/repository/models/split/load")[0] == 200
    assert {infer(server, "split", key=f"k{i}")[1] for i in range(40)} == {"1", "2"}


def test_routing_and_pins_survive_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "models"
    versioned(root, "m")
    settings = test_settings(root, preload=False, admin_token=TOKEN)
    first = start_server(settings)
    try:
        call(first, "PUT", "/v2/admin/models/m/routing", {"aliases": {"stable": 1}})
        call(first, "POST", "/v2/admin/models/m/versions/1/pin")
    finally:
        stop_server(first)
    second = start_server(settings)
    try:
        routing = call(second, "GET", "/v2/admin/models/m/routing")[2]
        assert routing["aliases"] == {"stable": 1}
        assert infer(second, "m", "stable") == (200, "1", 1.0)
        version = call(second, "GET", "/v2/admin/models/m")[2]["versions"][0]
        assert version["pinned"] is True and version["state"] == "READY"  # loaded at start
    finally:
        stop_server(second)


def test_upload_switch_rollback_and_unload_under_load_lose_no_request(
    server: RunningServer,
) -> None:
    async def main() -> Counter[str]:
        served: Counter[str] = Counter()
        stop = asyncio.Event()
        body = {"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
        url = f"{server.http_url}/v2/models/swap/infer"

        async def client(http: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                async with http.post(url, json=body) as reply:
                    doc = await reply.json()
                    if reply.status != 200:
                        served[f"error {reply.status}: {doc['error']}"] += 1
                        continue
                    version = doc["model_version"]
                    assert doc["outputs"][0]["data"][0] == float(version)
                    served[version] += 1

        async def admin(method: str, path: str, body: Any = None) -> None:
            status, _, reply = await asyncio.to_thread(call, server, method, path, body)
            assert status in (200, 201), reply

        async with aiohttp.ClientSession() as http:
            clients = [asyncio.ensure_future(client(http)) for _ in range(8)]
            await asyncio.sleep(0.2)
            await admin("PUT", "/v2/admin/models/swap/versions/3", model_bytes(3.0))
            await admin("POST", "/v2/admin/models/swap/versions/3/load")
            await asyncio.sleep(0.2)
            await admin("PUT", "/v2/admin/models/swap/routing", {"weights": {"2": 1}})  # rollback
            await asyncio.sleep(0.2)
            await admin("PUT", "/v2/admin/models/swap/routing", {"weights": {"2": 1, "3": 1}})
            await asyncio.sleep(0.2)
            await admin("PUT", "/v2/admin/models/swap/routing", {})  # back to the latest: 3
            await admin("POST", "/v2/admin/models/swap/versions/2/unload")
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
        return served

    served = asyncio.run(main())
    assert not [k for k in served if k.startswith("error")], served
    assert served["2"] > 0 and served["3"] > 0


def test_the_admin_cli_drives_the_real_server(
    server: RunningServer, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from fleetserve.server.cli import main

    versioned(repo, "cli", (1,))
    url = ["admin", "--url", server.http_url]
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", TOKEN)
    model = tmp_path / "model.onnx"
    model.write_bytes(model_bytes(2.0))
    with caplog.at_level("INFO", logger="fleetserve.audit"):
        assert main([*url, "upload", "cli", "2", str(model)]) == 0
        assert main([*url, "route", "cli", "--alias", "old=1", "--weight", "1=1"]) == 0
    assert infer(server, "cli") == (200, "1", 1.0)
    assert infer(server, "cli", "2") == (200, "2", 2.0)
    audit = [r.getMessage() for r in caplog.records if r.name == "fleetserve.audit"]
    assert audit[0] == f"admin upload cli:2 by 127.0.0.1 ({len(model_bytes(2.0))} bytes)"
    assert audit[1].startswith("admin route cli by 127.0.0.1")
    assert all(TOKEN not in line for line in audit)
    monkeypatch.setenv("FLEETSERVE_ADMIN_TOKEN", "zz-not-it-zz")
    capsys.readouterr()
    assert main([*url, "status", "cli"]) == 1
    err = capsys.readouterr().err
    assert "admin token" in err and "zz-not-it-zz" not in err
