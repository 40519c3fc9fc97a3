"""The user service's rules: profiles, the update mask, roles, tiers, listing and deletion.

Plain Python in and out (roles, tiers, themes and channels by lower-case name), so the
rules read without protobuf; ``servicer.py`` converts. Every change runs in one
transaction with the audit row that describes it.

Human text arrives normalised (NFC) and free of control and invisible characters: the
contract's rules (protos/learnmesh/common/v1/text.proto) and the validation link see to
it before a handler runs. Rules that are also reached without a call (``promote``, the
operator's command) normalise their own input.

The first admin of an installation is made by an operator, ``learnmesh users promote
EMAIL --role admin`` (``promote``), never by registering a particular address. Tiers are
set by an admin (SetTier, ``set_tier``) or an operator (``learnmesh users set-tier EMAIL
TIER``, ``set_tier_by_email``): billing stays outside the mesh.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from learnmesh import audit
from learnmesh.db import Database, utcnow
from learnmesh.eventing.outbox import emit
from learnmesh.events.v1 import events_pb2
from learnmesh.kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from learnmesh.page_tokens import PageTokens
from services.user import store

ADMIN = "admin"
# The roles of the contract (learnmesh.user.v1.Role), by lower-case name.
ROLES = ("admin", "instructor", "moderator", "subscriber", "free_user")
# The tiers of the contract (learnmesh.user.v1.SubscriptionTier), by lower-case name.
TIERS = ("free", "basic", "pro", "enterprise")
# The actor of changes made with the operator's command rather than by a user.
OPERATOR = "operator"
DEFAULT_ROLE = "free_user"
DEFAULT_TIER = "free"
DEFAULT_PAGE_SIZE = 20

# UpdateMe's mask paths (names of ProfileUpdate's fields) and what each replaces.
PREFERENCE_PATHS = {
    "preferences.theme": "theme",
    "preferences.language": "language",
    "preferences.notification_channels": "notification_channels",
}
UPDATABLE_PATHS = ("display_name", "bio", "preferences", *PREFERENCE_PATHS)
# An unknown mask path is echoed back at most this long, and at most this many of them.
ECHOED_PATH_LENGTH = 40
ECHOED_PATHS = 3
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Preferences:
    theme: str = "system"
    language: str = "en"
    notification_channels: tuple[str, ...] = ("in_app", "email")

    def to_json(self) -> str:
        return json.dumps(
            {
                "theme": self.theme,
                "language": self.language,
                "notification_channels": list(self.notification_channels),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Preferences:
        data = json.loads(text or "{}")
        default = cls()
        return cls(
            theme=str(data.get("theme", default.theme)),
            language=str(data.get("language", default.language)),
            notification_channels=tuple(
                str(c) for c in data.get("notification_channels", default.notification_channels)
            ),
        )


@dataclass(frozen=True)
class Profile:
    id: str
    email: str
    display_name: str
    avatar_url: str
    bio: str
    role: str
    tier: str
    preferences: Preferences
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: store.ProfileRow) -> Profile:
        return cls(
            id=row.id,
            email=row.email,
            display_name=row.display_name,
            avatar_url=row.avatar_url,
            bio=row.bio,
            role=row.role,
            tier=row.tier,
            preferences=Preferences.from_json(row.preferences),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


@dataclass(frozen=True)
class ProfileChanges:
    """What UpdateMe carries; only the fields named by the mask are applied.

    An unset enum arrives as "" (theme) and is refused where the mask names it.
    """

    display_name: str = ""
    bio: str = ""
    preferences: Preferences = field(default_factory=Preferences)


@dataclass(frozen=True)
class RoleChange:
    profile: Profile
    old_role: str

    @property
    def changed(self) -> bool:
        return self.profile.role != self.old_role


@dataclass(frozen=True)
class TierChange:
    profile: Profile
    old_tier: str

    @property
    def changed(self) -> bool:
        return self.profile.tier != self.old_tier


@dataclass(frozen=True)
class Page:
    profiles: list[Profile]
    next_page_token: str


@dataclass(frozen=True)
class AvatarFile:
    """What the file service says about a file offered as an avatar."""

    id: str
    owner_id: str
    purpose: str  # "avatar", "course_material", …
    content_type: str


# Looks a file up in the file service on behalf of the caller (raises domain errors).
FileLookup = Callable[[str], Awaitable[AvatarFile]]


def normal_email(email: str) -> str:
    """The stored form of an email: NFKC, no surrounding spaces, lower-case (as the auth
    service stores it; the validation link has already applied NFKC to emails in calls)."""
    return unicodedata.normalize("NFKC", email).strip().lower()


def _echo(path: str) -> str:
    shown = path if len(path) <= ECHOED_PATH_LENGTH else path[:ECHOED_PATH_LENGTH] + "…"
    return repr(shown)


def _resume(position: list[object]) -> tuple[datetime, str]:
    """A signed (created_at, id) position back to values (its shape checked again)."""
    refused = InvalidArgument.field(
        "page_token", "not a next_page_token of this listing; start again without one"
    )
    if len(position) != 2:
        raise refused
    micros, last_id = position
    if not isinstance(micros, int) or isinstance(micros, bool) or not isinstance(last_id, str):
        raise refused
    try:
        return EPOCH + micros * MICROSECOND, last_id
    except OverflowError:
        raise refused from None


def avatar_url_of(file_id: str) -> str:
    """A profile's avatar_url: the avatar file's download route on the web bridge."""
    return f"/api/v1/files/{file_id}/content"


async def forget_avatar(session: AsyncSession, owner_id: str, file_id: str) -> bool:
    """Clears the avatar of ``owner_id`` if it is the deleted file ``file_id`` (in the
    consumer's transaction of ``file.deleted``); True when it was."""
    row = await store.get(session, owner_id, for_update=True)
    if row is None or row.avatar_url != avatar_url_of(file_id):
        return False
    row.avatar_url = ""
    row.updated_at = utcnow()
    await session.flush()
    await _emit_updated(session, owner_id, ["avatar_url"])
    return True


async def _emit_updated(session: AsyncSession, user_id: str, changed: list[str]) -> None:
    """``user.updated`` naming the changed fields of learnmesh.user.v1.User."""
    updated = events_pb2.UserUpdated(user_id=user_id, changed_fields=changed)
    await emit(session, store.events.outbox, "user.updated", user_id, updated)


class Profiles:
    """The rules of the user service over its store."""

    def __init__(self, db: Database, page_tokens: PageTokens | None = None) -> None:
        self.db = db
        # Signs ListUsers' page tokens (None: a Profiles that never lists, as the CLI's).
        self.page_tokens = page_tokens

    async def create(self, user_id: str, email: str, display_name: str) -> Profile:
        """Creates a profile; a retry with the same id and email returns it unchanged."""
        email = normal_email(email)
        try:
            async with self.db.transaction() as session:
                existing = await self._retry_or_conflict(session, user_id, email)
                if existing is not None:
                    return existing
                now = utcnow()
                role = DEFAULT_ROLE
                row = store.ProfileRow(
                    id=user_id,
                    email=email,
                    display_name=display_name,
                    avatar_url="",
                    bio="",
                    role=role,
                    tier=DEFAULT_TIER,
                    preferences=Preferences().to_json(),
                    created_at=now,
                    updated_at=now,
                )
                await store.add(session, row)
                await audit.record(session, store.user_audit, "user.created", user_id, role=role)
                created = events_pb2.UserCreated(
                    user_id=user_id, email=email, display_name=display_name
                )
                await emit(session, store.events.outbox, "user.created", user_id, created)
                return Profile.of(row)
        except IntegrityError:
            pass
        # A concurrent call inserted the same id or email first: answer as a retry would.
        async with self.db.transaction() as session:
            existing = await self._retry_or_conflict(session, user_id, email)
        if existing is None:  # the other row is gone again; a retry will succeed
            raise AlreadyExists("a user with this id or email was being created; retry")
        return existing

    @staticmethod
    async def _retry_or_conflict(session: AsyncSession, user_id: str, email: str) -> Profile | None:
        """The existing profile if this is a retry; ALREADY_EXISTS if the id or the email
        belongs to another profile; None when both are free."""
        by_id = await store.get(session, user_id)
        if by_id is not None:
            if by_id.email == email:
                return Profile.of(by_id)
            raise AlreadyExists("a user with this id already exists", reason="USER_EXISTS")
        if await store.by_email(session, email) is not None:
            raise AlreadyExists("a user with this email already exists", reason="EMAIL_TAKEN")
        return None

    async def get(self, user_id: str) -> Profile:
        async with self.db.transaction() as session:
            row = await store.get(session, user_id)
            if row is None:
                raise NotFound(f"no user {user_id}")
            return Profile.of(row)

    async def batch_get(self, user_ids: Sequence[str]) -> list[Profile]:
        """Profiles in the order asked, each once; unknown ids left out."""
        wanted = list(dict.fromkeys(user_ids))
        async with self.db.transaction() as session:
            rows = {row.id: Profile.of(row) for row in await store.many(session, wanted)}
        return [rows[i] for i in wanted if i in rows]

    async def update(self, user_id: str, changes: ProfileChanges, paths: Iterable[str]) -> Profile:
        """Applies the fields named by ``paths`` (UpdateMe's mask) and nothing else."""
        masked = list(dict.fromkeys(paths))
        if not masked:
            raise InvalidArgument.field(
                "update_mask", "name at least one field to change: " + ", ".join(UPDATABLE_PATHS)
            )
        unknown = [p for p in masked if p not in UPDATABLE_PATHS]
        if unknown:
            # One violation naming a few of them, each cut short: the error must stay
            # readable however many paths (or however long ones) the caller sent.
            named = ", ".join(_echo(p) for p in unknown[:ECHOED_PATHS])
            if len(unknown) > ECHOED_PATHS:
                named += f" and {len(unknown) - ECHOED_PATHS} more"
            raise InvalidArgument.field(
                "update_mask",
                f"{named} cannot be changed; allowed: {', '.join(UPDATABLE_PATHS)}",
            )
        self._check_masked_values(changes, masked)
        async with self.db.transaction() as session:
            row = await store.get(session, user_id, for_update=True)
            if row is None:
                raise NotFound(f"no user {user_id}")
            before = Profile.of(row)
            if "display_name" in masked:
                row.display_name = changes.display_name
            if "bio" in masked:
                row.bio = changes.bio
            preferences = Preferences.from_json(row.preferences)
            if "preferences" in masked:
                preferences = changes.preferences
            else:
                updated = {
                    attribute: getattr(changes.preferences, attribute)
                    for path, attribute in PREFERENCE_PATHS.items()
                    if path in masked
                }
                preferences = dataclasses.replace(preferences, **updated)
            row.preferences = preferences.to_json()
            row.updated_at = utcnow()
            await session.flush()
            after = Profile.of(row)
            fields = ("display_name", "bio", "preferences")
            changed = [f for f in fields if getattr(before, f) != getattr(after, f)]
            if changed:
                await _emit_updated(session, user_id, changed)
            return Profile.of(row)

    @staticmethod
    def _check_masked_values(changes: ProfileChanges, masked: list[str]) -> None:
        """Values the proto's rules let through because they are empty, but that a masked
        field may not be set to (the proto ignores empty values so unmasked ones pass)."""
        violations = []
        if "display_name" in masked and not changes.display_name.strip():
            violations.append(
                FieldViolation("profile.display_name", "must be 2 to 50 characters, not empty")
            )
        whole = "preferences" in masked
        if (whole or "preferences.theme" in masked) and not changes.preferences.theme:
            violations.append(
                FieldViolation("profile.preferences.theme", "choose light, dark or system")
            )
        if (whole or "preferences.language" in masked) and not changes.preferences.language:
            violations.append(
                FieldViolation("profile.preferences.language", "an ISO 639-1 code such as en")
            )
        if violations:
            raise InvalidArgument(violations)

    async def page(self, *, page_size: int | None, page_token: str, role: str, text: str) -> Page:
        """Newest first, one page; next_page_token is empty on the last page."""
        if self.page_tokens is None:
            raise RuntimeError("this Profiles was made without page tokens")
        size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        # A token is signed with its filters: replayed with others, or edited, it is refused.
        query = ["users", role, text]
        after = None
        if page_token:
            after = _resume(self.page_tokens.decode(page_token, query=query))
        async with self.db.transaction() as session:
            rows = await store.page(session, limit=size + 1, after=after, role=role, text=text)
        profiles = [Profile.of(row) for row in rows[:size]]
        token = ""
        if len(rows) > size and profiles:
            last = profiles[-1]
            position = [(last.created_at - EPOCH) // MICROSECOND, last.id]
            token = self.page_tokens.encode(position, query=query)
        return Page(profiles, token)

    async def set_role(self, user_id: str, role: str, *, actor: str) -> Profile:
        """Gives ``user_id`` the role; never leaves the platform without an admin."""
        # A write transaction: on SQLite two admins demoting each other at once would both
        # see the other as the spare admin otherwise (FOR UPDATE locks only on PostgreSQL).
        async with self.db.write_transaction() as session:
            admins = await store.lock_ids_with_role(session, ADMIN)
            row = await store.get(session, user_id, for_update=True)
            if row is None:
                raise NotFound(f"no user {user_id}")
            await self._change_role(session, row, role, admins, actor=actor)
            return Profile.of(row)

    async def promote(self, email: str, role: str, *, actor: str = OPERATOR) -> RoleChange:
        """Gives the user with ``email`` the role, for the operator's command (``learnmesh
        users promote``): how the first admin comes to be. Same rules and audit as SetRole,
        with ``actor`` "operator"."""
        if role not in ROLES:
            raise InvalidArgument.field("role", "one of " + ", ".join(ROLES))
        email = normal_email(email)
        async with self.db.write_transaction() as session:
            admins = await store.lock_ids_with_role(session, ADMIN)
            row = await store.by_email(session, email, for_update=True)
            if row is None:
                raise NotFound(f"no user with email {email}")
            old = row.role
            await self._change_role(session, row, role, admins, actor=actor, via="cli")
            return RoleChange(Profile.of(row), old)

    @staticmethod
    async def _change_role(
        session: AsyncSession,
        row: store.ProfileRow,
        role: str,
        admins: list[str],
        *,
        actor: str,
        **details: str,
    ) -> None:
        """Sets the role of the locked ``row`` (``admins``: the locked admin ids) and
        records it; nothing when it already has the role."""
        old = row.role
        if old == role:
            return
        if old == ADMIN and admins == [row.id]:
            raise FailedPrecondition(
                "this user is the last admin; make another user admin first",
                reason="LAST_ADMIN",
            )
        row.role = role
        row.updated_at = utcnow()
        await session.flush()
        await _emit_updated(session, row.id, ["role"])
        await audit.record(
            session,
            store.user_audit,
            "role.changed",
            row.id,
            actor=actor,
            old=old,
            new=role,
            **details,
        )

    async def set_tier(self, user_id: str, tier: str, *, actor: str) -> Profile:
        """Gives ``user_id`` the subscription tier (SetTier, by an admin)."""
        if tier not in TIERS:
            raise InvalidArgument.field("tier", "one of " + ", ".join(TIERS))
        async with self.db.write_transaction() as session:
            row = await store.get(session, user_id, for_update=True)
            if row is None:
                raise NotFound(f"no user {user_id}")
            await self._change_tier(session, row, tier, actor=actor)
            return Profile.of(row)

    async def set_tier_by_email(
        self, email: str, tier: str, *, actor: str = OPERATOR
    ) -> TierChange:
        """Gives the user with ``email`` the tier, for the operator's command (``learnmesh
        users set-tier``). Same rules and audit as SetTier, with ``actor`` "operator"."""
        if tier not in TIERS:
            raise InvalidArgument.field("tier", "one of " + ", ".join(TIERS))
        email = normal_email(email)
        async with self.db.write_transaction() as session:
            row = await store.by_email(session, email, for_update=True)
            if row is None:
                raise NotFound(f"no user with email {email}")
            old = row.tier
            await self._change_tier(session, row, tier, actor=actor, via="cli")
            return TierChange(Profile.of(row), old)

    @staticmethod
    async def _change_tier(
        session: AsyncSession, row: store.ProfileRow, tier: str, *, actor: str, **details: str
    ) -> None:
        """Sets the tier of the locked ``row`` and records it; nothing when it already has
        the tier."""
        old = row.tier
        if old == tier:
            return
        row.tier = tier
        row.updated_at = utcnow()
        await session.flush()
        await _emit_updated(session, row.id, ["tier"])
        await audit.record(
            session,
            store.user_audit,
            "tier.changed",
            row.id,
            actor=actor,
            old=old,
            new=tier,
            **details,
        )

    async def delete(self, user_id: str, *, actor: str) -> None:
        """Deletes the profile (the last admin's only once another admin exists)."""
        async with self.db.write_transaction() as session:  # see set_role
            admins = await store.lock_ids_with_role(session, ADMIN)
            row = await store.get(session, user_id, for_update=True)
            if row is None:
                raise NotFound(f"no user {user_id}")
            if row.role == ADMIN and admins == [user_id]:
                raise FailedPrecondition(
                    "this user is the last admin; make another user admin first",
                    reason="LAST_ADMIN",
                )
            await store.remove(session, user_id)
            deleted = events_pb2.UserDeleted(user_id=user_id)
            await emit(session, store.events.outbox, "user.deleted", user_id, deleted)
            await audit.record(
                session,
                store.user_audit,
                "user.deleted",
                user_id,
                actor=actor,
                self_service=actor == user_id,
            )

    async def set_avatar(self, user_id: str, file_id: str, lookup: FileLookup) -> Profile:
        """Makes the caller's own uploaded image (purpose avatar) their avatar."""
        found = await lookup(file_id)
        if found.owner_id != user_id:
            # An admin may read others' files, but an avatar must be one's own upload.
            raise NotFound(f"no file {file_id} of yours")
        if found.purpose != "avatar":
            raise FailedPrecondition(
                "the file was not uploaded as an avatar (purpose avatar)", reason="NOT_AN_AVATAR"
            )
        if not found.content_type.startswith("image/"):
            raise FailedPrecondition("an avatar must be an image", reason="NOT_AN_IMAGE")
        async with self.db.transaction() as session:
            row = await store.get(session, user_id, for_update=True)
            if row is None:
                raise NotFound(f"no user {user_id}")
            avatar_url = avatar_url_of(file_id)
            changed = row.avatar_url != avatar_url
            row.avatar_url = avatar_url
            row.updated_at = utcnow()
            await session.flush()
            if changed:
                await _emit_updated(session, user_id, ["avatar_url"])
            return Profile.of(row)
