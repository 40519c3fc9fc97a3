"""Refresh has a rate class of its own: over the wire, through the real auth service and
start_server with mTLS, refreshes count against the refresh limits per address and no
longer use up the login budget (nor logins the refresh budget)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc import aio

from learnmesh import config
from learnmesh.auth.v1 import auth_pb2
from learnmesh.common.v1 import access_pb2
from learnmesh.config import LimitSettings
from tests.conftest import PASSWORD, Mesh, mesh_settings, running_mesh
from tests.support.mesh import new_email


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    settings = mesh_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    limits = replace(
        settings.limits, login_per_minute=2, refresh_per_minute=3, refresh_per_hour=100
    )
    async with running_mesh(replace(settings, limits=limits)) as m:
        yield m


def test_refresh_is_its_own_class_in_the_proto_and_has_generous_defaults() -> None:
    refresh = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].methods_by_name["Refresh"]
    policy = refresh.GetOptions().Extensions[access_pb2.policy]
    assert policy.rate_class == access_pb2.RATE_CLASS_REFRESH
    defaults = config.load(env={}).limits
    assert (defaults.refresh_per_minute, defaults.refresh_per_hour) == (60, 600)
    assert defaults.refresh_per_minute > LimitSettings().login_per_minute
    env = {"LEARNMESH_LIMITS_REFRESH_PER_MINUTE": "120"}
    assert config.load(env=env).limits.refresh_per_minute == 120


async def test_refresh_is_limited_by_its_own_budget_and_spares_the_login_one(mesh: Mesh) -> None:
    email = new_email("refresher")
    await mesh.register(email)
    login = await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    refresh_token = login.refresh_token
    # Three refreshes pass though the login budget is two a minute and one is used.
    for _ in range(3):
        refreshed = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refresh_token))
        refresh_token = refreshed.refresh_token
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refresh_token))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 calls per 60 s for refresh calls from this address" in (err.value.details() or "")
    # The refreshes took nothing from the login budget: one more login passes, then it ends.
    await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "login calls from this address" in (err.value.details() or "")
