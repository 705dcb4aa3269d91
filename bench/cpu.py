"""CPU time of every process the system runs on, read from /proc before and after a phase.

A group is a root process and all its descendants. Its CPU is the sum, over the members alive at
sampling time, of utime + stime + cutime + cstime: a child that exits during the phase leaves
its whole CPU time in its parent's cutime/cstime once reaped, so Postgres backends and Dramatiq
worker processes that come and go are counted (the parent is a member too). A root that changed
between two samples (a supervisord restart) is flagged: its number is then incomplete."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")
TCP_LISTEN = "0A"
SUPERVISED = re.compile(r"^(\S+)\s+RUNNING\s+pid (\d+),", re.MULTILINE)
GENERATOR = "bench (generator)"


@dataclass(frozen=True)
class ProcStat:
    """One line of /proc/<pid>/stat, the fields this module needs (in clock ticks)."""

    pid: int
    ppid: int
    own_ticks: int  # utime + stime
    reaped_children_ticks: int  # cutime + cstime


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; the command name (field 2) may hold spaces and parentheses."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # `fields` starts at field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ProcStat(pid, int(fields[1]), utime + stime, cutime + cstime)


def read_processes() -> dict[int, ProcStat]:
    """Every process's stat; processes that vanish while being read are skipped."""
    table: dict[int, ProcStat] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            table[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(root: int, table: Mapping[int, ProcStat]) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def postgres_role(title: str) -> str:
    """What a Postgres process does, from its process title: `db:<name>` for a client backend
    (`postgres: user db host(port) state`), `background` for the rest (walwriter, ...)."""
    words = title.split()
    if len(words) >= 4 and words[0] == "postgres:" and ("(" in words[3] or words[3] == "[local]"):
        return f"db:{words[2]}"
    return "background"


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port (the parent one if several share the socket)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == TCP_LISTEN and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    holders: set[int] = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    holders.add(int(entry.name))
                    break
        except OSError:
            continue
    processes = read_processes()
    roots = [pid for pid in holders if pid in processes and processes[pid].ppid not in holders]
    return min(roots) if roots else None


@dataclass(frozen=True)
class Group:
    """A named root process whose descendants count with it (unless `with_children` is off)."""

    name: str
    root: int
    kind: str  # "ours", "server" or "generator"
    with_children: bool = True


def port_of(url: str, default: int) -> int:
    """The port of a database/Redis URL or a Kafka `host:port[,host:port]` list."""
    first = url.split(",")[0]
    if "://" not in first:
        first = f"tcp://{first}"
    return urlsplit(first).port or default


def supervised_pids(services_script: Path, env: Mapping[str, str]) -> dict[str, int]:
    """Program name -> pid of every RUNNING program of `scripts/services.sh`'s supervisord."""
    done = subprocess.run(
        [str(services_script), "ctl", "status"],
        env={**env, "VENV": env.get("VENV", sys.prefix)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return {name: int(pid) for name, pid in SUPERVISED.findall(done.stdout)}


def discover(
    services_script: Path, env: Mapping[str, str], server_ports: Mapping[str, int]
) -> list[Group]:
    """The groups to measure: our supervised programs, the servers, this generator."""
    groups = [
        Group(name, pid, "ours") for name, pid in supervised_pids(services_script, env).items()
    ]
    for name, port in server_ports.items():
        pid = listening_pid(port)
        if pid is not None:
            groups.append(Group(name, pid, "server"))
    groups.append(Group(GENERATOR, os.getpid(), "generator", with_children=False))
    return groups


def executables(groups: Iterable[Group]) -> dict[str, str]:
    """The real program each of our processes runs (`/proc/<pid>/exe`): for ours, the interpreter
    they were started on, which need not be the generator's."""
    found = {}
    for g in groups:
        if g.kind == "ours":
            try:
                found[g.name] = os.path.realpath(f"/proc/{g.root}/exe", strict=True)
            except OSError:
                continue
    return found


@dataclass(frozen=True)
class Sample:
    """CPU seconds of each group, of each live Postgres process, and of the machine, at `at`."""

    at: float
    groups: dict[str, float]
    alive: dict[str, bool]
    postgres: dict[int, tuple[str, float]] = field(default_factory=dict)
    machine_busy: float = 0.0
    # seconds the group's threads spent runnable but waiting for a CPU (live threads only)
    runqueue_wait: dict[str, float] = field(default_factory=dict)
    # seconds since boot in which some, and all, non-idle tasks were stalled on I/O
    io_stall: tuple[float, float] | None = None
    # CPU seconds since boot the hypervisor ran something else while this VM had work (steal)
    machine_steal: float = 0.0


def parse_machine(text: str) -> tuple[float, float]:
    """(busy, steal): CPU seconds every core spent not idle, and that the hypervisor took
    while this VM had work to run, since boot (the first line of /proc/stat)."""
    values = [int(v) for v in text.split("\n", 1)[0].split()[1:]]
    # busy: user, nice, system, irq, softirq; not idle, iowait, or steal (the hypervisor's);
    # guest time is already inside user time. Kernels before 2.6.11 have no steal field.
    user, nice, system, irq, softirq = values[0], values[1], values[2], values[5], values[6]
    steal = values[7] if len(values) > 7 else 0
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def parse_pressure(text: str) -> tuple[float, float]:
    """The `some` and `full` stall totals of a /proc/pressure file, in seconds."""
    totals = {"some": 0.0, "full": 0.0}
    for line in text.splitlines():
        kind, *fields = line.split()
        for item in fields:
            name, _, value = item.partition("=")
            if name == "total" and kind in totals:
                totals[kind] = int(value) / 1e6  # microseconds
    return totals["some"], totals["full"]


def io_stall_seconds() -> tuple[float, float] | None:
    """How long, since boot, some and all non-idle tasks waited on I/O (the kernel's pressure
    stall information): a disk stall shows here while the CPU figures look idle. None where
    the kernel does not keep it."""
    try:
        return parse_pressure((PROC / "pressure" / "io").read_text())
    except OSError:
        return None


def runqueue_wait_seconds(pid: int) -> float:
    """How long the threads of a process have waited, runnable, for a CPU (/proc schedstat)."""
    waited = 0
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            try:
                waited += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return 0.0
    return waited / 1e9


def take_sample(groups: Iterable[Group]) -> Sample:
    """Read every group's CPU time now."""
    table = read_processes()
    waits: dict[str, float] = {}
    seconds: dict[str, float] = {}
    alive: dict[str, bool] = {}
    postgres: dict[int, tuple[str, float]] = {}
    for group in groups:
        alive[group.name] = group.root in table
        members = descendants(group.root, table) if group.with_children else {group.root}
        members &= table.keys()
        ticks = sum(
            table[pid].own_ticks + (table[pid].reaped_children_ticks if group.with_children else 0)
            for pid in members
        )
        seconds[group.name] = ticks / CLOCK_TICKS
        waits[group.name] = sum(runqueue_wait_seconds(pid) for pid in members)
        if group.name == "postgres":
            for pid in members - {group.root}:
                postgres[pid] = (_postgres_title(pid), table[pid].own_ticks / CLOCK_TICKS)
    busy, steal = parse_machine((PROC / "stat").read_text())
    return Sample(
        time.monotonic(), seconds, alive, postgres, busy, waits, io_stall_seconds(), steal
    )


def _postgres_title(pid: int) -> str:
    try:
        return postgres_role(
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        )
    except OSError:
        return "background"


def usage(
    before: Sample, send_end: Sample, after: Sample, groups: Iterable[Group], orders: int
) -> dict[str, Any]:
    """CPU per group between `before` and `after` (ms per order), its utilisation while the
    load was being sent (`before` .. `send_end`, % of one core) and how long its threads were
    runnable but got no CPU meanwhile (% of the time, summed over threads); the machine and
    the rest."""
    send_wall = max(send_end.at - before.at, 1e-9)

    def entry(total: float, while_sending: float, restarted: bool = False) -> dict[str, Any]:
        return {
            "cpu_s": round(total, 3),
            "ms_per_order": round(total * 1000 / orders, 3) if orders else None,
            "util_send_pct": round(while_sending * 100 / send_wall, 1),
            "restarted": restarted,
        }

    processes: dict[str, Any] = {}
    measured = system = system_send = 0.0
    for group in groups:
        name = group.name
        if name not in before.groups or name not in after.groups:
            continue
        total = after.groups[name] - before.groups[name]
        restarted = not (before.alive[name] and after.alive[name])
        processes[name] = entry(
            total, send_end.groups[name] - before.groups[name], restarted or total < 0
        )
        if name in before.runqueue_wait and name in send_end.runqueue_wait:
            waited = max(send_end.runqueue_wait[name] - before.runqueue_wait[name], 0.0)
            processes[name]["waited_for_cpu_send_pct"] = round(waited * 100 / send_wall, 1)
        measured += max(total, 0.0)
        if group.kind != "generator":
            system += max(total, 0.0)
            system_send += max(send_end.groups[name] - before.groups[name], 0.0)
    machine = after.machine_busy - before.machine_busy
    machine_send = send_end.machine_busy - before.machine_busy
    measured_send = sum(
        max(send_end.groups[g] - before.groups[g], 0.0) for g in processes if g in send_end.groups
    )
    io_pressure = None
    if before.io_stall is not None and send_end.io_stall is not None:
        io_pressure = {
            kind: round(max(end - start, 0.0) * 100 / send_wall, 1)
            for kind, start, end in zip(
                ("some", "full"), before.io_stall, send_end.io_stall, strict=True
            )
        }
    return {
        "wall_send_s": round(send_wall, 3),
        "wall_total_s": round(after.at - before.at, 3),
        # % of the sending time in which some / all non-idle tasks waited on I/O
        "io_pressure_send_pct": io_pressure,
        # CPU the hypervisor gave to others while this VM had work, % of one core
        "steal_send_pct": round(
            max(send_end.machine_steal - before.machine_steal, 0.0) * 100 / send_wall, 1
        ),
        "processes": processes,
        "postgres_by_role": _postgres_roles(before, after, orders),
        "system": entry(system, system_send),
        "machine": entry(machine, machine_send),
        "other": entry(max(machine - measured, 0.0), max(machine_send - measured_send, 0.0)),
    }


def _postgres_roles(before: Sample, after: Sample, orders: int) -> dict[str, Any]:
    """Postgres CPU split by what each process served, over processes alive in both samples."""
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.postgres.items():
        if pid in before.postgres:
            roles[role] = roles.get(role, 0.0) + seconds - before.postgres[pid][1]
        else:
            roles[role] = roles.get(role, 0.0) + seconds
    return {
        role: {
            "cpu_s": round(seconds, 3),
            "ms_per_order": round(seconds * 1000 / orders, 3) if orders else None,
        }
        for role, seconds in sorted(roles.items())
    }
