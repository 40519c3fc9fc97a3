"""Kept only while tests/test_telemetry.py (changed on another branch right now) runs
``python -m tests.traced_server``: the same as ``python -m tests.support.double_process
--traced``. Delete it once that test starts B through tests.support.processes."""

from __future__ import annotations

import asyncio

from tests.support.double_process import main

if __name__ == "__main__":
    asyncio.run(main(["--traced"]))
