"""Who is calling: the key headers LiteLLM accepts -> a ``Principal``, checked against the
route's auth level. Keys are compared in constant time and never echoed."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Mapping

from .config import Secret
from .errors import AuthenticationError, PermissionDeniedError

MISSING = "Authentication Error, No api key passed in."
MALFORMED = "Authentication Error, Malformed API Key passed in. Ensure Key has `Bearer ` prefix."
INVALID = "Authentication Error, Invalid proxy server token passed. Check the key you were given."


@dataclass(frozen=True)
class Principal:
    kind: str  # "master" | "anonymous" (no master key configured)

    @property
    def is_admin(self) -> bool:
        return self.kind in ("master", "anonymous")


MASTER = Principal("master")
ANONYMOUS = Principal("anonymous")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent, in LiteLLM's order of headers. ``None``: no key header at all."""
    custom = headers.get("x-litellm-api-key")
    if custom is not None:
        return custom[7:].strip() if custom.startswith("Bearer ") else custom.strip()
    authorization = headers.get("Authorization")
    if authorization is not None:
        if not authorization.startswith("Bearer "):
            raise AuthenticationError(MALFORMED)
        return authorization[7:].strip()
    for name in ("api-key", "x-api-key"):
        value = headers.get(name)
        if value is not None:
            return value.strip()
    return None


def authenticate(headers: Mapping[str, str], level: str, master_key: Secret | None) -> Principal | None:
    """``None`` for public routes; raises ``AuthenticationError`` (401) for a bad or missing key."""
    if level == "none":
        return None
    if not master_key:
        return ANONYMOUS
    key = presented_key(headers)
    if not key:
        raise AuthenticationError(MISSING)
    if hmac.compare_digest(key.encode(), master_key.reveal().encode()):
        return MASTER
    raise AuthenticationError(INVALID)


def authorize(principal: Principal | None, level: str) -> None:
    if level == "master" and (principal is None or not principal.is_admin):
        raise PermissionDeniedError("This route needs the master key.")
