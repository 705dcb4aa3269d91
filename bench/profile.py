"""Where the time goes during a load phase: py-spy samples each process's stacks (only the
thread holding the GIL, so the samples are Python CPU time), the collapsed stacks are boiled
down to the functions that dominate; pg_stat_activity, sampled alongside, says what the
database sessions wait on.

py-spy is optional (`pip install py-spy`); without it `--profile` reports that it was skipped.
The raw stacks are kept next to the results (flamegraph.pl or speedscope read them)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import psycopg

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
SAMPLES_PER_SECOND = 100
WAIT_SAMPLE_INTERVAL = 0.1

# Every non-idle client session of the server (all databases: some locks are cluster-wide).
SESSIONS: Final = r"""
SELECT datname, state, coalesce(wait_event_type || ':' || wait_event, 'on CPU'),
       left(regexp_replace(query, '\s+', ' ', 'g'), 70)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND state <> 'idle' AND pid <> pg_backend_pid()
"""


def py_spy() -> str | None:
    """The py-spy executable: on PATH or next to this interpreter."""
    found = shutil.which("py-spy")
    beside = Path(sys.prefix) / "bin" / "py-spy"
    return found or (str(beside) if beside.exists() else None)


def frame_key(frame: str) -> str:
    """A frame without its line number, so one function's lines count together."""
    match = FRAME.match(frame)
    return f"{match['function']} ({match['file']})" if match else frame


def package_of(key: str) -> str:
    """The top-level package or stdlib module a frame key's file belongs to."""
    match = FRAME.match(key)
    where = match["file"] if match else key
    if where.startswith("<frozen "):
        return where.removeprefix("<frozen ").split(".")[0].rstrip(">")
    return where.split("/")[0].removesuffix(".py")


def summarize_collapsed(lines: Iterable[str], top: int = 25) -> dict[str, Any]:
    """Self time (the function on top of the stack) and inclusive time (anywhere on the stack)
    per function, and self time per package, as % of all samples, from py-spy's raw
    `frame;frame;... count` lines."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_key(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[package_of(frames[-1])] += count
        for key in set(frames):
            inclusive[key] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": key, "pct": round(100 * n / total, 1)}
            for key, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": ranked(own),
        "inclusive": ranked(inclusive),
        "packages": [
            {"package": name, "pct": round(100 * n / total, 1)}
            for name, n in packages.most_common(top)
        ],
    }


async def record(
    name: str, pid: int, seconds: float, directory: Path, executable: str
) -> dict[str, Any]:
    """Sample one process (and its subprocesses) for `seconds`; the summary, or why not."""
    out = directory / f"{name}.collapsed.txt"
    command = [
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(SAMPLES_PER_SECOND),
        "--subprocesses",
        "--nonblocking",  # never pause the process being measured
        "--gil",  # only the thread holding the GIL: CPU time, not threads waiting
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0 or not out.exists():
        return {"pid": pid, "error": output.decode(errors="replace").strip()[-500:]}
    summary = summarize_collapsed(out.read_text().splitlines())
    summary.update(
        pid=pid,
        command=" ".join(command),
        raw_stacks=str(out),
        gil_held_share=round(summary["samples"] / (SAMPLES_PER_SECOND * seconds), 2),
    )
    return summary


def summarize_sessions(
    samples: Iterable[Iterable[tuple[Any, ...]]], databases: Mapping[str, str], top: int = 15
) -> list[dict[str, Any]]:
    """What database sessions were doing, as the average number of sessions per (database,
    wait, query) over the samples; `databases` names ours, the rest count as `other`."""
    counts: Counter[tuple[str, str, str]] = Counter()
    taken = 0
    for rows in samples:
        taken += 1
        for datname, state, wait, query in rows:
            doing = (
                "idle in transaction (waiting for the app)" if state.startswith("idle") else wait
            )
            counts[(databases.get(datname, "other"), doing, query or "")] += 1
    return [
        {"database": db, "wait": wait, "query": query, "avg_sessions": round(n / taken, 2)}
        for (db, wait, query), n in counts.most_common(top)
    ]


async def sample_sessions(url: str, seconds: float) -> list[list[tuple[Any, ...]]]:
    """pg_stat_activity every WAIT_SAMPLE_INTERVAL seconds for `seconds`."""
    samples: list[list[tuple[Any, ...]]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while loop.time() < end:
            samples.append(await (await conn.execute(SESSIONS)).fetchall())
            await asyncio.sleep(WAIT_SAMPLE_INTERVAL)
    return samples
