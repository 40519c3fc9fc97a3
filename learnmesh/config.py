"""Settings from ``LEARNMESH_*`` environment variables and an optional TOML file.

Every setting has a default that runs the whole mesh on one machine. A TOML file (given by
``--config`` or ``LEARNMESH_CONFIG``) uses sections (``[auth] access_token_ttl = 900``);
the environment overrides it with the flattened upper-case name
(``LEARNMESH_AUTH_ACCESS_TOKEN_TTL=900``). A bad value stops start-up with a message that
names the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "LEARNMESH_"
SERVICE_NAMES = ("auth", "user", "course", "file", "notification")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which and why."""


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("a TCP port from 0 to 65535 (0 picks a free one)")
    return value


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("a whole number greater than 0")
    return value


def _log_level(value: str) -> str:
    allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
    if value.upper() not in allowed:
        raise ValueError("one of " + ", ".join(allowed))
    return value.upper()


def _database_url(value: str) -> str:
    for plain, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if value.startswith(plain):
            value = driver + value[len(plain) :]
    if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        raise ValueError("a URL starting postgresql:// or sqlite:// (or empty for the default)")
    return value


def _address(value: str) -> str:
    if value and ":" not in value and not value.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        raise ValueError("host:port, several as host:port,host:port, or a dns:/// target")
    return value


def _check(fn: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = field(default=50051, metadata=_check(_port))
    # Seconds in-flight calls get to finish on SIGINT/SIGTERM.
    grace: float = 5.0


@dataclass(frozen=True)
class AuthSettings:
    issuer: str = "learnmesh"
    audience: str = "learnmesh"
    access_token_ttl: int = field(default=900, metadata=_check(_positive))
    refresh_token_ttl: int = field(default=30 * 24 * 3600, metadata=_check(_positive))
    reset_token_ttl: int = field(default=1800, metadata=_check(_positive))
    # argon2id at OWASP's minimum (m=19 MiB, t=2, p=1) or stronger.
    argon2_time_cost: int = field(default=2, metadata=_check(_positive))
    argon2_memory_kib: int = field(default=19456, metadata=_check(_positive))
    argon2_parallelism: int = field(default=1, metadata=_check(_positive))
    # PEM files of ES256 signing keys; the active one is `jwt_active_kid` or the newest.
    # Empty: var/keys/jwt, made on first start.
    jwt_keys_dir: str = ""
    jwt_active_kid: str = ""
    # AES-256-GCM keys for TOTP secrets: "kid:base64key,kid2:base64key"; the first encrypts,
    # all decrypt. Empty: one key made on first start under var/keys/mfa.
    mfa_keys: str = ""
    # Failed logins allowed per email and per client address within `throttle_window`.
    throttle_per_email: int = field(default=5, metadata=_check(_positive))
    throttle_per_address: int = field(default=20, metadata=_check(_positive))
    throttle_window: int = field(default=900, metadata=_check(_positive))
    reset_requests_per_hour: int = field(default=3, metadata=_check(_positive))
    # Where password-reset links point (the web client).
    public_url: str = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class UserSettings:
    # Emails whose profiles are created with the admin role (comma-separated): how the
    # first admin of a new installation comes to be.
    admin_emails: str = ""

    @property
    def admins(self) -> frozenset[str]:
        return frozenset(e.strip().lower() for e in self.admin_emails.split(",") if e.strip())


@dataclass(frozen=True)
class Settings:
    # Everything the embedded defaults write: SQLite file, keys, mail, certificates.
    var_dir: str = "var"
    # Empty: SQLite in var_dir/learnmesh.db.
    database_url: str = field(default="", metadata=_check(_database_url))
    log_level: str = field(default="INFO", metadata=_check(_log_level))
    redis_url: str = ""
    nats_url: str = ""
    # Where each service is reached (host:port, comma-separated replicas, or dns:///name:port).
    # Empty: the server's own host:port, as in `learnmesh up`.
    auth_address: str = field(default="", metadata=_check(_address))
    user_address: str = field(default="", metadata=_check(_address))
    course_address: str = field(default="", metadata=_check(_address))
    file_address: str = field(default="", metadata=_check(_address))
    notification_address: str = field(default="", metadata=_check(_address))
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    user: UserSettings = field(default_factory=UserSettings)

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir)

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.var_path / 'learnmesh.db'}"

    def address_of(self, service: str) -> str:
        """The target a client dials for ``service``."""
        if service not in SERVICE_NAMES:
            raise ConfigError(f"unknown service {service!r}; known: {', '.join(SERVICE_NAMES)}")
        configured: str = getattr(self, f"{service}_address")
        return configured or f"{self.server.host}:{self.server.port}"


def _convert(key: str, raw: Any, kind: Any) -> Any:
    """Turns a TOML or environment value into ``kind``, or raises ConfigError naming ``key``."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int and not isinstance(raw, bool):
            return int(raw)
        if kind is float and not isinstance(raw, bool):
            return float(raw)
        if kind is str and isinstance(raw, str | int | float):
            return str(raw)
    except ValueError:
        pass
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    raise ConfigError(f"{key}: {raw!r} is not {names.get(kind, kind)}")


def _build(cls: Any, values: Mapping[str, Any], env: Mapping[str, str], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            raise ConfigError(
                f"{path}{name}: unknown setting; known here: {', '.join(sorted(known))}"
            )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{path}{f.name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            section = values.get(f.name, {})
            if not isinstance(section, Mapping):
                raise ConfigError(f"{key}: must be a table ([{key}])")
            kwargs[f.name] = _build(kind, section, env, f"{key}.")
            continue
        env_name = PREFIX + key.replace(".", "_").upper()
        if env_name in env:
            raw, where = env[env_name], env_name
        elif f.name in values:
            raw, where = values[f.name], key
        else:
            continue
        value = _convert(where, raw, kind)
        check = f.metadata.get("check")
        if check is not None:
            try:
                value = check(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {raw!r} is not allowed; expected {exc}") from None
        kwargs[f.name] = value
    return cls(**kwargs)


def load(
    config_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Reads the TOML file (if any) and the environment into Settings."""
    env = os.environ if env is None else env
    path = config_file or env.get(PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    return typing.cast(Settings, _build(Settings, values, env, ""))
