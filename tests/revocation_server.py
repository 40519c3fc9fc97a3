"""A second server process for the revocation tests: the auth and user services of a test
mesh (its var dir and database) with the revocation feed on a JetStream stream of the
test's own, through the production wiring (start_server, mTLS). Prints "serving PORT" once
it reports SERVING, then runs until it is killed.

python -m tests.revocation_server VAR_DIR DATABASE_URL NATS_URL STREAM PREFIX
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from learnmesh.eventing.jetstream import JetStreamBus
from learnmesh.server import build_runtime, start_server
from learnmesh.service import definition
from tests.conftest import mesh_settings


async def main(var_dir: str, url: str, nats_url: str, stream: str, prefix: str) -> None:
    settings = mesh_settings(Path(var_dir), url)
    # Not started here: start_server starts the process's bus.
    bus = JetStreamBus(nats_url, stream=stream, subject_prefix=prefix)
    runtime, credentials = build_runtime(settings, "mesh")
    server = await start_server(
        runtime,
        [definition("auth"), definition("user")],
        host="127.0.0.1",
        port=0,
        credentials=credentials,
        bus=bus,
    )
    print(f"serving {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
