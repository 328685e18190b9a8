"""Which kept HTTP library carries the front: uvicorn + Starlette + httpx vs aiohttp (server and client), measured.

Each candidate runs the front's hot path — accept a POSTed JPEG, forward it to an upstream, relay the JSON answer —
in its own process, in front of the same upstream (a minimal aiohttp app in a third process that answers a fixed
one-item JSON list after reading the body). Closed-loop clients (`serving.client.Client`: keep-alive, TCP_NODELAY,
one real CIFAR-10 JPEG per request) run in a fourth process. `direct` rows load the upstream itself: the floor.

    .venv/bin/python benchmarks/front_choice.py --seconds 5
Writes benchmarks/results/front_choice.json (rows: stack, concurrency, requests_per_s, p50_ms, p99_ms, errors).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, provenance, write_rows  # noqa: E402
from benchmarks.serve_load import load_images, summarise  # noqa: E402

ANSWER = b'[{"cluster": 3, "confidence": 0.9, "label": "cat"}]'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upstream(port: int) -> None:
    from aiohttp import web

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/predictions/{model}", predict)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def aiohttp_front(port: int, upstream_port: int) -> None:
    import aiohttp
    from aiohttp import web

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def predict(request: web.Request) -> web.Response:
        body = await request.read()
        url = f"http://127.0.0.1:{upstream_port}{request.path}"
        headers = {"Content-Type": "application/octet-stream"}
        async with request.app["session"].post(url, data=body, headers=headers) as answer:
            data = await answer.read()
            return web.Response(status=answer.status, body=data, content_type="application/json")

    app = web.Application()
    app.on_startup.append(start)
    app.router.add_post("/predictions/{model}", predict)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def starlette_front(port: int, upstream_port: int, http: str) -> None:
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{upstream_port}", limits=httpx.Limits(max_connections=64))

    async def predict(request: Request) -> Response:
        body = await request.body()
        answer = await client.post(request.url.path, content=body, headers={"Content-Type": "application/octet-stream"})
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/predictions/{model}", predict, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, log_level="warning", access_log=False)


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def medians(rows: list[dict]) -> list[dict]:
    """One row per (stack, concurrency): the median of its rounds (the machine is shared; turns spread the noise)."""
    import numpy as np

    out = []
    for key in dict.fromkeys((r["stack"], r["concurrency"]) for r in rows):
        mine = [r for r in rows if (r["stack"], r["concurrency"]) == key]
        row = {"stack": key[0], "concurrency": key[1], "rounds": len(mine)}
        for field in ("requests_per_s", "p50_ms", "p99_ms"):
            row[field] = round(float(np.median([r[field] for r in mine])), 2)
        row["errors"] = sum(r["errors"] for r in mine)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="the stacks take turns; medians are kept")
    args = parser.parse_args()
    from benchmarks.serve_load import run_level

    images = load_images(200)
    ctx = multiprocessing.get_context("spawn")
    up_port = _free_port()
    up = ctx.Process(target=upstream, args=(up_port,), daemon=True)
    up.start()
    wait_port(up_port)
    stacks = {
        "direct (upstream alone)": None,
        "aiohttp server + aiohttp client": (aiohttp_front, ()),
        "uvicorn[httptools] + starlette + httpx": (starlette_front, ("httptools",)),
        "uvicorn[h11] + starlette + httpx": (starlette_front, ("h11",)),
    }
    rows = []
    try:
        with ctx.Pool(1) as pool:
            for round_, (stack, spec) in ((r, item) for r in range(args.rounds) for item in stacks.items()):
                process, port = None, up_port
                if spec is not None:
                    port = _free_port()
                    process = ctx.Process(target=spec[0], args=(port, up_port, *spec[1]), daemon=True)
                    process.start()
                    wait_port(port)
                url = f"http://127.0.0.1:{port}"
                try:
                    pool.apply(run_level, (url, "m", None, images, max(args.concurrency), 1.0))  # warm-up
                    for concurrency in args.concurrency:
                        latencies, ok, errors, elapsed = pool.apply(
                            run_level, (url, "m", None, images, concurrency, args.seconds)
                        )
                        row = summarise(stack, concurrency, latencies, ok, errors, elapsed)
                        row["stack"] = row.pop("target")
                        row["round"] = round_
                        row["requests_per_s"] = row.pop("images_per_s")
                        rows.append(row)
                        print(row, flush=True)
                finally:
                    if process is not None:
                        process.terminate()
                        process.join(10)
    finally:
        up.terminate()
        up.join(10)
    rows = medians(rows)
    for row in rows:
        row.update(load_average=[round(x, 2) for x in os.getloadavg()], **provenance())
    path = write_rows("front_choice", rows)
    print_table(rows, ["stack", "concurrency", "requests_per_s", "p50_ms", "p99_ms", "errors"])
    print(f"results: {path}")


if __name__ == "__main__":
    main()
