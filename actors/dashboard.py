"""The Dramatiq dashboard (queues, workers, messages) on `DASHBOARD_PORT`.

Run it with `python -m actors.dashboard`; it reads the same Redis as the workers."""

from __future__ import annotations

import logging
from wsgiref.simple_server import make_server

from dramatiq_dashboard import DashboardApp

from actors import orders, payments  # noqa: F401 - the dashboard lists declared actors
from actors.broker import broker, config

log = logging.getLogger("actors.dashboard")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = DashboardApp(broker=broker, prefix="")
    with make_server(config.bind_host, config.dashboard_port, app) as server:
        log.info("Dramatiq dashboard on http://%s:%d/", config.bind_host, config.dashboard_port)
        server.serve_forever()


if __name__ == "__main__":
    main()
