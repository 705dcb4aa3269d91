"""The running system chaos aims at: the stack `scripts/stack.sh` started (its pid files and data
directory under STACK_DIR) and the processes `scripts/services.sh` runs under supervisord."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg

from services.common.config import Config, load

REPO = Path(__file__).resolve().parents[1]


NOW: Final = "SELECT clock_timestamp()"


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """The rows `sql` gives on the database at `url`."""
    with psycopg.connect(url, connect_timeout=5, application_name="chaos") as conn:
        return conn.execute(sql, params).fetchall()


class TargetError(RuntimeError):
    """The system is not in a state chaos can work with (a server is not ours, a process is
    missing, a restart did not come back)."""


@dataclass(frozen=True)
class Target:
    stack_dir: Path
    services_dir: Path
    env: Mapping[str, str]  # for scripts/stack.sh and scripts/services.sh
    config: Config

    @classmethod
    def from_environment(cls) -> Target:
        """The system the environment points at: `just up`'s by default (.stack, default ports)."""
        stack_dir = Path(os.environ.get("STACK_DIR") or REPO / ".stack").resolve()
        services_dir = Path(os.environ.get("SERVICES_DIR") or stack_dir / "services")
        env = {
            **os.environ,
            "STACK_DIR": str(stack_dir),
            "SERVICES_DIR": str(services_dir),
            "VENV": os.environ.get("VENV") or sys.prefix,
            "VENV_PYTHON": os.environ.get("VENV_PYTHON") or sys.executable,
        }
        return cls(stack_dir=stack_dir, services_dir=services_dir, env=env, config=load())

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.config.gateway_port}"

    @property
    def database_urls(self) -> dict[str, str]:
        """Each service's database, by service name."""
        return {
            "orders": self.config.orders_database_url,
            "payments": self.config.payments_database_url,
        }

    @property
    def redis_port(self) -> int:
        return urlsplit(self.config.redis_url).port or 6379

    @property
    def pid_dir(self) -> Path:
        return self.stack_dir / "run"

    @property
    def postgres_datadir(self) -> Path:
        """The cluster's data directory ($STACK_DIR/postgres, possibly a symlink to it)."""
        return (self.stack_dir / "postgres").resolve()

    def server_pid(self, server: str) -> int:
        """The pid of a server stack.sh started and still runs, or `TargetError`."""
        if server == "postgres":
            pid_file, marker = self.postgres_datadir / "postmaster.pid", "postgres"
        else:
            pid_file = self.pid_dir / f"{server}.pid"
            marker = "kafka.Kafka" if server == "kafka" else "redis-server"
        try:
            pid = int(pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError) as exc:
            raise TargetError(f"{server} is not running from {self.stack_dir}: {exc}") from exc
        if marker not in cmdline:
            raise TargetError(f"pid {pid} in {pid_file} is not {server}: {cmdline[:80]}")
        return pid

    async def script(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        """Run scripts/stack.sh or scripts/services.sh; its output, or (`check`) `TargetError`
        when it fails."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / args[0]),
            *args[1:],
            env=dict(self.env),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the run must not kill a half-done restart
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TargetError(f"{' '.join(args)} did not finish within {timeout:.0f} s") from None
        text = out.decode(errors="replace")
        if check and process.returncode != 0:
            raise TargetError(f"{' '.join(args)} exited {process.returncode}:\n{text[-2000:]}")
        return text

    async def stack_up(self) -> None:
        """`scripts/stack.sh up`: starts whichever server is down, leaves the others alone."""
        await self.script("stack.sh", "up", timeout=300)

    async def program_pid(self, program: str) -> int:
        """The pid supervisord reports for `program` (0 when it is not running)."""
        # supervisorctl prints 0 and exits 7 for a program that is not running.
        out = await self.script("services.sh", "ctl", "pid", program, timeout=30, check=False)
        text = out.strip().splitlines()[-1] if out.strip() else ""
        return int(text) if text.isdigit() else 0
