"""The ``Gateway``: one long-lived object per worker holding config, registry, router,
upstream client and metrics, handed to every handler; and the Tornado application."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path

import tornado.web

from . import admin, handlers, keyadmin, llm, media, messages, responsesapi, routes, spendadmin
from .cache import build_cache
from .cachekey import CacheSettings
from .catalog import Catalog
from .config import Config, ConfigError, Secret, Settings, describe_ignored, resource_dir
from .counters import LocalCounters, SharedCounters
from .handlers import CallContext
from .health import HealthMonitor, MemoryReports
from .metrics import Metrics
from .ratelimit import LimitTable, RateLimiter, redis_client
from .responsedir import ResponseDirectory
from .responsestore import ResponseStore
from .retention import RetentionSettings, SpendLogRetention
from .registry import Registry, build_registry
from .router import Router, RouterSettings, with_settings
from .budget import BudgetReset
from .keystore import hash_key
from .schemas import Schemas
from .spend import SpendWriter
from .spendstore import SpendStore
from .tenants import Tenants
from .tracing import TraceSettings, Tracer, check_installed
from .upstream import Upstream

log = logging.getLogger(__name__)

# Settings that size the process: a reload keeps the running values.
RESTART_ONLY = ("num_workers", "upstream_max_connections", "upstream_connect_timeout", "database_url",
                "store_model_in_db", "database_connection_pool_limit", "database_connection_timeout",
                "embedded_db_dir", "max_request_size_mb", "spend_spill_dir", "spend_queue_size",
                "redis_host", "redis_port", "redis_password", "redis_url", "keepalive_timeout",
                "graceful_shutdown_timeout", "ssl_verify", "ssl_cert_file", "ssl_keyfile_path", "ssl_certfile_path")

HANDLERS = {**llm.HANDLERS, **messages.HANDLERS, **media.HANDLERS, **responsesapi.HANDLERS, **admin.HANDLERS,
            **keyadmin.HANDLERS, **spendadmin.HANDLERS}


class Gateway:
    def __init__(self, config: Config, metrics: Metrics | None = None, generation: int = 1,
                 health: HealthMonitor | None = None, limits: LimitTable | None = None, worker: int = 0,
                 responses_dir: Path | None = None):
        self.config = config
        self.settings = config.settings
        self.schemas = Schemas(resource_dir("schemas"))
        self.catalog = Catalog(config, generation)
        # virtual keys live in the same database as the models, on the same pool
        self.tenants = Tenants(self.catalog.store.db if self.catalog.store is not None else None, self.settings)
        # one Redis client (or none) for the rate limits and the router's shared counters
        redis = redis_client(self.settings)
        self.shared_counters = SharedCounters(redis, self.deployment_ids) if redis is not None else None
        self.router = Router(RouterSettings.parse(config.router_settings, config.litellm_settings),
                             self.shared_counters or LocalCounters())
        self.metrics = metrics or Metrics()
        self.upstream: Upstream | None = None
        self.app: tornado.web.Application | None = None
        self.in_flight = 0
        self.draining = False  # SIGTERM came: readiness answers 503 while in-flight requests finish
        # alone, this worker checks models itself; under ``serve``, worker 0 checks for all
        self.health = health or HealthMonitor(MemoryReports(), runs_checks=True)
        # under ``serve`` the supervisor's table, shared by all workers; alone, a table of its own
        self.own_limits = limits is None
        self.limiter = RateLimiter(limits or LimitTable(), worker if limits else 0, redis,
                                   rejections=self.metrics.rate_limit_rejections)
        db = self.catalog.store.db if self.catalog.store is not None else None
        self.spend_store = SpendStore(db) if db is not None else None
        # Responses API responses (previous_response_id, GET / DELETE): under ``serve`` shared by
        # the instance's workers through a directory; alone, in this worker's memory
        self.responses = ResponseStore(db, ResponseDirectory(responses_dir) if responses_dir is not None else None,
                                       watches=worker == 0)
        self.spend = SpendWriter(self.spend_store, self.tenants, self.settings.spend_spill_dir,
                                 self.settings.spend_queue_size, self.metrics.spend_log_dropped)
        self.budget_reset = BudgetReset(self.spend_store, self.settings.proxy_budget_rescheduler_min_time)
        # spend log retention: worker 0 of each instance runs it (an advisory lock keeps it to one instance)
        self.retention = SpendLogRetention(self.spend_store if worker == 0 else None,
                                           RetentionSettings.parse(self.settings))
        # the response cache (litellm_settings.cache): None when off; a restart changes it
        self.cache_settings, _ = CacheSettings.parse(config.litellm_settings)
        self.cache = build_cache(self.cache_settings, self.settings) if self.cache_settings else None
        if self.cache is None:
            self.cache_settings = None
        self._master_hash: tuple[str, str] | None = None
        # OpenTelemetry tracing: None when off (the request path checks only that); a restart changes it
        trace_settings = TraceSettings.parse(config.litellm_settings, config.environ)
        self.tracer = Tracer(trace_settings) if trace_settings is not None else None

    def master_key_hash(self) -> str:
        """The master key's SHA-256 hex: its calls' ``api_key`` in the spend log (as LiteLLM's)."""
        key = self.settings.master_key.reveal() if self.settings.master_key else ""
        if self._master_hash is None or self._master_hash[0] != key:
            self._master_hash = (key, hash_key(key) if key else "")
        return self._master_hash[1]

    @property
    def registry(self) -> Registry:
        return self.catalog.registry

    def deployment_ids(self) -> list[str]:
        """The ids whose shared counters this worker mirrors: the current registry's."""
        return [d.id for d in self.registry.deployments]

    def begin(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    async def start(self, require_db: bool = False) -> None:
        """Create what needs the running event loop; connect the database (if configured)."""
        if self.tracer is not None:
            self.tracer.start()  # its export thread belongs to this worker (after the fork)
        self.upstream = Upstream(self.settings.upstream_max_connections, self.settings.upstream_connect_timeout,
                                 ssl_verify=self.settings.ssl_verify, ssl_cert_file=self.settings.ssl_cert_file)
        await self.catalog.start(require_db)
        await self.tenants.start()
        self.responses.open()
        self.spend.start()
        self.budget_reset.start()
        self.retention.start()
        self.health.start(self)
        if self.shared_counters is not None:
            self.shared_counters.start()

    async def stop(self) -> None:
        await self.health.stop()
        await self.budget_reset.stop()
        await self.retention.stop()
        await self.spend.stop(self.settings.graceful_shutdown_timeout or 5.0)
        await self.responses.stop()
        await self.tenants.stop()
        if self.shared_counters is not None:
            await self.shared_counters.stop()
        await self.limiter.close()  # closes the Redis client too
        if self.cache is not None:
            await self.cache.close()
        if self.own_limits:
            self.limiter.table.close()
        await self.catalog.stop()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.tracer is not None:  # last: every request has ended and its span is queued
            await self.tracer.stop(self.tracer.settings.timeout + 1.0)

    async def reload(self, config: Config, generation: int) -> None:
        """Swap in a validated config: routes, models and settings. Requests in flight keep
        what they started with; settings that size the process (workers, pools, database)
        take effect at the next restart."""
        rules = routes.build(config.routes, HANDLERS, self.schemas, self)
        for name in RESTART_ONLY:
            if getattr(config.settings, name) != getattr(self.settings, name):
                log.warning("reload: %s changed; it takes effect at the next restart", name)
        if CacheSettings.parse(config.litellm_settings)[0] != CacheSettings.parse(self.config.litellm_settings)[0]:
            log.warning("reload: litellm_settings.cache / cache_params changed; they take effect at the next restart")
        if TraceSettings.parse(config.litellm_settings, config.environ) != TraceSettings.parse(
                self.config.litellm_settings, self.config.environ):
            log.warning("reload: tracing settings changed; they take effect at the next restart")
        router = with_settings(self.router, RouterSettings.parse(config.router_settings, config.litellm_settings))
        self.config = keep_restart_only(config, self.settings)
        self.settings = self.config.settings
        self.router = router
        self.tenants.settings = self.settings
        self.retention.configure(RetentionSettings.parse(self.settings))
        if self.app is not None:
            swap_rules(self.app, rules)
        await self.catalog.reload(self.config, generation)
        self.health.wake()  # models or health settings may have changed: check again now
        log.info("reloaded %s as config generation %d", config.path, generation)

    def unhealthy_deployment_ids(self) -> frozenset[str]:
        """Ids of the deployments the latest background health check found unhealthy (empty when
        background checks are off or the latest report is stale). Memory only: the set is
        refreshed by a timer in every worker, never on a request."""
        return self.health.unhealthy

    def record(self, route: str, ctx: CallContext, status: int, elapsed: float, began: bool) -> None:
        m = self.metrics
        if began:
            self.in_flight -= 1
            m.in_flight.dec()
        m.record(route, ctx.model_group or "", status, elapsed,
                 ctx.deployment.provider if ctx.deployment is not None and ctx.upstream_s else None,
                 ctx.upstream_s, ctx.usage)
        if ctx.retries:
            m.child(m.retries, ctx.model_group or "").inc(ctx.retries)


def keep_restart_only(config: Config, running: Settings) -> Config:
    """``config`` with the running values of the settings a reload does not change. A reload
    never switches auth off: a config without a master key keeps the running one (the one
    ``serve`` generated, say)."""
    kept = {n: getattr(running, n) for n in RESTART_ONLY}
    if not config.settings.master_key and running.master_key:
        kept["master_key"] = running.master_key
    settings = dataclasses.replace(config.settings, **kept)
    return dataclasses.replace(config, settings=settings)


def settle_auth(config: Config, no_auth: bool = False) -> tuple[Config, str | None]:
    """Before forking: a config without a master key gets a generated one (every worker then
    shares it), unless open mode was asked for. Returns the config and the generated key."""
    settings = config.settings
    if settings.master_key:
        return config, None
    if no_auth or settings.allow_unauthenticated:
        settings = dataclasses.replace(settings, allow_unauthenticated=True)
        return dataclasses.replace(config, settings=settings), None
    if settings.store_model_in_db and not config.environ.get("LITELLM_SALT_KEY"):
        raise ConfigError("store_model_in_db encrypts stored secrets with LITELLM_SALT_KEY or the master key, "
                          "and a generated master key changes at every start: set LITELLM_SALT_KEY or a master key")
    key = "sk-" + secrets.token_urlsafe(24)
    settings = dataclasses.replace(settings, master_key=Secret(key))
    return dataclasses.replace(config, settings=settings), key


def make_application(gw: Gateway) -> tornado.web.Application:
    rules = routes.build(gw.config.routes, HANDLERS, gw.schemas, gw)
    gw.app = tornado.web.Application(
        rules,
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args={"gw": gw, "route": None},
        log_function=lambda handler: None,  # BaseHandler.on_finish writes the scrubbed access line
        compress_response=False,
        serve_traceback=False,
    )
    return gw.app


def swap_rules(app: tornado.web.Application, rules: list) -> None:
    """Replace the URL table in one step (no await in between): requests already matched keep
    their handler; the next request sees the new table."""
    fresh = tornado.web._ApplicationRouter(app, rules)
    app.wildcard_router.rules = fresh.rules
    app.wildcard_router.named_rules = fresh.named_rules


def validate(config: Config) -> Registry:
    """Routes, schemas and models, checked as a worker builds them. Raises ConfigError."""
    try:
        routes.check(config.routes, HANDLERS, Schemas(resource_dir("schemas")))
        RouterSettings.parse(config.router_settings, config.litellm_settings)
        CacheSettings.parse(config.litellm_settings)
        RetentionSettings.parse(config.settings)
        trace_settings = TraceSettings.parse(config.litellm_settings, config.environ)
        if trace_settings is not None:
            check_installed(trace_settings)
        return build_registry(config.models, config.environ, aliases=config.router_settings.get("model_group_alias"))
    except ConfigError as exc:
        raise ConfigError(f"{config.path}: {exc}") from None


def log_startup_warnings(config: Config, registry: Registry) -> list[str]:
    """Everything an operator should fix, logged once; also what ``proxyctl check`` prints."""
    warnings = [f"{where}: os.environ/{name} is not set; the value is treated as empty"
                for where, name in config.unset_env]
    settings = config.settings
    if not settings.master_key and settings.allow_unauthenticated:
        warnings.append("NO MASTER KEY, AUTHENTICATION IS OFF (allow_unauthenticated / --no-auth): every "
                        "route, the model API included, is open to anyone who can reach this port.")
    elif not settings.master_key:
        warnings.append("no master key is set: `proxyctl serve` generates one at start-up and prints it. "
                        "Set general_settings.master_key or LITELLM_MASTER_KEY to choose it.")
    warnings += [f"{p}; requests for it get a 400" for p in registry.problems()]
    warnings += database_warnings(config)
    warnings += [describe_ignored(key, config.router_settings) for key in config.ignored]
    warnings += cache_warnings(config)
    for line in warnings:
        log.warning("%s", line)
    return warnings


def cache_warnings(config: Config) -> list[str]:
    """A cache type this gateway does not implement, or Redis caching without a Redis."""
    try:
        cache, warnings = CacheSettings.parse(config.litellm_settings)
    except ConfigError:
        return []  # validate() reports it
    s = config.settings
    if cache is not None and cache.type == "redis" and not (cache.url or cache.host or s.redis_url or s.redis_host):
        warnings.append("litellm_settings.cache_params.type is redis but no Redis is configured (cache_params "
                        "host/url, router_settings redis_*, REDIS_HOST/REDIS_URL): responses are NOT cached")
    return warnings


def database_warnings(config: Config) -> list[str]:
    """Database settings that would otherwise do nothing without a word."""
    s = config.settings
    if s.database_url and not s.store_model_in_db:
        return ["database_url is set but store_model_in_db is off: the database is not used. This gateway "
                "keeps models and virtual keys in PostgreSQL only with database storage on; set "
                "general_settings.store_model_in_db: true (or STORE_MODEL_IN_DB=true) to use it."]
    return []
