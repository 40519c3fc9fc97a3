"""Server reflection, both versions: ``grpc.reflection.v1`` (what current tools ask for
first) and ``grpc.reflection.v1alpha``.

grpcio-reflection ships only v1alpha. The two protocols are the same messages under
another package, so v1 is served by the same servicer: its file descriptor is v1alpha's
renamed (so that describing the v1 service itself works), and its messages travel with
v1alpha's classes, whose wire format is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.", 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    pool.Add(proto)


def enable(service_names: Sequence[str], server: aio.Server) -> None:
    """Serves reflection (both versions) for ``service_names`` on ``server``."""
    _register_v1_descriptor()
    names = [*service_names, V1_SERVICE, V1ALPHA_SERVICE]
    servicer: Any = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),
            grpc.method_handlers_generic_handler(
                V1ALPHA_SERVICE, {"ServerReflectionInfo": handler}
            ),
        ]
    )
