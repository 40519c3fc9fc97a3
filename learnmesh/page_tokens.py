"""Signed page tokens: an opaque cursor that only this service can have made.

A token carries the position after which the next page starts (the sort key values of
the last row sent) and an HMAC-SHA256 over that position and the query it belongs to
(filters, search, ordering). A token edited by hand, made up, or replayed with other
filters fails the check and the call is INVALID_ARGUMENT on ``page_token``; the service
never reads a position it did not sign. The key is the service's (every replica's), so a
token from one replica is good on another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from learnmesh.kernel.errors import InvalidArgument

VERSION = b"page-token-v1"
MAC_BYTES = 16
KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Makes and checks the page tokens of one listing."""

    def __init__(self, key: bytes, *, field: str = "page_token") -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"a page-token key needs at least {KEY_BYTES} bytes")
        self._key = key
        self.field = field

    def _mac(self, payload: bytes, query: Sequence[Any]) -> bytes:
        bound = json.dumps(list(query), separators=(",", ":"), ensure_ascii=False).encode()
        message = b"\x00".join((VERSION, bound, payload))
        return hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_BYTES]

    def encode(self, position: Sequence[Any], *, query: Sequence[Any]) -> str:
        """The token that resumes ``query`` after ``position`` (JSON-able values)."""
        payload = json.dumps(list(position), separators=(",", ":"), ensure_ascii=False).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload, query))}"

    def decode(self, token: str, *, query: Sequence[Any]) -> list[Any]:
        """The position signed in ``token`` for ``query``; INVALID_ARGUMENT otherwise."""
        refused = InvalidArgument.field(
            self.field,
            "not a next_page_token of this listing with these filters and this order; "
            "start again without one",
        )
        encoded, dot, mac = token.partition(".")
        if not dot:
            raise refused
        try:
            payload, given = _unb64(encoded), _unb64(mac)
        except (binascii.Error, ValueError):
            raise refused from None
        if not hmac.compare_digest(given, self._mac(payload, query)):
            raise refused
        try:
            position = json.loads(payload)
        except ValueError:
            raise refused from None
        if not isinstance(position, list):
            raise refused
        return position
