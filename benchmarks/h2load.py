"""Drives unary gRPC calls with h2load (Debian package nghttp2-client) from outside.

h2load speaks gRPC when given the 5-byte length-prefixed message as its body and the
``content-type: application/grpc`` and ``te: trailers`` headers. It only counts HTTP
statuses, so the caller checks the gRPC status of the same call separately.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message


@dataclass(frozen=True)
class Load:
    clients: int = 4
    streams: int = 16
    seconds: int = 5
    warmup: int = 1


def grpc_frame(message: Message) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def h2load_path() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    return found


def run(url: str, message: Message, load: Load, headers: tuple[tuple[str, str], ...] = ()) -> float:
    """Calls per second that h2load sustained against ``url`` (a /pkg.Service/Method URL)."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as body:
        body.write(grpc_frame(message))
    args = [
        h2load_path(),
        f"-c{load.clients}",
        f"-m{load.streams}",
        f"-D{load.seconds}",
        f"--warm-up-time={load.warmup}",
        "-d",
        body.name,
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    for key, value in headers:
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=False)
    Path(body.name).unlink(missing_ok=True)
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out.stdout)
    failed = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed", out.stdout
    )
    if rate is None or failed is None or int(failed.group(1)) > 0:
        raise RuntimeError(f"h2load failed:\n{out.stdout}\n{out.stderr}")
    return float(rate.group(1))
