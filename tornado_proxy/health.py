"""Model health checks (``GET /health``, ``general_settings.background_health_checks``).

A probe is one minimal real call per deployment, built by its provider adapter and sent through
``upstream.py``: a chat with one short user message and ``max_tokens: 1``, an embedding of
``"ping"`` for ``model_info.mode: embedding``, a one-token text completion for ``mode:
completion``, a moderation of ``"ping"`` for ``mode: moderation``; image and audio modes are
skipped (each probe would be a billed call). ``model_info.health_check_model`` replaces the
model (that is how a wildcard deployment such as ``openai/*`` gets checked, as in LiteLLM); a
wildcard without one, and a deployment that cannot be served at all (``Deployment.problem``), is
reported as skipped, never called. In-process providers (``mock/``, ``mock_response``) are healthy without a call.

Background checks run in one loop per instance: worker 0 of ``proxyctl serve`` (the supervisor
restarts it under the same index if it dies). The loop writes each report atomically to a JSON
file next to the supervisor's state file, and every worker reads that file: ``GET /health``
answers from it, and each worker keeps the set of unhealthy deployment ids in memory
(``HealthMonitor.unhealthy``), refreshed by a timer, so the router can read it without I/O.
A gateway run without a supervisor (tests, embedding) keeps its reports in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import orjson

from .errors import ProxyError
from .providers import PROVIDERS
from .providers.base import Deployment

if TYPE_CHECKING:
    from .app import Gateway
    from .config import Settings
    from .upstream import Upstream

log = logging.getLogger(__name__)

PROBE_TEXT = "ping"
# Modes whose smallest real call costs real money per call (an image, audio): not probed.
UNPROBED_MODES = ("image_generation", "audio_speech", "audio_transcription")
REFRESH_MAX = 5.0      # seconds: how stale a worker's in-memory unhealthy set may be at most
STALE_INTERVALS = 2    # a report older than this many intervals (plus a probe timeout) is ignored


@dataclass(frozen=True)
class EndpointHealth:
    """The outcome for one deployment, in LiteLLM's words: ``model`` is its
    ``litellm_params.model``; ``error`` (unhealthy) and ``reason`` (skipped) never hold a key."""

    model_id: str
    model: str
    api_base: str | None
    error: str | None = None
    exception_status: int | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        out = {"model": self.model, "model_id": self.model_id, "api_base": self.api_base}
        if self.error is not None:
            out["error"] = self.error
            out["exception_status"] = self.exception_status
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, obj: Mapping) -> "EndpointHealth":
        return cls(model_id=str(obj["model_id"]), model=str(obj["model"]), api_base=obj.get("api_base"),
                   error=obj.get("error"), exception_status=obj.get("exception_status"), reason=obj.get("reason"))


@dataclass(frozen=True)
class HealthReport:
    checked_at: float | None  # unix time the check started; None: no check has run yet
    healthy: tuple[EndpointHealth, ...] = ()
    unhealthy: tuple[EndpointHealth, ...] = ()
    skipped: tuple[EndpointHealth, ...] = ()

    def only(self, ids: Iterable[str]) -> "HealthReport":
        keep = frozenset(ids)
        return HealthReport(self.checked_at, *(tuple(e for e in group if e.model_id in keep)
                                               for group in (self.healthy, self.unhealthy, self.skipped)))

    def to_body(self) -> dict:
        """LiteLLM's ``/health`` answer, plus when it was computed and what was not checked."""
        return {
            "healthy_endpoints": [e.to_json() for e in self.healthy],
            "unhealthy_endpoints": [e.to_json() for e in self.unhealthy],
            "healthy_count": len(self.healthy),
            "unhealthy_count": len(self.unhealthy),
            "skipped_endpoints": [e.to_json() for e in self.skipped],
            "checked_at": self.checked_at,
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_body())

    @classmethod
    def from_bytes(cls, data: bytes) -> "HealthReport":
        obj = orjson.loads(data)
        return cls(None if obj["checked_at"] is None else float(obj["checked_at"]),
                   *(tuple(EndpointHealth.from_json(e) for e in obj[key])
                     for key in ("healthy_endpoints", "unhealthy_endpoints", "skipped_endpoints")))


def unhealthy_ids(report: HealthReport | None, max_age: float, now: float | None = None) -> frozenset[str]:
    """The deployment ids ``report`` found unhealthy; empty when there is no report or it is
    older than ``max_age`` seconds (a stuck checker must not keep deployments out for ever)."""
    if report is None or report.checked_at is None:
        return frozenset()
    if (time.time() if now is None else now) - report.checked_at > max_age:
        return frozenset()
    return frozenset(e.model_id for e in report.unhealthy)


def max_report_age(settings: Settings) -> float:
    return STALE_INTERVALS * settings.health_check_interval + settings.health_check_timeout


# --- probes (pure) ---------------------------------------------------------------------------

def endpoint_of(d: Deployment) -> EndpointHealth:
    model = d.public_params.get("model")
    return EndpointHealth(model_id=d.id, model=model if isinstance(model, str) else f"{d.provider}/{d.model}",
                          api_base=d.public_api_base or None)


def skip_reason(d: Deployment) -> str | None:
    """Why ``d`` is not probed; None when it is."""
    if d.problem:
        return d.problem
    if "*" in d.model and not d.model_info.get("health_check_model"):
        return ("a wildcard deployment is not checked without model_info.health_check_model "
                "(a model to probe it with)")
    mode = d.model_info.get("mode")
    if mode in UNPROBED_MODES:
        return f"model_info.mode {mode} is not checked: a probe would be a billed image or audio call"
    return None


def probe_target(d: Deployment) -> Deployment:
    """``d`` with ``model_info.health_check_model`` (a LiteLLM model string; the provider prefix
    is optional) as its model."""
    model = d.model_info.get("health_check_model")
    if not isinstance(model, str) or not model:
        return d
    prefix = d.provider + "/"
    return dataclasses.replace(d, model=model[len(prefix):] if model.startswith(prefix) else model)


def probe_request(d: Deployment) -> tuple[str, dict]:
    """The endpoint and OpenAI-shaped body of the smallest real call for ``d``'s mode."""
    mode = d.model_info.get("mode")
    if mode == "embedding":
        return "embeddings", {"model": d.model_name, "input": PROBE_TEXT}
    if mode == "completion":
        return "completions", {"model": d.model_name, "prompt": PROBE_TEXT, "max_tokens": 1}
    if mode == "moderation":
        return "moderation", {"model": d.model_name, "input": PROBE_TEXT}
    return "chat", {"model": d.model_name, "messages": [{"role": "user", "content": PROBE_TEXT}], "max_tokens": 1}


def probe_timeout(d: Deployment, default: float) -> float:
    """``model_info.health_check_timeout`` (as LiteLLM), else the gateway's setting."""
    try:
        value = float(d.model_info.get("health_check_timeout") or default)
    except (TypeError, ValueError):
        return default
    return value if value > 0 else default


# --- probes (I/O) ----------------------------------------------------------------------------

async def probe(upstream: Upstream, d: Deployment, timeout: float) -> EndpointHealth:
    """Call ``d`` once; healthy when it answers a valid reply within ``timeout`` seconds."""
    entry = endpoint_of(d)
    provider = PROVIDERS[d.provider]
    if provider.local or d.mock_response is not None:
        return entry
    target = probe_target(d)
    endpoint, body = probe_request(target)
    try:
        reply = await upstream.fetch(provider.build_request(target, endpoint, body, stream=False), timeout,
                                     ssl_verify=target.ssl_verify)
        if not 200 <= reply.status < 300:
            raise provider.parse_error(reply, target)
        provider.parse_response(endpoint, reply)  # a 2xx that is not a real answer is a failure too
    except ProxyError as exc:
        exc = d.scrubber.error(exc)
        return dataclasses.replace(entry, error=exc.message, exception_status=exc.status)
    except Exception:  # a bug in an adapter: logged here, never echoed
        log.exception("health check of deployment %s failed", d.id)
        return dataclasses.replace(entry, error="The health check failed inside the gateway (see its log).",
                                   exception_status=500)
    return entry


async def check(upstream: Upstream, deployments: Iterable[Deployment], timeout: float) -> HealthReport:
    """Probe ``deployments`` in parallel (each id once)."""
    checked_at = time.time()
    unique = list({d.id: d for d in deployments}.values())
    skipped = tuple(dataclasses.replace(endpoint_of(d), reason=reason)
                    for d in unique if (reason := skip_reason(d)) is not None)
    todo = [d for d in unique if skip_reason(d) is None]
    results = await asyncio.gather(*(probe(upstream, d, probe_timeout(d, timeout)) for d in todo))
    return HealthReport(checked_at, healthy=tuple(r for r in results if r.error is None),
                        unhealthy=tuple(r for r in results if r.error is not None), skipped=skipped)


# --- where reports live -----------------------------------------------------------------------

class MemoryReports:
    """Reports of a gateway that runs alone (no supervisor): kept in this process."""

    def __init__(self) -> None:
        self._report: HealthReport | None = None

    def write(self, report: HealthReport) -> None:
        self._report = report

    def read(self) -> HealthReport | None:
        return self._report

    def remove(self) -> None:
        self._report = None


class ReportFile:
    """The latest report as JSON in one file, replaced atomically (temp file + rename) by the
    one checker and read by every worker. ``read`` parses the file again only when it changed."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the parsed file
        self._report: HealthReport | None = None

    def write(self, report: HealthReport) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(report.to_bytes())
        os.replace(tmp, self.path)

    def read(self) -> HealthReport | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._report = None, None
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                self._report = HealthReport.from_bytes(self.path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("cannot read the health-check results in %s; ignoring them", self.path)
                self._report = None
            self._seen = seen
        return self._report

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def reports_path(state_path: Path) -> Path:
    """Beside the supervisor's state file (``var/proxyctl-4000.state`` -> ``...4000.health``)."""
    return state_path.with_suffix(".health")


# --- the per-worker monitor ----------------------------------------------------------------------

class HealthMonitor:
    """One per worker. In the checker worker it runs the background loop; in every worker it
    keeps ``unhealthy`` (a frozenset of deployment ids from a fresh report) up to date."""

    def __init__(self, reports: MemoryReports | ReportFile, runs_checks: bool):
        self.reports = reports
        self.runs_checks = runs_checks
        self.unhealthy: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self, gw: Gateway) -> None:
        if self.runs_checks:
            self._tasks.append(asyncio.create_task(self._check_loop(gw)))
        self._tasks.append(asyncio.create_task(self._refresh_loop(gw)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def wake(self) -> None:
        """Check again now (after a reload: the models may have changed)."""
        self._wake.set()

    def latest(self) -> HealthReport | None:
        return self.reports.read()

    async def _check_loop(self, gw: Gateway) -> None:
        while True:
            settings = gw.settings
            if settings.background_health_checks:
                try:
                    report = await check(gw.upstream, gw.registry.deployments, settings.health_check_timeout)
                    self.reports.write(report)
                    self.refresh(settings)
                    log.info("background health check: %d healthy, %d unhealthy, %d skipped",
                             len(report.healthy), len(report.unhealthy), len(report.skipped))
                except OSError as exc:
                    log.error("cannot write the health-check results: %s", exc)
                except Exception:  # the loop outlives any one bad round
                    log.exception("background health check failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), settings.health_check_interval)
            except asyncio.TimeoutError:
                pass

    async def _refresh_loop(self, gw: Gateway) -> None:
        while True:
            self.refresh(gw.settings)
            await asyncio.sleep(min(gw.settings.health_check_interval / 2, REFRESH_MAX))

    def refresh(self, settings: Settings) -> None:
        if not settings.background_health_checks:
            self.unhealthy = frozenset()
            return
        self.unhealthy = unhealthy_ids(self.reports.read(), max_report_age(settings))
