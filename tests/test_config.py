"""Settings: defaults, TOML, environment precedence, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from learnmesh import config


def test_defaults_run_the_mesh_locally() -> None:
    settings = config.load(env={})
    assert settings.server.host == "127.0.0.1" and settings.server.port == 50051
    assert settings.database == "sqlite+aiosqlite:///var/learnmesh.db"
    assert settings.address_of("user") == "127.0.0.1:50051"
    assert settings.auth.access_token_ttl == 900


def test_toml_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text('database_url = "postgresql://db/x"\n[auth]\naccess_token_ttl = 300\n')
    settings = config.load(path, env={"LEARNMESH_AUTH_ACCESS_TOKEN_TTL": "120"})
    assert settings.auth.access_token_ttl == 120
    assert settings.database == "postgresql+asyncpg://db/x"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LEARNMESH_SERVER_PORT": "70000"}, "LEARNMESH_SERVER_PORT: '70000' is not allowed"),
        ({"LEARNMESH_AUTH_ACCESS_TOKEN_TTL": "0"}, "greater than 0"),
        ({"LEARNMESH_DATABASE_URL": "mysql://x"}, "postgresql://"),
        ({"LEARNMESH_LOG_LEVEL": "chatty"}, "DEBUG, INFO"),
        ({"LEARNMESH_USER_ADDRESS": "nohostport"}, "host:port"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(env: dict[str, str], needle: str) -> None:
    with pytest.raises(config.ConfigError, match=needle):
        config.load(env=env)


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text("[auth]\naccess_token_tll = 5\n")
    with pytest.raises(config.ConfigError, match=r"auth\.access_token_tll: unknown setting"):
        config.load(path, env={})
