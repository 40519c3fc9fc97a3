"""Measures the server chain against a bare grpc.aio server in the same run.

    python -m benchmarks.run [--rounds 3] [--seconds 5]

Each configuration of benchmarks/servers.py runs in its own process; h2load (Debian
package nghttp2-client) drives it from outside with unary calls. Rounds alternate the
configurations so drift on a shared machine hits all of them alike; each figure is the
median over rounds of (configuration calls/s) / (bare calls/s of the same round). The
results go to benchmarks/RESULTS.md and into README.md between the benchmark markers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from benchmarks import h2load
from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.course.v1 import course_pb2

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = (
    "/learnmesh.course.v1.CourseService/GetCourse",
    course_pb2.GetCourseRequest(course_id=str(uuid.uuid4())),
)
SIGNED_IN = (
    "/learnmesh.course.v1.CourseService/GetProgress",
    course_pb2.GetProgressRequest(course_id=str(uuid.uuid4())),
)
MARK_BEGIN, MARK_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(config: str) -> Iterator[str]:
    """Runs one configuration in its own process; yields its address once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.servers", config, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(_call(address, PUBLIC, ()))
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{config} did not start") from None
                time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(30)


async def _call(
    address: str, target: tuple[str, object], metadata: tuple[tuple[str, str], ...]
) -> None:
    """One real gRPC call of what h2load will send: h2load only sees HTTP statuses."""
    path, message = target
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString())
        await method(message, metadata=metadata, timeout=5)


async def _token(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(
                email=f"bench-{uuid.uuid4().hex[:8]}@example.com",
                password="benchmark password",
                display_name="Bench",
                accepted_terms=True,
            ),
            timeout=10,
        )
        return reply.access_token


def measure(
    address: str,
    target: tuple[str, object],
    load: h2load.Load,
    headers: tuple[tuple[str, str], ...] = (),
) -> float:
    asyncio.run(_call(address, target, headers))  # the status must be OK, not just HTTP 200
    path, message = target
    return h2load.run(f"http://{address}{path}", message, load, headers)  # type: ignore[arg-type]


@dataclass
class Round:
    bare_public: float
    bare_signed_in: float
    full_public: float
    full_signed_in: float
    full_console: float
    tracing100: float
    tracing10: float


def one_round(load: h2load.Load) -> Round:
    with server("bare") as address:
        bare_public = measure(address, PUBLIC, load)
        bare_signed_in = measure(address, SIGNED_IN, load)
    with server("full") as address:
        bearer = (("authorization", f"Bearer {asyncio.run(_token(address))}"),)
        full_public = measure(address, PUBLIC, load)
        full_signed_in = measure(address, SIGNED_IN, load, bearer)
    with server("full-console") as address:
        full_console = measure(address, PUBLIC, load)
    with server("tracing100") as address:
        tracing100 = measure(address, PUBLIC, load)
    with server("tracing10") as address:
        tracing10 = measure(address, PUBLIC, load)
    return Round(
        bare_public,
        bare_signed_in,
        full_public,
        full_signed_in,
        full_console,
        tracing100,
        tracing10,
    )


def report(rounds: list[Round], load: h2load.Load) -> str:
    def median_ratio(num: str, den: str) -> float:
        return statistics.median(getattr(r, num) / getattr(r, den) for r in rounds)

    rows = [
        ("full chain, public read (GetCourse)", "full_public", "bare_public", ">= 0.60"),
        (
            "full chain, authenticated read (GetProgress, ES256 token)",
            "full_signed_in",
            "bare_signed_in",
            ">= 0.50",
        ),
        (
            "full chain, public read, spans exported to the console",
            "full_console",
            "bare_public",
            "-",
        ),
        ("tracing link alone, 100 % sampling", "tracing100", "bare_public", ">= 0.75"),
        ("tracing link alone, 10 % sampling", "tracing10", "bare_public", ">= 0.95"),
    ]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}; h2load -c {load.clients} "
        f"-m {load.streams}, {load.seconds} s per run, {len(rounds)} rounds; "
        "median of per-round ratios.",
        "",
        "| configuration | calls/s (median) | bare calls/s (median) | ratio to bare | target |",
        "|---|---:|---:|---:|---|",
    ]
    for label, num, den, target in rows:
        lines.append(
            f"| {label} | {statistics.median(getattr(r, num) for r in rounds):,.0f} "
            f"| {statistics.median(getattr(r, den) for r in rounds):,.0f} "
            f"| {median_ratio(num, den):.2f} | {target} |"
        )
    cost100 = 1 - median_ratio("tracing100", "bare_public")
    cost10 = 1 - median_ratio("tracing10", "bare_public")
    lines += [
        "",
        f"Tracing link's own cost: {cost100:.0%} of a trivial call at 100 % sampling "
        f"(target <= 25 %), {cost10:.0%} at 10 % (target <= 5 %).",
    ]
    return "\n".join(lines)


def write(text: str) -> None:
    (ROOT / "benchmarks" / "RESULTS.md").write_text(
        "# Benchmark results\n\nMade by `python -m benchmarks.run`; do not edit by hand.\n\n"
        + text
        + "\n"
    )
    readme = ROOT / "README.md"
    content = readme.read_text()
    if MARK_BEGIN in content and MARK_END in content:
        head, rest = content.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        readme.write_text(f"{head}{MARK_BEGIN}\n{text}\n{MARK_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    load = h2load.Load(seconds=args.seconds)
    rounds = []
    for number in range(args.rounds):
        rounds.append(one_round(load))
        print(f"round {number + 1}: {rounds[-1]}", flush=True)
    text = report(rounds, load)
    print(text)
    write(text)


if __name__ == "__main__":
    main()
