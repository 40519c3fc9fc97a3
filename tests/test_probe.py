"""`learnmesh health` as operators run it: a real process against real servers.

Exit codes as grpc_health_probe's: 0 serving, 1 bad arguments, 2 connection failure,
3 RPC failure, 4 not serving. TLS cases use the tests' CA (tests.support.authority).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learnmesh import probe
from learnmesh.admin import start_admin
from learnmesh.course.v1 import course_pb2_grpc
from tests.support.authority import Authority
from tests.support.doubles import CourseDouble
from tests.support.processes import Finished, run_to_end

PROBE = [sys.executable, "-m", "learnmesh.probe"]
COURSE = "learnmesh.course.v1.CourseService"
FILES = "learnmesh.file.v1.FileService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def run_probe(*args: str) -> Finished:
    return await run_to_end([*PROBE, *args])


@dataclass
class Files:
    ca: str
    cert: str
    key: str
    foreign_cert: str
    foreign_key: str


# Servers


@dataclass
class Servers:
    plain: int  # health: "" and course SERVING, files NOT_SERVING
    no_health: int  # a server without grpc.health.v1.Health
    slow: int  # health that never answers in time
    mtls: int  # health behind mTLS (client certificate required)
    silent: int  # a TCP port that accepts and never speaks
    admin: int  # the plain server's admin port
    files: Files


class SlowHealth(health.aio.HealthServicer):
    async def Check(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await asyncio.sleep(30)
        return await super().Check(request, context)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
async def servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Servers]:
    tmp: Path = tmp_path_factory.mktemp("probe-certs")
    ca = Authority(tmp / "ours")
    client = ca.issue("probe", kind="client")
    foreign = Authority(tmp / "another").issue("probe", kind="client")
    paths = {
        "ca": str(ca.ca_file),
        "cert": str(client.cert),
        "key": str(client.key),
        "foreign_cert": str(foreign.cert),
        "foreign_key": str(foreign.key),
    }

    servicer = health.aio.HealthServicer()
    await servicer.set(COURSE, SERVING)
    await servicer.set(FILES, NOT_SERVING)
    plain = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, plain)
    plain_port = plain.add_insecure_port("127.0.0.1:0")

    no_health = aio.server()
    course_pb2_grpc.add_CourseServiceServicer_to_server(CourseDouble(), no_health)
    no_health_port = no_health.add_insecure_port("127.0.0.1:0")

    slow = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(), slow)
    slow_port = slow.add_insecure_port("127.0.0.1:0")

    mtls = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, mtls)
    mtls_port = mtls.add_secure_port("127.0.0.1:0", ca.server_credentials("server"))

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    for server in (plain, no_health, slow, mtls):
        await server.start()
    admin = await start_admin("127.0.0.1", 0, servicer)
    try:
        yield Servers(
            plain=plain_port,
            no_health=no_health_port,
            slow=slow_port,
            mtls=mtls_port,
            silent=silent.sockets[0].getsockname()[1],
            admin=admin.port,
            files=Files(**paths),
        )
    finally:
        await admin.stop()
        silent.close()
        for server in (plain, no_health, slow, mtls):
            await server.stop(0)


# Plaintext


async def test_serving_server_exits_0(servers: Servers) -> None:
    outcome = await run_probe(f"127.0.0.1:{servers.plain}")
    assert (outcome.code, outcome.out, outcome.err) == (0, "status: SERVING\n", "")


async def test_serving_service_exits_0(servers: Servers) -> None:
    outcome = await run_probe(f"localhost:{servers.plain}", COURSE)
    assert (outcome.code, outcome.out) == (0, "status: SERVING\n")


async def test_admin_port_answers_the_probe(servers: Servers) -> None:
    outcome = await run_probe(f"127.0.0.1:{servers.admin}", COURSE)
    assert (outcome.code, outcome.out) == (0, "status: SERVING\n")


async def test_not_serving_service_exits_4(servers: Servers) -> None:
    outcome = await run_probe(f"127.0.0.1:{servers.plain}", FILES)
    assert outcome.code == 4
    assert outcome.err == f"service '{FILES}' is not serving: status NOT_SERVING\n"
    assert outcome.out == ""


async def test_unknown_service_exits_3(servers: Servers) -> None:
    outcome = await run_probe(f"127.0.0.1:{servers.plain}", "no.such.v1.Service")
    assert outcome.code == 3
    assert outcome.err == (
        "error: health rpc failed with NOT_FOUND: "
        "the server does not know service 'no.such.v1.Service'\n"
    )


async def test_server_without_health_exits_3(servers: Servers) -> None:
    outcome = await run_probe(f"127.0.0.1:{servers.no_health}")
    assert outcome.code == 3
    assert "UNIMPLEMENTED" in outcome.err and "grpc.health.v1.Health" in outcome.err


async def test_health_that_does_not_answer_in_time_exits_3(servers: Servers) -> None:
    started = asyncio.get_running_loop().time()
    outcome = await run_probe("--timeout", "1", f"127.0.0.1:{servers.slow}")
    assert outcome.code == 3
    assert outcome.err == "error: health rpc failed with DEADLINE_EXCEEDED: no answer within 1s\n"
    assert asyncio.get_running_loop().time() - started < 10


async def test_refused_connection_exits_2() -> None:
    port = free_port()
    outcome = await run_probe(f"127.0.0.1:{port}")
    assert outcome.code == 2
    assert outcome.err.startswith(f"error: cannot connect to 127.0.0.1:{port}: ")
    assert "Connection refused" in outcome.err
    assert outcome.err.count("\n") == 1


async def test_no_connection_within_timeout_exits_2(servers: Servers) -> None:
    started = asyncio.get_running_loop().time()
    outcome = await run_probe("--timeout", "1", f"127.0.0.1:{servers.silent}")
    elapsed = asyncio.get_running_loop().time() - started
    assert outcome.code == 2
    assert outcome.err == f"error: no connection to 127.0.0.1:{servers.silent} within 1s\n"
    assert elapsed < 10


# Bad arguments


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "the following arguments are required: address"),
        (["nonsense"], "address 'nonsense' is not host:port"),
        (["127.0.0.1"], "address '127.0.0.1' is not host:port"),
        (["127.0.0.1:99999"], "port must be from 1 to 65535"),
        (["127.0.0.1:1", "svc", "extra"], "unrecognized arguments: extra"),
        (["--bogus", "127.0.0.1:1"], "unrecognized arguments: --bogus"),
        (["--timeout", "0", "127.0.0.1:1"], "--timeout must be greater than 0"),
        (["--timeout", "soon", "127.0.0.1:1"], "argument --timeout: invalid float value"),
        (["--tls", "--ca", "/no/such/ca.pem", "127.0.0.1:1"], "cannot read CA file /no/such"),
        (["--ca", "{ca}", "127.0.0.1:1"], "--ca given without --tls"),
        (["--server-name", "x", "127.0.0.1:1"], "--server-name given without --tls"),
        (["--tls", "--cert", "{cert}", "127.0.0.1:1"], "--cert and --key go together"),
        (["--tls", "--cert", "{cert}", "--key", "/no/key", "127.0.0.1:1"], "cannot read key"),
    ],
)
async def test_bad_arguments_exit_1(servers: Servers, args: list[str], says: str) -> None:
    files = vars(servers.files)
    outcome = await run_probe(*(arg.format(**files) for arg in args))
    assert outcome.code == 1, outcome
    assert says in outcome.err
    assert outcome.out == ""


# TLS


async def test_mtls_with_client_certificate_exits_0(servers: Servers) -> None:
    f = servers.files
    for host in ("127.0.0.1", "localhost"):
        outcome = await run_probe(
            "--tls", "--ca", f.ca, "--cert", f.cert, "--key", f.key, f"{host}:{servers.mtls}"
        )
        assert (outcome.code, outcome.out) == (0, "status: SERVING\n"), outcome
    outcome = await run_probe(
        "--tls", "--ca", f.ca, "--cert", f.cert, "--key", f.key, f"127.0.0.1:{servers.mtls}", FILES
    )
    assert outcome.code == 4


async def test_mtls_without_client_certificate_exits_2(servers: Servers) -> None:
    outcome = await run_probe("--tls", "--ca", servers.files.ca, f"127.0.0.1:{servers.mtls}")
    assert outcome.code == 2, outcome
    assert outcome.err.startswith(f"error: cannot connect to 127.0.0.1:{servers.mtls}: ")


async def test_mtls_with_certificate_from_another_ca_exits_2(servers: Servers) -> None:
    f = servers.files
    outcome = await run_probe(
        "--tls", "--ca", f.ca, "--cert", f.foreign_cert, "--key", f.foreign_key,
        f"127.0.0.1:{servers.mtls}",
    )  # fmt: skip
    assert outcome.code == 2, outcome


async def test_server_name_is_verified(servers: Servers) -> None:
    f = servers.files
    tls = ("--tls", "--ca", f.ca, "--cert", f.cert, "--key", f.key)
    outcome = await run_probe(*tls, "--server-name", "wrong.example", f"127.0.0.1:{servers.mtls}")
    assert outcome.code == 2, outcome
    outcome = await run_probe(*tls, "--server-name", "localhost", f"127.0.0.1:{servers.mtls}")
    assert outcome.code == 0, outcome


async def test_server_not_trusted_without_its_ca_exits_2(servers: Servers) -> None:
    f = servers.files
    outcome = await run_probe(
        "--tls", "--cert", f.cert, "--key", f.key, f"127.0.0.1:{servers.mtls}"
    )
    assert outcome.code == 2, outcome


async def test_plaintext_against_tls_and_tls_against_plaintext_exit_2(servers: Servers) -> None:
    assert (await run_probe(f"127.0.0.1:{servers.mtls}")).code == 2
    assert (
        await run_probe("--tls", "--ca", servers.files.ca, f"127.0.0.1:{servers.plain}")
    ).code == 2


# Wiring into the learnmesh command


def cli_parser() -> argparse.ArgumentParser:
    """A parser shaped like learnmesh.cli's, with the probe added as a subcommand."""
    parser = argparse.ArgumentParser(prog="learnmesh")
    parser.add_argument("--config")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up")
    probe.add_parser(commands)
    return parser


def test_subcommand_parses_every_flag() -> None:
    args = cli_parser().parse_args(
        [
            "health",
            "mesh.internal:50051",
            COURSE,
            "--tls",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--server-name",
            "auth",
            "--timeout",
            "2.5",
        ]
    )
    assert args.command == "health"
    assert (args.address, args.service, args.tls, args.timeout) == (
        "mesh.internal:50051",
        COURSE,
        True,
        2.5,
    )
    assert (args.ca, args.cert, args.key, args.server_name) == ("ca.pem", "c.pem", "k.pem", "auth")
    defaults = cli_parser().parse_args(["health", "h:1"])
    assert (defaults.service, defaults.tls, defaults.timeout, defaults.ca) == ("", False, 5.0, None)


@pytest.mark.parametrize(
    "argv", [["health"], ["health", "h:1", "svc", "extra"], ["health", "h:1", "--bogus"]]
)
def test_subcommand_bad_arguments_exit_1(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_parser().parse_args(argv)
    assert caught.value.code == 1
    assert "learnmesh health: error:" in capsys.readouterr().err


def test_run_reports_bad_arguments_with_1(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_parser().parse_args(["health", "h:1", "--timeout", "-1"])
    assert probe.run(args) == 1
    assert capsys.readouterr().err == "error: --timeout must be greater than 0\n"
