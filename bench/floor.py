"""`python -m bench.floor` (`just bench-floor`): what the HTTP part of an order costs at the
least on this machine, to read `just bench`'s figures against.

A trivial Starlette app (POST → 201 with a JSON body) behind a trivial Starlette proxy on
the gateway's client (`services.common.http1`; `--proxy-client aiohttp` for aiohttp's, which
the gateway used before), both under uvicorn as the services run (uvloop, httptools with one
write per answer, no access log), driven open-loop by the benchmark's own client
(`bench.http1`): the gateway → orders → answer path with no validation, middleware, database
or pipeline. Prints, per rate, the CPU milliseconds per request of client, proxy and
upstream, read from /proc."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench import cpu, http1, load, report
from services.common import http1 as services_http1

BODY = json.dumps({"user_id": "0190f7a4-0000-7d8e-9f00-aabbccddeeff", "amount": 1}).encode()
JSON = {"Content-Type": "application/json"}
# What the services run on (stack/supervisord.conf): each answer written in one piece.
HTTP_PROTOCOL = "services.common.http:CoalescingHttpToolsProtocol"


async def _create(request: Request) -> Response:
    return JSONResponse({"id": "x", "status": "new", **await request.json()}, status_code=201)


def upstream_app() -> Starlette:
    """The stand-in for a service: parses the body, answers 201 with JSON."""
    return Starlette(routes=[Route("/orders", _create, methods=["POST"])])


def proxy_app() -> Starlette:
    """The stand-in for the gateway: forwards the body to FLOOR_UPSTREAM with the client
    FLOOR_PROXY_CLIENT names (`http1`, the gateway's, or `aiohttp`)."""
    upstream = os.environ["FLOOR_UPSTREAM"]
    if os.environ.get("FLOOR_PROXY_CLIENT", "http1") == "aiohttp":
        return _aiohttp_proxy(upstream)
    client = services_http1.Client(upstream, max_connections=200, timeout=10)
    headers = services_http1.header_block(JSON.items())

    async def forward(request: Request) -> Response:
        answer = await client.request("POST", "", headers, await request.body())
        return Response(answer.body, answer.status, media_type="application/json")

    return Starlette(routes=[Route("/orders", forward, methods=["POST"])])


def _aiohttp_proxy(upstream: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            sessions.append(session)
            yield

    async def forward(request: Request) -> Response:
        async with sessions[0].post(upstream, data=await request.body(), headers=JSON) as answer:
            return Response(await answer.read(), answer.status, media_type="application/json")

    return Starlette(routes=[Route("/orders", forward, methods=["POST"])], lifespan=lifespan)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(factory: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--port", str(port),
         "--no-access-log", "--log-level", "warning", "--http", HTTP_PROTOCOL],
        env=os.environ | env,
    )  # fmt: skip


def ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return cpu.parse_stat(stat.read()).own_ticks


async def wait_ready(client: http1.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await client.post("", BODY)).status != 201:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not answer within {timeout} s")
        await asyncio.sleep(0.2)


async def drive(
    client: http1.Client, rate: float, seconds: float, pids: dict[str, int]
) -> dict[str, Any]:
    """Open loop: `rate` requests per second for `seconds`, each sent on schedule."""
    latencies: list[float] = []
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        errors += (await client.post("", BODY)).status != 201
        latencies.append(time.monotonic() - due)

    before = {name: ticks(pid) for name, pid in pids.items()}
    own_before, started = time.process_time(), time.monotonic()
    recorder = load.Recorder()
    await load.on_schedule(
        rate, seconds, started, lambda due: recorder.spawn(one(due)), clock=time.monotonic
    )
    await recorder.settle()
    count = recorder.scheduled
    elapsed = time.monotonic() - started
    ms_per_request = {
        name: (ticks(pid) - before[name]) / cpu.CLOCK_TICKS / count * 1000
        for name, pid in pids.items()
    }
    ms_per_request["client"] = (time.process_time() - own_before) / count * 1000
    return {
        "rate": rate,
        "achieved": count / elapsed,
        "errors": errors,
        "latency_ms": report.latency_summary(latencies),
        "cpu_ms_per_request": ms_per_request | {"total": sum(ms_per_request.values())},
    }


async def measure(
    rates: Sequence[float], seconds: float, proxy_client: str = "http1"
) -> list[dict[str, Any]]:
    up_port, proxy_port = free_port(), free_port()
    upstream = serve("bench.floor:upstream_app", up_port, {})
    proxy = serve(
        "bench.floor:proxy_app",
        proxy_port,
        {
            "FLOOR_UPSTREAM": f"http://127.0.0.1:{up_port}/orders",
            "FLOOR_PROXY_CLIENT": proxy_client,
        },
    )
    url = f"http://127.0.0.1:{proxy_port}/orders"
    client = http1.Client(url, max_connections=500, timeout=10)
    try:
        await wait_ready(client)
        pids = {"proxy": proxy.pid, "upstream": upstream.pid}
        return [await drive(client, rate, seconds, pids) for rate in rates]
    finally:
        await client.close()
        for process in (proxy, upstream):
            process.terminate()
            process.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="just bench-floor", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="300,1000", help="requests/s, comma separated")
    p.add_argument("--seconds", type=float, default=8.0, help="per rate")
    p.add_argument(
        "--proxy-client",
        choices=("http1", "aiohttp"),
        default="http1",
        help="the proxy's client: the gateway's (http1) or aiohttp's",
    )
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    results = http1.run_fast(measure(rates, args.seconds, args.proxy_client))
    print(
        f"cores {os.cpu_count()}; proxy client {args.proxy_client}; "
        "CPU ms per request (client + proxy + upstream)"
    )
    for r in results:
        c, lat = r["cpu_ms_per_request"], r["latency_ms"]
        print(
            f"{r['rate']:7.0f}/s offered {r['achieved']:7.0f}/s done  errors {r['errors']}  "
            f"p50/p99 {lat['p50']}/{lat['p99']} ms  client {c['client']:.2f}  "
            f"proxy {c['proxy']:.2f}  upstream {c['upstream']:.2f}  total {c['total']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
