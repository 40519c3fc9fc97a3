"""The `learnmesh` command as an operator runs it: a real process, real ports, signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.authority import Authority
from tests.support.processes import Finished, ServerProcess, run_to_end, server_process

LEARNMESH = [sys.executable, "-m", "learnmesh.cli"]


def env_for(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEARNMESH_")}
    env.update(LEARNMESH_VAR_DIR=str(var_dir), LEARNMESH_SERVER_ADMIN_PORT="0", **extra)
    return env


# The command prints each service's address once it serves, then "ready".
READY = re.compile(r"^ready")
SERVICE_PORT = re.compile(r"grpcs? \((?:mTLS|PLAINTEXT)\) 127\.0\.0\.1:(\d+)")


def running(args: list[str], env: dict[str, str]) -> AbstractAsyncContextManager[ServerProcess]:
    """The command serving on the port it picked (0: a free one), once it says 'ready'."""
    return server_process(
        [*LEARNMESH, *args], env=env, ready=READY, port=SERVICE_PORT, merge_stderr=True
    )


def client_credentials(var_dir: Path) -> grpc.ChannelCredentials:
    """A client certificate from the mesh's dev CA, as an operator would issue one."""
    return Authority(var_dir / "certs").channel_credentials("operator")


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def health_of(
    address: str, service: str, credentials: grpc.ChannelCredentials | None = None
) -> int:
    channel = (
        aio.insecure_channel(address)
        if credentials is None
        else aio.secure_channel(address, credentials)
    )
    async with channel:
        # grpc_health's stubs declare no HealthStub methods
        reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def test_up_runs_mtls_by_default_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = env_for(tmp_path, LEARNMESH_SERVER_PORT="0")
    async with running(["up"], env) as up:
        banner, port = "".join(up.lines), up.port
        assert "learnmesh.auth.v1.AuthService" in banner
        assert f"mTLS) 127.0.0.1:{port}" in banner and port != 50051
        assert (tmp_path / "certs" / "ca.pem").exists()  # the dev CA, made on first start
        credentials = client_credentials(tmp_path)
        for name in ("", "learnmesh.auth.v1.AuthService", "learnmesh.user.v1.UserService"):
            status = await health_of(f"127.0.0.1:{port}", name, credentials)
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(aio.AioRpcError) as err:  # plaintext is refused
            await health_of(f"127.0.0.1:{port}", "")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (tmp_path / "learnmesh.db").exists()

        # Probes without a certificate use the admin port: health, /healthz, /readyz, /metrics.
        admin = int(re.search(r"admin: .* plaintext 127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
        assert await health_of(f"127.0.0.1:{admin}", "learnmesh.user.v1.UserService") == 1
        probe = [*LEARNMESH, "health", f"127.0.0.1:{admin}", "learnmesh.auth.v1.AuthService"]
        assert (await run_to_end(probe)).code == 0
        for path, status in (("/healthz", 200), ("/readyz", 200), ("/metrics", 200)):
            assert await http_status(admin, path) == status
        out, _ = await up.stop(signal.SIGTERM)
        assert up.proc.returncode == 0, out
        assert "stopped" in out


async def test_insecure_is_announced_and_plaintext(tmp_path: Path) -> None:
    args = ["serve", "user", "--port", "0", "--insecure"]
    async with running(args, env_for(tmp_path)) as served:
        banner = "".join(served.lines)
        assert "WARNING: --insecure" in banner and "PLAINTEXT" in banner
        assert await health_of(served.address, "learnmesh.user.v1.UserService") == 1
        await served.stop(signal.SIGINT)
        assert served.proc.returncode == 0


async def test_serve_one_service_per_process_and_sigint(tmp_path: Path) -> None:
    async with running(["serve", "user", "--port", "0"], env_for(tmp_path)) as served:
        credentials = client_credentials(tmp_path)
        name = "learnmesh.user.v1.UserService"
        assert await health_of(served.address, name, credentials) == 1
        with pytest.raises(aio.AioRpcError) as err:
            await health_of(served.address, "learnmesh.auth.v1.AuthService", credentials)
        assert err.value.code().name == "NOT_FOUND"
        await served.stop(signal.SIGINT)
        assert served.proc.returncode == 0


async def test_bad_setting_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    code, _, err = await learnmesh_cli("up", env=env_for(tmp_path, LEARNMESH_SERVER_PORT="fifty"))
    assert code == 1
    assert "LEARNMESH_SERVER_PORT" in err and "whole number" in err
    assert "Traceback" not in err


async def test_migrate_creates_every_services_tables(tmp_path: Path) -> None:
    code, out, _ = await learnmesh_cli("migrate", env=env_for(tmp_path))
    assert code == 0
    assert "auth: migrated to head" in out and "user: migrated to head" in out


# certs: names are file names and SPIFFE segments; the CA and existing pairs are kept


async def learnmesh_cli(*args: str, env: dict[str, str]) -> Finished:
    return await run_to_end([*LEARNMESH, *args], env=env)


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*.pem")}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ca", "reserved for the CA"),
        ("ca-key", "may not end in -key"),
        ("me-key", "may not end in -key"),
        ("../x", "invalid certificate name"),
        ("sub/x", "invalid certificate name"),
        (".hidden", "invalid certificate name"),
        ("Upper", "invalid certificate name"),
        ("-dash", "invalid certificate name"),
        ("a" * 64, "invalid certificate name"),
    ],
)
async def test_certs_issue_refuses_unsafe_names(tmp_path: Path, name: str, message: str) -> None:
    directory = tmp_path / "var" / "certs"
    env = env_for(tmp_path / "var")
    code, _, _ = await learnmesh_cli("certs", "init", "--dir", str(directory), env=env)
    assert code == 0
    before = files_under(tmp_path)
    code, out, err = await learnmesh_cli(
        "certs", "issue", "--force", "--dir", str(directory), "--", name, env=env
    )
    assert code == 1, out + err
    assert message in err and "Traceback" not in err
    # Nothing written anywhere: the CA's pair is intact, nothing landed beside the directory.
    assert files_under(tmp_path) == before
    assert sorted(before) == ["var/certs/ca-key.pem", "var/certs/ca.pem"]


async def test_certs_issue_keeps_an_existing_certificate_unless_forced(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    env = env_for(tmp_path)
    issue = ("certs", "issue", "me", "--kind", "client", "--dir", str(directory))
    assert (await learnmesh_cli("certs", "init", "--dir", str(directory), env=env))[0] == 0
    code, out, _ = await learnmesh_cli(*issue, env=env)
    assert code == 0
    assert "spiffe://learnmesh.local/client/me" in out
    first = files_under(directory)
    assert {"me.pem", "me-key.pem"} <= set(first)
    assert (directory / "me-key.pem").stat().st_mode & 0o777 == 0o600

    code, _, err = await learnmesh_cli(*issue, env=env)
    assert code == 1
    assert "me.pem exists; pass --force" in err and "Traceback" not in err
    assert files_under(directory) == first

    code, _, _ = await learnmesh_cli(*issue, "--force", env=env)
    assert code == 0
    again = files_under(directory)
    assert again["me.pem"] != first["me.pem"] and again["me-key.pem"] != first["me-key.pem"]
    assert again["ca.pem"] == first["ca.pem"] and again["ca-key.pem"] == first["ca-key.pem"]
    assert (directory / "me-key.pem").stat().st_mode & 0o777 == 0o600
    # No temporary file is left behind by the atomic replace.
    assert sorted(p.name for p in directory.iterdir()) == sorted(again)
