"""The ``learnmesh`` command: run the mesh, one service, or the migrations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from learnmesh import config
from learnmesh.client import ClientFactory
from learnmesh.db import Database
from learnmesh.service import IMPLEMENTED, Runtime, definition

log = logging.getLogger("learnmesh")


def _runtime(settings: config.Settings) -> Runtime:
    return Runtime(
        settings=settings, db=Database(settings.database), clients=ClientFactory(settings)
    )


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve(
    settings: config.Settings, names: Sequence[str], host: str, port: int, reuse_port: bool
) -> None:
    from learnmesh.server import start_server

    runtime = _runtime(settings)
    definitions = [definition(name) for name in names]
    try:
        server = await start_server(
            runtime, definitions, host=host, port=port, reuse_port=reuse_port
        )
    except OSError as exc:
        await runtime.db.dispose()
        raise SystemExit(f"learnmesh: {exc}") from None
    for d in definitions:
        print(f"{d.full_name:<40} grpc://{server.address}", flush=True)
    print(f"{'grpc.health.v1.Health, reflection':<40} grpc://{server.address}", flush=True)
    print(f"database: {runtime.db.url.render_as_string(hide_password=True)}", flush=True)
    print("ready; Ctrl-C stops", flush=True)
    try:
        await _wait_for_signal()
    finally:
        print("stopping…", flush=True)
        await server.stop(settings.server.grace)
        await runtime.clients.close()
        await runtime.db.dispose()
        print("stopped", flush=True)


async def _migrate(settings: config.Settings, names: Sequence[str]) -> None:
    db = Database(settings.database)
    try:
        for name in names:
            d = definition(name)
            await db.migrate(d.name, d.migrations)
            print(f"{d.name}: migrated to head")
    finally:
        await db.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="learnmesh", description="The learnmesh gRPC mesh.")
    parser.add_argument("--config", help="a TOML settings file (default: $LEARNMESH_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole mesh in this process")
    up.add_argument("--host", help="listen address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gRPC port (default 50051)")

    serve = commands.add_parser("serve", help="run one service in this process")
    serve.add_argument("service", choices=sorted(IMPLEMENTED))
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument(
        "--reuse-port", action="store_true", help="share the port with replicas (SO_REUSEPORT)"
    )

    migrate = commands.add_parser("migrate", help="bring the database to the newest schema")
    migrate.add_argument("services", nargs="*", help="default: every implemented service")

    args = parser.parse_args(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        print(f"learnmesh: configuration error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = getattr(args, "host", None) or settings.server.host
    port = settings.server.port if getattr(args, "port", None) is None else args.port
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "up":
            asyncio.run(_serve(settings, list(IMPLEMENTED), host, port, False))
        elif args.command == "serve":
            asyncio.run(_serve(settings, [args.service], host, port, args.reuse_port))
        else:
            asyncio.run(_migrate(settings, args.services or list(IMPLEMENTED)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
