"""Model listing, model API, health and metrics handlers. Only ``/health`` calls providers
(through ``health.check``); the others read gateway state or the database."""

from __future__ import annotations

import os

import uuid

from . import __version__, health
from .errors import DatabaseUnavailable, InvalidRequestError, NotFoundError, ServiceUnavailableError
from .cache import CacheUnavailable
from .handlers import BaseHandler
from .modelstore import ModelStore, public_view
from .providers.base import Deployment
from .registry import Registry, check_model_name

MODEL_CREATED = 1677610602  # the fixed `created` LiteLLM reports for configured models


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "openai"}


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        names = [n for n in self.gw.registry.model_names() if self.principal is None or self.principal.may_use(n)]
        self.write_json({"data": [model_object(n) for n in names], "object": "list"})


class ModelHandler(BaseHandler):
    def get(self, model_id: str) -> None:
        registry = self.gw.registry
        if model_id not in registry.model_names() or (self.principal is not None and not self.principal.may_use(model_id)):
            raise NotFoundError(f"The model '{model_id}' does not exist", param="model")
        self.write_json(model_object(model_id))


class ModelInfoHandler(BaseHandler):
    def get(self) -> None:
        wanted = self.get_query_argument("litellm_model_id", None)
        data = [{
            "model_name": d.model_name,
            "litellm_params": dict(d.public_params),
            "model_info": {**d.model_info, "db_model": d.source == "db"},
        } for d in self.gw.registry.deployments if wanted is None or d.id == wanted]
        self.write_json({"data": data})


class ModelWriteHandler(BaseHandler):
    """Base of /model/new, /model/update, /model/delete: needs database storage; a database
    outage is a 503 (nothing is half-written: each write is one statement)."""

    body_limit = 1024 * 1024

    def store(self) -> ModelStore:
        store = self.gw.catalog.store
        if store is None:
            raise InvalidRequestError(
                "Model storage is off. Set general_settings.store_model_in_db: true (or STORE_MODEL_IN_DB=True) "
                "and general_settings.database_url (or DATABASE_URL) to add, update or delete models.")
        return store

    async def post(self) -> None:
        body = self.json_body()
        store = self.store()
        try:
            result = await self.change(store, body)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailableError(f"Database unavailable ({exc}); the change was not saved. "
                                          "Models already loaded keep serving.") from None
        try:
            await self.gw.catalog.refresh()  # this worker serves it now; the others hear NOTIFY
        except DatabaseUnavailable:
            pass  # saved; the watcher catches up when the database answers again
        self.write_json(result)

    async def change(self, store: ModelStore, body: dict) -> dict:
        raise NotImplementedError


class ModelNewHandler(ModelWriteHandler):
    async def change(self, store: ModelStore, body: dict) -> dict:
        model_id = str((body.get("model_info") or {}).get("id") or uuid.uuid4())
        row = await store.db.insert_model(store.checked_row(body, model_id))
        if row is None:
            raise InvalidRequestError(f"A model with id={model_id} already exists.", param="model_info.id")
        return public_view(row)


class ModelUpdateHandler(ModelWriteHandler):
    async def patch(self) -> None:
        await self.post()

    async def change(self, store: ModelStore, body: dict) -> dict:
        model_id = body.get("id") or body.get("model_id") or (body.get("model_info") or {}).get("id")
        if not model_id:
            raise InvalidRequestError("Missing required parameter: 'model_info.id'.", param="model_info.id")
        old = await store.existing_api_row(model_id)
        merged = {
            "model_name": body.get("model_name") or old.model_name,
            "litellm_params": store.merged_params(old, body.get("litellm_params") or {}),
            "model_info": {**old.model_info, **(body.get("model_info") or {})},
        }
        row = await store.db.update_model(store.checked_row(merged, model_id))
        if row is None:
            raise NotFoundError(f"Model with id={model_id} not found", param="id")
        return public_view(row)


class ModelDeleteHandler(ModelWriteHandler):
    async def change(self, store: ModelStore, body: dict) -> dict:
        await store.existing_api_row(body["id"])
        if not await store.db.delete_model(body["id"]):
            raise NotFoundError(f"Model with id={body['id']} not found", param="id")
        return {"message": f"Model: {body['id']} deleted successfully"}


class LivelinessHandler(BaseHandler):
    def get(self) -> None:
        self.write_json("I'm alive!")


class ReadinessHandler(BaseHandler):
    """LiteLLM's readiness answer; 503 (``"status": "draining"``) once the worker is shutting
    down, so a load balancer stops sending it requests."""

    def get(self) -> None:
        draining = self.gw.draining
        self.write_json({
            "status": "draining" if draining else "healthy",
            "db": self.gw.catalog.db_state,
            "cache": None,
            "litellm_version": __version__,
            "config_generation": self.gw.registry.generation,
            "models": len(self.gw.registry.deployments),
            "worker_pid": os.getpid(),
        }, status=503 if draining else 200)


class HealthHandler(BaseHandler):
    """``GET /health[?model=NAME|?model_id=ID]``: LiteLLM's model health answer. With background
    checks on, the latest report (from whichever worker ran it) is answered without probing."""

    async def get(self) -> None:
        registry = self.gw.registry
        targets = self.targets(registry)
        settings = self.gw.settings
        if settings.background_health_checks:
            report = self.gw.health.latest() or health.HealthReport(checked_at=None)
        else:
            report = await health.check(self.gw.upstream, targets, settings.health_check_timeout)
        body = report.only(d.id for d in targets).to_body()
        # as LiteLLM: a model asked for by name or id with nothing healthy is a 503 (same body)
        targeted = self.get_query_argument("model", None) or self.get_query_argument("model_id", None)
        self.write_json(body, status=503 if targeted and body["unhealthy_count"] and not body["healthy_count"]
                        else 200)

    def targets(self, registry: Registry) -> tuple[Deployment, ...]:
        """The deployments asked about: all, one group (or its alias, or a litellm_params.model),
        or one id. An unknown name is a 400 and an unknown id a 404, as on LiteLLM's routes."""
        model_id = self.get_query_argument("model_id", None)
        model = self.get_query_argument("model", None)
        if model_id:
            found = registry.by_id.get(check_model_name(model_id))
            if found is None:
                raise NotFoundError(f"Model with ID {model_id} not found", param="model_id")
            return (found,)
        if not model:
            return registry.deployments
        name = registry.aliases.get(check_model_name(model), model)
        found = tuple(d for d in registry.deployments if d.model_name == name) or registry.by_litellm_model.get(name, ())
        if not found:
            raise InvalidRequestError(f"Invalid model name passed in model={model}. Call `/v1/models` to view "
                                      "available models for your key.", param="model")
        return found


class MetricsHandler(BaseHandler):
    @property
    def auth_level(self) -> str:
        # general_settings.require_auth_for_metrics_endpoint, as in LiteLLM: then any key the
        # gateway accepts may read it; otherwise the route's level (open by default)
        return "key" if self.gw.settings.require_auth_for_metrics_endpoint else self.route.auth

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gw.metrics.render())


class CacheHandler(BaseHandler):
    def cache(self):
        if self.gw.cache is None:
            raise ServiceUnavailableError("The response cache is off: set litellm_settings.cache: true "
                                          "(and cache_params) to use it.")
        return self.gw.cache


class CachePingHandler(CacheHandler):
    """``GET /cache/ping`` (as LiteLLM): is the cache reachable."""

    async def get(self) -> None:
        cache = self.cache()
        try:
            await cache.ping()
        except CacheUnavailable as exc:
            raise ServiceUnavailableError(f"The response cache ({cache.kind}) is unreachable: {exc}") from None
        self.write_json({"status": "healthy", "cache_type": cache.kind, "ping_response": True})


class CacheFlushAllHandler(CacheHandler):
    """``POST /cache/flushall[?namespace=N]``: delete the cached answers (of one namespace). A
    local cache is this worker's memory: only the worker that takes the request is flushed."""

    async def post(self) -> None:
        cache = self.cache()
        namespace = self.get_query_argument("namespace", None) or None
        try:
            deleted = await cache.flush(namespace)
        except CacheUnavailable as exc:
            raise ServiceUnavailableError(f"The response cache ({cache.kind}) is unreachable: {exc}") from None
        self.write_json({"status": "success", "cache_type": cache.kind, "deleted": deleted})


HANDLERS = {
    "cache_ping": CachePingHandler,
    "cache_flushall": CacheFlushAllHandler,
    "models": ModelsHandler,
    "model": ModelHandler,
    "model_info": ModelInfoHandler,
    "model_new": ModelNewHandler,
    "model_update": ModelUpdateHandler,
    "model_delete": ModelDeleteHandler,
    "liveliness": LivelinessHandler,
    "readiness": ReadinessHandler,
    "health": HealthHandler,
    "metrics": MetricsHandler,
}
