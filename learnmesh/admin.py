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

The port needs no credentials, so nothing a client does may hold the process's resources
for long (:class:`AdminLimits`): connections beyond a cap are closed at once; an HTTP
request must arrive whole within the header timeout (the proxy reads the first one before
it opens an inner connection, the HTTP protocol times every later one on a keep-alive
connection, so one byte a second does not keep a connection); a keep-alive connection
waiting for its next request, and a gRPC connection with no call, are closed when idle.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("learnmesh.admin")

# What every HTTP/2 client (so every gRPC client) sends first (RFC 9113, section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
COPY_CHUNK = 64 * 1024
# h11's own limit on a request head: a longer one is passed on for h11 to refuse.
MAX_HEAD = 16 * 1024
HEAD_END = b"\r\n\r\n"
# How an HTTP/1.1 request line starts (a method token); anything else is passed on at once
# for h11 to answer 400, rather than waited on.
REQUEST_START = re.compile(rb"[A-Z]{1,20}(?: |$)")
# Refused connections are logged at most once per this many seconds (and always counted).
REFUSAL_LOG_INTERVAL = 10.0
LOOPBACK = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NO_STORE = {"cache-control": "no-store"}

# Raises (or times out) when its dependency is unreachable, e.g. ``runtime.db.ping``.
ReadyCheck = Callable[[], Awaitable[object]]

REFUSED = Counter(
    "learnmesh_admin_connections_refused",
    "Connections to the admin port closed at once because it had its cap of open ones",
)


@dataclass(frozen=True)
class AdminLimits:
    """What one admin port lets its clients hold (seconds, and connections)."""

    # Open connections at once (HTTP and gRPC together); a new one over it is closed.
    max_connections: int = 64
    # A connection must say which protocol it speaks (its first bytes) within this time.
    sniff_timeout: float = 10.0
    # An HTTP request (head and any body; the admin port's requests have none) must
    # arrive whole within this time of its first byte; the first within it of connecting.
    header_timeout: float = 5.0
    # A keep-alive HTTP connection waiting this long for its next request is closed.
    http_idle_timeout: float = 5.0
    # A gRPC connection without a call for this long is closed; one that moves no byte
    # for this long (its calls included: the server pings live ones) is cut.
    grpc_idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_connections <= 0:
            raise ValueError("admin max_connections must be greater than 0")
        for name in ("sniff_timeout", "header_timeout", "http_idle_timeout", "grpc_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"admin {name} must be a number of seconds greater than 0")


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


class TimedHeadProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request does not arrive
    whole within ``header_timeout`` of its first byte.

    uvicorn has no such timeout: its keep-alive timer stops at the first byte of the next
    request, so a client trickling a byte a second would hold the connection forever.
    """

    header_timeout: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type[TimedHeadProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout": seconds})

    def _track_request(self) -> None:
        """Arms the timer while a request is arriving, disarms it once it has arrived."""
        state = self.conn.their_state
        arriving = state is h11.SEND_BODY or (
            state is h11.IDLE and bool(self.conn.trailing_data[0])
        )
        if arriving and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._too_slow)
        elif not arriving and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        log.debug("admin HTTP request not whole within %ss: connection closed", self.header_timeout)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track_request()  # a pipelined request already buffered starts its clock

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class Activity:
    """When a forwarded connection last moved a byte, either way."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    async def idle_for(self, seconds: float) -> None:
        """Returns once no byte has moved for ``seconds``."""
        left = seconds
        while left > 0:
            await asyncio.sleep(left)
            left = self.last + seconds - time.monotonic()


async def _copy(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: Activity
) -> None:
    """Copies until end of stream, then half-closes ``writer`` (the peer may still answer)."""
    while chunk := await reader.read(COPY_CHUNK):
        activity.touch()
        writer.write(chunk)
        await writer.drain()
        activity.touch()
    if writer.can_write_eof():
        writer.write_eof()


async def _client_to_inner(
    reader: asyncio.StreamReader, inner_writer: asyncio.StreamWriter, activity: Activity
) -> None:
    try:
        await _copy(reader, inner_writer, activity)
    except (ConnectionError, OSError, RuntimeError):
        # The client is gone: closing the inner side ends the other direction too.
        inner_writer.close()


async def _read_head(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """``head`` and what follows up to the end of the request head (or EOF, or MAX_HEAD, or
    at once when it does not start like an HTTP request: h11 answers those)."""
    while HEAD_END not in head and len(head) <= MAX_HEAD and REQUEST_START.match(head[:21]):
        chunk = await reader.read(COPY_CHUNK)
        if not chunk:
            break
        head += chunk
    return head


class AdminServer:
    """A running admin port; ``await stop()`` closes it and everything behind it."""

    def __init__(self, readiness: Readiness, limits: AdminLimits | None = None) -> None:
        self.readiness = readiness
        self.limits = limits or AdminLimits()
        self._listener: asyncio.Server | None = None
        self._grpc: aio.Server | None = None
        self._http: uvicorn.Server | None = None
        # Loopback ports the admin port forwards to (gRPC health only, and the HTTP app).
        self.grpc_port = 0
        self.http_port = 0
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False
        # Refusals since the last log line about them, and when that line was written.
        self._refused = 0
        self._refusal_logged = 0.0

    @property
    def port(self) -> int:
        """The admin port itself (useful when it was started on port 0)."""
        assert self._listener is not None
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    async def _start(self, host: str, port: int, reuse_port: bool) -> None:
        idle_ms = int(self.limits.grpc_idle_timeout * 1000)
        self._grpc = aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                # A connection without a call is closed; one with calls is pinged (bytes
                # moving), so the proxy's idle cut does not end a quiet Watch.
                ("grpc.max_connection_idle_ms", idle_ms),
                ("grpc.keepalive_time_ms", max(idle_ms // 2, 1)),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.readiness.servicer, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{LOOPBACK}:0")
        await self._grpc.start()

        config = uvicorn.Config(
            http_app(self.readiness),
            host=LOOPBACK,
            port=0,
            http=TimedHeadProtocol.with_timeout(self.limits.header_timeout),
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=self.limits.http_idle_timeout,  # type: ignore[arg-type]
            # Long enough for a /readyz to finish its checks (they are timed), so a stop
            # never has to cancel one.
            timeout_graceful_shutdown=math.ceil(self.readiness.timeout) + 1,
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

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Closes a connection over the cap at once; counts it, logs now and then."""
        writer.transport.abort()
        REFUSED.inc()
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "admin port has its cap of %d open connections: refused %d since the last "
                "report (learnmesh_admin_connections_refused_total)",
                self.limits.max_connections,
                self._refused,
            )
            self._refused = 0
            self._refusal_logged = now

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.limits.max_connections:
            self._refuse(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not self._closing:
                await self._forward(reader, writer)
        except (ConnectionError, OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # stop() ends connections so; asyncio would log a cancelled connection task
            # as an error, so this one ends normally.
            if not self._closing:
                raise
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
        accepted = asyncio.get_running_loop().time()
        head = await asyncio.wait_for(self._sniff(reader), self.limits.sniff_timeout)
        if not head:
            return
        if head == HTTP2_PREFACE:
            port, idle = self.grpc_port, self.limits.grpc_idle_timeout
        else:
            # Before an inner connection exists, so a half-sent request holds one socket.
            async with asyncio.timeout_at(accepted + self.limits.header_timeout):
                head = await _read_head(reader, head)
            # A response being made (a /readyz waiting on its checks) moves no byte either.
            port = self.http_port
            idle = self.limits.http_idle_timeout + self.readiness.timeout
        inner_reader, inner_writer = await asyncio.open_connection(LOOPBACK, port)
        activity = Activity()
        upstream = asyncio.create_task(_client_to_inner(reader, inner_writer, activity))
        downstream = asyncio.create_task(_copy(inner_reader, writer, activity))
        idle_cut = asyncio.create_task(activity.idle_for(idle))
        try:
            inner_writer.write(head)
            # The inner server ending its side ends the conversation; so does silence.
            await asyncio.wait((downstream, idle_cut), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upstream, downstream, idle_cut):
                task.cancel()
            await asyncio.gather(upstream, downstream, idle_cut, return_exceptions=True)
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
            # uvicorn cancels the requests still running after its grace and returns at
            # once; a /readyz mid-check holds a database connection, so wait for them.
            requests = list(self._http.server_state.tasks)
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
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
    limits: AdminLimits | None = None,
) -> AdminServer:
    """Starts the admin port on ``host:port`` (0 picks a free port).

    ``health_servicer`` is the main server's own, so statuses agree on both ports;
    ``ready_checks`` maps a dependency's name to an async callable that raises when it is
    unreachable (each gets ``check_timeout`` seconds per /readyz); ``limits`` bound what
    clients can hold (AdminLimits' defaults when None).
    """
    if not isinstance(getattr(health_servicer, "_server_status", None), Mapping):
        raise TypeError("health_servicer must be a grpc_health.v1.health.aio.HealthServicer")
    admin = AdminServer(Readiness(health_servicer, ready_checks or {}, check_timeout), limits)
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
