"""The sign-in throttle under concurrency, over the wire on SQLite and PostgreSQL: 40 racing
wrong guesses get at most the limit's number verified (argon2 and TOTP verifications are
counted in the server, which runs in this process); the rest are refused with
RESOURCE_EXHAUSTED and RetryInfo before anything is verified, and so is the right guess
after them.

The right guess is not part of the sign-in races: a success starts the email's count
again (by design), so a right guess verified early in a race lets up to the limit's number
of further guesses through, and the bound would depend on the order the server saw."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from grpc import aio

from learnmesh.auth.v1 import auth_pb2
from services.auth import mfa
from services.auth.passwords import Passwords
from tests.conftest import PASSWORD, Mesh, bearer
from tests.support.mesh import new_email
from tests.support.status import error_reason, retry_delay
from tests.support.totp import code_at, start_of_a_quiet_step

WRONG_GUESSES = 40


class Counted:
    """How many times the server verified a password (argon2) and a TOTP code."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passwords = 0
        self.codes = 0
        verify, matching_step = Passwords._verify, mfa.matching_step

        def counting_verify(self_: Passwords, password_hash: str, password: str) -> bool:
            self.passwords += 1  # in a worker thread; += on an int is safe enough under the GIL
            return verify(self_, password_hash, password)

        def counting_step(*args: Any, **kwargs: Any) -> int:
            self.codes += 1
            return matching_step(*args, **kwargs)

        monkeypatch.setattr(Passwords, "_verify", counting_verify)
        monkeypatch.setattr(mfa, "matching_step", counting_step)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counted:
    return Counted(monkeypatch)


def wrong_codes(secret: str, step: int, count: int) -> list[str]:
    """``count`` six-digit codes none of which is good in the server's window."""
    good = {code_at(secret, s) for s in range(step - 2, step + 3)}
    found: list[str] = []
    while len(found) < count:
        code = f"{random.randrange(1_000_000):06d}"
        if code not in good and code not in found:
            found.append(code)
    return found


async def race(calls: list[Awaitable[Any]]) -> list[Any]:
    """Waits for calls that are all in flight already (a grpc.aio call starts when made)."""
    return await asyncio.gather(*calls, return_exceptions=True)


def assert_refused_beyond_the_limit(results: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` calls got an answer other than RESOURCE_EXHAUSTED; each refusal
    says why and when to retry. Returns the answered ones."""
    refused = [
        r
        for r in results
        if isinstance(r, aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    answered = [r for r in results if r not in refused]
    assert len(answered) <= limit, [repr(r)[:120] for r in answered]
    assert len(refused) >= len(results) - limit
    for err in refused:
        assert error_reason(err) == "LOGIN_THROTTLED"
        assert 0 < retry_delay(err) <= 900
    return answered


async def enable_mfa(mesh: Mesh, access_token: str) -> str:
    """Turns MFA on for the token's account; returns the secret."""
    me = bearer(access_token)
    secret: str = (
        await mesh.auth.EnrollMfa(auth_pb2.EnrollMfaRequest(password=PASSWORD), metadata=me)
    ).secret
    step = await start_of_a_quiet_step(8)
    await mesh.auth.ConfirmMfa(
        auth_pb2.ConfirmMfaRequest(code=code_at(secret, step - 1), password=PASSWORD), metadata=me
    )
    return secret


async def test_concurrent_wrong_passwords_get_at_most_the_limit_verified(
    mesh: Mesh, counted: Counted
) -> None:
    email = new_email("pwrace")
    await mesh.register(email)
    limit = mesh.settings.auth.throttle_per_email
    passwords = [f"wrong password number {i}" for i in range(WRONG_GUESSES)]
    before = counted.passwords

    results = await race(
        [mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=p)) for p in passwords]
    )

    assert counted.passwords - before <= limit
    answered = assert_refused_beyond_the_limit(results, limit)
    for r in answered:
        assert isinstance(r, aio.AioRpcError)
        assert error_reason(r) == "INVALID_CREDENTIALS"
    # The account is locked: the right password is refused too, before it is verified.
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert counted.passwords - before <= limit


async def test_concurrent_mfa_codes_at_login_get_at_most_the_limit_verified(
    mesh: Mesh, counted: Counted
) -> None:
    email = new_email("mfarace")
    registered = await mesh.register(email)
    secret = await enable_mfa(mesh, registered.access_token)
    limit = mesh.settings.auth.throttle_per_email
    step = await start_of_a_quiet_step(8)
    codes = wrong_codes(secret, step, WRONG_GUESSES)
    passwords_before, codes_before = counted.passwords, counted.codes

    results = await race(
        [
            mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD, mfa_code=c))
            for c in codes
        ]
    )

    assert counted.codes - codes_before <= limit
    assert counted.passwords - passwords_before <= limit
    answered = assert_refused_beyond_the_limit(results, limit)
    for r in answered:
        assert isinstance(r, aio.AioRpcError)
        assert error_reason(r) == "INVALID_CREDENTIALS"
    # Locked: the right code is refused as well, before password or code is verified.
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Login(
            auth_pb2.LoginRequest(email=email, password=PASSWORD, mfa_code=code_at(secret, step))
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert counted.codes - codes_before <= limit


async def test_concurrent_codes_at_disable_mfa_get_at_most_the_limit_verified(
    mesh: Mesh, counted: Counted
) -> None:
    email = new_email("disrace")
    registered = await mesh.register(email)
    secret = await enable_mfa(mesh, registered.access_token)
    me = bearer(registered.access_token)
    limit = mesh.settings.auth.throttle_per_email
    step = await start_of_a_quiet_step(8)
    codes = wrong_codes(secret, step, WRONG_GUESSES)
    codes.insert(WRONG_GUESSES // 2, code_at(secret, step))
    before = counted.codes

    results = await race(
        [
            mesh.auth.DisableMfa(auth_pb2.DisableMfaRequest(code=c, password=PASSWORD), metadata=me)
            for c in codes
        ]
    )

    # The right code's reservation is given back (it was no wrong guess), so one call more
    # may be verified after it succeeded: by then whoever held the code has already won.
    succeeded = any(isinstance(r, auth_pb2.DisableMfaResponse) for r in results)
    assert counted.codes - before <= limit + (1 if succeeded else 0)
    # Calls that looked after MFA was off verified nothing: FAILED_PRECONDITION, fine then.
    off = [
        r
        for r in results
        if isinstance(r, aio.AioRpcError) and r.code() == grpc.StatusCode.FAILED_PRECONDITION
    ]
    assert not off or succeeded
    checked = [r for r in results if not any(r is o for o in off)]
    answered = assert_refused_beyond_the_limit(checked, limit + (1 if succeeded else 0))
    for r in answered:
        if isinstance(r, aio.AioRpcError):
            assert r.code() == grpc.StatusCode.INVALID_ARGUMENT
