"""The server deadline's timers: calls sharing a slot share one loop timer, and a call is
cancelled no earlier than its deadline and at most one slot late."""

from __future__ import annotations

import asyncio

import pytest

from interceptors.deadline import _Timer, current_deadline


async def _sleeper(seconds: float, ended: dict[int, float], key: int) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with _Timer(seconds) as timer:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            assert timer.fired
            ended[key] = loop.time() - started
            return


async def test_calls_in_one_slot_share_a_loop_timer_and_end_on_time() -> None:
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    ended: dict[int, float] = {}
    tasks = [asyncio.create_task(_sleeper(0.3, ended, i)) for i in range(50)]
    await asyncio.sleep(0)  # every task has entered its timer
    timers = len(loop._scheduled) - before  # type: ignore[attr-defined]
    # 50 sleeps (one loop timer each) plus the deadline timers: a slot is 3 ms wide here,
    # so the 50 calls made within a moment share one or two.
    assert timers <= 50 + 2
    await asyncio.gather(*tasks)
    assert len(ended) == 50
    assert all(0.3 <= took < 0.3 + 0.003 + 0.05 for took in ended.values()), ended


async def test_a_call_that_finishes_in_time_is_not_cancelled_later() -> None:
    with _Timer(0.05) as timer:
        assert current_deadline() is not None
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.1)  # past the slot: nothing fires into this task any more
    assert not timer.fired


@pytest.mark.parametrize("seconds", [0.001, 0.02, 1.0, 30.0])
async def test_slots_never_end_before_the_deadline(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    with _Timer(seconds) as timer:
        due_ms = next(due for due, members in _members(timer) if timer in members)
        assert due_ms / 1000 >= loop.time() + seconds - 0.001
        assert due_ms / 1000 <= loop.time() + seconds + 0.05 + 0.001


def _members(timer: _Timer) -> list[tuple[int, set[_Timer]]]:
    from interceptors.deadline import _slots_of

    return list(_slots_of(asyncio.get_running_loop()).slots.items())
