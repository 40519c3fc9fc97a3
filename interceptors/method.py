"""What the protos say about a method, read once from the descriptor pool and cached."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from learnmesh.common.v1 import access_pb2

RpcKind = Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]

NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
IDEMPOTENT = descriptor_pb2.MethodOptions.IDEMPOTENT

# Infrastructure services every process serves to anyone who can connect.
_INFRASTRUCTURE = access_pb2.CallPolicy(
    access=access_pb2.ACCESS_PUBLIC, rate_class=access_pb2.RATE_CLASS_EXEMPT
)


@dataclass(frozen=True)
class MethodInfo:
    """One RPC: its names, kind, access policy and idempotency."""

    full_method: str  # "/learnmesh.auth.v1.AuthService/Login"
    service: str  # "learnmesh.auth.v1.AuthService"
    name: str  # "Login"
    kind: RpcKind
    policy: access_pb2.CallPolicy
    idempotency: int
    request_type: type[Any] | None

    @property
    def is_safe_to_retry(self) -> bool:
        return self.idempotency in (NO_SIDE_EFFECTS, IDEMPOTENT)

    @property
    def rate_class(self) -> access_pb2.RateClass.ValueType:
        """The declared rate class, or the one derived from idempotency and name."""
        if self.policy.rate_class != access_pb2.RATE_CLASS_UNSPECIFIED:
            return self.policy.rate_class
        if self.idempotency == NO_SIDE_EFFECTS:
            return access_pb2.RATE_CLASS_READ
        if self.name.startswith("Delete"):
            return access_pb2.RATE_CLASS_DELETE
        return access_pb2.RATE_CLASS_WRITE


def split(full_method: str) -> tuple[str, str]:
    service, _, name = full_method.lstrip("/").partition("/")
    return service, name


@lru_cache(maxsize=1024)
def method_info(full_method: str, kind: RpcKind = "unary_unary") -> MethodInfo:
    """Reads ``/package.Service/Method`` from the default descriptor pool."""
    service, name = split(full_method)
    try:
        desc = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        desc = None
    if desc is None:
        # Unknown to the pool: a method that does not exist (the server answers UNIMPLEMENTED).
        return MethodInfo(full_method, service, name, kind, access_pb2.CallPolicy(), 0, None)
    options = desc.GetOptions()
    # grpc's own services (health, reflection) are open to whoever may connect.
    infrastructure = service.startswith("grpc.")
    return MethodInfo(
        full_method=full_method,
        service=service,
        name=name,
        kind=kind,
        policy=_INFRASTRUCTURE if infrastructure else options.Extensions[access_pb2.policy],
        idempotency=options.idempotency_level,
        request_type=message_factory.GetMessageClass(desc.input_type),
    )
