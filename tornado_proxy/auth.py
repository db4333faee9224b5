"""Who is calling: the key headers LiteLLM accepts -> a ``Principal`` (the master key, or a
virtual key with its team and user), checked against the route's auth level and the models
the key may use. Keys are compared in constant time and never echoed."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from .config import Secret
from .errors import AuthenticationError, DatabaseUnavailable, PermissionDeniedError, ServiceUnavailableError
from .keystore import KeyRecord, TeamRecord, UserRecord, hash_key, now
from .ratelimit import LimitScope

if TYPE_CHECKING:
    from .tenants import Tenants

MISSING = "Authentication Error, No api key passed in."
MALFORMED = "Authentication Error, Malformed API Key passed in. Ensure Key has `Bearer ` prefix."
INVALID = "Authentication Error, Invalid proxy server token passed. Check the key you were given."


ALL_MODELS = ("all-proxy-models", "*")
BLOCKED = "Authentication Error, Key is blocked. Update via `/key/unblock` if you're admin."
KEY_STORE_DOWN = ("Authentication Error, the key store is unavailable: the database cannot be reached and this "
                  "key is not among the keys this gateway already knows. Retry shortly.")


def allows(models: tuple, model: str) -> bool:
    """LiteLLM's model lists: empty or ``all-proxy-models`` = every model; ``openai/*`` = a prefix."""
    if not models or model in models:
        return True
    for allowed in models:
        if allowed in ALL_MODELS or allowed == "all-team-models":
            return True
        if allowed.endswith("*") and model.startswith(allowed[:-1]):
            return True
    return False


@dataclass(frozen=True)
class Principal:
    kind: str  # "master" | "anonymous" (no master key configured) | "key" (a virtual key)
    key: KeyRecord | None = None
    team: TeamRecord | None = None
    user: UserRecord | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind in ("master", "anonymous") or (self.user is not None and self.user.user_role == "proxy_admin")

    @property
    def token(self) -> str | None:
        """The hashed key (the spend log's ``api_key``); None for the master key."""
        return self.key.token if self.key is not None else None

    def may_use(self, model: str) -> bool:
        """The intersection of the key's and its team's models."""
        if self.key is None:
            return True
        if not allows(self.key.models, model):
            return False
        return self.team is None or allows(self.team.models, model)

    def check_model(self, *names: str) -> None:
        """403 unless the key (and its team) may use one of ``names`` (the requested name, and
        the group an alias points to). LiteLLM 1.108's wording and error type."""
        if self.key is None or any(self.may_use(n) for n in names if n):
            return
        model = names[0]
        if not any(allows(self.key.models, n) for n in names if n):
            raise PermissionDeniedError(
                f"key not allowed to access model. This key can only access models={list(self.key.models)}. "
                f"Tried to access {model}", param="model", type="key_model_access_denied")
        raise PermissionDeniedError(
            f"team not allowed to access model. This team can only access models={list(self.team.models)}. "
            f"Tried to access {model}", param="model", type="team_model_access_denied")

    def limit_scopes(self) -> tuple[LimitScope, ...]:
        """The rate-limit scopes of the key, its team and its user, in that order, leaving out
        those with no limit at all."""
        scopes = []
        for kind, record, ident in (("key", self.key, self.key and self.key.token),
                                    ("team", self.team, self.team and self.team.team_id),
                                    ("user", self.user, self.user and self.user.user_id)):
            if record is None:
                continue
            limits = (record.rpm_limit, record.tpm_limit, record.max_parallel_requests)
            if any(v is not None for v in limits):
                scopes.append(LimitScope(kind, ident, *limits))
        return tuple(scopes)


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
    """``None`` for public routes; raises ``AuthenticationError`` (401) for a bad or missing key.
    The master key only (``authenticate_request`` also takes virtual keys)."""
    found = master_or_key(headers, level, master_key)
    if isinstance(found, str):
        raise AuthenticationError(INVALID)
    return found


def master_or_key(headers: Mapping[str, str], level: str, master_key: Secret | None) -> Principal | str | None:
    """None for public routes, the master (or anonymous) principal, or the presented key that is
    not the master key (for the key store to judge). 401 when no key was presented."""
    if level == "none":
        return None
    if not master_key:
        return ANONYMOUS
    key = presented_key(headers)
    if not key:
        raise AuthenticationError(MISSING)
    if hmac.compare_digest(key.encode(), master_key.reveal().encode()):
        return MASTER
    return key


async def authenticate_request(headers: Mapping[str, str], level: str, master_key: Secret | None,
                               tenants: Tenants | None) -> Principal | None:
    """``authenticate``, and a virtual key from the per-worker key cache (a key not in it is
    looked up once). 401 for a bad, blocked or expired key; 503 when the key is unknown and
    the key store cannot be reached."""
    key = master_or_key(headers, level, master_key)
    if not isinstance(key, str):
        return key
    if tenants is None or tenants.store is None:
        raise AuthenticationError(INVALID)
    try:
        principal = await tenants.principal(hash_key(key))
    except DatabaseUnavailable:
        raise ServiceUnavailableError(KEY_STORE_DOWN) from None
    if principal is None:
        raise AuthenticationError(INVALID)
    check_usable(principal)
    return principal


def check_usable(principal: Principal) -> None:
    key = principal.key
    if key.blocked:
        raise AuthenticationError(BLOCKED)
    if principal.team is not None and principal.team.blocked:
        raise AuthenticationError(f"Authentication Error, Team={principal.team.team_id} is blocked. Update via "
                                  "`/team/update` if you're admin.", type="team_blocked")
    current = now()
    if key.expired(current):
        raise AuthenticationError(f"Authentication Error - Expired Key. Key Expiry time {key.expires.isoformat()} "
                                  f"and current time {current.isoformat()}", type="expired_key")


def authorize(principal: Principal | None, level: str) -> None:
    if level == "master" and (principal is None or not principal.is_admin):
        raise PermissionDeniedError("This route needs the master key.")
