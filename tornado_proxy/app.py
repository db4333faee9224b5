"""The ``Gateway``: one long-lived object per worker holding config, registry, router,
upstream client and metrics, handed to every handler; and the Tornado application."""

from __future__ import annotations

import logging

import tornado.web

from . import admin, handlers, routes
from .config import Config, resource_dir
from .handlers import CallContext
from .metrics import Metrics
from .registry import Registry, build_registry
from .router import Router
from .schemas import Schemas
from .upstream import Upstream

log = logging.getLogger(__name__)

HANDLERS = {**handlers.HANDLERS, **admin.HANDLERS}


class Gateway:
    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.settings = config.settings
        self.schemas = Schemas(resource_dir("schemas"))
        self.registry: Registry = build_registry(config.models, config.environ,
                                                 aliases=config.router_settings.get("model_group_alias"))
        self.router = Router()
        self.metrics = metrics or Metrics()
        self.upstream: Upstream | None = None
        self.in_flight = 0

    def begin(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    async def start(self) -> None:
        """Create what needs the running event loop."""
        self.upstream = Upstream(self.settings.upstream_max_connections, self.settings.upstream_connect_timeout)

    async def stop(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def record(self, route: str, ctx: CallContext, status: int, elapsed: float, began: bool) -> None:
        m = self.metrics
        if began:
            self.in_flight -= 1
            m.in_flight.dec()
        model = ctx.model_group or ""
        m.requests.labels(route, model, str(status)).inc()
        m.latency.labels(route, model).observe(elapsed)
        if ctx.deployment is not None and ctx.upstream_s:
            m.upstream_latency.labels(model, ctx.deployment.provider).observe(ctx.upstream_s)
        if ctx.usage:
            prompt, completion = ctx.usage.get("prompt_tokens"), ctx.usage.get("completion_tokens")
            if isinstance(prompt, int) and prompt > 0:
                m.input_tokens.labels(model).inc(prompt)
            if isinstance(completion, int) and completion > 0:
                m.output_tokens.labels(model).inc(completion)


def make_application(gw: Gateway) -> tornado.web.Application:
    rules = routes.build(gw.config.routes, HANDLERS, gw.schemas, gw)
    return tornado.web.Application(
        rules,
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args={"gw": gw, "route": None},
        log_function=lambda handler: None,  # BaseHandler.on_finish writes the scrubbed access line
        compress_response=False,
        serve_traceback=False,
    )


def log_startup_warnings(config: Config, registry: Registry) -> list[str]:
    """Everything an operator should fix, logged once; also what ``proxyctl check`` prints."""
    warnings = []
    if not config.settings.master_key:
        warnings.append("NO MASTER KEY IS SET: every route is open to anyone who can reach this port. "
                        "Set general_settings.master_key or LITELLM_MASTER_KEY.")
    warnings += [f"{p}; requests for it get a 400" for p in registry.problems()]
    if config.ignored:
        warnings.append("ignored config keys (kept, not used by this gateway): " + ", ".join(config.ignored))
    for line in warnings:
        log.warning("%s", line)
    return warnings
