"""Deadlines: kept, defaulted and capped on the server; propagated to outbound calls.

Server side: a call without a deadline gets the method's default, a longer one is cut to
the method's cap, and one already past ends with DEADLINE_EXCEEDED before the handler runs.
The deadline starts when the call does: the request of a unary-request call is read under
it (see ``interceptors.requests``), so a request that never arrives ends at the deadline
too. A caller's own deadline is kept a few milliseconds short (``_early``), so the server's
DEADLINE_EXCEEDED, with its trailers and request id, arrives before the caller's timer
would end the call without them. The handler runs under that deadline, so when it passes
(or the caller cancels, which
grpc.aio delivers as cancellation) the handler's work, database calls included, is
cancelled. A handler that returns after its deadline (a loop timer fires a little late)
also ends with DEADLINE_EXCEEDED rather than an answer its caller no longer waits for, so
a deadline shorter than the call's own work fails every time, not only when a timer
happens to win the race; what the handler did stands, as with any missed deadline.

Client side: grpc Python does not propagate deadlines, so an outbound call made while
serving one gets min(its own timeout, the inbound remaining time minus a small margin),
and fails at once with DEADLINE_EXCEEDED when nothing is left.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio

from interceptors.client import ClientConcern, method_name, replace_details
from interceptors.link import Behavior, ServerLink
from interceptors.method import MethodInfo
from interceptors.requests import PendingRequest
from interceptors.shapes import stream_of
from learnmesh.kernel.errors import DeadlineExceeded

# Absolute time.monotonic() deadline of the call being served, for outbound propagation.
_deadline: ContextVar[float | None] = ContextVar("learnmesh_deadline", default=None)
# grpc reports "no deadline" as None or as a huge number, depending on the version.
_NO_DEADLINE = 10 * 365 * 24 * 3600


def current_deadline() -> float | None:
    return _deadline.get()


def remaining() -> float | None:
    """Seconds left for the call being served, or None outside a call."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def _slot_ms(seconds: float) -> int:
    """The width of the deadline slot (ms) a deadline ``seconds`` away joins: a hundredth
    of it, between 1 and 50 ms (see ``_Slots``)."""
    return min(max(int(seconds * 10), 1), 50)


def _early(left: float) -> float:
    """How much sooner than the caller's own deadline the server gives up, so that its
    DEADLINE_EXCEEDED (with the call's trailers: the request id) reaches the caller before
    the caller's timer ends the call on its own: two deadline slots and 2 ms for the
    network, at most half the time left."""
    return min(2 * _slot_ms(left) / 1000 + 0.002, left / 2)


class Deadline(ServerLink):
    """Keeps, defaults and caps the deadline of every call; reads the request of a
    unary-request call under it, so a request that never arrives ends at the deadline."""

    reads_request = True

    def __init__(
        self, default: float, cap: float, methods: Mapping[str, tuple[float, float]] | None = None
    ) -> None:
        self.default = default
        self.cap = cap
        self.methods = dict(methods or {})

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        default, cap = self.methods.get(method.full_method, (self.default, self.cap))
        name = method.name

        def budget(context: aio.ServicerContext[Any, Any]) -> float:
            left: float | None = context.time_remaining()
            if left is None or left > _NO_DEADLINE:
                return default
            if left <= 0:
                raise DeadlineExceeded(f"{name}: the caller's deadline had passed on arrival")
            return min(left - _early(left), cap)

        def exceeded(seconds: float) -> DeadlineExceeded:
            return DeadlineExceeded(f"{name} did not finish within its deadline of {seconds:.3g} s")

        if method.kind in ("unary_unary", "stream_unary"):

            async def unary_response(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                seconds = budget(context)
                with _Timer(seconds) as timer:
                    try:
                        if type(request) is PendingRequest:
                            request = await request.read()
                        response = await behavior(request, context)
                    except asyncio.CancelledError:
                        if timer.fired:
                            raise exceeded(seconds) from None
                        raise
                    if timer.overdue():
                        raise exceeded(seconds)
                    return response

            return unary_response

        async def streaming_response(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            seconds = budget(context)
            with _Timer(seconds) as timer:
                try:
                    if type(request) is PendingRequest:
                        request = await request.read()
                    async for message in stream_of(behavior(request, context)):
                        yield message
                except asyncio.CancelledError:
                    if timer.fired:
                        raise exceeded(seconds) from None
                    raise
                if timer.overdue():
                    raise exceeded(seconds)

        return streaming_response


class _Timer:
    """Cancels the current task when ``seconds`` have passed and records the deadline for
    outbound calls.

    Lighter than asyncio.timeout, which matters on every call: a loop timer per call would
    sit, cancelled, in the loop's heap until its time came (a 10 s default at thousands of
    calls a second keeps tens of thousands there, and every push walks that heap), so calls
    whose deadlines fall in one slot share a single loop timer (``_Slots``).
    """

    __slots__ = ("due", "fired", "slot", "task")

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self.due = due = time.monotonic() + seconds
        _deadline.set(due)
        self.task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self.slot = _slots_of(loop).join(self, seconds, loop)

    def overdue(self) -> bool:
        """The deadline has passed (whether or not the slot's loop timer has fired yet)."""
        return self.fired or time.monotonic() >= self.due

    def fire(self) -> None:
        self.fired = True
        if self.task is not None:
            self.task.cancel()

    def __enter__(self) -> _Timer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.slot.discard(self)
        if self.fired and self.task is not None:
            self.task.uncancel()


class _Slots:
    """Deadline slots of one event loop: each slot is a set of timers with one loop timer.

    A slot is as long as a hundredth of the deadline, between 1 ms and 50 ms, and a timer
    joins the slot that ends at or after its deadline: a call is cancelled at most that
    late (50 ms on a 10 s default), never early.
    """

    def __init__(self) -> None:
        self.slots: dict[int, set[_Timer]] = {}  # slot end, in whole ms of loop time -> timers

    def join(self, timer: _Timer, seconds: float, loop: asyncio.AbstractEventLoop) -> set[_Timer]:
        width = _slot_ms(seconds)
        due = math.ceil((loop.time() + seconds) * 1000 / width) * width
        members = self.slots.get(due)
        if members is None:
            members = self.slots[due] = set()
            loop.call_at(due / 1000, self._fire, due)
        members.add(timer)
        return members

    def _fire(self, due: int) -> None:
        for timer in self.slots.pop(due, ()):
            timer.fire()


# Per loop, held weakly so a closed loop goes away with its slots.
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = weakref.WeakKeyDictionary()
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], _Slots] | None = None


def _slots_of(loop: asyncio.AbstractEventLoop) -> _Slots:
    """The loop's slots; the last loop's are found without the weak-dictionary lookup."""
    global _last
    last = _last
    if last is not None and last[0]() is loop:
        return last[1]
    found = _slots.get(loop)
    if found is None:
        found = _slots[loop] = _Slots()
    _last = (weakref.ref(loop), found)
    return found


def deadline_exceeded_error(method: str) -> aio.AioRpcError:
    return aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        aio.Metadata(),
        aio.Metadata(),
        details=f"no time left to call {method}: the call being served is out of time",
    )


class DeadlinePropagation(ClientConcern):
    """Shortens outbound timeouts to what the inbound call has left (minus ``margin``)."""

    def __init__(self, margin: float = 0.05) -> None:
        self.margin = margin

    def before(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, Any]:
        deadline = _deadline.get()
        if deadline is None:
            return details, None
        left = deadline - time.monotonic() - self.margin
        if left <= 0:
            raise deadline_exceeded_error(method_name(details))
        timeout = details.timeout
        if timeout is None or timeout > left:
            details = replace_details(details, timeout=left)
        return details, None
