"""Human text in requests, over the wire on SQLite and PostgreSQL: control, invisible and
bidi characters are refused with a field violation before anything is stored or queried;
text is stored NFC (emails NFKC); update masks are bounded and their errors stay small.

Before: PostgreSQL refused NUL in text, so UpdateMe and ListUsers answered INTERNAL and
Register UNAVAILABLE with the SQL and the email in the log; on SQLite a ListUsers query of
one NUL matched every user.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, field_mask_pb2

from buf.validate import validate_pb2
from interceptors.errors import STATUS_DETAILS_KEY
from interceptors.validation import PATTERN_MESSAGE
from learnmesh.auth.v1 import auth_pb2
from learnmesh.common.v1 import text_pb2
from learnmesh.user.v1 import user_pb2
from tests.conftest import PASSWORD, Mesh, bearer
from tests.support.status import all_violations, refused, violations

NUL = "\x00"
BAD_LINE = {
    "nul": "Ann\x00Example",
    "bell": "Ann\x07Example",
    "escape": "Ann\x1b[31mExample",
    "tab": "Ann\tExample",
    "newline": "Ann\nExample",
    "bidi override": "Ann\u202eelpmaxE",
    "bidi isolate": "Ann\u2066Example",
    "zero-width space": "Ann\u200bExample",
    "zero-width joiner": "Ann\u200dExample",
    "byte-order mark": "\ufeffAnn Example",
    "line separator": "Ann\u2028Example",
    "noncharacter": "Ann\ufdd0Example",
}
INVISIBLE_ONLY = {
    "spaces": "     ",
    "ideographic spaces": "\u3000\u3000\u3000",
    "no-break spaces": "\u00a0\u00a0\u00a0",
    "zero-width spaces": "\u200b\u200b\u200b",
    "zero-width mix": "\u200b\u2060\ufeff",
}
BAD_BIO = {
    "nul": "hello\x00world",
    "escape": "hello\x1b[2Jworld",
    "lone carriage return": "hello\rworld",
    "bidi override": "hello \u202eworld",
    "zero-width space": "hello\u200bworld",
    "paragraph separator": "hello\u2029world",
}
# What must never reach a log or a response: SQL, stack traces.
LEAKS = re.compile(r"SELECT|INSERT|UPDATE |Traceback|asyncpg|sqlite3|psycopg", re.IGNORECASE)


def new_email(tag: str = "text") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def assert_readable(description: str) -> None:
    """A message for people: no regular expression, no CEL, no echoed control characters."""
    assert description
    assert "\\p{" not in description and "matches(" not in description
    assert "`" not in description and "regex" not in description
    assert not any(ch < " " for ch in description)


def assert_clean_log(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert record.levelno < logging.ERROR, text
        assert not LEAKS.search(text), text
        for secret in secrets:
            assert secret not in text, text


async def register(mesh: Mesh, email: str, name: str = "Text User", password: str = PASSWORD):
    return await mesh.auth.Register(
        auth_pb2.RegisterRequest(
            email=email, password=password, display_name=name, accepted_terms=True
        )
    )


@pytest.fixture(scope="module")
async def admin(mesh: Mesh) -> auth_pb2.RegisterResponse:
    """An admin of this module's mesh, promoted as an operator does."""
    return await mesh.make_admin((await mesh.register()).user.email)


@pytest.fixture
async def carol(mesh: Mesh) -> auth_pb2.RegisterResponse:
    response: auth_pb2.RegisterResponse = await register(mesh, new_email("carol"), "Carol Example")
    return response


# --- Register ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*BAD_LINE, *INVISIBLE_ONLY])
async def test_register_refuses_a_bad_display_name_and_stores_nothing(
    mesh: Mesh, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    email = new_email("reg")
    bad = {**BAD_LINE, **INVISIBLE_ONLY}[name]
    err = await refused(register(mesh, email, bad), grpc.StatusCode.INVALID_ARGUMENT)
    found = violations(err)
    assert set(found) == {"display_name"}, found
    assert_readable(found["display_name"])
    assert_clean_log(caplog, email)
    # Nothing was stored: the address is still free.
    assert (await register(mesh, email, "Fine Name")).user.email == email


@pytest.mark.parametrize(
    "email", ["nul\x00@example.com", "bell\x07x@example.com", "zw\u200bx@example.com"]
)
async def test_register_refuses_control_characters_in_the_email(
    mesh: Mesh, email: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    err = await refused(register(mesh, email), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(err)) == {"email"}
    assert_readable(violations(err)["email"])
    assert_clean_log(caplog, email)


@pytest.mark.parametrize("password", ["correct horse\x00battery", "correct horse\tbattery"])
async def test_register_refuses_control_characters_in_the_password(
    mesh: Mesh, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    email = new_email("pw")
    err = await refused(register(mesh, email, password=password), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(err)) == {"password"}
    assert "control characters" in violations(err)["password"]
    assert_clean_log(caplog, email, password)
    assert (await register(mesh, email)).user.email == email


async def test_passwords_may_hold_any_printable_text_kept_exactly(mesh: Mesh) -> None:
    """Spaces, emoji with joiners, accents in either form: passwords are never normalised,
    so the decomposed form does not open the account of the composed one."""
    email = new_email("pw")
    password = "  Cafe\u0301 👩‍💻 \u202e pass  "
    await register(mesh, email, password=password)
    login = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=password))
    assert login.user.email == email
    err = await refused(
        mesh.auth.Login(
            auth_pb2.LoginRequest(email=email, password=password.replace("e\u0301", "é"))
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_emails_are_stored_nfkc_and_lower_case(mesh: Mesh) -> None:
    tag = uuid.uuid4().hex[:8]
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in f"Wide{tag}") + "@Example.COM"
    registered = await register(mesh, fullwidth)
    assert registered.user.email == f"wide{tag}@example.com"
    login = await mesh.auth.Login(
        auth_pb2.LoginRequest(email=f"WIDE{tag}@example.com", password=PASSWORD)
    )
    assert login.user.id == registered.user.id


async def test_display_names_are_stored_nfc(mesh: Mesh) -> None:
    registered = await register(mesh, new_email("nfc"), "Rene\u0301 Example")
    assert registered.user.display_name == "René Example"


# --- UpdateMe ------------------------------------------------------------------------------


def update(**profile: Any) -> user_pb2.UpdateMeRequest:
    return user_pb2.UpdateMeRequest(
        profile=user_pb2.ProfileUpdate(**profile),
        update_mask=field_mask_pb2.FieldMask(paths=list(profile)),
    )


@pytest.mark.parametrize("name", [*BAD_LINE, *INVISIBLE_ONLY])
async def test_update_me_refuses_a_bad_display_name(
    mesh: Mesh, carol: auth_pb2.RegisterResponse, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    auth = bearer(carol.access_token)
    bad = {**BAD_LINE, **INVISIBLE_ONLY}[name]
    err = await refused(
        mesh.user.UpdateMe(update(display_name=bad), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    found = violations(err)
    assert set(found) == {"profile.display_name"}, found
    assert_readable(found["profile.display_name"])
    assert_clean_log(caplog)
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    assert me.display_name == "Carol Example"


@pytest.mark.parametrize("name", list(BAD_BIO))
async def test_update_me_refuses_a_bad_bio(
    mesh: Mesh, carol: auth_pb2.RegisterResponse, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    auth = bearer(carol.access_token)
    err = await refused(
        mesh.user.UpdateMe(update(bio=BAD_BIO[name]), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    found = violations(err)
    assert set(found) == {"profile.bio"}, found
    assert_readable(found["profile.bio"])
    assert_clean_log(caplog)
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    assert me.bio == ""


async def test_a_bio_keeps_line_breaks_and_tabs_normalised(
    mesh: Mesh, carol: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(carol.access_token)
    bio = "Cafe\u0301 owner.\r\nLikes:\ttea\nand code"  # decomposed é, Windows line break
    changed = await mesh.user.UpdateMe(
        update(bio=bio, display_name="Zoe\u0308 Example"), metadata=auth
    )
    assert changed.user.bio == "Café owner.\nLikes:\ttea\nand code"
    assert changed.user.display_name == "Zoë Example"
    me = (await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=auth)).user
    assert (me.bio, me.display_name) == (changed.user.bio, changed.user.display_name)


# --- ListUsers -----------------------------------------------------------------------------


@pytest.mark.parametrize("query", [NUL, "a\x00", "\u200b", "x\u202e", "a\nb"])
async def test_list_users_refuses_a_bad_query(
    mesh: Mesh, admin: auth_pb2.RegisterResponse, query: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: INTERNAL on PostgreSQL; on SQLite a NUL query matched every user."""
    caplog.set_level(logging.INFO)
    await register(mesh, new_email("listed"))
    token = admin.access_token
    err = await refused(
        mesh.user.ListUsers(user_pb2.ListUsersRequest(query=query), metadata=bearer(token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(violations(err)) == {"query"}
    assert_readable(violations(err)["query"])
    assert_clean_log(caplog)


async def test_list_users_matches_the_normalised_text(
    mesh: Mesh, admin: auth_pb2.RegisterResponse
) -> None:
    tag = uuid.uuid4().hex[:6]
    await register(mesh, new_email("nfcq"), f"\u00e5sa {tag}")  # typed precomposed
    found = await mesh.user.ListUsers(
        user_pb2.ListUsersRequest(query=f"a\u030asa {tag}"),  # searched decomposed
        metadata=bearer(admin.access_token),
    )
    assert [u.display_name for u in found.users] == [f"\u00e5sa {tag}"]


# --- update masks --------------------------------------------------------------------------


def details_size(err: grpc.aio.AioRpcError) -> int:
    return sum(len(v) for k, v in err.trailing_metadata() or () if k == STATUS_DETAILS_KEY)


async def test_a_huge_update_mask_gets_a_small_error(
    mesh: Mesh, carol: auth_pb2.RegisterResponse
) -> None:
    mask = field_mask_pb2.FieldMask(paths=[f"p{i}_" + "x" * 190 for i in range(10_000)])
    request = user_pb2.UpdateMeRequest(profile=user_pb2.ProfileUpdate(bio="b"), update_mask=mask)
    assert request.ByteSize() > 1_900_000
    err = await refused(
        mesh.user.UpdateMe(request, metadata=bearer(carol.access_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert 0 < details_size(err) < 1024
    assert len(err.details() or "") < 1024
    found = all_violations(err)
    assert {field for field, _ in found} == {"update_mask"}
    assert ("update_mask", "name at most 16 paths") in found


async def test_unknown_mask_paths_are_echoed_few_and_short(
    mesh: Mesh, carol: auth_pb2.RegisterResponse
) -> None:
    paths = [f"nope{i}_" + "y" * 56 for i in range(16)]
    request = user_pb2.UpdateMeRequest(
        profile=user_pb2.ProfileUpdate(bio="b"), update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    err = await refused(
        mesh.user.UpdateMe(request, metadata=bearer(carol.access_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details_size(err) < 1024
    description = violations(err)["update_mask"]
    assert description.count("nope") == 3 and "and 13 more" in description
    assert paths[0] not in description  # cut short
    assert "allowed: display_name" in description
    me = await mesh.user.GetMe(user_pb2.GetMeRequest(), metadata=bearer(carol.access_token))
    assert me.user.bio == ""


async def test_an_over_long_mask_path_is_refused(
    mesh: Mesh, carol: auth_pb2.RegisterResponse
) -> None:
    request = user_pb2.UpdateMeRequest(
        profile=user_pb2.ProfileUpdate(bio="b"),
        update_mask=field_mask_pb2.FieldMask(paths=["bio", "z" * 65]),
    )
    err = await refused(
        mesh.user.UpdateMe(request, metadata=bearer(carol.access_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(err) == {"update_mask": "each path must be at most 64 characters"}


# --- the validation link's messages --------------------------------------------------------


async def test_rules_answer_in_words_not_regular_expressions(
    mesh: Mesh, carol: auth_pb2.RegisterResponse
) -> None:
    auth = bearer(carol.access_token)
    request = user_pb2.UpdateMeRequest(
        profile=user_pb2.ProfileUpdate(preferences=user_pb2.Preferences(language="EN")),
        update_mask=field_mask_pb2.FieldMask(paths=["preferences.language"]),
    )
    err = await refused(
        mesh.user.UpdateMe(request, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    found = violations(err)
    assert found == {
        "profile.preferences.language": "must be an ISO 639-1 code of two lower-case letters, "
        "such as en"
    }
    login = auth_pb2.LoginRequest(email=new_email(), password="x", mfa_code="12")
    err = await refused(mesh.auth.Login(login), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(err) == {"mfa_code": "must be the 6 digits your authenticator app shows"}
    # A rule still written as a bare pattern gets a plain message, not its regex.
    err = await refused(
        mesh.auth.ConfirmMfa(auth_pb2.ConfirmMfaRequest(code="12"), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert_readable(violations(err)["code"])


def test_a_bare_pattern_violation_reads_as_words() -> None:
    from interceptors.validation import description

    class Proto:
        rule_id = "string.pattern"
        message = "does not match regex pattern `^[0-9]{6}$`"

    class Violation:
        proto = Proto()

    assert description(Violation()) == PATTERN_MESSAGE  # type: ignore[arg-type]


# --- the contract: every string a request carries has a rule -------------------------------

# Strings of requests that are not human text and need no character rule: opaque tokens
# compared by hash or decoded (page tokens, refresh and reset tokens) and the password of a
# sign-in (refusing characters there could lock out an account created before the rules).
OPAQUE = {
    "learnmesh.auth.v1.LoginRequest.password",
    # Passwords that re-authenticate an MFA change (being added in parallel): like Login's.
    "learnmesh.auth.v1.EnrollMfaRequest.password",
    "learnmesh.auth.v1.ConfirmMfaRequest.password",
    "learnmesh.auth.v1.DisableMfaRequest.password",
    "learnmesh.auth.v1.RefreshRequest.refresh_token",
    "learnmesh.auth.v1.LogoutRequest.refresh_token",
    "learnmesh.auth.v1.ResetPasswordRequest.token",
    "learnmesh.auth.v1.IntrospectTokenRequest.token",
    "learnmesh.user.v1.ListUsersRequest.page_token",
    "learnmesh.course.v1.ListCoursesRequest.page_token",
    "learnmesh.course.v1.ListLessonsRequest.page_token",
    "learnmesh.notification.v1.ListNotificationsRequest.page_token",
}
SERVICES = (
    "learnmesh.auth.v1.AuthService",
    "learnmesh.user.v1.UserService",
    "learnmesh.course.v1.CourseService",
    "learnmesh.file.v1.FileService",
    "learnmesh.notification.v1.NotificationService",
)


def _string_rules_say_which_characters(rules: validate_pb2.StringRules) -> bool:
    marked = any(
        rules.Extensions[ext]
        for ext in (
            text_pb2.single_line,
            text_pb2.multi_line,
            text_pb2.no_control,
        )
    )
    listed = bool(getattr(rules, "in"))
    return marked or rules.uuid or rules.email or rules.uri or bool(rules.pattern) or listed


def _has_character_rule(field: Any) -> bool:
    options = field.GetOptions()
    if not options.HasExtension(validate_pb2.field):
        return False
    rules = options.Extensions[validate_pb2.field]
    if rules.cel:  # a CEL rule of its own (a format such as a kind or a digest)
        return True
    if rules.HasField("string"):
        return _string_rules_say_which_characters(rules.string)
    items = rules.repeated.items
    return bool(items.cel) or (
        items.HasField("string") and _string_rules_say_which_characters(items.string)
    )


def test_every_string_of_every_request_says_which_characters_it_takes() -> None:
    import learnmesh.course.v1.course_pb2
    import learnmesh.file.v1.file_pb2
    import learnmesh.notification.v1.notification_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    seen: set[str] = set()
    unruled: list[str] = []

    def walk(message: Any) -> None:
        if message.full_name in seen or message.full_name.startswith("google."):
            return
        seen.add(message.full_name)
        for field in message.fields:
            name = f"{message.full_name}.{field.name}"
            if field.message_type is not None:
                walk(field.message_type)
            elif (
                field.type == field.TYPE_STRING
                and name not in OPAQUE
                and not _has_character_rule(field)
            ):
                unruled.append(name)

    for service in SERVICES:
        for method in pool.FindServiceByName(service).methods:
            walk(method.input_type)
    assert "learnmesh.user.v1.ProfileUpdate" in seen
    assert unruled == []
