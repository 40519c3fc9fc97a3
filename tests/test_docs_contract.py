"""docs/contract.md tells callers who may call what and where its REST route is: it must say
what the protos say, method for method."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from google.api import annotations_pb2

from learnmesh.auth.v1 import auth_pb2
from learnmesh.common.v1 import access_pb2
from learnmesh.course.v1 import course_pb2
from learnmesh.file.v1 import file_pb2
from learnmesh.notification.v1 import notification_pb2
from learnmesh.user.v1 import user_pb2

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "contract.md"
MODULES = [auth_pb2, user_pb2, course_pb2, file_pb2, notification_pb2]
SECTION = re.compile(r"^## (learnmesh\.\w+\.v1\.\w+Service)\b")


def who(policy: Any) -> str:
    access = policy.access
    if access == access_pb2.ACCESS_PUBLIC:
        return "public"
    if access == access_pb2.ACCESS_USER:
        return "user"
    if access == access_pb2.ACCESS_OWNER:
        return f"owner (`{policy.owner_field}`)"
    if access == access_pb2.ACCESS_ROLE:
        return "role: " + ", ".join(policy.roles)
    if access == access_pb2.ACCESS_INTERNAL:
        return "internal: " + ", ".join(policy.callers)
    raise AssertionError(f"no access policy: {policy}")


def route(options: Any) -> str:
    rule = options.Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    return f"{verb.upper()} {getattr(rule, verb)}" if verb else "—"


def from_protos() -> dict[str, list[tuple[str, str, str]]]:
    found = {}
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = [
                (
                    m.name,
                    who(m.GetOptions().Extensions[access_pb2.policy]),
                    route(m.GetOptions()),
                )
                for m in service.methods
            ]
    return found


def from_doc() -> dict[str, list[tuple[str, str, str]]]:
    found: dict[str, list[tuple[str, str, str]]] = {}
    rows: list[tuple[str, str, str]] | None = None
    for line in CONTRACT.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            heading = SECTION.match(line)
            rows = found.setdefault(heading.group(1), []) if heading else None
        elif rows is not None and line.startswith("| ") and not line.startswith("| RPC"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.append((cells[0], cells[1], cells[2]))
    return found


def test_every_service_and_method_is_documented_as_its_proto_declares_it() -> None:
    assert from_doc() == from_protos()
