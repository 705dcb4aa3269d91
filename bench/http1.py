"""The load generator's HTTP client: the services' lean HTTP/1.1 client
(`services.common.http1`: keep-alive connections, answers parsed by httptools), POSTing JSON
and reporting how each request ended rather than raising.

Why not aiohttp: the generator shares the machine's two cores with the system it measures,
and every millisecond it spends is taken from the system. aiohttp's client costs 0.3-0.6 ms
of CPU per request here (`just bench-floor`); this one about a fifth of that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from services.common import http1
from services.common.http1 import header_block

T = TypeVar("T")


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (uvicorn[standard] brings it): less generator
    overhead than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


JSON_HEADERS: Final = header_block([("Content-Type", "application/json")])


@dataclass(frozen=True)
class Answer:
    """How one request ended. `status` is the HTTP status, or 0 when there was none; `outcome`
    is the status as text, `timeout`, `timeout_waiting_for_a_connection` or `connection`."""

    status: int
    outcome: str


class Client(http1.Client):
    """The services' lean client (`services.common.http1`), POSTing JSON and reporting how
    each request ended instead of raising."""

    async def post(self, path: str, body: bytes, timeout: float | None = None) -> Answer:
        """POST `body` (JSON) to `path` within `timeout` (the client's by default); never
        raises for what the network or server did."""
        try:
            response = await self.request("POST", path, JSON_HEADERS, body, timeout)
        except http1.RequestTimeout as timeout_error:
            return Answer(
                0, "timeout" if timeout_error.written else "timeout_waiting_for_a_connection"
            )
        except (http1.UpstreamError, OSError):
            return Answer(0, "connection")
        return Answer(response.status, str(response.status))
