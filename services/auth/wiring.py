"""Builds the auth service's use cases from the runtime, once, before serving."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from learnmesh.eventing.handlers import Handlers
from learnmesh.mail import Mailer
from learnmesh.service import Runtime
from services.auth import mfa
from services.auth.deps import Deps
from services.auth.introspection import Introspection
from services.auth.keys import KeyRing
from services.auth.mfa_enrolment import MfaSettings
from services.auth.password_reset import PasswordResets
from services.auth.passwords import Passwords
from services.auth.registration import Registration
from services.auth.second_factor import SecondFactor
from services.auth.sessions import Sessions
from services.auth.signin import SignIn
from services.auth.throttle import Throttle
from services.auth.tokens import Tokens
from services.auth.user_deletion import consumed
from services.auth.users import UserDirectory


@dataclass(frozen=True)
class AuthRules:
    """One object per use case; the servicer calls them."""

    registration: Registration
    signin: SignIn
    sessions: Sessions
    mfa: MfaSettings
    resets: PasswordResets
    introspection: Introspection
    # The events it consumes (the runtime runs their consumer).
    consumes: Handlers

    async def aclose(self) -> None:
        await self.resets.aclose()


async def build(runtime: Runtime) -> AuthRules:
    """Loads or makes the keys, and the dummy password hash, before serving."""
    settings = runtime.settings
    passwords = Passwords(settings.auth)
    await passwords.start()
    keys = KeyRing(settings)
    await keys.start()
    box = await asyncio.to_thread(mfa.SecretBox.from_settings, settings)
    deps = Deps(
        runtime=runtime,
        passwords=passwords,
        tokens=Tokens(keys, settings.auth),
        box=box,
        users=UserDirectory(runtime.clients),
    )
    sessions = Sessions(deps)
    throttle = Throttle(deps)
    second_factor = SecondFactor(deps)
    return AuthRules(
        registration=Registration(deps, sessions),
        signin=SignIn(deps, throttle, second_factor, sessions),
        sessions=sessions,
        mfa=MfaSettings(deps, throttle, second_factor),
        resets=PasswordResets(deps, Mailer(settings.var_dir)),
        introspection=Introspection(deps, keys),
        consumes=consumed(settings.auth.access_token_ttl),
    )
