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
import re
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


def _admin_port(value: int) -> int:
    if not -1 <= value <= 65535:
        raise ValueError("a TCP port from 0 to 65535, or -1 for no admin port")
    return value


def _positive_float(value: float) -> float:
    if value <= 0:
        raise ValueError("a number of seconds greater than 0")
    return value


def _trust_domain(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9.-]+", value):
        raise ValueError("a lower-case DNS-like name such as learnmesh.local")
    return value


def _method_pairs(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in value.split(";"))):
        method, sep, rest = item.partition("=")
        if not sep or "/" not in method or not rest:
            raise ValueError(f"entries like pkg.Service/Method=…; got {item!r}")
        pairs.append(("/" + method.strip().lstrip("/"), rest.strip()))
    return pairs


def _parse_extra_callers(value: str) -> dict[str, frozenset[str]]:
    return {
        method: frozenset(n.strip() for n in names.split(",") if n.strip())
        for method, names in _method_pairs(value)
    }


def _extra_callers(value: str) -> str:
    _parse_extra_callers(value)
    return value


def _parse_method_deadlines(value: str) -> dict[str, tuple[float, float]]:
    found = {}
    for method, spec in _method_pairs(value):
        default, _, cap = spec.partition(":")
        try:
            found[method] = (float(default), float(cap or default))
        except ValueError:
            raise ValueError(f"pkg.Service/Method=default:cap in seconds; got {spec!r}") from None
    return found


def _method_deadlines(value: str) -> str:
    _parse_method_deadlines(value)
    return value


def _check(fn: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = field(default=50051, metadata=_check(_port))
    # Seconds in-flight calls get to finish on SIGINT/SIGTERM.
    grace: float = 5.0
    # The plaintext admin port for probes: grpc.health.v1.Health, /healthz, /readyz, /metrics
    # (never a business method). Port 0 picks a free one; -1 turns it off.
    admin_host: str = "127.0.0.1"
    admin_port: int = field(default=50052, metadata=_check(_admin_port))
    # The admin port takes no credentials, so what one client may hold is bounded: open
    # connections at once (one more is closed on arrival, counted in
    # learnmesh_admin_connections_refused_total); seconds a connection gets for its first
    # bytes (sniff), an HTTP request to arrive whole (header), a keep-alive HTTP connection
    # to send its next request (http_idle), and a gRPC connection to go without a call
    # (grpc_idle).
    admin_max_connections: int = field(default=64, metadata=_check(_positive))
    admin_sniff_timeout: float = field(default=10.0, metadata=_check(_positive_float))
    admin_header_timeout: float = field(default=5.0, metadata=_check(_positive_float))
    admin_http_idle_timeout: float = field(default=5.0, metadata=_check(_positive_float))
    admin_grpc_idle_timeout: float = field(default=60.0, metadata=_check(_positive_float))
    # Concurrent calls one client connection may have open (HTTP/2 SETTINGS); more wait.
    max_concurrent_streams: int = field(default=100, metadata=_check(_positive))


@dataclass(frozen=True)
class TlsSettings:
    # mTLS between every caller and every service. Off only with `--insecure` (or false here).
    enabled: bool = True
    # PEM files; empty: var/certs/{ca,<service>}.pem, made on first start by `learnmesh up`.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    trust_domain: str = field(default="learnmesh.local", metadata=_check(_trust_domain))
    # Callers allowed on internal methods beyond the proto option's, as
    # "pkg.Service/Method=name,name;pkg.Service/Method=name" (service names: SPIFFE path
    # service/<name>).
    extra_callers: str = field(default="", metadata=_check(_extra_callers))

    @property
    def callers(self) -> dict[str, frozenset[str]]:
        return _parse_extra_callers(self.extra_callers)


# Streams that carry whole files get an hour by default, not the 10 s / 30 s of a call: a
# 100 MiB upload over a slow link takes minutes. LEARNMESH_DEADLINES_METHODS overrides them.
TRANSFER_DEADLINES = {
    "/learnmesh.file.v1.FileService/Upload": (3600.0, 3600.0),
    "/learnmesh.file.v1.FileService/Download": (3600.0, 3600.0),
}


@dataclass(frozen=True)
class DeadlineSettings:
    # Seconds a call may run when its caller set no deadline, and the most it may ask for.
    default: float = field(default=10.0, metadata=_check(_positive_float))
    cap: float = field(default=30.0, metadata=_check(_positive_float))
    # Per-method "pkg.Service/Method=default:cap;…" overrides.
    methods: str = field(default="", metadata=_check(_method_deadlines))
    # Outbound calls made while serving one get the inbound remaining time minus this margin.
    propagation_margin: float = 0.05


@dataclass(frozen=True)
class LimitSettings:
    """The reference document's tiers (requests per minute) and endpoint limits."""

    enabled: bool = True
    free_per_minute: int = field(default=30, metadata=_check(_positive))
    basic_per_minute: int = field(default=60, metadata=_check(_positive))
    pro_per_minute: int = field(default=120, metadata=_check(_positive))
    enterprise_per_minute: int = field(default=300, metadata=_check(_positive))
    write_multiplier: float = 0.5
    delete_multiplier: float = 0.25
    # Bursts up to this multiple of the per-minute rate spread over burst_window seconds.
    burst_multiplier: float = 2.0
    burst_window: int = field(default=10, metadata=_check(_positive))
    login_per_minute: int = field(default=5, metadata=_check(_positive))
    login_per_hour: int = field(default=20, metadata=_check(_positive))
    # Token refresh per client address, apart from the login budget: a client refreshes
    # every access-token lifetime (15 min), and many users may share one NAT address.
    refresh_per_minute: int = field(default=60, metadata=_check(_positive))
    refresh_per_hour: int = field(default=600, metadata=_check(_positive))
    register_per_minute: int = field(default=3, metadata=_check(_positive))
    register_per_hour: int = field(default=10, metadata=_check(_positive))
    password_reset_per_minute: int = field(default=3, metadata=_check(_positive))
    password_reset_per_hour: int = field(default=10, metadata=_check(_positive))
    # Prefix of the rate-limit keys in Redis (with redis_url set); processes sharing a
    # prefix share their limits, so two meshes on one Redis need different prefixes.
    redis_prefix: str = "learnmesh:rl:"


@dataclass(frozen=True)
class ClientSettings:
    # Circuit breaker per target: this many failures in a row open it, it half-opens after
    # reset_timeout seconds, and this many successes close it again.
    breaker_failures: int = field(default=5, metadata=_check(_positive))
    breaker_reset_timeout: float = field(default=30.0, metadata=_check(_positive_float))
    breaker_half_open_successes: int = field(default=3, metadata=_check(_positive))
    # Native gRPC retry throttling (the retry budget): tokens and refill per success.
    retry_budget_tokens: int = field(default=10, metadata=_check(_positive))
    retry_budget_ratio: float = 0.1
    # The longest wait between a channel's tries to reconnect to a target that went away
    # (gRPC's own default is 120 s: a restarted replica would stay unreachable that long).
    max_reconnect_backoff: float = field(default=5.0, metadata=_check(_positive_float))


@dataclass(frozen=True)
class TelemetrySettings:
    # One JSON line per call (request id, trace id, peer, method, status, duration).
    access_log: bool = True
    # Tracing follows the standard OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console|none,
    # OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG, OTEL_EXPORTER_OTLP_*, OTEL_PROPAGATORS).
    # true: the OpenTelemetry SDK makes every span itself (the tracing links' fast path,
    # interceptors/spans/, off): for an SDK version the fast path was not verified against.
    sdk_spans: bool = False


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
    # Calls the server chain refuses (bad tokens, denied users and certificates) are written
    # to the audit trail every `refusal_audit_window` seconds, like ones coalesced into one
    # row with a count; at most `refusal_audit_capacity` rows wait, the rest are counted as
    # dropped.
    refusal_audit_window: float = field(default=5.0, metadata=_check(_positive_float))
    refusal_audit_capacity: int = field(default=1000, metadata=_check(_positive))


def _bus_url(value: str) -> str:
    if value and not value.startswith(("nats://", "tls://")):
        raise ValueError("a nats:// (or tls://) URL of NATS JetStream, or empty for in-process")
    return value


@dataclass(frozen=True)
class EventSettings:
    # A consumer gives an event up (to its dead-letter table) after this many failed tries.
    max_deliveries: int = field(default=5, metadata=_check(_positive))
    # Redelivery after a failed try: base * 2^(tries-1) seconds, at most backoff_max.
    backoff_base: float = field(default=1.0, metadata=_check(_positive_float))
    backoff_max: float = field(default=60.0, metadata=_check(_positive_float))
    # Published outbox rows are deleted this many seconds after publishing.
    outbox_retention: float = field(default=24 * 3600.0, metadata=_check(_positive_float))
    # The relay polls this often besides being woken by commits.
    relay_poll_interval: float = field(default=1.0, metadata=_check(_positive_float))
    # The relay's longest wait between tries while the bus refuses publishes.
    relay_retry_max: float = field(default=30.0, metadata=_check(_positive_float))
    # The bus drops a second publish of an event id within this many seconds; it must be
    # longer than relay_retry_max.
    duplicate_window: float = field(default=900.0, metadata=_check(_positive_float))
    # JetStream: how long the stream keeps events, and its replicas (3 for durability).
    stream_max_age: float = field(default=3 * 24 * 3600.0, metadata=_check(_positive_float))
    stream_replicas: int = field(default=1, metadata=_check(_positive))


@dataclass(frozen=True)
class CourseSettings:
    # Seconds an instructor's display name from the user service is used without asking it
    # again (while its channel is connected and no user.updated event said it changed).
    instructor_ttl: float = field(default=10.0, metadata=_check(_positive_float))
    # Seconds a read waits for the user service before answering with the last known names.
    user_timeout: float = field(default=2.0, metadata=_check(_positive_float))
    # Seconds a GetCourse answer is reused by the process that made it (its own writes drop
    # it at once; other replicas' show within this); 0 turns the cache off.
    read_cache_ttl: float = 1.0


def _file_store_url(value: str) -> str:
    if not value:
        return value
    if value.startswith("file://"):
        if not value.removeprefix("file://").startswith("/"):
            raise ValueError("file:///an/absolute/path (three slashes)")
        return value
    if value.startswith("s3://"):
        if not value.removeprefix("s3://").split("/", 1)[0]:
            raise ValueError("s3://bucket or s3://bucket/prefix")
        return value
    raise ValueError("file:///abs/path, s3://bucket/prefix, or empty for var/files")


MIB = 1024 * 1024


@dataclass(frozen=True)
class FileSettings:
    # Where the file service keeps the bytes: empty for var_dir/files, file:///abs/path for
    # another directory, s3://bucket/prefix for S3 (credentials, region and endpoint from the
    # AWS_* variables; docs/files.md).
    store_url: str = field(default="", metadata=_check(_file_store_url))
    # The largest upload of each purpose, in bytes.
    avatar_max_bytes: int = field(default=5 * MIB, metadata=_check(_positive))
    course_material_max_bytes: int = field(default=100 * MIB, metadata=_check(_positive))
    attachment_max_bytes: int = field(default=10 * MIB, metadata=_check(_positive))
    # Completed uploads per hour and tier (the reference design's file_upload limits; 0:
    # none), and avatars per hour, which every tier may upload apart from those.
    free_uploads_per_hour: int = 0
    basic_uploads_per_hour: int = 20
    pro_uploads_per_hour: int = 100
    enterprise_uploads_per_hour: int = 500
    avatar_uploads_per_hour: int = field(default=10, metadata=_check(_positive))
    # The bytes one user may keep stored, all purposes together.
    storage_quota_bytes: int = field(default=1024 * MIB, metadata=_check(_positive))
    # Bytes per message of a download.
    download_chunk_bytes: int = field(default=256 * 1024, metadata=_check(_positive))
    # Seconds between sweeps for stored objects that no file row names (left by a crash
    # between a delete's commit and the object's removal, or by a deleted user).
    sweep_interval: float = field(default=600.0, metadata=_check(_positive_float))


@dataclass(frozen=True)
class Settings:
    # Everything the embedded defaults write: SQLite file, keys, mail, certificates.
    var_dir: str = "var"
    # Empty: SQLite in var_dir/learnmesh.db.
    database_url: str = field(default="", metadata=_check(_database_url))
    log_level: str = field(default="INFO", metadata=_check(_log_level))
    redis_url: str = ""
    # Empty: the in-process bus (one process). nats://host:4222: NATS JetStream.
    bus_url: str = field(default="", metadata=_check(_bus_url))
    # Where each service is reached (host:port, comma-separated replicas, or dns:///name:port).
    # Empty: the server's own host:port, as in `learnmesh up`.
    auth_address: str = field(default="", metadata=_check(_address))
    user_address: str = field(default="", metadata=_check(_address))
    course_address: str = field(default="", metadata=_check(_address))
    file_address: str = field(default="", metadata=_check(_address))
    notification_address: str = field(default="", metadata=_check(_address))
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    deadlines: DeadlineSettings = field(default_factory=DeadlineSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    events: EventSettings = field(default_factory=EventSettings)
    course: CourseSettings = field(default_factory=CourseSettings)
    file: FileSettings = field(default_factory=FileSettings)

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir)

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.var_path / 'learnmesh.db'}"

    @property
    def method_deadlines(self) -> dict[str, tuple[float, float]]:
        """Per-method (default, cap): the built-in ones of long transfers, then the
        configured ones (which win)."""
        return {**TRANSFER_DEADLINES, **_parse_method_deadlines(self.deadlines.methods)}

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
    _refuse_removed(values, env)
    return typing.cast(Settings, _build(Settings, values, env, ""))


# Settings that existed once and now stop start-up, so that a deployment still counting on
# one learns what replaced it instead of silently losing it.
REMOVED = {
    "user.admin_emails": (
        "removed: registering an address no longer makes an admin; an operator makes one "
        "with `learnmesh users promote EMAIL --role admin`"
    ),
}


def _refuse_removed(values: Mapping[str, Any], env: Mapping[str, str]) -> None:
    for key, why in REMOVED.items():
        section, name = key.split(".")
        env_name = PREFIX + key.replace(".", "_").upper()
        table = values.get(section)
        if env_name in env:
            raise ConfigError(f"{env_name}: {why}")
        if isinstance(table, Mapping) and name in table:
            raise ConfigError(f"{key}: {why}")
