"""The worker's broker transport (celery_app.worker.broker) against a real Redis, no Docker.

A message is always in its queue or recorded as unacknowledged: the take step pops and records
in one Lua step, and waiting for a message pops nothing, so a consumer killed at any instant
loses none. Publishing stays a plain Celery client's (kombu's own transport).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import RedisServer, wait_for
from kombu import Connection, Consumer, Producer, Queue
from kombu.asynchronous import Hub

from celery_app.worker.broker import Channel, Transport, transport_for

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
DB = 15  # the broker database these tests flush; no other test uses it


@pytest.fixture
def broker_url(redis_server: RedisServer) -> Iterator[str]:
    url = f"{redis_server.url}/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _plain_client(url: str) -> Celery:
    """A plain Celery client as the seed's web app has: kombu's own Redis transport."""
    app = Celery("plain", broker=url, set_as_current=False)
    app.conf.task_serializer = "json"
    return app


def _our_channel(url: str) -> tuple[Connection, Channel]:
    conn = Connection(url, transport=transport_for(url))
    channel = conn.default_channel
    assert isinstance(channel, Channel)
    return conn, channel


def test_a_taken_message_is_recorded_as_unacknowledged_in_the_same_step(broker_url: str) -> None:
    """The take step empties the queue and leaves kombu's unacked entry, message byte-exact."""
    plain = _plain_client(broker_url)
    sent = plain.send_task("celery_app.tasks.start_container", args=["web", "t1"])
    r = redis.Redis.from_url(broker_url)
    raw = r.lindex("celery", 0)
    assert raw is not None
    conn, channel = _our_channel(broker_url)
    try:
        before = time.time()
        taken = channel.take(["celery"])
        assert taken is not None
        queue, item = taken
        assert (queue, item.encode()) == ("celery", raw)
        assert r.llen("celery") == 0
        tag = json.loads(raw)["properties"]["delivery_tag"]
        entry = r.hget("unacked", tag)
        assert entry is not None
        assert entry == b"[" + raw + b',"","celery"]'  # the message exactly as it was queued
        score = r.zscore("unacked_index", tag)
        assert score is not None
        assert before - 1 <= score <= time.time() + 1
        # Kombu's own restore (the in-flight keeper's) puts it back on its queue, unchanged.
        channel.qos.restore_by_tag(tag)
        back = json.loads(r.lindex("celery", 0) or b"{}")
        assert back["headers"]["id"] == sent.id
        assert back["properties"]["delivery_tag"] == tag
        assert r.hlen("unacked") == 0
    finally:
        conn.release()
        plain.close()


def test_a_message_on_any_consumed_list_is_taken_at_once(broker_url: str) -> None:
    """A message on either queue, at any priority step, is delivered within 0.5 s, not a poll."""
    queues = [Queue("celery", routing_key="celery"),
              Queue("ctf.host.alpha", routing_key="ctf.host.alpha")]
    arrived: dict[str, float] = {}
    stop = threading.Event()

    def on_message(body: Any, message: Any) -> None:
        arrived[body["name"]] = time.monotonic()
        message.ack()

    with Connection(broker_url, transport=transport_for(broker_url)) as ours, \
            Connection(broker_url) as plain, Consumer(ours, queues, callbacks=[on_message]):
        producer = Producer(plain)

        def drain() -> None:
            while not stop.is_set():
                _drain(ours, 0.2)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        try:
            time.sleep(0.3)  # let it block in its waits first: a wake-up, not a first look
            for queue in ("celery", "ctf.host.alpha"):
                for priority in (0, 3, 6, 9):
                    name = f"{queue}/{priority}"
                    sent = time.monotonic()
                    producer.publish({"name": name}, routing_key=queue, priority=priority)
                    wait_for(lambda n=name: n in arrived, 5, 0.001, f"{name} to arrive")
                    # The waits' own timeout is 1 s: a polling design would show it here.
                    assert arrived[name] - sent < 0.5, (name, arrived[name] - sent)
        finally:
            stop.set()
            thread.join(5)
    r = redis.Redis.from_url(broker_url)
    assert r.hlen("unacked") == 0  # each one acknowledged: nothing left to bring back


CONSUMER = textwrap.dedent("""
    import sys, threading
    from kombu import Connection, Consumer, Queue
    from celery_app.worker.broker import transport_for
    url = sys.argv[1]
    held = []
    def on_message(body, message):
        held.append(message)  # never acknowledged: the consumer stays full
        print("holding", body, flush=True)
    with Connection(url, transport=transport_for(url)) as conn:
        with Consumer(conn, [Queue("celery", routing_key="celery")], callbacks=[on_message],
                      prefetch_count=1):
            while True:
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
""")


def test_a_full_consumer_killed_while_waiting_holds_nothing_but_its_recorded_message(
    broker_url: str, tmp_path: Path,
) -> None:
    """Killed -9 while full and waiting: its one message is in unacked, the rest still queued."""
    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", CONSUMER, broker_url], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    r = redis.Redis.from_url(broker_url)
    try:
        wait_for(lambda: r.client_list().__len__() > 2, 20, 0.05, "the consumer to connect")
        with Connection(broker_url) as plain:
            producer = Producer(plain)
            for i in range(5):
                producer.publish({"n": i}, routing_key="celery")
        wait_for(lambda: b"holding" in log.read_bytes(), 20, 0.02, "the first delivery")
        # Full (prefetch 1): its waits may wake again and again, and must take nothing more.
        time.sleep(1.5)  # longer than a wait's 1 s timeout: at least one more wake-up cycle
        assert log.read_bytes().count(b"holding") == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert r.llen("celery") == 4
    assert r.hlen("unacked") == 1 and r.zcard("unacked_index") == 1


def test_a_no_ack_consumer_leaves_no_unacked_entry(broker_url: str) -> None:
    """A consumer that does not acknowledge (no_ack) takes without recording, as kombu's does."""
    got: list[Any] = []
    with Connection(broker_url, transport=transport_for(broker_url)) as ours, \
            Connection(broker_url) as plain:
        Producer(plain).publish({"n": 1}, routing_key="celery")
        with Consumer(ours, [Queue("celery", routing_key="celery")], no_ack=True,
                      callbacks=[lambda body, _m: got.append(body)]):
            wait_for(lambda: (ours.drain_events(timeout=1) or True) and bool(got), 10, 0,
                     "the message")
    r = redis.Redis.from_url(broker_url)
    assert got == [{"n": 1}]
    assert (r.llen("celery"), r.hlen("unacked"), r.zcard("unacked_index")) == (0, 0, 0)


def test_the_worker_app_consumes_with_our_transport_keeping_url_password_and_tls() -> None:
    """celery_config picks our transport for redis:// and rediss://, URL parts and TLS intact."""
    from celery_app.celery_app import app  # noqa: PLC0415  # the worker's own app

    assert isinstance(app.connection_for_read().transport, Transport)
    url = "rediss://:s3cret@broker.example:6380/4?ssl_cert_reqs=required"
    conn = Connection(url, transport=transport_for(url))
    assert isinstance(conn.transport, Transport)
    assert (conn.hostname, conn.port, conn.password, conn.virtual_host) == (
        "broker.example", 6380, "s3cret", "4")
    assert conn.ssl == {"ssl_cert_reqs": 2}  # ssl.CERT_REQUIRED, from the URL
    bare = Connection("rediss://broker.example/0", transport=transport_for("rediss://x/0"))
    _ = bare.transport
    assert bare.ssl  # TLS even without options, as kombu does for a bare rediss:// URL
    assert transport_for("amqp://guest@localhost//") is None


def test_a_cancelled_queue_is_no_longer_taken_from_and_the_others_still_are(
    broker_url: str,
) -> None:
    """After cancelling one queue, its messages stay queued; the other queue's still arrive."""
    arrived: list[Any] = []
    queues = [Queue("celery", routing_key="celery"),
              Queue("ctf.host.alpha", routing_key="ctf.host.alpha")]
    with Connection(broker_url, transport=transport_for(broker_url)) as ours, \
            Connection(broker_url) as plain, \
            Consumer(ours, queues, callbacks=[lambda body, m: (arrived.append(body), m.ack())]) \
            as consumer:
        producer = Producer(plain)

        def drain_until(what: Any) -> None:
            wait_for(lambda: (_drain(ours) or True) and what in arrived, 10, 0, f"{what}")

        producer.publish({"n": 1}, routing_key="ctf.host.alpha")
        drain_until({"n": 1})
        consumer.cancel_by_queue("ctf.host.alpha")
        for _ in range(3):  # its wait may still be out: let it come back and be dropped
            _drain(ours)
        producer.publish({"n": 2}, routing_key="ctf.host.alpha")
        producer.publish({"n": 3}, routing_key="celery")
        drain_until({"n": 3})
        for _ in range(3):
            _drain(ours)
    r = redis.Redis.from_url(broker_url)
    assert {"n": 2} not in arrived
    assert r.llen("ctf.host.alpha") == 1


def _drain(conn: Connection, timeout: float = 0.5) -> None:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=timeout)


def _redis_now(r: redis.Redis) -> float:
    secs, micros = r.time()
    return float(secs) + micros / 1e6


def test_the_take_step_says_whether_it_recorded_the_message(broker_url: str) -> None:
    """A kombu message is recorded (scored by Redis's clock) and said so; a foreign one is not."""
    plain = _plain_client(broker_url)
    plain.send_task("celery_app.tasks.start_container", args=["web", "t1"])
    r = redis.Redis.from_url(broker_url)
    conn, channel = _our_channel(broker_url)
    try:
        taken = channel.take_message(["celery"])
        assert taken is not None and taken.recorded
        tag = json.loads(taken.message)["properties"]["delivery_tag"]
        score = r.zscore("unacked_index", tag)
        assert score is not None and abs(score - _redis_now(r)) < 1
        r.lpush("celery", b"not a kombu message")
        foreign = channel.take_message(["celery"])
        assert foreign is not None and not foreign.recorded
        assert foreign.message == "not a kombu message"
        assert (r.hlen("unacked"), r.zcard("unacked_index")) == (1, 1)  # the first one only
    finally:
        conn.release()
        plain.close()


def test_a_message_is_put_back_only_while_stale_by_redis_clock(broker_url: str) -> None:
    """Restore judges by Redis's TIME and skips a message refreshed or acknowledged meanwhile."""
    plain = _plain_client(broker_url)
    sent = plain.send_task("celery_app.tasks.start_container", args=["web", "t1"])
    r = redis.Redis.from_url(broker_url)
    conn = Connection(broker_url, transport=transport_for(broker_url),
                      transport_options={"visibility_timeout": 30})
    channel = conn.default_channel
    try:
        taken = channel.take_message(["celery"])
        assert taken is not None
        tag = json.loads(taken.message)["properties"]["delivery_tag"]
        assert channel.stale() == [] and not channel.restore_if_stale(tag)

        def age(seconds: float) -> None:
            r.zadd("unacked_index", {tag: _redis_now(r) - seconds}, xx=True)

        age(29)
        assert channel.stale() == []
        age(31)
        assert channel.stale() == [tag]
        assert channel.refresh([tag]) == [True]  # its worker still holds it: fresh again
        assert not channel.restore_if_stale(tag) and r.hexists("unacked", tag)
        age(31)
        assert channel.qos.restore_visible(num=None, interval=1) == 1
        back = json.loads(r.lindex("celery", 0) or b"{}")
        assert back["headers"]["id"] == sent.id and back["headers"]["redelivered"] is True
        assert (r.hlen("unacked"), r.zcard("unacked_index"), r.llen("celery")) == (0, 0, 1)
        assert channel.refresh([tag]) == [False]  # gone: a refresh does not bring it back
        assert not channel.restore_if_stale(tag) and r.llen("celery") == 1
    finally:
        conn.release()
        plain.close()


def test_an_ack_queued_from_a_task_thread_wakes_the_worker_loop_at_once(broker_url: str) -> None:
    """A callback queued on the worker's loop from another thread makes the loop's poll return."""
    # Celery's thread pool queues each ack with hub.call_soon from the task's thread; unless the
    # poll wakes, the ack and the next message wait for the loop's next timer, up to 1 s
    # (celery#6941): a burst larger than the worker's threads then ran one window a second.
    hub = Hub()
    conn = Connection(broker_url, transport=transport_for(broker_url))
    try:
        conn.transport.register_with_event_loop(conn.connection, hub)
        assert not hub.poller.poll(0), "nothing is readable before anything is queued"
        ran: list[str] = []
        thread = threading.Thread(target=hub.call_soon, args=(ran.append, "acked"))
        thread.start()
        thread.join()
        assert hub.poller.poll(0), "the queued callback left the loop's poll asleep"
        loop = hub.create_loop()
        next(loop)  # one turn: the queued callback runs, the wake-up is read
        assert ran == ["acked"]
        next(loop)
        assert not hub.poller.poll(0), "the wake-up was read, so the next poll sleeps again"
    finally:
        hub.close()
        conn.release()
