"""Configuration, read once from the environment, with working local defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_int(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def _env_float(name: str, default: float) -> float:
    return float(_env(name, str(default)))


def _local_postgres(database: str) -> str:
    return f"postgresql://postgres:postgres@127.0.0.1:{_env('POSTGRES_PORT', '5432')}/{database}"


@dataclass(frozen=True)
class Config:
    """Every knob of every process; see `.env.sample` files and the README's table."""

    # The defaults point at the local stack (`just up`), whose ports the *_PORT variables move.
    orders_database_url: str = field(
        default_factory=lambda: _env("ORDERS_DATABASE_URL", _local_postgres("orders"))
    )
    payments_database_url: str = field(
        default_factory=lambda: _env("PAYMENTS_DATABASE_URL", _local_postgres("payments"))
    )
    redis_url: str = field(
        default_factory=lambda: _env(
            "REDIS_URL", f"redis://127.0.0.1:{_env('REDIS_PORT', '6379')}/0"
        )
    )
    kafka_bootstrap_servers: str = field(
        default_factory=lambda: _env(
            "KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{_env('KAFKA_PORT', '9092')}"
        )
    )
    # Prefixes every topic and consumer group, so a test run never meets the live system's events.
    kafka_topic_prefix: str = field(default_factory=lambda: _env("KAFKA_TOPIC_PREFIX", ""))
    kafka_partitions: int = field(default_factory=lambda: _env_int("KAFKA_PARTITIONS", 6))

    # Where HTTP processes listen: loopback locally, 0.0.0.0 in containers.
    bind_host: str = field(default_factory=lambda: _env("BIND_HOST", "127.0.0.1"))
    gateway_port: int = field(default_factory=lambda: _env_int("GATEWAY_PORT", 8080))
    orders_port: int = field(default_factory=lambda: _env_int("ORDERS_PORT", 8081))
    payments_port: int = field(default_factory=lambda: _env_int("PAYMENTS_PORT", 8082))
    dashboard_port: int = field(default_factory=lambda: _env_int("DASHBOARD_PORT", 8090))
    # Prometheus metrics of the Dramatiq worker processes (relay and apply batches).
    orders_worker_metrics_port: int = field(
        default_factory=lambda: _env_int("ORDERS_WORKER_METRICS_PORT", 9101)
    )
    payments_worker_metrics_port: int = field(
        default_factory=lambda: _env_int("PAYMENTS_WORKER_METRICS_PORT", 9102)
    )
    # ... and of the Kafka consumer processes (they apply what they receive).
    orders_consumer_metrics_port: int = field(
        default_factory=lambda: _env_int("ORDERS_CONSUMER_METRICS_PORT", 9103)
    )
    payments_consumer_metrics_port: int = field(
        default_factory=lambda: _env_int("PAYMENTS_CONSUMER_METRICS_PORT", 9104)
    )
    orders_url: str = field(
        default_factory=lambda: _env(
            "ORDERS_URL", f"http://127.0.0.1:{_env('ORDERS_PORT', '8081')}"
        )
    )
    payments_url: str = field(
        default_factory=lambda: _env(
            "PAYMENTS_URL", f"http://127.0.0.1:{_env('PAYMENTS_PORT', '8082')}"
        )
    )

    # Seconds. Every network call is bounded by one of these.
    db_connect_timeout: float = field(default_factory=lambda: _env_float("DB_CONNECT_TIMEOUT", 5))
    db_statement_timeout: float = field(
        default_factory=lambda: _env_float("DB_STATEMENT_TIMEOUT", 10)
    )
    # A Postgres peer gone silent (its host down or the network cut: no FIN, no RST) is given
    # up after about this long, whatever the connection was doing: waiting for an answer,
    # writing, or idle on a LISTEN. statement_timeout only bounds a server that still answers.
    db_dead_peer_timeout: float = field(
        default_factory=lambda: _env_float("DB_DEAD_PEER_TIMEOUT", 10)
    )
    http_timeout: float = field(default_factory=lambda: _env_float("HTTP_TIMEOUT", 5))
    kafka_timeout: float = field(default_factory=lambda: _env_float("KAFKA_TIMEOUT", 10))

    # Requests the gateway forwards at once; more are refused with 503 at once (overload).
    # Enough to ride out a commit stalled by the disk: fsync here takes 0.2-0.5 s now and then,
    # which at 500 orders/s filled 128 (0.4-5.5% refused); with 512 none, in two 60 s runs.
    gateway_max_in_flight: int = field(
        default_factory=lambda: _env_int("GATEWAY_MAX_IN_FLIGHT", 512)
    )
    db_pool_size: int = field(default_factory=lambda: _env_int("DB_POOL_SIZE", 10))
    relay_batch_size: int = field(default_factory=lambda: _env_int("RELAY_BATCH_SIZE", 500))
    apply_batch_size: int = field(default_factory=lambda: _env_int("APPLY_BATCH_SIZE", 500))
    max_attempts: int = field(default_factory=lambda: _env_int("INBOX_MAX_ATTEMPTS", 5))
    # Seconds: under load (batches of 3 or more events) the listener wakes a relay at most once
    # per interval, and a consumer takes a batch at most once per half interval; what arrives
    # in between joins the next batch. At light load nothing waits. 0: no pacing.
    batch_interval: float = field(default_factory=lambda: _env_float("BATCH_INTERVAL", 0.015))
    # Seconds a relay woken under load keeps publishing a batch per BATCH_INTERVAL, with no
    # further wake-ups, before it stops and waits for the next one.
    relay_linger: float = field(default_factory=lambda: _env_float("RELAY_LINGER", 2))
    sweep_interval: float = field(default_factory=lambda: _env_float("SWEEP_INTERVAL", 2))
    # Seconds an order may stay new after its payment request was published before it is
    # requested again (then twice as long after each request, at most an hour; 0: never), and
    # how often the Orders sweeper looks.
    payment_rerequest_after: float = field(
        default_factory=lambda: _env_float("PAYMENT_REREQUEST_AFTER", 300)
    )
    payment_rerequest_interval: float = field(
        default_factory=lambda: _env_float("PAYMENT_REREQUEST_INTERVAL", 30)
    )
    purge_interval: float = field(default_factory=lambda: _env_float("PURGE_INTERVAL", 60))
    retention_hours: float = field(default_factory=lambda: _env_float("RETENTION_HOURS", 24))

    def topic(self, name: str) -> str:
        """The real topic name for one of the contract's topics."""
        return f"{self.kafka_topic_prefix}{name}"

    def worker_metrics_port(self, service: str) -> int:
        """Where the worker process of `orders` or `payments` serves its metrics."""
        return {
            "orders": self.orders_worker_metrics_port,
            "payments": self.payments_worker_metrics_port,
        }[service]

    def consumer_metrics_port(self, service: str) -> int:
        """Where the Kafka consumer process of `orders` or `payments` serves its metrics."""
        return {
            "orders": self.orders_consumer_metrics_port,
            "payments": self.payments_consumer_metrics_port,
        }[service]

    def database_url(self, service: str) -> str:
        """The database URL of `orders` or `payments`."""
        return {"orders": self.orders_database_url, "payments": self.payments_database_url}[service]


def load() -> Config:
    """Read the environment now (tests set variables before calling this)."""
    return Config()
