"""A producer process for the eventing tests: commits COUNT changes of the shop schema,
each with its event, printing "committed N" after each commit, then waits to be killed.
With a NATS URL it also runs the shop outbox's relay to that JetStream server (stream and
subject prefix given), as a service process does.

python -m tests.support.eventing_producer DATABASE_URL COUNT [SUBJECTS [NATS_URL STREAM PREFIX]]
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from sqlalchemy import insert

from learnmesh.db import Database
from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.eventing.outbox import emit
from learnmesh.eventing.relay import Relay
from learnmesh.events.v1 import events_pb2
from tests.support.eventing import TABLES, orders


async def main(url: str, count: int, subjects: int, nats: list[str]) -> None:
    db = Database(url)
    relay = None
    if nats:
        nats_url, stream, prefix = nats
        bus = JetStreamBus(nats_url, stream=stream, subject_prefix=prefix, publish_timeout=1)
        await bus.start()
        relay = asyncio.create_task(
            Relay(db, TABLES.outbox, bus, poll_interval=0.1, retry_max=0.5).run()
        )
    for n in range(count):
        order_id = str(uuid.uuid4())
        async with db.write_transaction() as s:
            await s.execute(insert(orders).values(id=order_id, count=n))
            await emit(
                s,
                TABLES.outbox,
                "user.updated",
                f"subject-{n % subjects}",
                events_pb2.UserUpdated(user_id=order_id, changed_fields=[str(n)]),
            )
        print(f"committed {n}", flush=True)
        if relay is not None:
            await asyncio.sleep(0.005)
    print("done", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 1, args[3:6]))
