"""The same bare V2 handler behind aiohttp's web.Application or its low-level web.Server.

Measures what aiohttp's application layer (router, match info, middleware chain, full
Request) costs per request, which is why fleetserve's REST edge runs on web.Server:

    python benchmarks/cpu_per_request.py --port 19300 \\
        "app=python benchmarks/aiohttp_layers.py --model M --port 19300" \\
        "server=python benchmarks/aiohttp_layers.py --model M --port 19300 --low-level"
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import onnxruntime as ort
import orjson
import uvloop
from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--low-level", action="store_true", help="web.Server instead of Application")
    args = ap.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(args.model, options)

    async def infer(request: web.BaseRequest) -> web.Response:
        doc = orjson.loads(await request.read())
        tensor = doc["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        y = session.run(None, {tensor["name"]: x})[0]
        out = {"name": "OUTPUT0", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel()}
        body = orjson.dumps(
            {"model_name": "mlp", "outputs": [out]}, option=orjson.OPT_SERIALIZE_NUMPY
        )
        return web.Response(body=body, content_type="application/json")

    async def serve() -> None:
        if args.low_level:
            runner: web.BaseRunner = web.ServerRunner(web.Server(infer, access_log=None))
        else:
            app = web.Application()
            app.router.add_post("/v2/models/{name}/infer", infer)
            runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        await asyncio.Event().wait()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
