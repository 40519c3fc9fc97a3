"""Measures the event backbone end to end: from a producer's commit to a consumer's
committed effect.

    python -m benchmarks.events [--events 3000] [--paced-seconds 10]

Two set-ups, as the mesh runs them:
- **PostgreSQL + NATS JetStream**: producer and consumer are separate OS processes
  (``python -m benchmarks.events produce|consume``), sharing a scratch PostgreSQL database
  and a stream of their own on the NATS server at LEARNMESH_BENCH_NATS_URL (default
  nats://127.0.0.1:4222);
- **SQLite + the in-process bus**: one process, as in ``learnmesh up``.

Each producer transaction inserts a row and emits one event about it (``emit`` in the same
transaction); the producer process runs its relay. The consumer's handler inserts one
effect row per delivery it applies, in the transaction that records the event as
processed, with the time it ran; an effect's latency is that time minus the event's time
(set inside the producer's transaction, just before its commit). Runs: as fast as C
concurrent producers go (C = 1, 4, 16), then paced at 200 events/s for the p99 target, then 16
producers writing 10 events per transaction (what the relay, the bus and the consumer
carry when the producers' own transactions are not the limit).
Every run counts what came through: effects per event id, so lost and duplicated events
show. The figures go between the ``events`` markers of README.md and
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, func, insert
from sqlalchemy import select as sql_select

from benchmarks.run import write
from learnmesh.db import Database, utcnow
from learnmesh.eventing.bus import Bus
from learnmesh.eventing.consumer import Consumer
from learnmesh.eventing.handlers import Handlers
from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.eventing.memory import InProcessBus
from learnmesh.eventing.outbox import emit
from learnmesh.eventing.relay import Relay
from learnmesh.eventing.tables import create_event_tables, event_tables
from learnmesh.events.v1 import events_pb2

POSTGRES_URL = os.environ.get(
    "LEARNMESH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1/test"
)
NATS_URL = os.environ.get("LEARNMESH_BENCH_NATS_URL", "nats://127.0.0.1:4222")
SERVICE = "bench"
EVENT_TYPE = "bench.ordered"
TARGET_EVENTS_PER_SECOND = 2000
TARGET_P99_MS = 50.0
PACED_RATE = 200
BATCHED = 10

metadata = MetaData()
orders = Table(
    "bench_orders",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("n", Integer, nullable=False),
)
# One row per applied delivery; no unique key, so a duplicate effect would show.
effects = Table(
    "bench_effects",
    metadata,
    Column("row", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)
TABLES = event_tables(SERVICE, metadata)
handlers = Handlers(f"{SERVICE}-consumer")


@handlers.on(EVENT_TYPE, events_pb2.UserCreated)
async def apply(session: Any, event: events_pb2.Event, _data: Any) -> None:
    now = utcnow()
    latency = (now - event.time.ToDatetime().replace(tzinfo=now.tzinfo)).total_seconds()
    await session.execute(
        insert(effects).values(event_id=event.id, latency_ms=latency * 1000, applied_at=now)
    )


def jetstream(name: str) -> JetStreamBus:
    """A stream, subjects and durable names of this run's own on the NATS server."""
    return JetStreamBus(
        NATS_URL,
        stream=f"BENCH_{name}",
        subject_prefix=f"bench.{name}.events",
        durable_prefix=f"bench-{name}-",
        duplicate_window=120.0,
        max_age=3600.0,
    )


async def produce(
    db: Database, bus: Bus, count: int, concurrency: int, rate: float, per_transaction: int = 1
) -> None:
    """``count`` events, each with its row, from ``concurrency`` tasks (at ``rate``
    events/s in all when rate > 0), ``per_transaction`` of them per transaction, with a
    relay running; returns once the outbox is empty."""
    relaying = Relay(db, TABLES.outbox, bus, poll_interval=0.5)
    relay = asyncio.create_task(relaying.run())
    started = time.monotonic()
    firsts = iter(range(0, count, per_transaction))

    async def producer() -> None:
        for first in firsts:
            if rate > 0:
                delay = started + first / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with db.write_transaction() as session:
                for n in range(first, min(first + per_transaction, count)):
                    order_id = str(uuid.uuid4())
                    await session.execute(insert(orders).values(id=order_id, n=n))
                    data = events_pb2.UserCreated(user_id=order_id, display_name=str(n))
                    await emit(session, TABLES.outbox, EVENT_TYPE, order_id, data)

    await asyncio.gather(*(producer() for _ in range(concurrency)))
    try:
        while await backlog(db):  # noqa: ASYNC110 (polls the database: nothing to await)
            await asyncio.sleep(0.05)
    finally:
        relaying.stop()  # after the round under way: no query cut halfway
        await relay


async def backlog(db: Database) -> int:
    outbox = TABLES.outbox
    async with db.transaction() as session:
        unpublished = sql_select(func.count()).select_from(outbox)
        found = await session.execute(unpublished.where(outbox.c.published_at.is_(None)))
        return int(found.scalar_one())


@contextlib.asynccontextmanager
async def consuming(db: Database, bus: Bus) -> AsyncIterator[None]:
    member = Consumer(db, TABLES, bus, handlers, fetch_wait=0.2)
    consumer = asyncio.create_task(member.run())
    try:
        yield
    finally:
        member.stop()
        await consumer


@dataclass
class Outcome:
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    lost: int
    duplicated: int
    # CPU time of the mesh's processes (producer and consumer, with their relay and bus
    # clients; not PostgreSQL's or NATS's) per event, in milliseconds.
    cpu_ms: float = 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def outcome(db: Database, count: int, began: float, within: float) -> Outcome:
    """Waits until ``count`` distinct events have their effect (or ``within`` seconds),
    then counts: throughput from the first emit to the last effect, latency quantiles."""
    deadline = time.monotonic() + within
    async with db.sessions() as session:
        while True:
            distinct = await session.execute(sql_select(func.count(effects.c.event_id.distinct())))
            if distinct.scalar_one() >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        rows = (await session.execute(sql_select(effects.c.event_id, effects.c.latency_ms))).all()
        last = (await session.execute(sql_select(func.max(effects.c.applied_at)))).scalar_one()
    ids = {row.event_id for row in rows}
    latencies = sorted(row.latency_ms for row in rows)
    if not latencies or last is None:
        raise RuntimeError("no event reached the consumer")
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    seconds = max(last.timestamp() - began, 1e-9)
    return Outcome(count, seconds, cuts[49], cuts[98], count - len(ids), len(rows) - len(ids))


@contextlib.asynccontextmanager
async def fresh_database(backend: str) -> AsyncIterator[Database]:
    """A database holding only the benchmark's tables, dropped afterwards."""
    name = f"learnmesh_bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
            admin = None
        else:
            admin = await asyncpg.connect(POSTGRES_URL)
            await admin.execute(f'CREATE DATABASE "{name}"')
            url = POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            url = f"{url}/{name}"
        db = Database(url)
        try:
            async with db.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
                await conn.run_sync(create_event_tables, SERVICE)
            yield db
        finally:
            await db.dispose()
            if admin is not None:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await admin.close()


async def run_in_process(
    count: int, concurrency: int, rate: float, per_transaction: int = 1
) -> Outcome:
    """SQLite and the in-process bus: producer, relay and consumer in this process."""
    async with fresh_database("sqlite") as db:
        bus = InProcessBus(duplicate_window=120.0)
        await bus.start()
        try:
            async with consuming(db, bus):
                began, cpu = time.time(), cpu_seconds()
                await produce(db, bus, count, concurrency, rate, per_transaction)
                found = await outcome(db, count, began, within=60)
                return replace(found, cpu_ms=(cpu_seconds() - cpu) / count * 1000)
        finally:
            await bus.close()


async def run_processes(
    count: int, concurrency: int, rate: float, per_transaction: int = 1
) -> Outcome:
    """PostgreSQL and JetStream: the producer and the consumer in processes of their own."""
    name = uuid.uuid4().hex[:8].upper()
    async with fresh_database("postgres") as db:
        url = db.url.render_as_string(hide_password=False)
        common = ["--db", url, "--stream", name]
        consumer = await role("consume", *common)
        try:
            began = time.time()
            producer = await role(
                "produce",
                *common,
                "--count",
                str(count),
                "--concurrency",
                str(concurrency),
                "--rate",
                str(rate),
                "--per-transaction",
                str(per_transaction),
            )
            produced, _ = await producer.communicate()
            if producer.returncode != 0:
                raise RuntimeError("the producer failed")
            found = await outcome(db, count, began, within=60)
        finally:
            consumer.terminate()
            consumed, _ = await consumer.communicate()
            await drop_stream(name)
        cpu = reported_cpu(produced) + reported_cpu(consumed)
        return replace(found, cpu_ms=cpu / count * 1000)


def cpu_seconds() -> float:
    """User and system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reported_cpu(output: bytes) -> float:
    """The CPU seconds a role process printed last ("cpu 1.23")."""
    last = output.decode().split()
    if len(last) < 2 or last[-2] != "cpu":
        raise RuntimeError(f"a role process did not report its CPU time: {output[-200:]!r}")
    return float(last[-1])


async def role(*args: str) -> asyncio.subprocess.Process:
    """A ``produce`` or ``consume`` process; returns once it says it is ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.events", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if line.strip() != b"ready":
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


async def drop_stream(name: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"BENCH_{name}")
    finally:
        await nc.close()


async def serve_role(args: argparse.Namespace) -> None:
    """What a ``produce`` or ``consume`` process does."""
    db = Database(args.db)
    bus = jetstream(args.stream)
    await bus.start()
    began = 0.0
    try:
        if args.command == "consume":
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            async with consuming(db, bus):
                print("ready", flush=True)
                began = cpu_seconds()
                await stop.wait()
        else:
            print("ready", flush=True)
            began = cpu_seconds()
            await produce(db, bus, args.count, args.concurrency, args.rate, args.per_transaction)
    finally:
        await bus.close()
        await db.dispose()
    print(f"cpu {cpu_seconds() - began:.3f}", flush=True)


def report(rows: list[tuple[str, str, Outcome]]) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; `python -m benchmarks.events`: from a "
        "producer's commit to the consumer's committed effect, every event counted.",
        "",
        "| set-up | producers | events | events/s | p50 ms | p99 ms | lost | duplicated "
        "| mesh CPU ms/event |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup, load, found in rows:
        lines.append(
            f"| {setup} | {load} | {found.events:,} | {found.rate:,.0f} | {found.p50_ms:.1f} | "
            f"{found.p99_ms:.1f} | {found.lost} | {found.duplicated} | {found.cpu_ms:.2f} |"
        )
    postgres = [(load, f) for s, load, f in rows if s.startswith("PostgreSQL")]
    fast = [f for load, f in postgres if "fast" in load]
    paced = [f for load, f in postgres if "paced" in load]
    batched = [f for load, f in postgres if "per transaction" in load]
    lines += [
        "",
        f"Targets: at least {TARGET_EVENTS_PER_SECOND:,} events/s through PostgreSQL + NATS "
        f"(best with one event per transaction: {max(f.rate for f in fast):,.0f}; with "
        f"{BATCHED} per transaction: {batched[0].rate:,.0f}); p99 under {TARGET_P99_MS:.0f} ms "
        f"at {PACED_RATE} events/s (measured: {paced[0].p99_ms:.1f} ms); no loss or duplicate "
        f"({sum(f.lost + f.duplicated for _, _, f in rows)} in all).",
    ]
    return "\n".join(lines)


async def benchmark(count: int, paced_seconds: int) -> str:
    rows: list[tuple[str, str, Outcome]] = []
    for setup, runner in (
        ("PostgreSQL + NATS JetStream", run_processes),
        ("SQLite + in-process bus", run_in_process),
    ):
        for concurrency in (1, 4, 16):
            found = await runner(count, concurrency, 0.0)
            rows.append((setup, f"{concurrency}, as fast as they go", found))
            print(
                f"{setup}, {concurrency}: {found.rate:,.0f}/s p99 {found.p99_ms:.1f} ms", flush=True
            )
        found = await runner(PACED_RATE * paced_seconds, 4, PACED_RATE)
        rows.append((setup, f"4, paced at {PACED_RATE}/s", found))
        print(f"{setup}, paced: p99 {found.p99_ms:.1f} ms", flush=True)
        # What the relay, bus and consumer carry when producers are not the limit.
        found = await runner(count * 2, 16, 0.0, BATCHED)
        rows.append((setup, f"16, {BATCHED} events per transaction", found))
        print(f"{setup}, batched: {found.rate:,.0f}/s", flush=True)
    return report(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for name in ("produce", "consume"):
        part = sub.add_parser(name)
        part.add_argument("--db", required=True)
        part.add_argument("--stream", required=True)
        part.add_argument("--count", type=int, default=0)
        part.add_argument("--concurrency", type=int, default=1)
        part.add_argument("--rate", type=float, default=0.0)
        part.add_argument("--per-transaction", type=int, default=1)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--paced-seconds", type=int, default=10)
    args = parser.parse_args()
    if args.command:
        asyncio.run(serve_role(args))
        return
    text = asyncio.run(benchmark(args.events, args.paced_seconds))
    print(text)
    write(text, tag="events")


if __name__ == "__main__":
    main()
