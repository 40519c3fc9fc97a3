"""gRPC in and out for AuthService: protos become use-case calls and back, nothing more.

Access policy and request validation already ran in the server chain (from the proto's
options), so nothing here checks the caller or the shape of a request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2
from grpc import aio

from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.service import Runtime
from services.auth import wiring
from services.auth.wiring import AuthRules

TOKEN_TYPE = "Bearer"


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, rules: AuthRules) -> None:
        self.rules = rules

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RegisterResponse:
        signed_in = await self.rules.registration.register(
            request.email, request.password, request.display_name
        )
        return auth_pb2.RegisterResponse(
            user=signed_in.user,
            access_token=signed_in.access_token,
            refresh_token=signed_in.refresh_token,
            expires_in=signed_in.expires_in,
            token_type=TOKEN_TYPE,
        )

    async def Login(
        self, request: auth_pb2.LoginRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.LoginResponse:
        signed_in = await self.rules.signin.login(
            request.email, request.password, request.mfa_code, request.recovery_code
        )
        return auth_pb2.LoginResponse(
            user=signed_in.user,
            access_token=signed_in.access_token,
            refresh_token=signed_in.refresh_token,
            expires_in=signed_in.expires_in,
            token_type=TOKEN_TYPE,
        )

    async def Refresh(
        self, request: auth_pb2.RefreshRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RefreshResponse:
        signed_in = await self.rules.sessions.refresh(request.refresh_token)
        return auth_pb2.RefreshResponse(
            access_token=signed_in.access_token,
            refresh_token=signed_in.refresh_token,
            expires_in=signed_in.expires_in,
            token_type=TOKEN_TYPE,
        )

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.LogoutResponse:
        revoked = await self.rules.sessions.logout(request.refresh_token, request.all_sessions)
        return auth_pb2.LogoutResponse(revoked_sessions=revoked)

    async def ListSessions(
        self, request: auth_pb2.ListSessionsRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ListSessionsResponse:
        sessions = await self.rules.sessions.list_sessions()
        return auth_pb2.ListSessionsResponse(
            sessions=[
                auth_pb2.Session(
                    id=s.id,
                    created_at=_timestamp(s.created_at),
                    last_used_at=_timestamp(s.last_used_at),
                    expires_at=_timestamp(s.expires_at),
                    client_address=s.client_address,
                    user_agent=s.user_agent,
                    current=s.current,
                )
                for s in sessions
            ]
        )

    async def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RevokeSessionResponse:
        await self.rules.sessions.revoke_session(request.session_id)
        return auth_pb2.RevokeSessionResponse()

    async def EnrollMfa(
        self, request: auth_pb2.EnrollMfaRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.EnrollMfaResponse:
        enrolment = await self.rules.mfa.enroll(request.password)
        return auth_pb2.EnrollMfaResponse(
            secret=enrolment.secret, otpauth_uri=enrolment.otpauth_uri
        )

    async def ConfirmMfa(
        self, request: auth_pb2.ConfirmMfaRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ConfirmMfaResponse:
        codes = await self.rules.mfa.confirm(request.code, request.password)
        return auth_pb2.ConfirmMfaResponse(recovery_codes=codes)

    async def DisableMfa(
        self, request: auth_pb2.DisableMfaRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.DisableMfaResponse:
        await self.rules.mfa.disable(request.code, request.recovery_code, request.password)
        return auth_pb2.DisableMfaResponse()

    async def ResetMfa(
        self, request: auth_pb2.ResetMfaRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ResetMfaResponse:
        done = await self.rules.mfa.reset(request.user_id)
        return auth_pb2.ResetMfaResponse(
            had_mfa=done.had_mfa, revoked_sessions=done.revoked_sessions
        )

    async def RequestPasswordReset(
        self, request: auth_pb2.RequestPasswordResetRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RequestPasswordResetResponse:
        await self.rules.resets.request(request.email)
        return auth_pb2.RequestPasswordResetResponse()

    async def ResetPassword(
        self, request: auth_pb2.ResetPasswordRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ResetPasswordResponse:
        await self.rules.resets.reset(request.token, request.new_password)
        return auth_pb2.ResetPasswordResponse()

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(
            keys=[auth_pb2.Jwk(**jwk) for jwk in await self.rules.introspection.jwks()]
        )

    async def IntrospectToken(
        self, request: auth_pb2.IntrospectTokenRequest, context: aio.ServicerContext[Any, Any]
    ) -> auth_pb2.IntrospectTokenResponse:
        found = await self.rules.introspection.introspect(request.token)
        if not found.active:
            return auth_pb2.IntrospectTokenResponse(active=False)
        return auth_pb2.IntrospectTokenResponse(
            active=True,
            subject=found.subject,
            roles=list(found.roles),
            tier=found.tier,
            expires_at=timestamp_pb2.Timestamp(seconds=found.expires_at),
            session_id=found.session_id,
        )

    async def aclose(self) -> None:
        await self.rules.aclose()


async def create(runtime: Runtime) -> AuthServicer:
    return AuthServicer(await wiring.build(runtime))
