"""The ``learnmesh`` command: run the mesh or one service, migrate, manage certificates."""

from __future__ import annotations

import os

# grpc-core's informational lines (GOAWAY on stop, TLS handshake notes) are noise to an
# operator; this must be set before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from learnmesh import certs, config, probe, tls
from learnmesh.db import Database
from learnmesh.service import IMPLEMENTED, Runtime, ServiceDefinition, definition

if TYPE_CHECKING:
    from learnmesh.admin import AdminServer
    from services.user.profiles import RoleChange, TierChange

log = logging.getLogger("learnmesh")
T = TypeVar("T")

INSECURE_WARNING = """\
************************************************************************
* WARNING: --insecure: plaintext gRPC, no mTLS. Any process that can   *
* reach this port can call internal methods and read every message.    *
* Use only on a developer machine.                                     *
************************************************************************"""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Stop signals that arrived before the event loop ran (while `up` or `serve` was starting).
_early_stops: list[int] = []
# Seconds the tasks still running at stop (a library's shielded connection close, a call
# ended at the grace) get to finish before the database is disposed; then they are cancelled.
SETTLE_SECONDS = 5.0


def _note_stop(signum: int, _frame: object) -> None:
    _early_stops.append(signum)


def _hold_stop_signals() -> None:
    """From here on, SIGINT and SIGTERM ask for a stop instead of killing the process (or
    raising KeyboardInterrupt in whatever is running): ``_serve`` reads what came."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _note_stop)


def _stop_requested() -> asyncio.Event:
    """Set by SIGINT or SIGTERM, or already set when one arrived before the loop ran."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    if _early_stops:
        stop.set()
    return stop


async def _settle() -> None:
    """Lets every task still running end (SQLAlchemy closes a connection a cancelled query
    held in a task of its own), so none is left pending when the loop closes."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=SETTLE_SECONDS)
    for task in late:
        log.warning("still running at stop, cancelled: %r", task)
        task.cancel()
    if late:
        await asyncio.wait(late)


async def _serve(
    settings: config.Settings,
    names: Sequence[str],
    identity: str,
    host: str,
    port: int,
    reuse_port: bool,
) -> None:
    """Starts the server and the admin port, serves until SIGINT or SIGTERM, then closes
    everything in the reverse order of its opening: health NOT_SERVING and the server's
    stop with grace, the admin port, the servicers and links, the tasks still running, the
    client channels and last the database engine. Each close runs even when one before it
    failed. A signal during start-up lets the step under way finish, then stops the same
    way (no step is cancelled halfway: grpc and aiosqlite do not survive that)."""
    stop = _stop_requested()
    from learnmesh.server import build_runtime, start_server

    async with contextlib.AsyncExitStack() as opened:
        runtime, credentials = build_runtime(settings, identity)
        opened.push_async_callback(runtime.close)  # channels, then the engine
        opened.push_async_callback(_settle)
        definitions = [definition(name) for name in names]
        try:
            server = await start_server(
                runtime,
                definitions,
                host=host,
                port=port,
                credentials=credentials,
                reuse_port=reuse_port,
            )
        except OSError as exc:
            raise SystemExit(f"learnmesh: {exc}") from None
        opened.push_async_callback(server.aclose)
        admin = None
        if settings.server.admin_port >= 0 and not stop.is_set():
            from learnmesh.admin import AdminLimits, start_admin

            limits = AdminLimits(
                max_connections=settings.server.admin_max_connections,
                sniff_timeout=settings.server.admin_sniff_timeout,
                header_timeout=settings.server.admin_header_timeout,
                http_idle_timeout=settings.server.admin_http_idle_timeout,
                grpc_idle_timeout=settings.server.admin_grpc_idle_timeout,
            )
            try:
                admin = await start_admin(
                    settings.server.admin_host,
                    settings.server.admin_port,
                    server.health,
                    {"database": runtime.db.ping, "bus": runtime.bus.ping},
                    reuse_port=reuse_port,
                    limits=limits,
                )
            except OSError as exc:
                raise SystemExit(f"learnmesh: {exc}") from None
            # The admin port outlives the drain, so probes see NOT_SERVING meanwhile.
            opened.push_async_callback(admin.stop)
        opened.push_async_callback(server.drain, settings.server.grace)
        if not stop.is_set():
            _announce(
                settings, server.address, definitions, credentials is not None, admin, runtime
            )
            await stop.wait()
        print("stopping…", flush=True)
    print("stopped", flush=True)


def _announce(
    settings: config.Settings,
    address: str,
    definitions: Sequence[ServiceDefinition],
    mtls: bool,
    admin: AdminServer | None,
    runtime: Runtime,
) -> None:
    """The banner: what listens where, and "ready" last (scripts wait for it)."""
    scheme = "grpcs (mTLS)" if mtls else "grpc (PLAINTEXT)"
    for d in definitions:
        print(f"{d.full_name:<42} {scheme} {address}", flush=True)
    print(f"{'grpc.health.v1.Health, reflection':<42} {scheme} {address}", flush=True)
    if admin is not None:
        where = f"{settings.server.admin_host}:{admin.port}"
        print(f"{'admin: Health, /healthz /readyz /metrics':<42} plaintext {where}", flush=True)
    if mtls and not settings.tls.ca_file:
        directory = tls.certs_dir(settings)
        print(f"certificates: {directory} (CA: {directory / 'ca.pem'})", flush=True)
    print(f"database: {runtime.db.url.render_as_string(hide_password=True)}", flush=True)
    print("ready; Ctrl-C stops", flush=True)


async def _migrate(settings: config.Settings, names: Sequence[str]) -> None:
    db = Database(settings.database)
    try:
        for name in names:
            d = definition(name)
            if d.migrations is not None:
                await db.migrate(d.name, d.migrations)
                print(f"{d.name}: migrated to head")
    finally:
        await db.dispose()


async def promote(settings: config.Settings, email: str, role: str) -> RoleChange:
    """`learnmesh users promote`: gives the user with ``email`` the role, in the configured
    database (opened here, as `learnmesh migrate` does), audited with actor "operator"."""
    from services.user.profiles import Profiles

    db = Database(settings.database)
    try:
        return await Profiles(db).promote(email, role)
    finally:
        await db.dispose()


async def set_tier(settings: config.Settings, email: str, tier: str) -> TierChange:
    """`learnmesh users set-tier`: gives the user with ``email`` the subscription tier, in
    the configured database, audited with actor "operator" (as ``promote``)."""
    from services.user.profiles import Profiles

    db = Database(settings.database)
    try:
        return await Profiles(db).set_tier_by_email(email, tier)
    finally:
        await db.dispose()


def _in_database(
    settings: config.Settings, what: str, change: Callable[[], Coroutine[Any, Any, T]]
) -> T | None:
    """Runs an operator's ``change`` of a user's ``what`` (role, tier); None, the reason
    printed, when it failed."""
    from sqlalchemy.exc import DBAPIError

    from learnmesh.kernel.errors import DomainError

    database = Database(settings.database).url.render_as_string(hide_password=True)
    try:
        return asyncio.run(change())
    except DomainError as exc:  # no such user, the last admin, a value the contract lacks
        print(f"learnmesh: {exc.message}", file=sys.stderr)
        return None
    except (DBAPIError, OSError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        print(
            f"learnmesh: cannot change the {what} in {database} ({cause}); is the database "
            "reachable and migrated (`learnmesh migrate user`)?",
            file=sys.stderr,
        )
        return None


def _promote(settings: config.Settings, args: argparse.Namespace) -> int:
    change = _in_database(settings, "role", lambda: promote(settings, args.email, args.role))
    if change is None:
        return 1
    user = change.profile
    if not change.changed:
        print(f"{user.email} (user {user.id}) already has the role {user.role}; nothing changed")
        return 0
    print(
        f"{user.email} (user {user.id}): role {change.old_role} -> {user.role}, recorded in "
        "user_audit with actor operator. Their access tokens issued before are refused as "
        "soon as the change reaches each server (it revokes them); their next sign-in or "
        "token refresh carries the new role."
    )
    return 0


def _set_tier(settings: config.Settings, args: argparse.Namespace) -> int:
    change = _in_database(settings, "tier", lambda: set_tier(settings, args.email, args.tier))
    if change is None:
        return 1
    user = change.profile
    if not change.changed:
        print(f"{user.email} (user {user.id}) already has the tier {user.tier}; nothing changed")
        return 0
    print(
        f"{user.email} (user {user.id}): tier {change.old_tier} -> {user.tier}, recorded in "
        "user_audit with actor operator. Their next sign-in or token refresh carries it; "
        f"access tokens issued before keep the old tier until they expire (at most "
        f"{settings.auth.access_token_ttl} s)."
    )
    return 0


def _certs(settings: config.Settings, args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else tls.certs_dir(settings)
    domain = settings.tls.trust_domain
    if args.certs_command == "init":
        ca = certs.init_ca(directory, domain)
        print(f"CA: {ca.cert} (key {ca.key}), trust domain {domain}")
        return 0
    try:
        issued = certs.issue(
            directory,
            args.name,
            domain,
            kind=args.kind,
            dns=tuple(args.dns or certs.DEFAULT_DNS),
            ips=tuple(args.ip or certs.DEFAULT_IPS),
            days=args.days,
            overwrite=args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"learnmesh: {exc}", file=sys.stderr)
        return 1
    print(f"{certs.spiffe_id(domain, args.name, args.kind)}: {issued.cert} (key {issued.key})")
    return 0


# --- learnmesh users reset-mfa ------------------------------------------------------------


def _add_reset_mfa(users_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub = users_commands.add_parser(
        "reset-mfa",
        help="turn off a user's MFA and end their sessions (they lost device and codes)",
    )
    sub.add_argument("email", help="the account's email")


async def _reset_mfa(settings: config.Settings, email: str) -> int:
    """Runs where the database is; migrates the auth tables first, as a server start does."""
    import getpass

    from services.auth.operator import reset_mfa_by_email

    db = Database(settings.database)
    try:
        auth = definition("auth")
        if auth.migrations is not None:
            await db.migrate(auth.name, auth.migrations)
        found = await reset_mfa_by_email(
            db, email, getpass.getuser(), access_ttl=settings.auth.access_token_ttl
        )
    finally:
        await db.dispose()
    if found is None:
        print(f"learnmesh: no account has the email {email}", file=sys.stderr)
        return 1
    user_id, done = found
    state = "MFA was on and is now off" if done.had_mfa else "MFA was not on"
    print(f"{email} ({user_id}): {state}; {done.revoked_sessions} session(s) ended")
    return 0


def _add_events(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    events = commands.add_parser("events", help="the event backbone's dead letters")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    events_commands.add_parser("dead-letters", help="list the events consumers gave up on")
    replay = events_commands.add_parser("replay", help="publish a dead event again")
    replay.add_argument("event_id", help="the event's id (see dead-letters)")


async def _events(settings: config.Settings, args: argparse.Namespace) -> int:
    """Lists or replays the dead letters of every service whose event tables exist."""
    from sqlalchemy import MetaData, inspect

    from learnmesh.eventing import dead_letters
    from learnmesh.eventing.tables import event_tables
    from learnmesh.eventing.wiring import make_bus

    db = Database(settings.database)
    try:
        async with db.engine.connect() as conn:
            existing = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        services = [n for n in IMPLEMENTED if f"{n}_dead_letters" in existing]
        found = {name: event_tables(name, MetaData()) for name in services}
        if args.events_command == "dead-letters":
            for name, tables in found.items():
                for row in await dead_letters.listing(db, tables):
                    print(
                        f"{row.event_id}  {name}  {row.consumer_group}  {row.type}  "
                        f"subject={row.subject}  attempts={row.attempts}  "
                        f"at={row.failed_at.isoformat()}  {row.error}"
                    )
            return 0
        if not settings.bus_url:
            print(
                "learnmesh: replay publishes to the bus of LEARNMESH_BUS_URL; the in-process "
                "bus lives inside the running process and cannot be reached from here",
                file=sys.stderr,
            )
            return 1
        bus = make_bus(settings)
        await bus.start()
        try:
            replayed = 0
            for tables in found.values():
                replayed += await dead_letters.replay(db, tables, bus, args.event_id)
        finally:
            await bus.close()
    finally:
        await db.dispose()
    if not replayed:
        print(f"learnmesh: no dead letter has the event id {args.event_id}", file=sys.stderr)
        return 1
    print(f"{args.event_id}: published again ({replayed} dead letter(s) removed)")
    return 0


# -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learnmesh", description="The learnmesh gRPC mesh.")
    parser.add_argument("--config", help="a TOML settings file (default: $LEARNMESH_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("up", "run the whole mesh in this process"),
        ("serve", "run one service in this process"),
    ):
        sub = commands.add_parser(name, help=help_text)
        if name == "serve":
            sub.add_argument("service", choices=sorted(IMPLEMENTED))
            sub.add_argument(
                "--reuse-port", action="store_true", help="share the port with replicas"
            )
        sub.add_argument("--host", help="listen address (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="gRPC port (default 50051)")
        sub.add_argument(
            "--insecure", action="store_true", help="plaintext, no mTLS (development only)"
        )

    probe.add_parser(commands)

    migrate = commands.add_parser("migrate", help="bring the database to the newest schema")
    migrate.add_argument("services", nargs="*", help="default: every implemented service")

    from learnmesh.user.v1 import user_pb2

    # The contract's roles by lower-case name (services.user.profiles.ROLES).
    roles = [n.removeprefix("ROLE_").lower() for n in user_pb2.Role.keys()[1:]]
    users = commands.add_parser("users", help="manage users directly in the database")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    promote_parser = users_commands.add_parser(
        "promote", help="give a registered user a role (how the first admin comes to be)"
    )
    promote_parser.add_argument("email", help="the email the user registered with")
    promote_parser.add_argument("--role", required=True, choices=roles)
    # The contract's tiers by lower-case name (services.user.profiles.TIERS).
    tier_names = user_pb2.SubscriptionTier.keys()[1:]
    tiers = [n.removeprefix("SUBSCRIPTION_TIER_").lower() for n in tier_names]
    tier_parser = users_commands.add_parser(
        "set-tier", help="give a registered user a subscription tier (billing is outside the mesh)"
    )
    tier_parser.add_argument("email", help="the email the user registered with")
    tier_parser.add_argument("tier", choices=tiers)
    _add_reset_mfa(users_commands)
    _add_events(commands)

    certs_parser = commands.add_parser("certs", help="the mesh CA and its certificates")
    certs_commands = certs_parser.add_subparsers(dest="certs_command", required=True)
    for name, help_text in (("init", "make the mesh CA"), ("issue", "issue a certificate")):
        sub = certs_commands.add_parser(name, help=help_text)
        sub.add_argument("--dir", help="where the CA and certificates live (default var/certs)")
        if name == "issue":
            sub.add_argument("name", help="the holder, e.g. auth or web-client")
            sub.add_argument("--kind", choices=["service", "client"], default="service")
            sub.add_argument("--dns", action="append", help="DNS SAN (repeatable)")
            sub.add_argument("--ip", action="append", help="IP SAN (repeatable)")
            sub.add_argument("--days", type=int, default=90)
            sub.add_argument(
                "--force", action="store_true", help="replace an existing certificate of NAME"
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("up", "serve"):
        _hold_stop_signals()
    if args.command == "health":
        return probe.run(args)
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        print(f"learnmesh: configuration error: {exc}", file=sys.stderr)
        return 1
    if args.command in ("up", "serve"):
        from learnmesh.kernel.logs import setup_logging
        from learnmesh.telemetry import setup_tracing

        # JSON lines on stderr, each with the call's request id and trace id.
        setup_logging(settings.log_level, access_log=settings.telemetry.access_log)
        try:
            tracer = setup_tracing("learnmesh" if args.command == "up" else args.service)
        except config.ConfigError as exc:
            print(f"learnmesh: configuration error: {exc}", file=sys.stderr)
            return 1
        atexit.register(tracer.shutdown)
    else:
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    if args.command == "certs":
        return _certs(settings, args)
    if args.command == "users" and args.users_command == "promote":
        return _promote(settings, args)
    if args.command == "users" and args.users_command == "set-tier":
        return _set_tier(settings, args)
    if args.command == "users" and args.users_command == "reset-mfa":
        return asyncio.run(_reset_mfa(settings, args.email))
    if args.command == "events":
        return asyncio.run(_events(settings, args))
    if getattr(args, "insecure", False):
        settings = dataclasses.replace(
            settings, tls=dataclasses.replace(settings.tls, enabled=False)
        )
    if args.command in ("up", "serve") and not settings.tls.enabled:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    host = getattr(args, "host", None) or settings.server.host
    port = settings.server.port if getattr(args, "port", None) is None else args.port
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "up":
            asyncio.run(_serve(settings, list(IMPLEMENTED), "mesh", host, port, False))
        elif args.command == "serve":
            asyncio.run(_serve(settings, [args.service], args.service, host, port, args.reuse_port))
        else:
            asyncio.run(_migrate(settings, args.services or list(IMPLEMENTED)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
