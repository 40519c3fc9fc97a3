"""The admin port: what probes and scrapers reach without a client certificate.

Kubernetes probes and load balancers carry no client certificate, so besides its mTLS port
each process listens on one plaintext TCP port that serves gRPC ``grpc.health.v1.Health``
AND plain HTTP/1.1: ``GET /healthz`` (alive), ``GET /readyz`` (every service SERVING and
every dependency reachable) and ``GET /metrics`` (Prometheus). Nothing else, and never a
business method.

The first bytes of each connection decide where it goes: the HTTP/2 client preface is
forwarded to a loopback gRPC server that has ONLY the health servicer (the same object the
main server uses, so both ports always report the same statuses); anything else to a
loopback Starlette app under uvicorn. Forwarding copies bytes both ways until the inner
server is done with the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import uvicorn
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("learnmesh.admin")

# What every HTTP/2 client (so every gRPC client) sends first (RFC 9113, section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A connection that has not said which protocol it speaks within this time is dropped.
SNIFF_TIMEOUT = 10.0
COPY_CHUNK = 64 * 1024
LOOPBACK = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NO_STORE = {"cache-control": "no-store"}

# Raises (or times out) when its dependency is unreachable, e.g. ``runtime.db.ping``.
ReadyCheck = Callable[[], Awaitable[object]]


def _statuses(servicer: health.aio.HealthServicer) -> Mapping[str, int]:
    """Every status the health servicer holds, by service name ("" is the whole server).

    grpc's HealthServicer has no public way to list what it knows (its ``List`` RPC is not
    implemented in grpcio), so readiness reads its table; start_admin checks it exists.
    """
    table: Mapping[str, int] = servicer._server_status  # type: ignore[attr-defined]  # private
    return table


class Readiness:
    """Decides /readyz: every health status SERVING and every ready check passing."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        checks: Mapping[str, ReadyCheck],
        timeout: float,
    ) -> None:
        self.servicer = servicer
        self.checks = dict(checks)
        self.timeout = timeout

    async def _outcome(self, name: str, check: ReadyCheck) -> str:
        """Says "ok", or why the check failed: the exception's type only, since the admin
        port is unauthenticated and driver messages can name hosts and users (logged)."""
        try:
            await asyncio.wait_for(check(), self.timeout)
        except TimeoutError:
            log.warning("ready check %s timed out after %ss", name, self.timeout)
            return f"timed out after {self.timeout:g}s"
        except Exception as exc:
            log.warning("ready check %s failed: %r", name, exc)
            return f"failed: {type(exc).__name__}"
        return "ok"

    async def evaluate(self) -> tuple[bool, dict[str, Any]]:
        names = health_pb2.HealthCheckResponse.ServingStatus.Name
        services = {name: names(status) for name, status in _statuses(self.servicer).items()}
        outcomes = await asyncio.gather(*(self._outcome(n, c) for n, c in self.checks.items()))
        checks = dict(zip(self.checks, outcomes, strict=True))
        failed = [
            f"service {name!r} is {status}"
            for name, status in services.items()
            if status != "SERVING"
        ]
        failed += [
            f"check {name!r} {outcome}" for name, outcome in checks.items() if outcome != "ok"
        ]
        body = {
            "status": "not ready" if failed else "ready",
            "failed": failed,
            "services": services,
            "checks": checks,
        }
        return not failed, body


def http_app(readiness: Readiness) -> Starlette:
    """/healthz, /readyz and /metrics; Starlette answers 404 to any other path."""

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "alive"}, headers=NO_STORE)

    async def readyz(_request: Request) -> Response:
        ready, body = await readiness.evaluate()
        return JSONResponse(body, status_code=200 if ready else 503, headers=NO_STORE)

    async def metrics(_request: Request) -> Response:
        # Collectors may read /proc and take locks: keep that off the event loop.
        text = await asyncio.to_thread(generate_latest, REGISTRY)
        return Response(text, media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies until end of stream, then half-closes ``writer`` (the peer may still answer)."""
    while chunk := await reader.read(COPY_CHUNK):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _client_to_inner(
    reader: asyncio.StreamReader, inner_writer: asyncio.StreamWriter
) -> None:
    try:
        await _copy(reader, inner_writer)
    except (ConnectionError, OSError, RuntimeError):
        # The client is gone: closing the inner side ends the other direction too.
        inner_writer.close()


class AdminServer:
    """A running admin port; ``await stop()`` closes it and everything behind it."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self._listener: asyncio.Server | None = None
        self._grpc: aio.Server | None = None
        self._http: uvicorn.Server | None = None
        # Loopback ports the admin port forwards to (gRPC health only, and the HTTP app).
        self.grpc_port = 0
        self.http_port = 0
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def port(self) -> int:
        """The admin port itself (useful when it was started on port 0)."""
        assert self._listener is not None
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    async def _start(self, host: str, port: int, reuse_port: bool) -> None:
        self._grpc = aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.readiness.servicer, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{LOOPBACK}:0")
        await self._grpc.start()

        config = uvicorn.Config(
            http_app(self.readiness),
            host=LOOPBACK,
            port=0,
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        config.load()
        self._http = uvicorn.Server(config)
        # Server.serve() would take over SIGINT/SIGTERM for its lifetime; startup() and
        # shutdown() run it without touching the process's signal handling.
        self._http.lifespan = config.lifespan_class(config)
        await self._http.startup()
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

        self._listener = await asyncio.start_server(
            self._accept, host, port, reuse_port=reuse_port or None
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not self._closing:
                await self._forward(reader, writer)
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _sniff(self, reader: asyncio.StreamReader) -> bytes:
        """Reads just enough to tell the HTTP/2 preface from anything else."""
        head = b""
        while len(head) < len(HTTP2_PREFACE) and HTTP2_PREFACE.startswith(head):
            chunk = await reader.read(len(HTTP2_PREFACE) - len(head))
            if not chunk:
                break
            head += chunk
        return head

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(self._sniff(reader), SNIFF_TIMEOUT)
        if not head:
            return
        port = self.grpc_port if head == HTTP2_PREFACE else self.http_port
        inner_reader, inner_writer = await asyncio.open_connection(LOOPBACK, port)
        upstream = asyncio.create_task(_client_to_inner(reader, inner_writer))
        try:
            inner_writer.write(head)
            # The inner server ending its side ends the conversation.
            await _copy(inner_reader, writer)
        finally:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
            inner_writer.close()

    async def stop(self) -> None:
        """Stops accepting, drops open connections, stops the inner servers."""
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(0)
        if self._http is not None and self._http.started:
            await self._http.shutdown()
        if self._listener is not None:
            await self._listener.wait_closed()


async def start_admin(
    host: str,
    port: int,
    health_servicer: health.aio.HealthServicer,
    ready_checks: Mapping[str, ReadyCheck] | None = None,
    *,
    check_timeout: float = 2.0,
    reuse_port: bool = False,
) -> AdminServer:
    """Starts the admin port on ``host:port`` (0 picks a free port).

    ``health_servicer`` is the main server's own, so statuses agree on both ports;
    ``ready_checks`` maps a dependency's name to an async callable that raises when it is
    unreachable (each gets ``check_timeout`` seconds per /readyz).
    """
    if not isinstance(getattr(health_servicer, "_server_status", None), Mapping):
        raise TypeError("health_servicer must be a grpc_health.v1.health.aio.HealthServicer")
    admin = AdminServer(Readiness(health_servicer, ready_checks or {}, check_timeout))
    try:
        await admin._start(host, port, reuse_port)
    except OSError as exc:
        await admin.stop()
        reason = exc.strerror or str(exc)
        raise OSError(f"cannot listen on {host}:{port} (admin port): {reason}") from None
    except BaseException:
        await admin.stop()
        raise
    return admin
