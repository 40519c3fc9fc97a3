"""The JetStream bus on a real NATS server: the stream's explicit settings, Nats-Msg-Id
de-duplication, and a service process that commits while NATS is down and is SIGKILLed:
once NATS is back every committed event is applied once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import uuid

import nats
import pytest
from nats.js.api import StorageType
from sqlalchemy import func, select

from learnmesh.eventing.bus import BusUnavailable
from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.eventing.relay import Relay
from tests.conftest import IN_CI
from tests.support.eventing import (
    NATS_URL,
    TABLES,
    backbone,
    open_bus,
    require_nats,
    shop_database,
    wait_for_effects,
)
from tests.test_eventing_consumer import emit_update, recording


async def test_the_stream_is_created_then_updated_with_explicit_settings():
    await require_nats()
    unique = uuid.uuid4().hex[:10]
    stream, prefix = f"TEST_{unique}", f"test.{unique}.events"
    bus = JetStreamBus(
        NATS_URL, stream=stream, subject_prefix=prefix, duplicate_window=120, max_age=3600
    )
    await bus.start()
    try:
        info = await bus.js.stream_info(bus.stream)
        assert info.config.subjects == [f"test.{unique}.events.>"]
        assert info.config.storage == StorageType.FILE
        assert info.config.duplicate_window == 120
        assert info.config.max_age == 3600
        again = JetStreamBus(
            NATS_URL, stream=stream, subject_prefix=prefix, duplicate_window=300, max_age=7200
        )
        await again.start()
        await again.close()
        info = await bus.js.stream_info(bus.stream)
        assert (info.config.duplicate_window, info.config.max_age) == (300, 7200)
    finally:
        await bus.delete_stream()
        await bus.close()


async def test_a_second_publish_of_one_msg_id_is_dropped():
    async with open_bus("jetstream") as bus:
        subject = bus.subject_for("user.updated")
        await bus.publish(subject, b"one", "event-1", "k")
        await bus.publish(subject, b"one again", "event-1", "k")
        await bus.publish(subject, b"two", "event-2", "k")
        info = await bus.js.stream_info(bus.stream)
        assert info.state.messages == 2
        group = await bus.subscribe("g", ["user.updated"])
        got = await group.fetch(10, 1)
        assert [d.data for d in got] == [b"one", b"two"]
        assert [d.msg_id for d in got] == ["event-1", "event-2"]
        assert await group.lag() == 2
        for delivery in got:
            await delivery.ack()
        for _ in range(50):  # acks are sent without waiting for the server's answer
            if await group.lag() == 0:
                break
            await asyncio.sleep(0.05)
        assert await group.lag() == 0


async def test_publishing_to_an_unreachable_server_says_so():
    bus = JetStreamBus("nats://127.0.0.1:1", connect_timeout=1)
    with pytest.raises(ConnectionError):
        await bus.start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateNats:
    """A nats-server of the test's own (JetStream, file store under ``store``), which it
    can stop and start again on the same port."""

    def __init__(self, store: str) -> None:
        self.port = free_port()
        self.store = store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            reason = "nats-server is not installed"
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            self.store,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(100):
            with contextlib.suppress(Exception):
                nc = await nats.connect(self.url, connect_timeout=1, max_reconnect_attempts=0)
                await nc.close()
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("private nats-server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def committed(stdout: asyncio.StreamReader) -> int:
    """The number in the producer's next "committed N" line."""
    line = await asyncio.wait_for(stdout.readline(), 30)
    assert line.startswith(b"committed"), line
    return int(line.split()[1])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_service_killed_while_nats_is_down_loses_and_duplicates_nothing(backend, tmp_path):
    await require_nats()
    server = PrivateNats(str(tmp_path / "jetstream"))
    await server.start()
    unique = uuid.uuid4().hex[:10]
    stream, prefix = f"TEST_{unique}", f"test.{unique}.events"
    try:
        async with shop_database(backend, tmp_path) as db:
            producer = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.eventing_producer",
                db.url.render_as_string(hide_password=False),
                "100000",
                "5",
                server.url,
                stream,
                prefix,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            assert producer.stdout is not None
            try:
                committed = -1
                while committed < 20:  # some published while NATS is up
                    committed = int(
                        (await asyncio.wait_for(producer.stdout.readline(), 30)).split()[1]
                    )
                await server.stop()  # the bus goes down mid-burst
                while committed < 60:
                    committed = int(
                        (await asyncio.wait_for(producer.stdout.readline(), 30)).split()[1]
                    )
            finally:
                producer.send_signal(signal.SIGKILL)
                await producer.wait()
            await server.start()
            bus = JetStreamBus(server.url, stream=stream, subject_prefix=prefix)
            await bus.start()
            try:
                async with db.transaction() as s:
                    events = (
                        await s.execute(select(func.count()).select_from(TABLES.outbox))
                    ).scalar_one()
                assert events >= 61
                async with backbone(db, bus, [recording("g")]):
                    rows = await wait_for_effects(db, events, within=60)
                assert len(rows) == events
                assert len({r.event_id for r in rows}) == events
                assert sorted(int(r.value) for r in rows) == list(range(events))
            finally:
                await bus.close()
    finally:
        await server.stop()


async def test_a_relay_retries_until_nats_is_back(tmp_path):
    await require_nats()
    server = PrivateNats(str(tmp_path / "jetstream"))
    await server.start()
    try:
        async with shop_database("sqlite", tmp_path) as db:
            bus = JetStreamBus(server.url, publish_timeout=0.5)
            await bus.start()
            try:
                await server.stop()
                for n in range(5):
                    await emit_update(db, f"s{n}", str(n))
                relay = Relay(db, TABLES.outbox, bus)
                with pytest.raises(ConnectionError):
                    await relay.relay_once()
                await server.start()
                for _ in range(50):
                    with contextlib.suppress(ConnectionError):
                        if await relay.relay_once() == 5:
                            break
                    await asyncio.sleep(0.2)
                info = await bus.js.stream_info(bus.stream)
                assert info.state.messages == 5
            finally:
                await bus.close()
    finally:
        await server.stop()


async def test_a_stream_refused_by_nats_says_why():
    """A second stream over the same subjects is refused by NATS: the start says so (it
    used to say "stream not found", from the update it tried next)."""
    await require_nats()
    unique = uuid.uuid4().hex[:10]
    first = JetStreamBus(NATS_URL, stream=f"TEST_{unique}_A", subject_prefix=f"test.{unique}")
    await first.start()
    try:
        second = JetStreamBus(NATS_URL, stream=f"TEST_{unique}_B", subject_prefix=f"test.{unique}")
        with pytest.raises(BusUnavailable, match=f"stream TEST_{unique}_B cannot be created"):
            await second.start()
    finally:
        await first.delete_stream()
        await first.close()
