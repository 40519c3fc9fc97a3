"""Validation: protovalidate checks every request message against its buf.validate rules.

A request that could not be decoded, or breaks a rule, ends with INVALID_ARGUMENT and a
google.rpc.BadRequest listing each field violation, before any handler runs, so servicers
never re-check shapes.
"""

from __future__ import annotations

from typing import Any

import protovalidate

from interceptors.chain import Behavior, ServerLink, each_request
from interceptors.method import MethodInfo
from interceptors.requests import refuse_undecodable
from learnmesh.kernel.errors import FieldViolation, InvalidArgument


def field_path(violation: protovalidate.Violation) -> str:
    """``profile.display_name``, ``user_ids[2]``: the path of the offending field."""
    parts: list[str] = []
    path = violation.proto.field  # None for a message-level rule
    for element in path.elements if path is not None else ():
        name = element.field_name
        subscript = element.subscript
        if subscript is not None:
            key = subscript.value
            name += f"[{key!r}]" if isinstance(key, str) else f"[{key}]"
        parts.append(name)
    return ".".join(parts) or violation.proto.rule_id


def violations_of(message: Any, validator: protovalidate.Validator) -> list[FieldViolation]:
    return [
        FieldViolation(field_path(v), v.proto.message or v.proto.rule_id)
        for v in validator.collect_violations(message)
    ]


class Validation(ServerLink):
    def __init__(self, validator: protovalidate.Validator | None = None) -> None:
        self.validator = validator or protovalidate.Validator()

    def check(self, message: Any) -> None:
        refuse_undecodable(message)
        found = violations_of(message, self.validator)
        if found:
            raise InvalidArgument(found)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        if method.request_type is None:  # grpc's own services: nothing declared to check
            return each_request(method, behavior, refuse_undecodable)
        return each_request(method, behavior, self.check)
