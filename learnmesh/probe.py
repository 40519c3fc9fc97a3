"""``learnmesh health ADDRESS [SERVICE]``: a one-shot gRPC health probe.

Behaves like grpc_health_probe so operators can use it in Kubernetes exec probes and
scripts: it prints one line and exits 0 when the service is SERVING, 1 on bad arguments
(unreadable files and bad addresses included), 2 when it cannot connect (refused, TLS
handshake failed, no connection within the timeout), 3 when the health RPC fails (for
example NOT_FOUND for a service the server does not know), 4 when the service is not
serving.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_BAD_ARGUMENTS = 1
EXIT_CONNECTION_FAILURE = 2
EXIT_RPC_FAILURE = 3
EXIT_NOT_SERVING = 4

# gRPC target schemes passed through as they are; anything else must be host:port.
_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d+)")


class BadArguments(Exception):
    """The command line cannot be used; the message says why."""


@dataclass(frozen=True)
class ProbeTarget:
    """What to probe and how to connect, with certificate files already read."""

    address: str
    service: str = ""
    timeout: float = 5.0
    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""


@dataclass(frozen=True)
class ProbeResult:
    exit_code: int
    message: str


def check_address(address: str) -> str:
    """``host:port`` (``[v6]:port``) with a port from 1 to 65535, or a gRPC target URI."""
    if address.startswith(_SCHEMES):
        return address
    found = _HOST_PORT.fullmatch(address)
    if found is None:
        raise BadArguments(f"address {address!r} is not host:port")
    if not 1 <= int(found["port"]) <= 65535:
        raise BadArguments(f"address {address!r}: port must be from 1 to 65535")
    return address


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise BadArguments(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def target_from(args: argparse.Namespace) -> ProbeTarget:
    """Checks the parsed arguments and reads the certificate files (before any event loop)."""
    if not args.timeout > 0:
        raise BadArguments("--timeout must be greater than 0")
    if not args.tls:
        given = [flag for flag, value in _tls_flags(args) if value is not None]
        if given:
            raise BadArguments(f"{', '.join(given)} given without --tls")
    if (args.cert is None) != (args.key is None):
        raise BadArguments("--cert and --key go together (the client certificate and its key)")
    return ProbeTarget(
        address=check_address(args.address),
        service=args.service,
        timeout=args.timeout,
        tls=args.tls,
        ca=_read(args.ca, "CA file"),
        cert=_read(args.cert, "certificate file"),
        key=_read(args.key, "key file"),
        server_name=args.server_name or "",
    )


def _tls_flags(args: argparse.Namespace) -> list[tuple[str, Any]]:
    return [
        ("--ca", args.ca),
        ("--cert", args.cert),
        ("--key", args.key),
        ("--server-name", args.server_name),
    ]


def _channel(target: ProbeTarget) -> aio.Channel:
    if not target.tls:
        return aio.insecure_channel(target.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=target.ca, private_key=target.key, certificate_chain=target.cert
    )
    options = []
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    return aio.secure_channel(target.address, credentials, options=options)


async def _connect(channel: aio.Channel, deadline: float) -> bool:
    """Waits for the channel to be READY or to fail; False only when time ran out first.

    Like grpc_health_probe, a one-shot probe does not wait out reconnection backoff: on a
    refused connection or failed handshake the health call is made at once, and fails fast
    with UNAVAILABLE and gRPC's reason."""
    state = channel.get_state(try_to_connect=True)
    while state not in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return True


async def probe(target: ProbeTarget) -> ProbeResult:
    """Connects, calls grpc.health.v1.Health/Check once, and says what that means."""
    deadline = time.monotonic() + target.timeout
    what = f"service {target.service!r}" if target.service else "the server"
    async with _channel(target) as channel:
        if not await _connect(channel, deadline):
            return ProbeResult(
                EXIT_CONNECTION_FAILURE,
                f"error: no connection to {target.address} within {target.timeout:g}s",
            )
        try:
            # types-grpcio-health-checking's HealthStub declares no methods.
            reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=target.service),
                timeout=max(deadline - time.monotonic(), 0.001),
            )
        except grpc.aio.AioRpcError as err:
            return _failure(err, target, what)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return ProbeResult(EXIT_SERVING, f"status: {status}")
    return ProbeResult(EXIT_NOT_SERVING, f"{what} is not serving: status {status}")


def _failure(err: grpc.aio.AioRpcError, target: ProbeTarget, what: str) -> ProbeResult:
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        # No connection (refused, handshake failed), or it broke under the call.
        return ProbeResult(
            EXIT_CONNECTION_FAILURE,
            f"error: cannot connect to {target.address}: {err.details() or 'unavailable'}",
        )
    if code == grpc.StatusCode.NOT_FOUND:
        detail = f": the server does not know {what}"
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        detail = ": the server does not implement grpc.health.v1.Health"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        detail = f": no answer within {target.timeout:g}s"
    else:
        detail = f" ({err.details()})" if err.details() else ""
    return ProbeResult(EXIT_RPC_FAILURE, f"error: health rpc failed with {code.name}{detail}")


def _exit_one_on_bad_arguments(parser: argparse.ArgumentParser) -> None:
    """argparse exits 2 on bad arguments, but a health probe's 2 means "cannot connect":
    make this parser exit 1 instead, unrecognised arguments included (left to a parent
    parser, they would exit 2)."""

    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        parser.exit(EXIT_BAD_ARGUMENTS, f"{parser.prog}: error: {message}\n")

    parse_known = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = parse_known(args, namespace)
        if extra:
            error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the probe's arguments to ``parser``."""
    parser.add_argument("address", help="host:port of the gRPC server (or its admin port)")
    parser.add_argument(
        "service", nargs="?", default="", help='service name to check (default "": the server)'
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", metavar="FILE", help="CA certificates (PEM) to verify the server")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (PEM), for mTLS")
    parser.add_argument("--key", metavar="FILE", help="client certificate's private key (PEM)")
    parser.add_argument(
        "--server-name", metavar="NAME", help="name to verify the server certificate against"
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="time to connect and get an answer (default 5)",
    )
    _exit_one_on_bad_arguments(parser)
    return parser


DESCRIPTION = (
    "Check a gRPC server's health (grpc.health.v1.Health/Check). Exit 0 serving, 1 bad "
    "arguments, 2 connection failure, 3 RPC failure, 4 not serving."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``health`` on the CLI's subparsers (dispatch it to ``run``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "health", help="probe a server's gRPC health", description=DESCRIPTION
    )
    return configure(parser)


def run(args: argparse.Namespace) -> int:
    """Runs the probe for parsed arguments; prints one line; returns the exit code."""
    try:
        target = target_from(args)
    except BadArguments as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    result = asyncio.run(probe(target))
    print(result.message, file=sys.stdout if result.exit_code == EXIT_SERVING else sys.stderr)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="learnmesh health", description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
