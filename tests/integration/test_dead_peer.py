"""A Postgres server that vanishes without a word (its host gone, the network cut) on a real
network path: connections to it give up after `DB_DEAD_PEER_TIMEOUT`, whatever they were doing,
while a connection without those settings waits on.

The path: a veth pair into a network namespace of its own, where a forwarder listens and passes
the bytes on to the stack's Postgres. Taking the namespace's end of the pair down drops every
packet from then on, with no FIN or RST to either side: to the client, the server went silent.
Needs root (the namespace and the veth pair); skipped with the reason otherwise."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import pytest

from actors import pipeline
from chaos.faults import alive
from services.common import db
from services.common.config import Config
from tests.conftest import PG_HOST, PG_PORT

NAME = "test-dead-peer"
# Seconds: short enough for a quick test, at the floor `db.dead_peer_kwargs` rounds up to.
DEAD_PEER_TIMEOUT = 4
# The silence must be noticed well within this (a liveness bound, not a speed claim). Without
# the settings the kernel retransmits a query for about fifteen minutes, and leaves a quiet
# LISTEN connection open for hours.
NOTICED_WITHIN = 30.0
# How long the unprotected connection must still be waiting after the protected one gave up.
STILL_WAITING_FOR = 3.0
CLONE_NEWNET = 0x40000000
# A run's namespace is named by its pid, so a run that was killed can be told from a live one.
NAMESPACE = re.compile(r"^op-dead-(\d+)(?:\s|$)")

T = TypeVar("T")


def ip(*args: str) -> str:
    """Run `ip ARGS`; its output."""
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def names(pid: int) -> tuple[str, str, str]:
    """The namespace and the two veth ends of the run with this pid (at most 7 digits: the veth
    names fit the kernel's 15 characters)."""
    return f"op-dead-{pid}", f"opd{pid}a", f"opd{pid}b"


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces runs that were killed (SIGKILL skips the fixture's cleanup) left
    behind, with their veth pairs (a pair dies with either end); return their names. A leftover
    holding the subnet a new run picks would take its route."""
    removed = []
    for line in ip("netns", "list").splitlines():
        match = NAMESPACE.match(line)
        if match is not None and not alive(pid := int(match.group(1))):
            namespace, _, _ = names(pid)
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                ip("netns", "del", namespace)
                removed.append(namespace)
    return removed


def in_namespace(name: str, make: Callable[[], T]) -> T:
    """`make()` run on a thread that entered network namespace `name`: a socket it creates
    lives there, whichever thread uses it later."""
    libc = ctypes.CDLL(None, use_errno=True)
    made: list[T] = []
    failed: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(make())
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=enter_and_make)  # the namespace leaves with the thread
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


class Forwarder:
    """Accepts connections on `listener` and passes bytes both ways to Postgres."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection((PG_HOST, PG_PORT), timeout=5)
                upstream.settimeout(None)
                self.sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


@dataclass
class SilentPath:
    """A way to the test's database that can go silent."""

    host: str
    port: int
    namespace: str
    far_end: str

    def url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by this path's."""
        return database_url.replace(f"@{PG_HOST}:{PG_PORT}/", f"@{self.host}:{self.port}/")

    def cut(self) -> None:
        """From now on every packet is dropped, without a FIN or RST to either side."""
        ip("-n", self.namespace, "link", "set", self.far_end, "down")


@pytest.fixture
def silent_path() -> Iterator[SilentPath]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace and a veth pair")
    pid = os.getpid()
    namespace, near, far = names(pid)
    # 198.18.0.0/15 is set aside for benchmarking networks (RFC 2544): no real host is there.
    subnet = f"198.{18 + pid % 2}.{pid % 250}"
    try:
        remove_stale_namespaces()
        ip("netns", "add", namespace)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    forwarder = None
    try:
        ip("link", "add", near, "type", "veth", "peer", "name", far, "netns", namespace)
        ip("addr", "add", f"{subnet}.1/30", "dev", near)
        ip("link", "set", near, "up")
        ip("-n", namespace, "addr", "add", f"{subnet}.2/30", "dev", far)
        ip("-n", namespace, "link", "set", far, "up")

        forwarder = Forwarder(
            in_namespace(namespace, lambda: socket.create_server((f"{subnet}.2", 0)))
        )
        port = forwarder.listener.getsockname()[1]
        yield SilentPath(host=f"{subnet}.2", port=port, namespace=namespace, far_end=far)
    finally:
        if forwarder is not None:
            forwarder.close()
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            ip("link", "del", near)
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            ip("netns", "del", namespace)


class Waiting:
    """`call()` running on a thread of its own: how it ended, and when."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def unblock(*calls: tuple[psycopg.Connection[Any], Waiting]) -> None:
    """End each call still stuck on its connection (the unprotected one's, or the protected
    one's if it failed to give up) so that the connections can close and the test finish."""
    for conn, call in calls:
        if not call.join(0):
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(conn.pgconn.socket)).shutdown(socket.SHUT_RDWR)
            call.join(5)


def protected(path: SilentPath, url: str) -> psycopg.Connection[Any]:
    config = Config(orders_database_url=path.url(url), db_dead_peer_timeout=DEAD_PEER_TIMEOUT)
    return db.connect(config, "orders", NAME)


def unprotected(path: SilentPath, url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(path.url(url), autocommit=True, connect_timeout=5)


def test_a_query_to_a_vanished_server_fails_after_the_dead_peer_timeout(
    silent_path: SilentPath, orders_url: str
) -> None:
    with (
        protected(silent_path, orders_url) as ours,
        unprotected(silent_path, orders_url) as plain,
    ):
        for conn in (ours, plain):
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the path works
        silent_path.cut()
        cut_at = time.monotonic()
        query = Waiting(lambda: ours.execute("SELECT 1"))
        plain_query = Waiting(lambda: plain.execute("SELECT 1"))
        try:
            assert query.join(NOTICED_WITHIN), "the query still waits on a silent server"
            assert isinstance(query.error, psycopg.OperationalError)
            assert query.ended_at is not None
            gave_up_after = query.ended_at - cut_at
            assert gave_up_after >= DEAD_PEER_TIMEOUT - 1
            # The same query on a connection without the settings is still waiting.
            assert not plain_query.join(STILL_WAITING_FOR)
        finally:
            unblock((ours, query), (plain, plain_query))


def test_a_listening_connection_notices_a_vanished_server_while_idle(
    silent_path: SilentPath, orders_url: str
) -> None:
    # The listener waits for notifications and sends nothing: only keepalive probes can find
    # out that the server has gone.
    def read_until_failure(conn: psycopg.Connection[Any], until: float) -> None:
        while time.monotonic() < until:
            pipeline.notifications(conn.pgconn, timeout=0.2)

    with (
        protected(silent_path, orders_url) as ours,
        unprotected(silent_path, orders_url) as plain,
    ):
        for conn in (ours, plain):
            conn.execute(f"LISTEN {pipeline.OUTBOX_CHANNEL}")
        silent_path.cut()
        cut_at = time.monotonic()
        deadline = cut_at + NOTICED_WITHIN
        listening = Waiting(lambda: read_until_failure(ours, deadline))
        plain_listening = Waiting(lambda: read_until_failure(plain, deadline))
        try:
            assert listening.join(NOTICED_WITHIN + 5)
            assert isinstance(listening.error, psycopg.OperationalError), "no failure noticed"
            assert listening.ended_at is not None
            assert listening.ended_at - cut_at >= DEAD_PEER_TIMEOUT - 1
            assert not plain_listening.join(STILL_WAITING_FOR)
        finally:
            unblock((ours, listening), (plain, plain_listening))


def gave_up(caplog: pytest.LogCaptureFixture) -> bool:
    return any("commit notifications unavailable" in r.getMessage() for r in caplog.records)


def test_a_relays_commit_watch_falls_back_to_its_clock_when_the_server_vanishes(
    silent_path: SilentPath, orders_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(
        orders_database_url=silent_path.url(orders_url), db_dead_peer_timeout=DEAD_PEER_TIMEOUT
    )
    watch = pipeline.CommitWatch(lambda: db.connect(config, "orders", NAME))
    try:
        assert watch.notified(0) is True  # listening from now on
        assert watch.notified(0.1) is False
        silent_path.cut()
        deadline = time.monotonic() + NOTICED_WITHIN
        answers = []
        with caplog.at_level(logging.WARNING, logger=pipeline.log.name):
            while time.monotonic() < deadline and not gave_up(caplog):
                answers.append(watch.notified(0.2))
        assert gave_up(caplog), "the watch never noticed the server was gone"
        # Nothing was notified while the server was silent; once the watch gave up it says
        # "relay", and the relay passes on its own clock.
        assert answers[-1] is True and not any(answers[:-1])
    finally:
        watch.close()


def test_namespaces_left_by_a_killed_run_are_removed_and_a_live_runs_kept(
    silent_path: SilentPath,
) -> None:
    child = subprocess.Popen(["true"])  # a run that is gone: its pid names no process now
    child.wait(timeout=10)
    namespace, near, far = names(child.pid)
    ip("netns", "add", namespace)
    ip("link", "add", near, "type", "veth", "peer", "name", far)
    ip("link", "set", far, "netns", namespace)
    try:
        removed = remove_stale_namespaces()
        assert removed == [namespace]
        assert near not in ip("-o", "link")  # the pair went with its namespace
        # This run's own, its process alive, stays.
        assert silent_path.namespace in ip("netns", "list")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            ip("netns", "del", namespace)
