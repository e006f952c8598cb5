"""Bare baseline servers: the ceiling of what Python can do for one V2 infer call.

Each baseline does only the unavoidable work for a V2 ``ModelInfer`` on one ONNX model (decode,
build the numpy input, run ONE onnxruntime session inline, encode) with no routing,
validation, batching, queueing, metrics or logging. ``benchmarks/loadtest.py`` runs them next to
fleetserve so that "fleetserve / baseline" ratios come from the same run on the same machine.

* ``--kind rest``: a bare aiohttp app (uvloop) with one route, ``POST /v2/models/{name}/infer``:
  the V2 JSON body is decoded with orjson, inputs built with numpy, answered as V2 JSON (orjson).
* ``--kind grpc``: a bare grpc.aio servicer for ``inference.GRPCInferenceService/ModelInfer``
  reading ``raw_input_contents`` with ``np.frombuffer`` and answering ``raw_output_contents``.

Usage::

    python benchmarks/baselines.py --model PATH/model.onnx --kind rest --port 8000
    python benchmarks/baselines.py --model PATH/model.onnx --kind grpc --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fleetserve.server.types import DTYPES  # noqa: E402  (needs ROOT on sys.path)

# V2 datatype <-> numpy dtype, enough for the numeric models a baseline serves.
V2_TO_NP: dict[str, np.dtype] = {k: v for k, v in DTYPES.items() if v != np.object_}
NP_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NP.items()}

MAX_MSG = 64 * 1024 * 1024


def grpc_messages() -> Any:
    """fleetserve's generated Open Inference Protocol messages (module grpc_service_pb2).

    Message names never go on the wire, only the method path, so these serve a bare
    servicer registered by hand, as a grpc.aio user without service stubs (and fleetserve
    itself) writes one; no tritonclient needed, and the stubs are the ones that the
    installed protobuf runs.
    """
    from fleetserve.protos import grpc_service_pb2

    return grpc_service_pb2


def make_session(model_path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------------


def build_rest_app(sess: Any) -> Any:
    import orjson
    from aiohttp import web

    out_names = [o.name for o in sess.get_outputs()]
    dumps_opts = orjson.OPT_SERIALIZE_NUMPY

    async def infer(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            feeds = {
                inp["name"]: np.asarray(inp["data"], dtype=V2_TO_NP[inp["datatype"]]).reshape(
                    inp["shape"]
                )
                for inp in body["inputs"]
            }
            results = sess.run(out_names, feeds)
        except Exception as exc:  # a baseline still answers V2-shaped errors
            return web.Response(
                status=400,
                body=orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}),
                content_type="application/json",
            )
        outputs = [
            {
                "name": name,
                "datatype": NP_TO_V2.get(arr.dtype, "FP32"),
                "shape": arr.shape,
                "data": np.ascontiguousarray(arr).ravel(),
            }
            for name, arr in zip(out_names, results, strict=True)
        ]
        resp: dict[str, Any] = {"model_name": request.match_info["name"], "outputs": outputs}
        if "id" in body:
            resp["id"] = body["id"]
        return web.Response(
            body=orjson.dumps(resp, option=dumps_opts), content_type="application/json"
        )

    app = web.Application(client_max_size=MAX_MSG)
    app.router.add_post("/v2/models/{name}/infer", infer)
    return app


def serve_rest(sess: Any, host: str, port: int) -> None:
    import uvloop
    from aiohttp import web

    web.run_app(
        build_rest_app(sess), host=host, port=port, access_log=None, print=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------


def build_grpc_handler(sess: Any, pb2: Any) -> Any:
    """A generic handler with the one method, ModelInfer (what generated stubs register)."""
    import grpc

    out_names = [o.name for o in sess.get_outputs()]

    async def model_infer(request: Any, context: Any) -> Any:
        try:
            raw = request.raw_input_contents
            feeds = {
                inp.name: np.frombuffer(raw[i], dtype=V2_TO_NP[inp.datatype]).reshape(
                    tuple(inp.shape)
                )
                for i, inp in enumerate(request.inputs)
            }
            results = sess.run(out_names, feeds)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
        resp = pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, arr in zip(out_names, results, strict=True):
            out = resp.outputs.add()
            out.name = name
            out.datatype = NP_TO_V2.get(arr.dtype, "FP32")
            out.shape.extend(arr.shape)
            resp.raw_output_contents.append(arr.tobytes())
        return resp

    method = grpc.unary_unary_rpc_method_handler(
        model_infer,
        request_deserializer=pb2.ModelInferRequest.FromString,
        response_serializer=pb2.ModelInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": method}
    )


async def serve_grpc(sess: Any, host: str, port: int) -> None:
    import grpc

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MSG),
            ("grpc.max_send_message_length", MAX_MSG),
        ]
    )
    server.add_generic_rpc_handlers((build_grpc_handler(sess, grpc_messages()),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"baseline grpc serving on {host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="path to an ONNX model file")
    ap.add_argument("--kind", choices=("rest", "grpc"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="gRPC only: run grpc.aio on uvloop (REST always uses uvloop)",
    )
    args = ap.parse_args(argv)
    sess = make_session(args.model)
    if args.kind == "rest":
        print(f"baseline rest serving on {args.host}:{args.port}", file=sys.stderr, flush=True)
        serve_rest(sess, args.host, args.port)
    else:
        run = asyncio.run
        if args.uvloop:
            import uvloop

            run = uvloop.run
        run(serve_grpc(sess, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
