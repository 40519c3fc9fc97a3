"""Measures the server chain against a bare grpc.aio server in the same run.

    python -m benchmarks.run [--rounds 10] [--seconds 3]

Each configuration of benchmarks/servers.py runs in its own process, all started afresh
every round (a server nobody calls is idle); h2load (Debian package nghttp2-client)
drives one at a time from outside with unary calls. Every run of a configuration is
paired with a run of the bare server right next to it, before or after it in turn, so
the drift of a shared machine (easily ±15 % over a minute here) hits both alike. Each
figure is the median over rounds of (configuration calls/s) / (bare calls/s of its
pair); the quartiles of those ratios show the spread. The results go between the
benchmark markers of benchmarks/RESULTS.md and README.md; the rest of both is kept.
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
from pathlib import Path
from typing import Any

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


# benchmarks/RESULTS.md and README.md: the figures go between these markers, nothing else
# in either file is rewritten.
def markers(tag: str) -> tuple[str, str]:
    """The comments around one benchmark's figures (``benchmarks``, ``events``, …)."""
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


MARK_BEGIN, MARK_END = markers("benchmarks")
RESULTS_HEAD = (
    "# Benchmark results\n\nBetween the markers: made by `python -m benchmarks.run`, which "
    "rewrites only that part; text outside them is kept.\n\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def servers(
    configs: tuple[str, ...],
    env: dict[str, str] | None = None,
    probe: tuple[str, object] = PUBLIC,
) -> Iterator[dict[str, str]]:
    """Runs each configuration in its own process (``env`` added to this one's); yields
    their addresses once all answer ``probe`` with OK."""
    procs: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    try:
        for config in configs:
            port = free_port()
            procs[config] = (
                f"127.0.0.1:{port}",
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.servers", config, "--port", str(port)],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "GRPC_VERBOSITY": "ERROR", **(env or {})},
                ),
            )
        deadline = time.monotonic() + 60
        for config, (address, proc) in procs.items():
            while True:
                try:
                    asyncio.run(_call(address, probe, ()))
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{config} did not start") from None
                    time.sleep(0.2)
        yield {config: address for config, (address, _) in procs.items()}
    finally:
        for _, proc in procs.values():
            proc.terminate()
        for _, proc in procs.values():
            proc.wait(30)


async def _call(
    address: str, target: tuple[str, object], metadata: tuple[tuple[str, str], ...]
) -> None:
    """One real gRPC call of what h2load will send: h2load only sees HTTP statuses."""
    path, message = target
    async with grpc.aio.insecure_channel(address) as channel:
        method: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = channel.unary_unary(
            path, request_serializer=lambda m: m.SerializeToString()
        )
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


# (name, server configuration, call, signed in?, the bare run it is compared with)
RUNS = (
    ("full_public", "full", PUBLIC, False, "bare_public"),
    ("full_signed_in", "full", SIGNED_IN, True, "bare_signed_in"),
    ("full_console", "full-console", PUBLIC, False, "bare_public"),
    ("chain", "chain", PUBLIC, False, "bare_public"),
    ("tracing100", "tracing100", PUBLIC, False, "bare_public"),
    ("tracing10", "tracing10", PUBLIC, False, "bare_public"),
)
BARE_CALLS = {"bare_public": PUBLIC, "bare_signed_in": SIGNED_IN}
CONFIGS = ("bare", *dict.fromkeys(config for _, config, _, _, _ in RUNS))

# A round: run name -> (calls/s, calls/s of the bare server measured right next to it)
Round = dict[str, tuple[float, float]]


def rounds_of(load: h2load.Load, count: int) -> Iterator[Round]:
    """``count`` rounds; in each, every run is measured right after (or, every other round,
    right before) the bare server making the same call.

    Every round starts fresh server processes: one process can run a few percent faster or
    slower than another of the same code for its whole life (memory layout, hash seed), a
    bias that repeating runs against the same processes would never average out.
    """
    for number in range(count):
        with servers(CONFIGS) as addresses:
            bearer = (("authorization", f"Bearer {asyncio.run(_token(addresses['full']))}"),)
            found: Round = {}
            for name, config, target, signed_in, bare in RUNS:
                pair = [
                    (config, target, bearer if signed_in else ()),
                    ("bare", BARE_CALLS[bare], ()),
                ]
                if number % 2:
                    pair.reverse()
                rates = {c: measure(addresses[c], call, load, h) for c, call, h in pair}
                found[name] = (rates[config], rates["bare"])
        yield found


def report(rounds: list[Round], load: h2load.Load) -> str:
    def ratios(name: str) -> list[float]:
        return [r[name][0] / r[name][1] for r in rounds]

    def median_ratio(name: str) -> float:
        return statistics.median(ratios(name))

    def spread(name: str) -> str:
        found = ratios(name)
        if len(found) < 2:
            return "-"
        low, _, high = statistics.quantiles(found, n=4)
        return f"{low:.2f}-{high:.2f}"

    rows = [
        ("full chain, public read (GetCourse)", "full_public", ">= 0.60"),
        ("full chain, authenticated read (GetProgress, ES256 token)", "full_signed_in", ">= 0.50"),
        ("full chain, public read, spans exported to the console", "full_console", "-"),
        ("the chain with no link (generic handlers)", "chain", "-"),
        ("tracing link alone, 100 % sampling", "tracing100", ">= 0.75"),
        ("tracing link alone, 10 % sampling", "tracing10", ">= 0.95"),
    ]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}; h2load -c {load.clients} "
        f"-m {load.streams}, {load.seconds} s per run, {len(rounds)} rounds; each run is "
        "paired with a run of the bare server right next to it; median of the pairs' ratios "
        "(and their quartiles).",
        "",
        "| configuration | calls/s (median) | bare calls/s (median) | ratio to bare "
        "| quartiles | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, name, target in rows:
        lines.append(
            f"| {label} | {statistics.median(r[name][0] for r in rounds):,.0f} "
            f"| {statistics.median(r[name][1] for r in rounds):,.0f} "
            f"| {median_ratio(name):.2f} | {spread(name)} | {target} |"
        )

    def against_chain(name: str) -> float:
        """The link's ratio to the chain without it, round by round (each against its bare
        pair, so the drift between the two runs cancels out)."""
        return statistics.median(
            (r[name][0] / r[name][1]) / (r["chain"][0] / r["chain"][1]) for r in rounds
        )

    cost100 = 1 - median_ratio("tracing100")
    cost10 = 1 - median_ratio("tracing10")
    lines += [
        "",
        f"Tracing link's own cost: {cost100:.0%} of a trivial call at 100 % sampling "
        f"(target <= 25 %), {cost10:.0%} at 10 % (target <= 5 %). Against the chain with "
        f"no link instead of the bare server: {1 - against_chain('tracing100'):.0%} and "
        f"{1 - against_chain('tracing10'):.0%}.",
    ]
    return "\n".join(lines)


def between_markers(content: str, text: str, tag: str = "benchmarks") -> str:
    """``content`` with what lies between the ``tag`` markers replaced by ``text``;
    everything outside the markers is kept as it was. ValueError unless each marker is
    there exactly once, the beginning first."""
    begin, end = markers(tag)
    if content.count(begin) != 1 or content.count(end) != 1:
        raise ValueError(f"expected one {begin} and one {end}")
    head, rest = content.split(begin)
    if end not in rest:
        raise ValueError(f"{end} comes before {begin}")
    _, tail = rest.split(end)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def write(text: str, root: Path = ROOT, tag: str = "benchmarks") -> None:
    """Puts ``text`` between the markers of benchmarks/RESULTS.md (made with them when
    missing, the marked section added at its end when it has none) and of README.md (left
    alone without them); nothing outside the markers is touched, and neither file is
    written when either one's markers are broken."""
    results, readme = root / "benchmarks" / "RESULTS.md", root / "README.md"
    begin, end = markers(tag)
    content = results.read_text() if results.exists() else RESULTS_HEAD
    if begin not in content and end not in content:
        content = f"{content.rstrip()}\n\n{begin}\n{end}\n"
    updates = {results: between_markers(content, text, tag)}
    content = readme.read_text()
    if begin in content or end in content:
        updates[readme] = between_markers(content, text, tag)
    else:
        print(f"README.md has no {begin} … {end}: not updated", file=sys.stderr)
    for path, updated in updates.items():
        path.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    load = h2load.Load(seconds=args.seconds)
    rounds = []
    for number, found in enumerate(rounds_of(load, args.rounds), start=1):
        rounds.append(found)
        figures = ", ".join(f"{name} {a:,.0f}/{b:,.0f}" for name, (a, b) in found.items())
        print(f"round {number}: {figures}", flush=True)
    text = report(rounds, load)
    print(text)
    write(text)


if __name__ == "__main__":
    main()
