"""`just bench-floor` runs its two real HTTP servers and reports CPU per request: only the
report's shape and plausibility are checked, never a speed."""

from __future__ import annotations

import asyncio

import pytest

from bench import floor


@pytest.mark.parametrize("proxy_client", ["http1", "aiohttp"])
def test_the_floor_benchmark_drives_real_servers_and_reports_cpu_per_request(
    proxy_client: str,
) -> None:
    (result,) = asyncio.run(floor.measure([200], seconds=1.0, proxy_client=proxy_client))

    assert result["rate"] == 200
    assert result["errors"] == 0
    assert result["latency_ms"]["count"] == 200  # every request answered 201
    cpu = result["cpu_ms_per_request"]
    assert set(cpu) == {"client", "proxy", "upstream", "total"}
    # The servers did the work, read from /proc (in clock ticks: 200 requests make several).
    assert cpu["proxy"] + cpu["upstream"] > 0
    assert cpu["total"] == sum(v for k, v in cpu.items() if k != "total")
