"""How tests run other processes: the one way to start a server in one (run its command,
read its output until it says it is ready, learn its port from what it printed, kill it
afterwards), and running a command to its end."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
# What tests/support/double_process.py (and any server started here by default) prints.
PORT_LINE = re.compile(r"^port (\d+)$", re.MULTILINE)
# For a server to say it is ready, or a command to end (a cold interpreter importing grpc).
START_SECONDS = 60
STOP_SECONDS = 30


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    port: int
    # Its output up to the line that said it was ready (stdout, and stderr when merged).
    lines: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, signum: int = signal.SIGTERM) -> tuple[str, str]:
        """Sends ``signum``, then returns what it printed afterwards (stdout, stderr) once
        it has exited."""
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        out, err = await asyncio.wait_for(self.proc.communicate(), STOP_SECONDS)
        return out.decode(), (err or b"").decode()


class Finished(NamedTuple):
    code: int
    out: str
    err: str


def python_module(module: str, *args: str) -> list[str]:
    """The command running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@asynccontextmanager
async def server_process(
    command: list[str],
    *,
    env: Mapping[str, str] | None = None,
    ready: re.Pattern[str] = PORT_LINE,
    port: re.Pattern[str] = PORT_LINE,
    merge_stderr: bool = False,
) -> AsyncIterator[ServerProcess]:
    """Starts ``command`` in the repository's root, waits for a line matching ``ready``,
    finds its port with ``port`` (group 1) in the output so far, and yields it. On the way
    out a process still running is killed (SIGKILL: nothing is flushed, as in a crash)."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"} if env is None else dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(START_SECONDS):
            while not (lines and ready.search(lines[-1])):
                raw = await proc.stdout.readline()
                if not raw:
                    error = b"" if proc.stderr is None else await proc.stderr.read()
                    raise AssertionError(
                        f"{command} exited before it was ready:\n{''.join(lines)}"
                        f"{error.decode()[-4000:]}"
                    )
                lines.append(raw.decode())
        found = port.search("".join(lines))
        assert found, f"{command} named no port:\n{''.join(lines)}"
        yield ServerProcess(proc, int(found.group(1)), lines)
    finally:
        if proc.returncode is None:
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def run_to_end(command: list[str], *, env: Mapping[str, str] | None = None) -> Finished:
    """Runs a command that ends by itself (the CLI's one-shot commands, the probe)."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=None if env is None else dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), START_SECONDS)
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(), err.decode())
