"""The client factory: a typed stub for a service by name, over a shared channel.

Services reach each other only through it, over the network, even inside ``learnmesh up``.
Every channel carries the client chain (request id, a client span and the trace context,
the gRPC client metrics, deadline propagation, a circuit breaker of its own target), gRPC's
native retry policy generated from the protos, round-robin balancing over several addresses
or a DNS name, and, with mTLS, the calling service's certificate. Channels are made lazily,
inside the running event loop, and reused per target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry

from interceptors.breaker import CircuitBreaker
from interceptors.client import for_every_kind
from interceptors.deadline import DeadlinePropagation
from interceptors.metrics import ClientMetrics
from interceptors.request_id import ClientRequestId
from interceptors.retry import service_config
from interceptors.tracing import ClientTracing
from learnmesh.auth.v1 import auth_pb2_grpc
from learnmesh.config import Settings
from learnmesh.course.v1 import course_pb2_grpc
from learnmesh.file.v1 import file_pb2_grpc
from learnmesh.notification.v1 import notification_pb2_grpc
from learnmesh.user.v1 import user_pb2_grpc

ServiceName = Literal["auth", "user", "course", "file", "notification"]

STUBS: dict[str, Any] = {
    "auth": auth_pb2_grpc.AuthServiceStub,
    "user": user_pb2_grpc.UserServiceStub,
    "course": course_pb2_grpc.CourseServiceStub,
    "file": file_pb2_grpc.FileServiceStub,
    "notification": notification_pb2_grpc.NotificationServiceStub,
}
FULL_NAMES = {
    "auth": "learnmesh.auth.v1.AuthService",
    "user": "learnmesh.user.v1.UserService",
    "course": "learnmesh.course.v1.CourseService",
    "file": "learnmesh.file.v1.FileService",
    "notification": "learnmesh.notification.v1.NotificationService",
}


def target_of(address: str) -> str:
    """``a:1,b:2`` → ``ipv4:a:1,b:2`` (gRPC's static list); others unchanged."""
    if "," in address and not address.startswith(("ipv4:", "ipv6:", "dns:", "unix:")):
        return "ipv4:" + address
    return address


def authority_of(target: str) -> str | None:
    """The authority of a static list's channel: its first address.

    gRPC would otherwise take the whole list ("a:1,b:2") as the authority, which no
    server certificate names, so every TLS handshake failed its hostname check. Each
    replica's certificate must then carry the first address's host (the dev CA's carry
    localhost and 127.0.0.1); replicas on several hosts are better named by one DNS name
    (``dns:///auth.internal:50051``) that every replica's certificate carries.
    """
    scheme, _, rest = target.partition(":")
    if scheme not in ("ipv4", "ipv6") or "," not in rest:
        return None
    return rest.split(",", 1)[0]


class ClientFactory:
    def __init__(
        self,
        settings: Settings,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[aio.ClientInterceptor] = (),
        local_address: str = "",
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        # Extra interceptors put before the standard chain.
        self.interceptors = list(interceptors)
        # Where this process's own server listens; the default target of every service.
        self.local_address = local_address
        self._channels: dict[str, aio.Channel] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        # One for every channel: outside the breaker, so calls it refuses count too.
        self.metrics = ClientMetrics(metrics_registry)
        self._config = service_config(
            FULL_NAMES.values(),
            budget_tokens=settings.client.retry_budget_tokens,
            budget_ratio=settings.client.retry_budget_ratio,
        )

    @classmethod
    def for_caller(cls, settings: Settings, name: str, *, kind: str = "client") -> ClientFactory:
        """A factory for a program that calls the mesh: with mTLS on, it presents the
        certificate ``name`` (configured, or issued by the dev CA under var/certs)."""
        if not settings.tls.enabled:
            return cls(settings)
        from learnmesh import tls

        return cls(settings, credentials=tls.channel_credentials(settings, name, kind))

    def address_of(self, service: str) -> str:
        configured: str = getattr(self.settings, f"{service}_address", "")
        if configured:
            return configured
        return self.local_address or self.settings.address_of(service)

    def _chain(self, target: str) -> list[aio.ClientInterceptor]:
        client = self.settings.client
        breaker = self.breakers.get(target)
        if breaker is None:
            breaker = self.breakers[target] = CircuitBreaker(
                target,
                failures=client.breaker_failures,
                reset_timeout=client.breaker_reset_timeout,
                half_open_successes=client.breaker_half_open_successes,
            )
        # grpc.aio files an interceptor under one kind only; for_every_kind fixes that.
        return for_every_kind(
            [
                *self.interceptors,
                ClientRequestId(),
                ClientTracing(sdk_spans=self.settings.telemetry.sdk_spans),
                self.metrics,
                DeadlinePropagation(self.settings.deadlines.propagation_margin),
                breaker,
            ]
        )

    def channel(self, service: str) -> aio.Channel:
        target = target_of(self.address_of(service))
        channel = self._channels.get(target)
        if channel is None:
            options: list[tuple[str, str | int]] = [
                ("grpc.service_config", self._config),
                ("grpc.enable_retries", 1),
                (
                    "grpc.max_reconnect_backoff_ms",
                    int(self.settings.client.max_reconnect_backoff * 1000),
                ),
            ]
            authority = authority_of(target)
            if authority is not None:
                options.append(("grpc.default_authority", authority))
            interceptors = self._chain(target)
            if self.credentials is None:
                channel = aio.insecure_channel(target, options, interceptors=interceptors)
            else:
                channel = aio.secure_channel(
                    target, self.credentials, options, interceptors=interceptors
                )
            self._channels[target] = channel
        return channel

    @overload
    def stub(self, service: Literal["auth"]) -> auth_pb2_grpc.AuthServiceStub: ...
    @overload
    def stub(self, service: Literal["user"]) -> user_pb2_grpc.UserServiceStub: ...
    @overload
    def stub(self, service: Literal["course"]) -> course_pb2_grpc.CourseServiceStub: ...
    @overload
    def stub(self, service: Literal["file"]) -> file_pb2_grpc.FileServiceStub: ...
    @overload
    def stub(
        self, service: Literal["notification"]
    ) -> notification_pb2_grpc.NotificationServiceStub: ...
    def stub(self, service: ServiceName) -> Any:
        """A stub of ``service`` (auth, user, course, file, notification)."""
        if service not in STUBS:
            raise ValueError(f"unknown service {service!r}; known: {', '.join(STUBS)}")
        return STUBS[service](self.channel(service))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
