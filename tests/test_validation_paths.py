"""interceptors.validation.field_path: the field a violation names, or its rule."""

from __future__ import annotations

import protovalidate

from interceptors.validation import field_path


def test_a_message_level_violation_names_its_rule() -> None:
    """A rule on the whole message (CEL over several fields) names no field: protovalidate
    leaves the path unset (None), and the violation is reported by its rule id rather
    than failing the call with INTERNAL."""
    violation = protovalidate.Violation(rule_id="course.dates", message="ends before it starts")
    assert violation.proto.field is None
    assert field_path(violation) == "course.dates"
