"""The revocation list on its own: what it refuses, that it forgets what no longer matters,
and that writers in threads and readers at the same time agree."""

from __future__ import annotations

import threading

from learnmesh.kernel.principal import Principal
from learnmesh.kernel.revocations import RevocationList


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def caller(user: str = "u1", session: str = "s1", issued_at: float = 999_990.0) -> Principal:
    return Principal(user, session_id=session, issued_at=issued_at, expires_at=issued_at + 900)


def test_a_revoked_session_is_refused_and_others_are_not():
    clock = Clock()
    revocations = RevocationList(clock=clock)
    assert not revocations.refuses(caller())
    revocations.revoke_sessions(["s1"], until=clock.now + 900)
    assert revocations.refuses(caller(session="s1"))
    assert not revocations.refuses(caller(session="s2"))
    assert not revocations.refuses(caller(user="u2", session=""))


def test_not_before_refuses_older_tokens_only():
    clock = Clock()
    revocations = RevocationList(clock=clock)
    revocations.revoke_user_before("u1", not_before=clock.now, until=clock.now + 900)
    assert revocations.refuses(caller(issued_at=clock.now - 1))
    assert not revocations.refuses(caller(issued_at=clock.now))
    assert not revocations.refuses(caller(user="u2", issued_at=clock.now - 1))
    # An earlier not-before arriving late (replayed out of order) does not loosen it.
    revocations.revoke_user_before("u1", not_before=clock.now - 100, until=clock.now + 800)
    assert revocations.refuses(caller(issued_at=clock.now - 1))


def test_entries_are_forgotten_once_their_tokens_have_expired():
    clock = Clock()
    revocations = RevocationList(clock=clock, grace=5)
    revocations.revoke_sessions(["s1"], until=clock.now + 10)
    revocations.revoke_user_before("u1", clock.now, until=clock.now + 20)
    assert len(revocations) == 2
    clock.now += 14
    assert revocations.prune() == 0  # s1 still has 5 s of verifier leeway
    clock.now += 1.5
    assert revocations.prune() == 1
    assert not revocations.session_revoked("s1")
    clock.now += 10
    assert revocations.prune() == 1
    assert len(revocations) == 0
    # A revocation of tokens that have all expired is not even kept.
    revocations.revoke_sessions(["old"], until=clock.now - 60)
    revocations.revoke_user_before("u9", clock.now - 1000, until=clock.now - 60)
    assert len(revocations) == 0


def test_a_later_revocation_of_one_session_extends_it():
    clock = Clock()
    revocations = RevocationList(clock=clock, grace=0)
    revocations.revoke_sessions(["s1"], until=clock.now + 10)
    revocations.revoke_sessions(["s1"], until=clock.now + 100)
    clock.now += 50
    revocations.prune()
    assert revocations.session_revoked("s1")


def test_memory_stays_bounded_by_one_token_lifetime():
    clock = Clock()
    revocations = RevocationList(clock=clock, grace=0)
    for second in range(10_000):
        clock.now += 1
        revocations.revoke_sessions([f"s{second}"], until=clock.now + 900)
    assert len(revocations) <= 901
    assert len(revocations._expiries) <= 901


def test_writers_in_threads_and_readers_agree():
    revocations = RevocationList()
    until = revocations._clock() + 900
    errors: list[BaseException] = []

    def write(base: int) -> None:
        try:
            for n in range(2_000):
                revocations.revoke_sessions([f"{base}-{n}"], until)
                revocations.revoke_user_before(f"user-{base}-{n % 50}", n, until)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read() -> None:
        try:
            for n in range(20_000):
                revocations.refuses(caller(f"user-0-{n % 50}", f"0-{n % 2000}", 0))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in range(4)]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(revocations) == 4 * 2_000 + 4 * 50
    assert all(revocations.session_revoked(f"{b}-{n}") for b in range(4) for n in range(2_000))
    assert revocations.issued_too_early("user-3-7", 1_000)
