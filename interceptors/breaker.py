"""Circuit breaker per target (the reference document's settings).

``failures`` failed calls in a row open the breaker; while open, calls fail fast with
UNAVAILABLE naming the target. After ``reset_timeout`` seconds it half-opens and lets a few
trial calls through: ``half_open_successes`` successes close it, one failure opens it again.
Only failures that say the target is unwell count (UNAVAILABLE, DEADLINE_EXCEEDED,
INTERNAL, UNKNOWN, DATA_LOSS); a NOT_FOUND or INVALID_ARGUMENT is a healthy answer.
The state of every breaker is the gauge ``learnmesh_circuit_breaker_state``.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Gauge

from interceptors.client import ClientConcern, method_name

TRIPPING = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)

STATE = Gauge(
    "learnmesh_circuit_breaker_state",
    "Circuit breaker state per target: 0 closed, 1 open, 2 half-open",
    ["target"],
)


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker(ClientConcern):
    def __init__(
        self,
        target: str,
        *,
        failures: int = 5,
        reset_timeout: float = 30.0,
        half_open_successes: int = 3,
        clock: Any = time.monotonic,
    ) -> None:
        self.target = target
        self.threshold = failures
        self.reset_timeout = reset_timeout
        self.needed = half_open_successes
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.successes = 0
        self.trials = 0  # calls let through while half-open and not yet finished
        self.opened_at = 0.0
        self._gauge = STATE.labels(target=target)
        self._gauge.set(State.CLOSED)

    def _move(self, state: State) -> None:
        self.state = state
        self._gauge.set(state)
        if state is State.OPEN:
            self.opened_at = self.clock()
        self.failures = self.successes = self.trials = 0

    def before(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, Any]:
        if self.state is State.OPEN:
            waited = self.clock() - self.opened_at
            if waited < self.reset_timeout:
                raise self._open_error(method_name(details), self.reset_timeout - waited)
            self._move(State.HALF_OPEN)
        if self.state is State.HALF_OPEN:
            if self.trials >= self.needed:
                raise self._open_error(method_name(details), 0.0)
            self.trials += 1
        return details, self.state

    def after(self, details: aio.ClientCallDetails, token: Any, code: grpc.StatusCode) -> None:
        if code is grpc.StatusCode.CANCELLED:
            if token is State.HALF_OPEN and self.state is State.HALF_OPEN:
                self.trials -= 1  # says nothing about the target's health
            return
        if code in TRIPPING:
            if self.state is State.HALF_OPEN or (
                self.state is State.CLOSED and self.failures + 1 >= self.threshold
            ):
                self._move(State.OPEN)
            elif self.state is State.CLOSED:
                self.failures += 1
            return
        if self.state is State.HALF_OPEN and token is State.HALF_OPEN:
            self.successes += 1
            self.trials -= 1
            if self.successes >= self.needed:
                self._move(State.CLOSED)
        elif self.state is State.CLOSED:
            self.failures = 0

    def _open_error(self, method: str, retry_in: float) -> aio.AioRpcError:
        when = f"; next trial in {retry_in:.1f} s" if retry_in > 0 else "; trial calls under way"
        return aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            aio.Metadata(),
            aio.Metadata(),
            details=f"circuit breaker open for {self.target}: not calling {method}{when}",
        )
