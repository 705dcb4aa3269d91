"""The pipeline's moving parts on real Postgres and Kafka: the relay publishes outbox rows in
order and marks them only after Kafka acknowledged them; the consumer records messages in the
inbox, applies them in the same transaction and commits offsets only after that commit; the
NOTIFY trigger fires once per transaction; old rows are purged."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from actors import consumer as consumer_process
from actors import pipeline
from services.common import db, inbox, kafka, outbox
from services.common.config import Config
from services.common.events import (
    TOPIC_PAYMENT_REQUESTED,
    TOPIC_PAYMENT_RESULT,
    Envelope,
    encode,
)
from services.orders.domain import payment_requested
from services.payments import queries as payments_queries
from services.payments.domain import new_account
from services.payments.handlers import make_handler as payments_handler
from tests.conftest import plan_nodes
from tests.pqtrace import sent_messages


@pytest.fixture
def config(orders_url: str, payments_url: str) -> Config:
    """A configuration whose topics and consumer groups belong to this test alone."""
    return Config(
        orders_database_url=orders_url,
        payments_database_url=payments_url,
        kafka_topic_prefix=f"test-{uuid.uuid4().hex[:12]}.",
        kafka_partitions=3,
        relay_batch_size=50,
        kafka_timeout=10,
        orders_consumer_metrics_port=0,
        payments_consumer_metrics_port=0,
    )


@pytest.fixture
def topics(config: Config) -> Iterator[None]:
    kafka.ensure_topics(config)
    yield
    names = [config.topic(TOPIC_PAYMENT_REQUESTED), config.topic(TOPIC_PAYMENT_RESULT)]
    client = kafka.admin(config)  # kept alive until the futures resolve
    for future in client.delete_topics(names, operation_timeout=10).values():
        future.result(timeout=15)


def read_topic(config: Config, topic: str, count: int, timeout: float = 30) -> list[Any]:
    reader = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    reader.subscribe([topic])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < count and time.monotonic() < deadline:
            for message in reader.consume(num_messages=count, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
    finally:
        reader.close()
    return messages


def add_outbox_rows(conn: psycopg.Connection[Any], config: Config, keys: list[str]) -> list[Any]:
    envelopes = []
    with conn.transaction():
        for index, key in enumerate(keys):
            envelope = Envelope("payment_requested", {"n": index, "user_id": key})
            conn.execute(
                outbox.INSERT, outbox.row(config.topic(TOPIC_PAYMENT_REQUESTED), key, envelope)
            )
            envelopes.append(envelope)
    return envelopes


def test_relay_publishes_every_row_once_keeps_key_order_and_marks_rows_published(
    config: Config, topics: None, orders_db: psycopg.Connection[Any]
) -> None:
    keys = [f"user-{i % 4}" for i in range(120)]  # more rows than one batch
    envelopes = add_outbox_rows(orders_db, config, keys)
    pool_name = f"test-relay-{uuid.uuid4().hex[:8]}"
    pool = db.sync_pool(config, "orders", pool_name, size=2)
    producer = Producer(kafka.producer_settings(config, "test-relay"))
    try:
        assert pipeline.relay_outbox(pool, producer, config) == 120
        assert pipeline.relay_outbox(pool, producer, config) == 0  # nothing left to send
    finally:
        pool.close()
    # The worker's metrics saw three batches (50 + 50 + 20) and every row.
    labels = {"pool": pool_name}
    assert REGISTRY.get_sample_value("relayed_events_total", labels) == 120
    assert REGISTRY.get_sample_value("relay_batch_size_count", labels) == 3
    assert REGISTRY.get_sample_value("relay_batch_size_sum", labels) == 120

    pending = orders_db.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    assert pending == (0,)
    messages = read_topic(config, config.topic(TOPIC_PAYMENT_REQUESTED), 120)
    assert len(messages) == 120
    sent_ids = [str(e.event_id) for e in envelopes]
    received_ids = [dict(m.headers())["event_id"].decode() for m in messages]
    assert sorted(received_ids) == sorted(sent_ids)
    for key in set(keys):  # per key, the topic holds events in outbox order
        expected = [str(e.event_id) for e in envelopes if e.payload["user_id"] == key]
        got = [dict(m.headers())["event_id"].decode() for m in messages if m.key() == key.encode()]
        assert got == expected


def test_rows_kafka_did_not_acknowledge_stay_pending(
    config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    add_outbox_rows(orders_db, config, ["user-a", "user-b"])
    unreachable = Config(
        orders_database_url=config.orders_database_url,
        kafka_bootstrap_servers="127.0.0.1:1",  # nothing listens there
        kafka_timeout=1,
    )
    pool = db.sync_pool(config, "orders", "test-relay", size=1)
    producer = Producer(kafka.producer_settings(unreachable, "test-relay"))
    try:
        with pytest.raises(pipeline.RelayIncomplete):
            pipeline.relay_outbox(pool, producer, unreachable)
    finally:
        pool.close()
    pending = orders_db.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    assert pending == (2,)


def test_one_transaction_raises_one_notify_however_many_outbox_rows(
    config: Config, orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(orders_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_pending")
        add_outbox_rows(orders_db, config, ["a", "b", "c"])  # one transaction, three statements
        add_outbox_rows(orders_db, config, ["d"])  # a second transaction
        notes = list(listener.notifies(timeout=1.0))
    assert [n.channel for n in notes] == ["outbox_pending", "outbox_pending"]


def committed_offsets(config: Config, topic: str, partitions: int) -> int:
    probe = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap_servers,
            "group.id": f"{config.kafka_topic_prefix}payments-service",
        }
    )
    try:
        positions = probe.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
    finally:
        probe.close()
    return sum(max(tp.offset, 0) for tp in positions)


def consume_until_committed(config: Config, topic: str, offsets: int) -> None:
    """Run the payments consumer until `offsets` are committed on `topic` (or 30 s), then stop
    it the way SIGTERM does."""
    stopping = threading.Event()
    worker = threading.Thread(target=consumer_process.run, args=("payments", config, stopping))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and committed_offsets(config, topic, 3) < offsets:
            time.sleep(0.3)
    finally:
        stopping.set()
        worker.join(timeout=30)
    assert not worker.is_alive()


def test_consumer_records_messages_once_and_commits_offsets_after_the_inbox(
    config: Config, topics: None, payments_db: psycopg.Connection[Any]
) -> None:
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    producer = Producer(kafka.producer_settings(config, "test-producer"))
    event_ids = []
    for index in range(30):
        envelope = Envelope("payment_requested", {"n": index})
        event_ids.append(envelope.event_id)
        headers: list[tuple[str, str | bytes | None]] = [
            ("event_id", str(envelope.event_id).encode())
        ]
        producer.produce(topic, key=f"k{index % 5}", value=b"{}", headers=headers)
    # The same event delivered again, and a message with no event_id at all.
    producer.produce(
        topic, key="k0", value=b"dup", headers=[("event_id", str(event_ids[0]).encode())]
    )
    producer.produce(topic, key="k1", value=b"not json")
    assert producer.flush(10) == 0

    consume_until_committed(config, topic, 32)

    assert committed_offsets(config, topic, 3) == 32
    rows = payments_db.execute("SELECT event_id FROM inbox").fetchall()
    recorded = {r[0] for r in rows}
    assert len(rows) == 31  # 30 events + the poison; the duplicate was dropped
    assert set(event_ids) <= recorded


def test_a_batch_the_consumer_could_not_store_is_never_committed(
    config: Config,
    topics: None,
    payments_db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    producer = Producer(kafka.producer_settings(config, "test-producer"))
    real_store = consumer_process.store
    stored: list[int] = []

    def later_batches_fail(*args: Any) -> Any:
        if sum(stored) >= 5:
            raise RuntimeError("the inbox commit failed")
        stored.append(len(args[1]))
        return real_store(*args)

    monkeypatch.setattr(consumer_process, "store", later_batches_fail)
    failed: list[BaseException] = []

    def consume() -> None:
        try:
            consumer_process.run("payments", config, threading.Event())
        except RuntimeError as exc:
            failed.append(exc)

    for index in range(5):
        producer.produce(topic, key=f"k{index}", value=b"{}")
    assert producer.flush(10) == 0
    worker = threading.Thread(target=consume)
    worker.start()
    deadline = time.monotonic() + 30
    while count_rows(payments_db, "inbox") < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    for index in range(5):  # more messages, which cannot be stored
        producer.produce(topic, key=f"k{index}", value=b"{}")
    assert producer.flush(10) == 0
    worker.join(timeout=30)

    assert sum(stored) == 5 and len(failed) == 1
    # The stored messages' offsets may or may not be committed yet; the others' never are, so
    # those five will be delivered again.
    assert committed_offsets(config, topic, 3) <= 5


def count_rows(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def funded_user(payments_db: psycopg.Connection[Any], amount: int) -> uuid.UUID:
    """A new user whose account holds `amount`."""
    ids = new_account(None)
    payments_db.execute(
        payments_queries.CREATE_ACCOUNT,
        {"account_id": ids.account_id, "user_id": ids.user_id, "idempotency_key": None},
    )
    payments_db.execute(
        payments_queries.TOP_UP_USER,
        {"user_id": ids.user_id, "amount": amount, "idempotency_key": None},
    )
    return ids.user_id


def test_the_consumer_applies_what_it_records_in_the_same_transaction(
    config: Config, topics: None, payments_db: psycopg.Connection[Any]
) -> None:
    user_id = funded_user(payments_db, 100)
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    order_ids = [uuid.uuid4() for _ in range(3)]
    producer = Producer(kafka.producer_settings(config, "test-producer"))
    for order_id in order_ids:  # 60 + 30 are paid; the third (60) finds 10 left
        amount = 30 if order_id == order_ids[1] else 60
        envelope = payment_requested(order_id, user_id, amount)
        producer.produce(
            topic,
            key=str(user_id),
            value=encode(envelope.to_json()),
            headers=[("event_id", str(envelope.event_id).encode())],
        )
    assert producer.flush(10) == 0

    consume_until_committed(config, topic, 3)

    assert committed_offsets(config, topic, 3) == 3
    # Applied by the consumer itself: no actor ran here.
    assert payments_db.execute(
        "SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL"
    ).fetchone() == (3,)
    assert payments_db.execute(
        "SELECT balance FROM accounts WHERE user_id = %s", [user_id]
    ).fetchone() == (10,)
    results = {
        row[0]["payload"]["order_id"]: row[0]["payload"]["status"]
        for row in payments_db.execute("SELECT payload FROM outbox").fetchall()
    }
    assert results == {
        str(order_ids[0]): "paid",
        str(order_ids[1]): "paid",
        str(order_ids[2]): "failed",
    }


def test_the_consumer_path_applies_a_clean_batch_without_a_savepoint(
    config: Config, payments_db: psycopg.Connection[Any]
) -> None:
    # Every statement is a round trip; the payments' answers are invisible to the relay until
    # COMMIT, so nothing should stand between the debit and it. Only a failing batch goes
    # back to a savepoint per event.
    users = [funded_user(payments_db, 100) for _ in range(3)]
    payments_db.commit()
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    batch = []
    for offset, user_id in enumerate(users * 2):
        envelope = payment_requested(uuid.uuid4(), user_id, 30)
        value = encode(envelope.to_json())
        batch.append(inbox.Received(envelope.event_id, topic, str(user_id), 0, offset, value))

    with sent_messages(payments_db.pgconn) as sent:
        report = pipeline.record_and_apply(payments_db, batch, payments_handler(config), config)

    assert report == inbox.ApplyReport(applied=6)
    queries = [content for kind, content in sent if kind == "Query"]
    assert not [q for q in queries if "SAVEPOINT" in q], queries
    assert queries[0] == '"BEGIN"' and queries[-1] == '"COMMIT"'
    balances = payments_db.execute(
        "SELECT balance FROM accounts WHERE user_id = ANY(%s)", [users]
    ).fetchall()
    assert balances == [(40,)] * 3


def plans_of(conn: psycopg.Connection[Any], opening: str) -> tuple[int, int]:
    """(generic, custom) plans Postgres made for the statement psycopg prepared on `conn` that
    starts with `opening`."""
    rows = conn.execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
        " WHERE ltrim(statement, E' \n') LIKE %s || '%%'",
        [opening],
    ).fetchall()
    assert len(rows) == 1, f"prepared {len(rows)} times: {opening}"
    generic, custom = rows[0]
    return int(generic), int(custom)


def test_the_consumer_charges_with_a_generic_plan_once_prepared(
    config: Config, payments_db: psycopg.Connection[Any]
) -> None:
    # A custom plan is one more planning of the whole charge (0.35 ms at 500/s) per batch.
    users = [funded_user(payments_db, 100) for _ in range(2)]
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    handler = payments_handler(config)
    for batch in range(10):  # psycopg prepares a statement on its fifth execution
        received = []
        for offset, user_id in enumerate(users):
            envelope = payment_requested(uuid.uuid4(), user_id, 5)
            value = encode(envelope.to_json())
            received.append(
                inbox.Received(envelope.event_id, topic, str(user_id), 0, 2 * batch + offset, value)
            )
        assert pipeline.record_and_apply(payments_db, received, handler, config).applied == 2

    generic, custom = plans_of(payments_db, "WITH request AS")
    assert custom == 0 and generic >= 5
    balances = payments_db.execute(
        "SELECT balance FROM accounts WHERE user_id = ANY(%s)", [users]
    ).fetchall()
    assert balances == [(50,)] * 2


def test_the_relay_marks_rows_published_with_a_generic_plan_once_prepared(
    config: Config, topics: None, orders_db: psycopg.Connection[Any]
) -> None:
    pool = db.sync_pool(config, "orders", "test-relay-plans", size=1)
    producer = Producer(kafka.producer_settings(config, "test-relay-plans"))
    try:
        for _ in range(10):
            add_outbox_rows(orders_db, config, ["user-1", "user-2"])
            assert pipeline.relay_outbox(pool, producer, config) == 2
        with pool.connection() as conn:
            generic, custom = plans_of(conn, "UPDATE outbox SET published_at")
    finally:
        pool.close()
    assert custom == 0 and generic >= 5


def test_the_consumer_path_applies_in_arrival_order_skips_duplicates_and_leaves_failures_pending(
    config: Config, payments_db: psycopg.Connection[Any]
) -> None:
    user_id = funded_user(payments_db, 100)
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)

    def request(amount: int, offset: int) -> inbox.Received:
        envelope = payment_requested(uuid.uuid4(), user_id, amount)
        value = encode(envelope.to_json())
        return inbox.Received(envelope.event_id, topic, str(user_id), 0, offset, value)

    first, second, third = request(60, 1), request(30, 2), request(60, 4)
    poison = inbox.Received(uuid.uuid4(), topic, None, 0, 3, b"not json")
    batch = [first, second, poison, third, first]  # `first` delivered twice in one batch
    handler = payments_handler(config)

    report = pipeline.record_and_apply(payments_db, batch, handler, config)

    assert report == inbox.ApplyReport(applied=3, retried=1)
    # Charged in arrival order: 60 and 30 paid, the last 60 finds 10 left.
    assert payments_db.execute(
        "SELECT balance FROM accounts WHERE user_id = %s", [user_id]
    ).fetchone() == (10,)
    statuses = [
        row[0]["payload"]["status"]
        for row in payments_db.execute("SELECT payload FROM outbox ORDER BY id").fetchall()
    ]
    assert statuses == ["paid", "paid", "failed"]
    rows = dict(
        (row[0], row[1:])
        for row in payments_db.execute(
            "SELECT event_id, processed_at IS NOT NULL, attempts, last_error FROM inbox"
        ).fetchall()
    )
    assert {rows[m.event_id][:2] for m in (first, second, third)} == {(True, 1)}
    processed, attempts, error = rows[poison.event_id]
    assert (processed, attempts) == (False, 1)  # pending, for the sweeper to retry with backoff
    assert error.startswith("poison")

    # Kafka delivering the whole batch again changes nothing.
    assert pipeline.record_and_apply(payments_db, batch, handler, config) == inbox.ApplyReport()
    assert payments_db.execute("SELECT count(*) FROM outbox").fetchone() == (3,)


def test_inbox_record_of_a_known_event_id_is_a_no_op(payments_db: psycopg.Connection[Any]) -> None:
    message = inbox.Received(uuid.uuid4(), "t", "k", 0, 1, b"{}")
    with payments_db.transaction():
        inbox.record(payments_db, [message])
    with payments_db.transaction():
        inbox.record(payments_db, [message, message])
    assert payments_db.execute("SELECT count(*) FROM inbox").fetchone() == (1,)


@pytest.mark.parametrize("purge", [outbox.PURGE, inbox.PURGE], ids=["outbox", "inbox"])
def test_purging_reads_only_the_old_rows_through_an_index(
    orders_db: psycopg.Connection[Any], purge: str
) -> None:
    # Purging runs every PURGE_INTERVAL against tables holding RETENTION_HOURS of events: it
    # must be an index range scan on the time column, never a read of every row kept (it was,
    # while the cut-off came from the volatile clock_timestamp(), which no index scan can use).
    with orders_db.transaction():
        orders_db.execute("SET LOCAL enable_seqscan = off")
        [(plan,)] = orders_db.execute(
            "EXPLAIN (FORMAT JSON) " + purge, {"retention_seconds": 3600, "limit": 100}
        ).fetchall()
    scans = [(node["Node Type"], node.get("Index Cond", "")) for node in plan_nodes(plan)]
    assert not any(kind == "Seq Scan" for kind, _ in scans), scans
    assert any("_at <" in cond for _, cond in scans), scans  # bounded by the time column


def test_purge_removes_only_rows_older_than_the_retention_window(
    config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    add_outbox_rows(orders_db, config, ["a", "b", "c"])
    orders_db.execute(
        "UPDATE outbox SET published_at = now() - interval '2 days' WHERE key = 'a';"
        "UPDATE outbox SET published_at = now() WHERE key = 'b'"
    )
    inbox.record(orders_db, [inbox.Received(uuid.uuid4(), "t", "k", 0, n, b"{}") for n in range(2)])
    orders_db.execute(
        "UPDATE inbox SET processed_at = now() - interval '2 days' WHERE kafka_offset = 0"
    )
    pool = db.sync_pool(config, "orders", "test-purge", size=1)
    try:
        purged = pipeline.purge(pool, config)
    finally:
        pool.close()
    assert purged == pipeline.Purged(outbox=1, inbox=1)
    left = orders_db.execute("SELECT key FROM outbox ORDER BY key").fetchall()
    assert left == [("b",), ("c",)]  # the recent published row and the pending one stay


def test_a_purge_backlog_goes_batch_by_batch_until_none_is_left(
    config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    # One DELETE for a whole backlog could outlast the statement timeout at every try, rolling
    # back both tables each time: the backlog never went.
    add_outbox_rows(orders_db, config, [f"k{n}" for n in range(25)] + ["recent"])
    orders_db.execute(
        "UPDATE outbox SET published_at = now() - interval '2 days' WHERE key <> 'recent'"
    )
    inbox.record(orders_db, [inbox.Received(uuid.uuid4(), "t", "k", 0, n, b"{}") for n in range(7)])
    orders_db.execute("UPDATE inbox SET processed_at = now() - interval '2 days'")
    pool = db.sync_pool(config, "orders", "test-purge", size=1)
    try:
        purged = pipeline.purge(pool, config, batch=10)
    finally:
        pool.close()
    assert purged == pipeline.Purged(outbox=25, inbox=7)
    assert orders_db.execute("SELECT key FROM outbox").fetchall() == [("recent",)]
    assert orders_db.execute("SELECT count(*) FROM inbox").fetchone() == (0,)


def test_a_purge_stops_at_its_time_and_each_table_gets_its_share(
    config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    add_outbox_rows(orders_db, config, [f"k{n}" for n in range(25)])
    orders_db.execute("UPDATE outbox SET published_at = now() - interval '2 days'")
    inbox.record(orders_db, [inbox.Received(uuid.uuid4(), "t", "k", 0, n, b"{}") for n in range(7)])
    orders_db.execute("UPDATE inbox SET processed_at = now() - interval '2 days'")
    now = [0.0]

    def clock() -> float:  # 10 s pass between two looks: one batch fits in a table's 15 s
        now[0] += 10
        return now[0]

    pool = db.sync_pool(config, "orders", "test-purge", size=1)
    try:
        purged = pipeline.purge(pool, config, batch=10, clock=clock)
    finally:
        pool.close()
    assert purged == pipeline.Purged(outbox=10, inbox=7)  # the rest waits for the next purge


@pytest.mark.parametrize("service", ["orders", "payments"])
def test_analyze_of_the_pipeline_tables_skips_payloads_and_samples_little(
    config: Config, service: str, request: pytest.FixtureRequest
) -> None:
    # Under load autovacuum analyzes the outbox at each of its rounds; with statistics on the
    # jsonb payloads and the default 30,000-row sample that was 0.45 s of CPU in one burst.
    conn: psycopg.Connection[Any] = request.getfixturevalue(f"{service}_db")
    add_outbox_rows(conn, config, ["a", "b", "c"])
    inbox.record(conn, [inbox.Received(uuid.uuid4(), "t", "k", 0, n, b"{}") for n in range(3)])
    conn.execute("ANALYZE outbox, inbox")
    analyzed = conn.execute(
        "SELECT tablename, attname FROM pg_stats WHERE tablename IN ('outbox', 'inbox')"
    ).fetchall()
    assert ("outbox", "published_at") in analyzed and ("inbox", "processed_at") in analyzed
    skipped = {("outbox", "payload"), ("outbox", "headers"), ("inbox", "payload")}
    assert skipped.isdisjoint(analyzed), analyzed
    targets = conn.execute(
        "SELECT DISTINCT attstattarget FROM pg_attribute"
        " WHERE attrelid IN ('outbox'::regclass, 'inbox'::regclass) AND attnum > 0"
        " AND NOT attisdropped"
    ).fetchall()
    assert sorted(targets) == [(0,), (10,)]  # nothing left at the default (-1): 300 x 100 rows


def test_consumer_lag_counts_only_records_kafka_still_keeps(config: Config, topics: None) -> None:
    # Records deleted before the group read them (retention ran out) can never be read: a
    # partition that gets nothing new would otherwise show that lag for good.
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    producer = Producer(kafka.producer_settings(config, "test-lag"))
    for _ in range(5):
        producer.produce(topic, key="k", value=b"x", partition=0)
    assert producer.flush(10) == 0
    group = "lag-probe"
    committer = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap_servers,
            "group.id": config.kafka_topic_prefix + group,
            "enable.auto.commit": False,
        }
    )
    try:
        committer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    finally:
        committer.close()
    assert kafka.consumer_lag(config, group, topic) == 4

    admin = kafka.admin(config)  # kept alive until the futures resolve
    for future in admin.delete_records([TopicPartition(topic, 0, 3)]).values():
        future.result(timeout=15)
    assert kafka.consumer_lag(config, group, topic) == 2  # offsets 3 and 4
