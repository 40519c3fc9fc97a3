"""TOTP codes as an authenticator app computes them, timed so a test's codes stay valid."""

from __future__ import annotations

import asyncio
import time

import pyotp

STEP = 30


async def start_of_a_quiet_step(seconds_needed: float = 6.0) -> int:
    """The current TOTP step, after waiting for a fresh one if this one ends too soon, so
    the codes a test computes stay inside the server's ±1-step window throughout."""
    left = STEP - time.time() % STEP
    if left < seconds_needed:
        await asyncio.sleep(left + 0.05)
    return int(time.time() // STEP)


def code_at(secret: str, step: int) -> str:
    return pyotp.TOTP(secret, interval=STEP).at(step * STEP)
