"""Models kept in PostgreSQL: the YAML -> database sync (a pure diff, then one transaction),
the model API's create/update/delete rules, and database rows -> ``ModelSpec``s for the
registry. Secrets are sealed with ``crypt.Cipher`` before they reach ``db.py``."""

from __future__ import annotations

import dataclasses
import logging

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .config import (ConfigError, ModelSpec, env_refs, is_own_secret_env, is_secret_name, resolve_env,
                     resource_dir, unset_params)
from .crypt import Cipher, DecryptError, sealed_count
from .errors import InvalidRequestError, NotFoundError
from .registry import build_deployment, derive_id

if TYPE_CHECKING:  # db.py imports the PostgreSQL driver: only a worker with a database needs it
    from .db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRow:
    """One row of ``proxy_models``."""

    id: str
    model_name: str
    litellm_params: dict
    model_info: dict
    source: str  # "yaml" | "api"
    created_at: datetime | None = None
    updated_at: datetime | None = None

MASK = "***"


def cipher_for(settings, environ: Mapping[str, str]) -> Cipher | None:
    """LITELLM_SALT_KEY, else the master key (LiteLLM's rule). None: nothing to derive from."""
    salt = environ.get("LITELLM_SALT_KEY") or (settings.master_key.reveal() if settings.master_key else None)
    return Cipher(salt) if salt else None


def require_cipher(cipher: Cipher | None) -> Cipher:
    if cipher is None:
        raise InvalidRequestError("Storing models needs LITELLM_SALT_KEY or a master key to encrypt their "
                                  "secrets with.")
    return cipher


def mask(params: Mapping[str, Any]) -> dict:
    """Secret-named values replaced by ``***``, at any depth."""
    return {k: (MASK if is_secret_name(k) and v else mask(v) if isinstance(v, dict) else v)
            for k, v in params.items()}


def yaml_row(spec: ModelSpec, cipher: Cipher) -> ModelRow:
    """A YAML entry as stored: resolved values, secrets sealed, so every instance can serve it."""
    info = dict(spec.model_info)
    info["id"] = str(info.get("id") or derive_id(spec))
    return ModelRow(id=info["id"], model_name=spec.model_name,
                    litellm_params=cipher.seal(spec.litellm_params, is_secret_name), model_info=info, source="yaml")


@dataclass
class SyncPlan:
    added: list[ModelRow] = field(default_factory=list)
    changed: list[ModelRow] = field(default_factory=list)
    removed: list[ModelRow] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    def describe(self) -> list[str]:
        lines = [f"+ {r.model_name} ({r.id}) {mask(r.litellm_params)}" for r in self.added]
        lines += [f"~ {r.model_name} ({r.id}) {mask(r.litellm_params)}" for r in self.changed]
        lines += [f"- {r.model_name} ({r.id})" for r in self.removed]
        return lines


def plan_sync(wanted: Iterable[ModelRow], stored: Iterable[ModelRow], cipher: Cipher) -> SyncPlan:
    """What makes the database's YAML rows equal ``wanted``. API rows are never touched."""
    stored_by_id = {r.id: r for r in stored}
    plan = SyncPlan()
    wanted = list(wanted)
    for row in wanted:
        old = stored_by_id.get(row.id)
        if old is None:
            plan.added.append(row)
        elif old.source != "yaml":
            log.warning("config model id %s is also a model added through the API: the API model is kept",
                        row.id)
        elif not same(old, row, cipher):
            plan.changed.append(row)
    wanted_ids = {r.id for r in wanted}
    plan.removed = [r for r in stored_by_id.values() if r.source == "yaml" and r.id not in wanted_ids]
    return plan


def same(a: ModelRow, b: ModelRow, cipher: Cipher) -> bool:
    try:
        return (a.model_name == b.model_name and a.model_info == b.model_info
                and cipher.open(a.litellm_params) == cipher.open(b.litellm_params))
    except DecryptError:
        return False


ENV_REFUSED = "litellm_params reads os.environ/"  # how spec_of words a refused reference


def spec_of(row: ModelRow, cipher: Cipher | None, environ: Mapping[str, str],
            own_env: frozenset[str] = frozenset()) -> tuple[ModelSpec, str | None]:
    """A stored row as the registry takes it; the second value is why it cannot be served.

    A model added through the API may not read the gateway's own secrets by reference: such a
    reference resolves to nothing and the model is reported, not served."""
    problem = None
    params = dict(row.litellm_params)
    try:
        if cipher is not None:
            params = cipher.open(params)
    except DecryptError as exc:
        problem = str(exc)
    if row.source == "api":
        refused = sorted(n for n in env_refs(params) if is_own_secret_env(n, own_env))
        if refused:
            problem = (f"{ENV_REFUSED}{refused[0]}, one of the gateway's own secrets; a model "
                       "added through the API may only reference provider variables")
            environ = {k: v for k, v in environ.items() if k not in refused}
    missing: list[str] = []
    unset = unset_params(params, environ)
    params = resolve_env(params, environ, missing)
    return ModelSpec(model_name=row.model_name, litellm_params=params, model_info=dict(row.model_info),
                     where=f"database model {row.id}", unset=unset), problem


class RotationError(Exception):
    """Some stored secrets do not decrypt with the current key: nothing was re-encrypted."""

    def __init__(self, model_ids: list[str]):
        super().__init__(f"{len(model_ids)} model(s) have secrets that do not decrypt with the current key")
        self.model_ids = model_ids


def undecryptable(rows: Iterable[ModelRow], cipher: Cipher) -> list[str]:
    """The ids of the rows whose stored secrets ``cipher`` cannot open."""
    bad = []
    for row in rows:
        try:
            cipher.open(row.litellm_params)
        except DecryptError:
            bad.append(row.id)
    return bad


def rotation(rows: list[ModelRow], old: Cipher, new: Cipher) -> dict[str, dict]:
    """Each row holding secrets -> its litellm_params re-encrypted from ``old`` to ``new``.
    RotationError (listing ids, never values) when any row does not decrypt with ``old``."""
    bad = undecryptable(rows, old)
    if bad:
        raise RotationError(bad)
    return {r.id: old.reseal(r.litellm_params, new) for r in rows if sealed_count(r.litellm_params)}


class ModelStore:
    """The database side of the registry, for one gateway (or one ``proxyctl sync``)."""

    def __init__(self, db: Database, cipher: Cipher | None, environ: Mapping[str, str],
                 own_env: frozenset[str] = frozenset()):
        self.db = db
        self.own_env = own_env
        self.cipher = cipher
        self.environ = environ
        self.undecryptable: tuple[str, ...] = ()

    async def plan(self, specs: Iterable[ModelSpec]) -> SyncPlan:
        """The sync diff; against an unmigrated database every model is new (nothing is created)."""
        cipher = require_cipher(self.cipher)
        wanted = [yaml_row(s, cipher) for s in specs]
        stored = await self.db.fetch_models() if await self.db.has_table("proxy_models") else []
        return plan_sync(wanted, stored, cipher)

    async def apply(self, plan: SyncPlan) -> None:
        await self.db.apply_sync(plan.added + plan.changed, [r.id for r in plan.removed])

    async def sync(self, specs: Iterable[ModelSpec]) -> SyncPlan:
        """Migrate, then make the database's config rows match ``specs``, under the start-up lock
        so instances starting together take turns. Returns what changed."""
        async with self.db.startup_lock():
            await self.db.migrate(resource_dir("sql"))
            plan = await self.plan(specs)
            if not plan.empty:
                await self.apply(plan)
        return plan

    async def rotate_key(self, new: Cipher) -> tuple[int, int]:
        """Re-encrypt every stored secret from this store's key to ``new`` in one transaction,
        under the start-up lock (no instance syncs its config models meanwhile). Returns
        (models, secrets) re-encrypted; RotationError changes nothing."""
        old = require_cipher(self.cipher)
        async with self.db.startup_lock():
            changed = await self.db.rewrite_models(lambda rows: rotation(rows, old, new))
        return len(changed), sum(sealed_count(params) for params in changed.values())

    async def deployments(self, exclude_ids: set[str]):
        """The database's models as deployments; ``self.undecryptable`` lists the ids whose
        stored secrets the current key cannot open (served as a 400 naming the reason)."""
        out, undecryptable = [], []
        for row in await self.db.fetch_models():
            if row.id in exclude_ids:
                continue
            spec, problem = spec_of(row, self.cipher, self.environ, self.own_env)
            if problem is not None and not problem.startswith(ENV_REFUSED):
                undecryptable.append(row.id)
            try:
                d = build_deployment(spec, self.environ, source="db" if row.source == "api" else "yaml")
            except (ConfigError, KeyError, TypeError, ValueError) as exc:
                # one row this gateway cannot build (e.g. an os.environ/ value that resolves to
                # something else here) must not stop the others from loading
                log.warning("database model %s is not served: %s", row.id, describe_error(exc))
                continue
            out.append(d if problem is None else dataclasses.replace(d, problem=problem))
        self.undecryptable = tuple(undecryptable)
        return out

    def checked_row(self, body: Mapping[str, Any], model_id: str, source: str = "api") -> ModelRow:
        """Validate a /model/new or /model/update body by building the deployment it describes."""
        cipher = require_cipher(self.cipher)
        spec = ModelSpec(model_name=body["model_name"], litellm_params=dict(body["litellm_params"]),
                         model_info={**(body.get("model_info") or {}), "id": model_id}, where="request")
        resolved, problem = spec_of(ModelRow(model_id, spec.model_name, spec.litellm_params,
                                             dict(spec.model_info), source), None, self.environ, self.own_env)
        if problem:
            raise InvalidRequestError(problem, param="litellm_params")
        resolved = dataclasses.replace(resolved, where="request")  # messages name the request, not a row
        try:
            d = build_deployment(resolved, self.environ, source="db")
        except ConfigError as exc:
            raise InvalidRequestError(str(exc).replace("request.", ""), param="litellm_params") from None
        if d.problem:
            raise InvalidRequestError(d.problem, param="litellm_params.model")
        return ModelRow(id=model_id, model_name=spec.model_name,
                        litellm_params=cipher.seal(spec.litellm_params, is_secret_name),
                        model_info=dict(spec.model_info), source=source)

    def merged_params(self, row: ModelRow, changes: Mapping[str, Any]) -> dict:
        """A stored row's params (decrypted) with ``changes`` on top, for /model/update. A stored
        secret the current key cannot decrypt must be sent again, not silently kept or lost."""
        cipher = require_cipher(self.cipher)
        merged = {}
        for name, value in row.litellm_params.items():
            if name in changes:
                continue
            try:
                merged[name] = cipher.decrypt(value) if isinstance(value, str) else value
            except DecryptError as exc:
                raise InvalidRequestError(f"litellm_params.{name} of model {row.id}: {exc}; send a new value for "
                                          "it.", param=f"litellm_params.{name}") from None
        return {**merged, **changes}

    async def existing_api_row(self, model_id: str) -> ModelRow:
        row = await self.db.fetch_model(model_id)
        if row is None:
            raise NotFoundError(f"Model with id={model_id} not found", param="id")
        if row.source != "api":
            raise InvalidRequestError(f"Model {model_id} is defined in the config file: edit the file and run "
                                      "`proxyctl sync` (or reload) instead.", param="id")
        return row


def describe_error(exc: Exception) -> str:
    return f"missing {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__


def public_view(row: ModelRow) -> dict:
    """The LiteLLM shape of a stored model, secrets masked."""
    return {"model_id": row.id, "model_name": row.model_name, "litellm_params": mask(row.litellm_params),
            "model_info": {**row.model_info, "id": row.id, "db_model": row.source == "api"}}

