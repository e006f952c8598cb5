"""What a REST client can send, as Hypothesis strategies: V2 JSON bodies, ground truth,
binary-extension bodies and raw HTTP requests (any method, route, headers, encoding
and framing), each an `HttpCase` sent over a raw socket.

Valid-ish, as every fuzz strategy (tests/fuzz_cases.py): mostly requests the fuzz
repository's models serve, one part bent now and then.
"""

from __future__ import annotations

import gzip
import json
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fleetserve.server.types import DTYPES
from tests.fuzz_cases import (
    ANY_JSON,
    EDGE_INTS,
    JSON,
    PRINTABLE,
    SCALARS,
    SIGNATURES,
    TEXT,
    element_count,
    model_names,
    parameters,
    rarely,
    raw_of,
    shapes,
    values,
    versions,
)

# -- V2 JSON and binary-extension bodies --------------------------------------------------


@dataclass
class HttpCase:
    """One HTTP/1.1 request, in parts (the oracle reads `doc` and `headers`)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    doc: Any = None  # the JSON document the body carries, when it carries one
    framing: str = "length"  # length | chunked | none | short (Content-Length < body)
    version: bytes = b"HTTP/1.1"
    host: bool = True  # send Host (HTTP/1.1 requires it)

    def __repr__(self) -> str:
        """The request as sent: `doc` may nest thousands of levels, past any pretty
        printer's recursion, and the body holds it anyway."""
        return f"HttpCase(wire={self.wire()[:4000]!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis's printer
        printer.text(repr(self))

    def wire(self) -> bytes:
        """The request's bytes; always complete, and always asking to close after it."""
        headers = [(b"Host", b"127.0.0.1")] if self.host else []
        headers += self.headers
        body = self.body
        if self.framing == "length":
            headers.append((b"Content-Length", b"%d" % len(body)))
        elif self.framing == "short":  # the rest of the body reads as a next request
            headers.append((b"Content-Length", b"%d" % (len(body) // 2)))
        elif self.framing == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
            chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        head = b"%s %s %s\r\n" % (self.method, self.target, self.version)
        head += b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
        return head + b"Connection: close\r\n\r\n" + body


def model_target(model: str, version: str | None, action: str) -> bytes:
    path = "/v2/models/" + urllib.parse.quote(model, safe="")
    if version is not None:
        path += "/versions/" + urllib.parse.quote(version, safe="")
    return (path + "/" + action).encode()


@st.composite
def tensor(draw: st.DrawFn, name: str, datatype: str, dims: list[int], binary: bool) -> dict:
    """One input, the signature's now and then bent; with `binary`, its bytes under "raw"."""
    if rarely(draw, 20):
        name = draw(TEXT)
    if rarely(draw, 20):
        datatype = draw(st.sampled_from(list(DTYPES)))
    shape = draw(shapes(dims))
    count = element_count(shape)
    item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if count < 0:
        item["data"] = draw(st.lists(SCALARS, max_size=3))
    elif binary:
        item["raw"] = raw_of(datatype, draw(values(datatype, count, binary=True)))
    elif rarely(draw):
        item["data"] = draw(bad_data(datatype, count))
    else:
        items = draw(values(datatype, count))
        nested = shape and 0 not in shape and draw(st.booleans())
        item["data"] = np.array(items, dtype=object).reshape(shape).tolist() if nested else items
    if rarely(draw):
        item["parameters"] = draw(parameters())
    return item


@st.composite
def bad_data(draw: st.DrawFn, datatype: str, count: int) -> Any:
    """Data a tensor of `datatype` and `count` elements must refuse."""
    good = draw(values(datatype, count))
    kind = draw(st.sampled_from(["short", "long", "wrong", "ragged", "any"]))
    if kind == "short":
        return good[:-1]
    if kind == "long":
        return [*good, *(good[:1] or [0])]
    if kind == "wrong":
        return [draw(SCALARS) for _ in range(max(count, 1))]
    if kind == "ragged":
        return [good[:1], good[1:]]
    return draw(ANY_JSON)


@st.composite
def infer_doc(draw: st.DrawFn, model: str, binary: bool = False) -> dict:
    inputs, outputs = SIGNATURES.get(model, SIGNATURES["mlp"])
    items = [draw(tensor(name, dt, dims, binary)) for name, dt, dims in inputs]
    if rarely(draw, 20):
        items = draw(st.permutations(items + items[:1]))  # an input twice
    doc: dict[str, Any] = {"inputs": items}
    if draw(st.booleans()):
        doc["id"] = draw(st.sampled_from(["a\nb", "x" * 300]) if rarely(draw) else PRINTABLE)
    if rarely(draw, 3):
        doc["parameters"] = draw(parameters())
    if rarely(draw, 3):
        wanted = []
        for name in draw(st.lists(st.sampled_from(outputs), min_size=1, max_size=3)):
            output: dict[str, Any] = {"name": draw(TEXT) if rarely(draw) else name}
            if draw(st.booleans()):
                output["parameters"] = {"binary_data": draw(st.booleans())}
            if rarely(draw):
                output["parameters"] = draw(parameters())
            wanted.append(output)
        doc["outputs"] = wanted
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with one value somewhere replaced by any JSON (or its key removed)."""
    if rarely(draw, 20):
        return draw(ANY_JSON)
    path = draw(st.sampled_from(list(_paths(doc, ()))[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(ANY_JSON)
    return doc


def _paths(value: Any, prefix: tuple) -> Any:
    yield prefix
    if len(prefix) > 6:  # not into deep values
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list) and len(value) <= 8:  # not into every element of the data
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def dumps(doc: Any) -> bytes:
    """JSON as any client may write it (big integers kept; too deep: a deep array)."""
    try:
        return json.dumps(doc).encode()
    except RecursionError:
        return b"[" * 5000 + b"]" * 5000


@st.composite
def json_bodies(draw: st.DrawFn) -> HttpCase:
    """POST .../infer with a JSON body."""
    model, version = draw(model_names()), draw(versions())
    doc = draw(infer_doc(model))
    if rarely(draw, 6):
        doc = draw(mutated(doc))
    headers = [(b"Content-Type", b"application/json")]
    return HttpCase(b"POST", model_target(model, version, "infer"), headers, dumps(doc), doc)


@st.composite
def feedback_bodies(draw: st.DrawFn) -> HttpCase:
    """POST .../feedback: ground truth (a label, tensors, metadata) for a request id."""
    model = draw(model_names())
    doc: dict[str, Any] = {"id": draw(PRINTABLE)}
    if draw(st.booleans()):
        doc["label"] = draw(st.one_of(TEXT, st.integers(), st.floats(allow_nan=False),
                                      st.booleans()))  # fmt: skip
    if draw(st.booleans()):
        doc["truth"] = draw(infer_doc(model))["inputs"]
    if draw(st.booleans()):
        doc["metadata"] = draw(st.dictionaries(TEXT, JSON, max_size=3))
    if rarely(draw, 4):
        doc = draw(mutated(doc))
    return HttpCase(b"POST", model_target(model, None, "feedback"), [], dumps(doc), doc)


@st.composite
def binary_bodies(draw: st.DrawFn) -> HttpCase:
    """POST .../infer in Triton's binary tensor data extension: a JSON header of
    Inference-Header-Content-Length bytes, then the tensors' bytes."""
    model, version = draw(model_names()), draw(versions())
    doc = draw(infer_doc(model, binary=True))
    blobs = []
    for item in doc["inputs"]:
        raw = item.pop("raw", None)
        if raw is None:
            continue
        size: Any = len(raw)
        if rarely(draw):
            raw = draw(st.binary(max_size=40))
        if rarely(draw):
            size = draw(st.integers(-5, 100) | EDGE_INTS | SCALARS)
        item["parameters"] = {**item.get("parameters", {}), "binary_data_size": size}
        blobs.append(raw)
    if rarely(draw, 3):
        doc.setdefault("parameters", {})["binary_data_output"] = True
    header = dumps(doc)
    body = header + b"".join(blobs)
    length = b"%d" % len(header)
    if rarely(draw, 8):
        length = draw(st.sampled_from([b"0", b"-1", b"abc", b" 12", b"1e3", b"0x10", b""])
                      | st.integers(0, len(body) + 8).map(lambda n: b"%d" % n))  # fmt: skip
    headers = [(b"Content-Type", b"application/octet-stream"),
               (b"Inference-Header-Content-Length", length)]  # fmt: skip
    return HttpCase(b"POST", model_target(model, version, "infer"), headers, body, doc)


# -- raw HTTP ----------------------------------------------------------------------------

ROUTES = [
    "/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/stats",
    "/v2/repository/index", "/v2/admin/models", "/metrics", "/", "/v2/models",
]  # fmt: skip
MODEL_ACTIONS = ["infer", "ready", "config", "stats", "feedback", ""]
ADMIN_ACTIONS = ["/routing", "/config", "/versions/3", "/versions/1/load",
                 "/versions/1/unpin", "/versions/x/pin", ""]  # fmt: skip
HEADER_NAMES = st.sampled_from([
    b"Content-Type", b"Content-Encoding", b"Authorization", b"X-Routing-Key", b"Host",
    b"Origin", b"If-Match", b"Inference-Header-Content-Length", b"Expect", b"Accept-Encoding",
    b"X-Request-Id", b"Cookie",
]) | st.from_regex(rb"\A[A-Za-z0-9-]{1,12}\Z")  # fmt: skip
HEADER_VALUES = (
    st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    | st.sampled_from([b"\xff\xfe\x80", b"Bearer \xff\xfe", b"caf\xc3\xa9", b"", b"0", b"-1"])
    | TEXT.map(str.encode)
)
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS"]
TOKENS = PRINTABLE.map(str.encode) | st.sampled_from([b"", b"\xff\xfe", b"caf\xc3\xa9"])
# the headers the server reads, with bytes that are not UTF-8 (or not ASCII)
READ_HEADERS = st.sampled_from(
    [
        b"X-Routing-Key",
        b"Authorization",
        b"Host",
        b"Origin",
        b"If-Match",
        b"Content-Type",
        b"Inference-Header-Content-Length",
    ]
)
ODD_VALUES = st.sampled_from([b"\xff\xfe\x80", b"Bearer \xff\xfe", b"caf\xc3\xa9", b"\x80"]) | (
    st.binary(min_size=1, max_size=12).map(lambda b: b.translate(None, b"\r\n") + b"\xff")
)  # fmt: skip


@st.composite
def raw_targets(draw: st.DrawFn) -> bytes:
    """A request target: a route of ours with any names in it, or any bytes."""
    kind = draw(st.integers(0, 4))
    model = draw(model_names())
    name = urllib.parse.quote(model, safe="")
    if kind == 0:
        path = draw(st.sampled_from(ROUTES))
    elif kind == 1:
        action = draw(st.sampled_from(MODEL_ACTIONS))
        path = model_target(model, draw(versions()), action).decode().rstrip("/")
    elif kind == 2:
        path = f"/v2/repository/models/{name}/" + draw(st.sampled_from(["load", "unload", "x"]))
    elif kind == 3:
        path = f"/v2/admin/models/{name}" + draw(st.sampled_from(ADMIN_ACTIONS))
    else:  # any bytes, UTF-8 or not
        return b"/" + draw(st.binary(max_size=40)).translate(None, b" \r\n")
    if rarely(draw, 6):
        path += "?" + draw(TEXT)
    return path.encode("utf-8", "surrogatepass").translate(None, b" \r\n") or b"/"


@st.composite
def raw_requests(draw: st.DrawFn) -> HttpCase:
    """Any method, route, headers (bytes that are not UTF-8 too), encoding and framing."""
    if draw(st.booleans()):
        case = draw(json_bodies() | feedback_bodies() | binary_bodies())
    else:
        case = HttpCase(b"GET", b"/", [], draw(st.binary(max_size=64)))
    method, target = case.method, case.target
    if not case.doc or rarely(draw, 3):
        method = (
            draw(st.from_regex(rb"\A[A-Z]{1,8}\Z"))
            if rarely(draw)
            else draw(st.sampled_from(METHODS))
        )
        target = draw(raw_targets())
    headers = [*case.headers, *draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3))]
    if target.startswith((b"/v2/admin", b"/v2/repository")) and draw(st.booleans()):
        headers.append((b"Authorization", b"Bearer " + draw(TOKENS)))  # never the token
    if target.startswith(b"/v2/models/") and draw(st.booleans()):
        headers.append((b"X-Routing-Key", draw(TOKENS)))
    if rarely(draw, 4):
        headers.append((draw(READ_HEADERS), draw(ODD_VALUES)))
    body = case.body
    if rarely(draw, 4):
        encoding = draw(st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"x-zip"]))
        pack = {b"gzip": gzip.compress, b"deflate": zlib.compress}.get(encoding)
        if pack is not None and not rarely(draw, 3):
            body = pack(body)
            if rarely(draw, 3):
                body = body[: len(body) // 2]  # a truncated stream
        headers.append((b"Content-Encoding", encoding))
    framing = "length"
    if rarely(draw, 3):
        framing = draw(st.sampled_from(["chunked", "none", "short"]))
    version = b"HTTP/1.1" if not rarely(draw, 6) else draw(
        st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTX"])
    )  # fmt: skip
    return HttpCase(method, target, headers, body, case.doc, framing, version, not rarely(draw))
