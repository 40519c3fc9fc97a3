"""Validation: protovalidate checks every request message against its buf.validate rules.

A request that could not be decoded, or breaks a rule, ends with INVALID_ARGUMENT and a
google.rpc.BadRequest listing each field violation, before any handler runs, so servicers
never re-check shapes.

Unicode normalisation happens here, before the rules run, and nowhere else: the contract
marks the fields that hold human text (``learnmesh.common.v1`` predefined rules in
``protos/learnmesh/common/v1/text.proto``), and this link rewrites them in the request
before validating it, so every service (auth and user alike) stores and compares one form
and the length rules measure that form:

* ``single_line`` and ``multi_line`` fields become NFC (canonical composition: the same
  letters typed on different keyboards compare equal, without folding look-alikes the way
  NFKC would); ``multi_line`` fields also turn CR LF into LF, so a bio pasted from a
  Windows text area keeps its line breaks while a lone CR is still refused;
* ``string.email`` fields become NFKC (full-width letters fold to ASCII, which the email
  rule then accepts or refuses); services lower-case emails themselves, as before;
* passwords (``no_control``) are left exactly as typed: normalising them would stop
  passwords that were set before from matching their hashes.

Each violation becomes a field violation with a message meant for people: a bare
``string.pattern`` rule would echo its regular expression, so its message is replaced
(the contract uses CEL rules with their own messages instead of patterns). At most
``MAX_VIOLATIONS`` are reported, so a request with thousands of bad items cannot make an
error trailer a client cannot read.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

import protovalidate
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from buf.validate import validate_pb2
from interceptors.link import Behavior, ServerLink, each_request
from interceptors.method import MethodInfo
from interceptors.requests import refuse_undecodable
from learnmesh.common.v1 import text_pb2
from learnmesh.kernel.errors import FieldViolation, InvalidArgument

MAX_VIOLATIONS = 20
PATTERN_MESSAGE = "is not in the expected format"

Normalise = Callable[[str], str]


def nfc(value: str) -> str:
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def nfc_lines(value: str) -> str:
    return nfc(value.replace("\r\n", "\n"))


def nfkc(value: str) -> str:
    return value if value.isascii() else unicodedata.normalize("NFKC", value)


def _string_normaliser(rules: validate_pb2.StringRules) -> Normalise | None:
    if rules.Extensions[text_pb2.multi_line]:
        return nfc_lines
    if rules.Extensions[text_pb2.single_line]:
        return nfc
    if rules.email:
        return nfkc
    return None


def _field_normaliser(field: FieldDescriptor) -> Normalise | None:
    options = field.GetOptions()
    if not options.HasExtension(validate_pb2.field):
        return None
    rules = options.Extensions[validate_pb2.field]
    if rules.HasField("string"):
        return _string_normaliser(rules.string)
    if rules.HasField("repeated") and rules.repeated.items.HasField("string"):
        return _string_normaliser(rules.repeated.items.string)
    return None


# What to rewrite in a message type: (field, normaliser) for strings, (field, plan) for
# messages that hold such strings. Built once per type.
Plan = list[tuple[FieldDescriptor, Any]]
_plans: dict[str, Plan] = {}


def plan_of(descriptor: Descriptor) -> Plan:
    found = _plans.get(descriptor.full_name)
    if found is not None:
        return found
    plan: Plan = []
    _plans[descriptor.full_name] = plan  # placeholder: recursive types end here
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            normaliser = _field_normaliser(field)
            if normaliser is not None:
                plan.append((field, normaliser))
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            inner = plan_of(field.message_type)
            if inner:
                plan.append((field, inner))
    return plan


def normalise(message: Any, plan: Plan | None = None) -> None:
    """Rewrites the human-text fields of ``message`` (and of its sub-messages) in place."""
    for field, how in plan_of(message.DESCRIPTOR) if plan is None else plan:
        if isinstance(how, list):
            if field.is_repeated:
                for item in getattr(message, field.name):
                    normalise(item, how)
            elif message.HasField(field.name):
                normalise(getattr(message, field.name), how)
        elif field.is_repeated:
            values = getattr(message, field.name)
            for i, value in enumerate(values):
                changed = how(value)
                if changed != value:
                    values[i] = changed
        else:
            value = getattr(message, field.name)
            changed = how(value)
            if changed != value:
                setattr(message, field.name, changed)


def field_path(violation: protovalidate.Violation) -> str:
    """``profile.display_name``, ``user_ids[2]``: the path of the offending field."""
    parts: list[str] = []
    path = violation.proto.field  # None for a message-level rule
    for element in path.elements if path is not None else ():
        name = element.field_name
        subscript = element.subscript
        if subscript is not None:
            key = subscript.value
            name += f"[{key[:40]!r}]" if isinstance(key, str) else f"[{key}]"
        parts.append(name)
    return ".".join(parts) or violation.proto.rule_id


def description(violation: protovalidate.Violation) -> str:
    """The violation's message for people (never a raw regular expression)."""
    rule = violation.proto.rule_id
    if rule == "string.pattern" or rule.endswith(".string.pattern"):
        return PATTERN_MESSAGE
    return violation.proto.message or rule


def violations_of(message: Any, validator: protovalidate.Validator) -> list[FieldViolation]:
    return [
        FieldViolation(field_path(v), description(v)) for v in validator.collect_violations(message)
    ]


class Validation(ServerLink):
    def __init__(self, validator: protovalidate.Validator | None = None) -> None:
        self.validator = validator or protovalidate.Validator()

    def check(self, message: Any) -> None:
        refuse_undecodable(message)
        normalise(message)
        found = violations_of(message, self.validator)
        if len(found) > MAX_VIOLATIONS:
            more = len(found) - MAX_VIOLATIONS
            fields = ", ".join(dict.fromkeys(v.field for v in found[:MAX_VIOLATIONS]))
            raise InvalidArgument(
                found[:MAX_VIOLATIONS],
                f"invalid request: {fields} (and {more} more violations not listed)",
            )
        if found:
            raise InvalidArgument(found)

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        if method.request_type is None:  # grpc's own services: nothing declared to check
            return each_request(method, behavior, refuse_undecodable)
        return each_request(method, behavior, self.check)
