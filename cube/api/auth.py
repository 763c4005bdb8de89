"""Who may call what: API keys, sandbox access tokens, traffic tokens and signed file URLs.

* REST calls carry ``X-API-KEY``; it must equal one configured key (constant-time compare).
* envd calls carry ``X-Access-Token`` = the sandbox's ``envdAccessToken`` (§3.7), except
  ``/health`` and ``/files`` with a valid signature (§3.8).
* Code-interpreter calls (port 49999) carry ``E2B-Traffic-Access-Token`` = the sandbox's
  ``trafficAccessToken``; ``X-Access-Token`` is accepted too (the SDK sends it on /execute).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Final

from .errors import BadRequest, Unauthorized

__all__ = [
    "API_KEY_SETTING",
    "ApiKeys",
    "basic_auth_user",
    "file_signature",
    "generate_api_key",
    "token_matches",
    "verify_file_signature",
]

API_KEY_SETTING: Final = "api_key"
BAD_TOKEN: Final = (
    "unauthorized access, please provide a valid access token or method signing if supported"
)


def generate_api_key() -> str:
    """A new API key in E2B's format: ``e2b_`` and 40 hex characters (old SDKs check it)."""
    return "e2b_" + secrets.token_hex(20)


def token_matches(given: str | None, expected: str | None) -> bool:
    """Constant-time equality of two tokens; a missing one never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class ApiKeys:
    """The keys that open the REST API."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys if k)
        if not self._keys:
            raise ValueError("at least one API key is needed")

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, given: str | None) -> None:
        """Raise ``Unauthorized`` unless ``given`` is one of the keys.

        Every key is compared, whatever matched, so the time taken says nothing about them.
        """
        if not given:
            raise Unauthorized("API key is required (X-API-KEY header)")
        candidate = given.encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(candidate, key)
        if not ok:
            raise Unauthorized("Invalid API key")


def basic_auth_user(header: str | None) -> str | None:
    """The user of an ``Authorization: Basic base64("<user>:")`` header (None when absent)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("only Basic authorization is supported")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic authorization header") from None
    user = decoded.partition(":")[0]
    return user or None


def file_signature(
    path: str, operation: str, username: str, token: str, expiration: int | None = None
) -> str:
    """E2B's signature of a file URL (§3.8): ``v1_`` + unpadded base64 of a sha256."""
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")


def verify_file_signature(
    query: Mapping[str, str], operation: str, token: str | None, now: float | None = None
) -> None:
    """Raise ``Unauthorized`` unless ``query`` carries a valid, unexpired signature."""
    signature = query.get("signature")
    if not signature or not token:
        raise Unauthorized(BAD_TOKEN)
    expiration: int | None = None
    raw_expiration = query.get("signature_expiration")
    if raw_expiration:
        if not raw_expiration.isdigit():
            raise BadRequest("signature_expiration must be unix seconds")
        expiration = int(raw_expiration)
        if expiration < (time.time() if now is None else now):
            raise Unauthorized("signature is already expired")
    expected = file_signature(
        query.get("path", ""), operation, query.get("username", ""), token, expiration
    )
    if not token_matches(signature, expected):
        raise Unauthorized("invalid signature")
