"""LiteLLM's key, team and user management API: ``/key/*``, ``/team/*``, ``/user/*``. Same
paths, request fields and answer shapes as LiteLLM, except that no answer ever carries a
key's text after ``/key/generate`` (and ``/key/regenerate``, ``/user/new``) returned it: lists
and info show the SHA-256 hash (``token``) and the masked ``key_name``.

They need database storage; without it every one answers a 400 saying so. A database outage
is a 503 and nothing is half-written. Each change is announced by PostgreSQL (NOTIFY) to every
worker of every instance; this worker re-reads the row at once."""

from __future__ import annotations

import math
import uuid
from typing import Any

from .errors import (DatabaseUnavailable, InvalidRequestError, NotFoundError, PermissionDeniedError,
                     ServiceUnavailableError)
from .handlers import BaseHandler
from .keystore import (KEYS, TEAMS, USERS, KeyRecord, TeamRecord, TenantStore, hash_key, masked, new_key, now,
                       parse_duration, public, token_of)

NO_STORAGE = ("Virtual keys, teams and users need database storage: set general_settings.database_url (or "
              "DATABASE_URL) and general_settings.store_model_in_db: true (or STORE_MODEL_IN_DB=True). Without "
              "it only the master key is accepted.")
COMMON = ("models", "max_budget", "soft_budget", "tpm_limit", "rpm_limit", "max_parallel_requests",
          "model_max_budget", "metadata")
KEY_FIELDS = COMMON + ("key_alias", "team_id", "user_id", "blocked")
TEAM_FIELDS = COMMON + ("team_alias", "blocked")
USER_FIELDS = COMMON + ("user_email", "user_alias", "user_role")
USER_ROLES = ("proxy_admin", "proxy_admin_viewer", "internal_user", "internal_user_viewer")


def duration_of(body: dict, name: str):
    try:
        return parse_duration(body[name])
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param=name) from None


def changes(body: dict, names: tuple[str, ...]) -> dict:
    """The columns a request sets: the named fields it sends, plus what its durations mean."""
    values = {n: body[n] for n in names if n in body}
    for n in ("models",):
        if n in values and values[n] is None:
            values[n] = []
    for n in ("model_max_budget", "metadata"):
        if n in values and values[n] is None:
            values[n] = {}
    if "blocked" in values and values["blocked"] is None:
        values["blocked"] = False
    if "budget_duration" in body:
        values["budget_duration"] = body["budget_duration"] or None
        values["budget_reset_at"] = now() + duration_of(body, "budget_duration") if body["budget_duration"] else None
    if "duration" in body:  # a key's lifetime from now; null or "-1": never expires
        values["expires"] = now() + duration_of(body, "duration") if body["duration"] not in (None, "", "-1") else None
    return values


def key_view(record: KeyRecord) -> dict:
    view = public(record)
    view["token_id"] = record.token
    return view


def members_view(members) -> list[dict]:
    return [{"role": m.role, "user_id": m.user_id, "user_email": m.user_email} for m in members]


class TenantAdminHandler(BaseHandler):
    """Base of the management handlers: database storage required, outages are a 503, and a
    change is re-read into this worker's key memory before the answer goes out."""

    body_limit = 1024 * 1024

    @property
    def store(self) -> TenantStore:
        store = self.gw.tenants.store
        if store is None:
            raise InvalidRequestError(NO_STORAGE)
        return store

    async def post(self, **path) -> None:
        body = self.json_body()
        self.store  # noqa: B018 - the 400 first
        await self.answer(self.change, body, **path)

    async def get(self, **_path) -> None:
        self.store  # noqa: B018
        await self.answer(self.read)

    async def answer(self, work, *args, **kwargs) -> None:
        try:
            result = await work(*args, **kwargs)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailableError(f"Database unavailable ({exc}); the change was not saved (nor anything "
                                          "read). Keys already known keep working.") from None
        self.write_json(result)

    async def announce(self, *names: str) -> None:
        """This worker sees the change now; the others hear it from PostgreSQL."""
        try:
            await self.gw.tenants.reload(set(names))
        except DatabaseUnavailable:
            pass

    def arg(self, name: str, default: Any = None) -> Any:
        return self.get_query_argument(name, default)

    def page_args(self, size_name: str, default_size: int) -> tuple[int, int]:
        try:
            page = max(int(self.arg("page", "1")), 1)
            size = min(max(int(self.arg(size_name, str(default_size))), 1), 100)
        except ValueError:
            raise InvalidRequestError(f"page and {size_name} must be whole numbers.", param=size_name) from None
        return page, size

    async def change(self, body: dict, **path) -> dict:
        raise NotImplementedError

    async def read(self) -> Any:
        raise NotImplementedError

    async def existing_key(self, key: str | None) -> KeyRecord:
        if not key:
            raise InvalidRequestError("Missing required parameter: 'key'.", param="key")
        record = await self.store.get(KEYS, token_of(key))
        if record is None:
            raise NotFoundError("Key not found.", param="key")
        return record

    async def existing_team(self, team_id: str | None) -> TeamRecord:
        if not team_id:
            raise InvalidRequestError("Missing required parameter: 'team_id'.", param="team_id")
        team = await self.store.get(TEAMS, team_id)
        if team is None:
            raise NotFoundError(f"Team not found, passed team_id={team_id}", param="team_id")
        return team

    async def create_key(self, values: dict, text: str | None = None) -> tuple[str, KeyRecord]:
        text = text or new_key()
        if not text.startswith("sk-"):
            raise InvalidRequestError("Invalid key format. A virtual key must start with 'sk-'.", param="key")
        if values.get("user_id"):
            await self.store.insert(USERS, {"user_id": values["user_id"]})  # as LiteLLM: the user exists from now
        try:
            record = await self.store.insert(KEYS, {**values, "token": hash_key(text), "key_name": masked(text)})
        except LookupError:
            raise InvalidRequestError(f"Team not found, passed team_id={values.get('team_id')}",
                                      param="team_id") from None
        if record is None:
            raise InvalidRequestError("A key with this key_alias (or this key) already exists.", param="key_alias")
        await self.announce(f"key:{record.token}")
        return text, record


class KeyGenerateHandler(TenantAdminHandler):
    async def change(self, body: dict, **_path) -> dict:
        text, record = await self.create_key(changes(body, KEY_FIELDS), body.get("key"))
        return {**key_view(record), "key": text, "duration": body.get("duration")}


class KeyUpdateHandler(TenantAdminHandler):
    async def change(self, body: dict, **_path) -> dict:
        record = await self.existing_key(body.get("key"))
        try:
            updated = await self.store.update(KEYS, record.token, changes(body, KEY_FIELDS))
        except KeyError:
            raise InvalidRequestError("A key with this key_alias already exists.", param="key_alias") from None
        except LookupError:
            raise InvalidRequestError(f"Team not found, passed team_id={body.get('team_id')}", param="team_id") from None
        if updated is None:
            raise NotFoundError("Key not found.", param="key")
        await self.announce(f"key:{record.token}")
        return {**key_view(updated), "key": updated.token}


class KeyDeleteHandler(TenantAdminHandler):
    async def change(self, body: dict, **_path) -> dict:
        tokens = [token_of(k) for k in body.get("keys") or []]
        if body.get("key_aliases"):
            tokens += await self.store.key_tokens_by_alias(body["key_aliases"])
        if not tokens:
            raise InvalidRequestError("Send 'keys' (keys or their hashes) or 'key_aliases'.", param="keys")
        deleted = await self.store.delete(KEYS, tokens)
        if not deleted:
            raise NotFoundError("No such keys: nothing was deleted.", param="keys")
        await self.announce(*(f"key:{t}" for t in deleted))
        return {"deleted_keys": deleted}


class KeyBlockHandler(TenantAdminHandler):
    blocked = True

    async def change(self, body: dict, **_path) -> dict:
        record = await self.existing_key(body.get("key"))
        updated = await self.store.update(KEYS, record.token, {"blocked": self.blocked})
        if updated is None:
            raise NotFoundError("Key not found.", param="key")
        await self.announce(f"key:{record.token}")
        return key_view(updated)


class KeyUnblockHandler(KeyBlockHandler):
    blocked = False


class KeyRegenerateHandler(TenantAdminHandler):
    """``POST /key/regenerate`` (``{"key": ...}``) or ``POST /key/{key}/regenerate``: a new key
    for the same record (spend, budgets and limits stay); the old key stops working."""

    async def change(self, body: dict, key: str | None = None, **_path) -> dict:
        record = await self.existing_key(key or body.get("key"))
        text = body.get("new_key") or new_key()
        if not text.startswith("sk-"):
            raise InvalidRequestError("Invalid key format. A virtual key must start with 'sk-'.", param="new_key")
        values = {**changes(body, KEY_FIELDS), "token": hash_key(text), "key_name": masked(text)}
        updated = await self.store.update(KEYS, record.token, values)
        if updated is None:
            raise NotFoundError("Key not found.", param="key")
        await self.announce(f"key:{record.token}", f"key:{updated.token}")
        return {**key_view(updated), "key": text}


class KeyInfoHandler(TenantAdminHandler):
    """Any key may read its own record (the caller's key when none is named); only the master
    key may read another's."""

    async def read(self) -> dict:
        named = self.arg("key")
        principal = self.principal
        if principal is not None and not principal.is_admin:
            if named is not None and token_of(named) != principal.token:
                raise PermissionDeniedError("A virtual key may only read its own /key/info.", param="key")
            named = principal.token
        elif named is None:
            raise InvalidRequestError("Missing required parameter: 'key'.", param="key")
        record = await self.existing_key(named)
        return {"key": record.token, "info": key_view(record)}


class KeyListHandler(TenantAdminHandler):
    async def read(self) -> dict:
        page, size = self.page_args("size", 10)
        where = {n: self.arg(n) for n in ("user_id", "team_id", "key_alias") if self.arg(n) is not None}
        rows, total = await self.store.page(KEYS, where, page, size)
        full = (self.arg("return_full_object") or "").lower() == "true"
        return {"keys": [key_view(r) for r in rows] if full else [r.token for r in rows],
                "total_count": total, "current_page": page, "total_pages": math.ceil(total / size)}


class TeamNewHandler(TenantAdminHandler):
    async def change(self, body: dict, **_path) -> dict:
        team_id = body.get("team_id") or str(uuid.uuid4())
        team = await self.store.insert(TEAMS, {**changes(body, TEAM_FIELDS), "team_id": team_id})
        if team is None:
            raise InvalidRequestError(f"Team id = {team_id} already exists. Please use a different team id.",
                                      param="team_id")
        members = body.get("members_with_roles") or []
        if members:
            await self.store.add_members(team_id, await self.checked_members(members))
        await self.announce(f"team:{team_id}")
        return await self.team_view(team)

    async def checked_members(self, members: list[dict]) -> list[dict]:
        out = []
        for m in members:
            if not m.get("user_id") and not m.get("user_email"):
                raise InvalidRequestError("Each member needs a user_id or a user_email.", param="member")
            user_id = m.get("user_id")
            if not user_id:
                known = await self.store.user_by_email(m["user_email"])
                user_id = known.user_id if known is not None else str(uuid.uuid4())
            out.append({"user_id": user_id, "user_email": m.get("user_email"), "role": m.get("role") or "user"})
        return out

    async def team_view(self, team: TeamRecord) -> dict:
        return {**public(team), "members_with_roles": members_view(await self.store.members([team.team_id]))}


class TeamUpdateHandler(TeamNewHandler):
    async def change(self, body: dict, **_path) -> dict:
        team = await self.existing_team(body.get("team_id"))
        updated = await self.store.update(TEAMS, team.team_id, changes(body, TEAM_FIELDS))
        if updated is None:
            raise NotFoundError(f"Team not found, passed team_id={team.team_id}", param="team_id")
        await self.announce(f"team:{team.team_id}")
        return {"team_id": team.team_id, "data": await self.team_view(updated)}


class TeamDeleteHandler(TenantAdminHandler):
    """Deletes the teams and, as LiteLLM, their keys."""

    async def change(self, body: dict, **_path) -> dict:
        ids = body["team_ids"]
        keys = []
        for team_id in ids:
            found, _ = await self.store.page(KEYS, {"team_id": team_id}, 1, 10_000)
            keys += found
        deleted = await self.store.delete(TEAMS, ids)
        missing = [t for t in ids if t not in deleted]
        if missing:
            raise NotFoundError(f"Team not found, passed team_id={missing[0]}", param="team_ids")
        await self.announce(*(f"team:{t}" for t in deleted), *(f"key:{k.token}" for k in keys))
        return {"deleted_teams": deleted, "deleted_keys": [k.token for k in keys]}


class TeamInfoHandler(TeamNewHandler):
    async def read(self) -> dict:
        team = await self.existing_team(self.arg("team_id"))
        keys, _ = await self.store.page(KEYS, {"team_id": team.team_id}, 1, 10_000)
        members = await self.store.members([team.team_id])
        return {"team_id": team.team_id, "team_info": {**public(team), "members_with_roles": members_view(members)},
                "keys": [key_view(k) for k in keys],
                "team_memberships": [{"team_id": m.team_id, "user_id": m.user_id, "role": m.role} for m in members]}


class TeamListHandler(TeamNewHandler):
    async def read(self) -> list:
        teams = await self.store.all(TEAMS)
        user_id = self.arg("user_id")
        members = await self.store.members(None if user_id is None else [t.team_id for t in teams], user_id)
        if user_id is not None:
            mine = {m.team_id for m in members}
            teams = [t for t in teams if t.team_id in mine]
            members = await self.store.members(mine)
        by_team: dict[str, list] = {}
        for m in members:
            by_team.setdefault(m.team_id, []).append(m)
        return [{**public(t), "members_with_roles": members_view(by_team.get(t.team_id, []))} for t in teams]


class TeamMemberAddHandler(TeamNewHandler):
    async def change(self, body: dict, **_path) -> dict:
        team = await self.existing_team(body.get("team_id"))
        given = body.get("member")
        members = await self.checked_members(given if isinstance(given, list) else [given])
        await self.store.add_members(team.team_id, members)
        await self.announce(f"team:{team.team_id}", *(f"user:{m['user_id']}" for m in members))
        users = await self.store.get_many(USERS, [m["user_id"] for m in members])
        return {**await self.team_view(team), "updated_users": [public(u) for u in users],
                "updated_team_memberships": [{"team_id": team.team_id, "user_id": m["user_id"], "role": m["role"]}
                                             for m in members]}


class TeamMemberDeleteHandler(TeamNewHandler):
    async def change(self, body: dict, **_path) -> dict:
        team = await self.existing_team(body.get("team_id"))
        if not body.get("user_id") and not body.get("user_email"):
            raise InvalidRequestError("Send the member's user_id or user_email.", param="user_id")
        if not await self.store.remove_member(team.team_id, body.get("user_id"), body.get("user_email")):
            raise NotFoundError(f"User is not a member of team_id={team.team_id}", param="user_id")
        await self.announce(f"team:{team.team_id}")
        return await self.team_view(team)


class UserNewHandler(TenantAdminHandler):
    """As LiteLLM: the user, their team memberships and (unless ``auto_create_key`` is false)
    a first key, returned once."""

    async def change(self, body: dict, **_path) -> dict:
        user_id = body.get("user_id") or str(uuid.uuid4())
        values = changes(body, USER_FIELDS)
        check_role(values)
        for team_id in body.get("teams") or []:
            await self.existing_team(team_id)
        user = await self.store.insert(USERS, {**values, "user_id": user_id})
        if user is None:
            raise InvalidRequestError(f"User with id={user_id} already exists.", param="user_id")
        for team_id in body.get("teams") or []:
            await self.store.add_members(team_id, [{"user_id": user_id, "user_email": user.user_email}])
        await self.announce(f"user:{user_id}", *(f"team:{t}" for t in body.get("teams") or []))
        answer = {**public(user), "teams": body.get("teams") or [], "key": None, "key_name": None, "token": None,
                  "expires": None}
        if body.get("auto_create_key", True):
            key_values = changes({k: body[k] for k in ("key_alias", "duration", "models") if k in body},
                                 ("key_alias", "models"))
            text, record = await self.create_key({**key_values, "user_id": user_id})
            answer.update(key=text, key_name=record.key_name, token=record.token, expires=public(record)["expires"])
        return answer


def check_role(values: dict) -> None:
    if "user_role" in values:
        if values["user_role"] is None:
            values["user_role"] = "internal_user"
        elif values["user_role"] not in USER_ROLES:
            raise InvalidRequestError(f"user_role must be one of {', '.join(USER_ROLES)}.", param="user_role")


class UserUpdateHandler(TenantAdminHandler):
    async def change(self, body: dict, **_path) -> dict:
        user = await self.existing_user(body.get("user_id"), body.get("user_email"))
        values = changes(body, USER_FIELDS)
        check_role(values)
        updated = await self.store.update(USERS, user.user_id, values)
        if updated is None:
            raise NotFoundError(f"User not found, passed user_id={user.user_id}", param="user_id")
        await self.announce(f"user:{user.user_id}")
        return {"user_id": user.user_id, "data": public(updated)}

    async def existing_user(self, user_id: str | None, user_email: str | None = None):
        if not user_id and not user_email:
            raise InvalidRequestError("Missing required parameter: 'user_id'.", param="user_id")
        user = await self.store.get(USERS, user_id) if user_id else await self.store.user_by_email(user_email)
        if user is None:
            raise NotFoundError(f"User not found, passed user_id={user_id or user_email}", param="user_id")
        return user


class UserDeleteHandler(TenantAdminHandler):
    """Deletes the users, their keys and their team memberships."""

    async def change(self, body: dict, **_path) -> dict:
        ids = body["user_ids"]
        keys = []
        for user_id in ids:
            found, _ = await self.store.page(KEYS, {"user_id": user_id}, 1, 10_000)
            keys += found
        deleted = await self.store.delete_user(ids)
        if not deleted:
            raise NotFoundError(f"User not found, passed user_id={ids[0]}", param="user_ids")
        await self.announce(*(f"user:{u}" for u in deleted), *(f"key:{k.token}" for k in keys))
        return {"deleted_users": deleted, "deleted_keys": [k.token for k in keys]}


class UserInfoHandler(UserUpdateHandler):
    async def read(self) -> dict:
        user = await self.existing_user(self.arg("user_id"))
        keys, _ = await self.store.page(KEYS, {"user_id": user.user_id}, 1, 10_000)
        team_ids = [m.team_id for m in await self.store.members(user_id=user.user_id)]
        teams = await self.store.get_many(TEAMS, team_ids) if team_ids else []
        return {"user_id": user.user_id, "user_info": {**public(user), "teams": team_ids},
                "keys": [key_view(k) for k in keys], "teams": [public(t) for t in teams]}


class UserListHandler(TenantAdminHandler):
    async def read(self) -> dict:
        page, size = self.page_args("page_size", 25)
        where = {"user_role": self.arg("role")} if self.arg("role") else {}
        users, total = await self.store.page(USERS, where, page, size)
        return {"users": [public(u) for u in users], "total": total, "page": page, "page_size": size,
                "total_pages": math.ceil(total / size)}


HANDLERS = {
    "key_generate": KeyGenerateHandler,
    "key_update": KeyUpdateHandler,
    "key_delete": KeyDeleteHandler,
    "key_info": KeyInfoHandler,
    "key_list": KeyListHandler,
    "key_block": KeyBlockHandler,
    "key_unblock": KeyUnblockHandler,
    "key_regenerate": KeyRegenerateHandler,
    "team_new": TeamNewHandler,
    "team_update": TeamUpdateHandler,
    "team_delete": TeamDeleteHandler,
    "team_info": TeamInfoHandler,
    "team_list": TeamListHandler,
    "team_member_add": TeamMemberAddHandler,
    "team_member_delete": TeamMemberDeleteHandler,
    "user_new": UserNewHandler,
    "user_update": UserUpdateHandler,
    "user_delete": UserDeleteHandler,
    "user_info": UserInfoHandler,
    "user_list": UserListHandler,
}
