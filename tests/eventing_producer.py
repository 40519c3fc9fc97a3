"""A producer process for the eventing tests: commits COUNT changes of the shop schema,
each with its event, printing "committed N" after each commit, then waits to be killed.

python -m tests.eventing_producer DATABASE_URL COUNT [SUBJECTS]
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from sqlalchemy import insert

from learnmesh.db import Database
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from tests.eventing_support import TABLES, orders


async def main(url: str, count: int, subjects: int) -> None:
    db = Database(url)
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
    print("done", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1))
