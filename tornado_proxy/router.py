"""Deployment selection and the failure policy, as LiteLLM's ``router_settings`` define them.
Pure: no I/O. It reads (and, for failures, writes) the counters in ``counters.py`` and
decides: which deployment next, whether an error is retried or falls back and to which group,
how long to wait, which deployment cools down.

Selection: ``order`` tiers first (the lowest tier with a usable deployment wins), then the
strategy within the tier. Cooled-down deployments are skipped; so are the deployments the
latest background health check found unhealthy (the caller passes their ids in), and the ones
that failed this call, each while others remain.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

import orjson

from .config import PACKAGE_DIR, ROUTING_STRATEGIES as STRATEGIES, ConfigError
from .counters import LocalCounters
from .errors import ProxyError, RateLimitError
from .providers.base import Deployment

# LiteLLM's defaults (litellm/router.py, litellm/constants.py)
DEFAULT_NUM_RETRIES = 2
DEFAULT_ALLOWED_FAILS = 3
DEFAULT_COOLDOWN_TIME = 5.0
DEFAULT_MAX_FALLBACKS = 5
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
JITTER = 0.75
RETRY_POLICY_FIELDS = ("BadRequestErrorRetries", "AuthenticationErrorRetries", "TimeoutErrorRetries",
                       "RateLimitErrorRetries", "ContentPolicyViolationErrorRetries", "InternalServerErrorRetries")
MAX_HONOURED_RETRY_AFTER = 60.0  # a longer Retry-After is not waited for
UNLIMITED = 1 << 30

CONTEXT_WINDOW = re.compile(r"context[ _-]?(length|window)|maximum context|prompt is too long|too many tokens|"
                            r"context_length_exceeded|input is too long|exceeds the maximum", re.IGNORECASE)
CONTENT_POLICY = re.compile(r"content[ _-]?(policy|management|filter)|safety system|responsible ?ai|"
                            r"prohibited_content|blocked by", re.IGNORECASE)


@dataclass(frozen=True)
class RouterSettings:
    routing_strategy: str = "simple-shuffle"
    lowest_latency_buffer: float = 0.0
    num_retries: int = DEFAULT_NUM_RETRIES
    allowed_fails: int = DEFAULT_ALLOWED_FAILS
    cooldown_time: float = DEFAULT_COOLDOWN_TIME
    retry_after: float = 0.0
    max_fallbacks: int = DEFAULT_MAX_FALLBACKS
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    context_window_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    content_policy_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_fallbacks: tuple[str, ...] = ()
    retry_policy: Mapping[str, int] = field(default_factory=dict)  # RETRY_POLICY_FIELDS -> retries
    model_group_retry_policy: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, router: Mapping[str, Any], litellm: Mapping[str, Any] | None = None) -> "RouterSettings":
        """``router_settings`` (and the ``litellm_settings`` keys LiteLLM's router reads too:
        ``num_retries``, the fallback lists) -> settings; a ConfigError names a bad key."""
        litellm = litellm or {}

        def pick(name: str):
            value = router.get(name)
            return litellm.get(name) if value is None else value

        strategy = router.get("routing_strategy") or "simple-shuffle"
        if strategy not in STRATEGIES:
            raise ConfigError(f"router_settings.routing_strategy: {strategy!r} is not a routing strategy; "
                              f"use one of {', '.join(STRATEGIES)}")
        args = router.get("routing_strategy_args") or {}
        if not isinstance(args, dict):
            raise ConfigError("router_settings.routing_strategy_args: expected a mapping")
        return cls(
            routing_strategy=strategy,
            lowest_latency_buffer=number(args.get("lowest_latency_buffer"), 0.0,
                                         "router_settings.routing_strategy_args.lowest_latency_buffer"),
            num_retries=int(number(pick("num_retries"), DEFAULT_NUM_RETRIES, "router_settings.num_retries")),
            allowed_fails=int(number(router.get("allowed_fails"), DEFAULT_ALLOWED_FAILS, "router_settings.allowed_fails")),
            cooldown_time=number(router.get("cooldown_time"), DEFAULT_COOLDOWN_TIME, "router_settings.cooldown_time"),
            retry_after=number(router.get("retry_after"), 0.0, "router_settings.retry_after"),
            max_fallbacks=int(number(router.get("max_fallbacks"), DEFAULT_MAX_FALLBACKS, "router_settings.max_fallbacks")),
            fallbacks=fallback_map(pick("fallbacks"), "fallbacks"),
            context_window_fallbacks=fallback_map(pick("context_window_fallbacks"), "context_window_fallbacks"),
            content_policy_fallbacks=fallback_map(pick("content_policy_fallbacks"), "content_policy_fallbacks"),
            default_fallbacks=group_list(pick("default_fallbacks"), "router_settings.default_fallbacks"),
            retry_policy=retry_policy(pick("retry_policy"), "router_settings.retry_policy"),
            model_group_retry_policy={
                str(group): retry_policy(policy, f"router_settings.model_group_retry_policy.{group}")
                for group, policy in mapping(pick("model_group_retry_policy"),
                                             "router_settings.model_group_retry_policy").items()})


def number(value: Any, default: float, where: str) -> float:
    if value is None:
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if out < 0:
        raise ConfigError(f"{where}: must be at least 0, got {value!r}")
    return out


def group_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a list of model group names")
    return tuple(value)


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping")
    return value


def retry_policy(value: Any, where: str) -> dict[str, int]:
    """LiteLLM's ``RetryPolicy``: ``{"TimeoutErrorRetries": 3, "BadRequestErrorRetries": 0, ...}``."""
    out = {}
    for name, count in mapping(value, where).items():
        if name not in RETRY_POLICY_FIELDS:
            raise ConfigError(f"{where}.{name}: not a retry policy field; use one of {', '.join(RETRY_POLICY_FIELDS)}")
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"{where}.{name}: expected a non-negative integer, got {count!r}")
        out[name] = count
    return out


def fallback_map(value: Any, name: str) -> dict[str, tuple[str, ...]]:
    """LiteLLM's ``[{"group": ["other", ...]}, ...]`` (a plain mapping is taken too)."""
    if value is None:
        return {}
    where = f"router_settings.{name}"
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f'{where}: expected a list like [{{"my-group": ["other-group"]}}]')
    out: dict[str, tuple[str, ...]] = {}
    for i, item in enumerate(items):
        for group, targets in item.items():
            out[str(group)] = group_list(targets, f"{where}[{i}].{group}")
    return out


# --- errors ----------------------------------------------------------------------------------

def is_retryable(error: ProxyError) -> bool:
    """408, 429, 5xx, timeouts, connection errors and invalid 2xx answers (502s the gateway
    raises): worth another attempt. Other 4xx never are."""
    return error.status in (408, 429) or error.status >= 500


def policy_field(error: ProxyError) -> str:
    """The ``RetryPolicy`` field that sets the retries for this error, as LiteLLM maps its
    exception classes."""
    if error.status == 400:
        if CONTENT_POLICY.search(error.message) or error.type == "content_policy_violation":
            return "ContentPolicyViolationErrorRetries"
        return "BadRequestErrorRetries"
    if error.status == 401:
        return "AuthenticationErrorRetries"
    if error.status == 408:  # timeouts included
        return "TimeoutErrorRetries"
    if error.status == 429:
        return "RateLimitErrorRetries"
    return "InternalServerErrorRetries" if error.status >= 500 else ""


def fallback_kind(error: ProxyError) -> str | None:
    """Which fallback list an error after its retries goes to: ``context_window``,
    ``content_policy``, ``default`` (the generic ``fallbacks``), or None (the client's own
    mistake: answered as is)."""
    if error.status == 400 or error.status == 413:
        if CONTEXT_WINDOW.search(error.message):
            return "context_window"
        if CONTENT_POLICY.search(error.message) or error.type == "content_policy_violation":
            return "content_policy"
        return None
    if is_retryable(error) or error.status in (401, 403, 404):
        return "default"  # a deployment problem another group may not have (as LiteLLM)
    return None


def retry_after_header(error: ProxyError) -> float | None:
    for name, value in error.headers.items():
        if name.lower() == "retry-after":
            try:
                return max(float(value), 0.0)
            except ValueError:
                return None
    return None


class NoDeploymentAvailable(RateLimitError):
    """Every deployment of a group is cooling down or at its rpm/tpm limit."""


# --- the router ------------------------------------------------------------------------------

class Router:
    def __init__(self, settings: RouterSettings | None = None, counters: LocalCounters | None = None,
                 rng: random.Random | None = None, prices: Mapping[str, Any] | None = None):
        self.settings = settings or RouterSettings()
        self.counters = counters or LocalCounters()
        self._rng = rng or random.Random()
        self._prices = prices
        strategy = self.settings.routing_strategy
        self._order = {"simple-shuffle": self.shuffle, "least-busy": self.least_busy,
                       "latency-based-routing": self.lowest_latency, "usage-based-routing-v2": self.lowest_usage,
                       "cost-based-routing": self.cheapest}[strategy]
        self.tracks_latency = strategy == "latency-based-routing"
        self.tracks_usage = strategy == "usage-based-routing-v2"
        self.tracks_in_flight = strategy == "least-busy"

    def pick(self, deployments: Sequence[Deployment], failed: Collection[str] = (),
             unhealthy: Collection[str] = ()) -> Deployment:
        """The deployment for the next attempt. Raises NoDeploymentAvailable (429, with a
        Retry-After) when every deployment is cooling down or at its limits."""
        if len(deployments) == 1 and not self.tracks_usage:
            return deployments[0]  # the fast path: a group's only deployment never cools down
        return self.plan(deployments, failed, unhealthy)[0]

    def plan(self, deployments: Sequence[Deployment], failed: Collection[str] = (),
             unhealthy: Collection[str] = ()) -> list[Deployment]:
        """The usable deployments of a group in the order to try them (at least one).

        ``unhealthy``: ids the latest background health check failed. They are left out while
        a deployment that passed (or was not checked) remains usable; when none does, they are
        tried anyway, as LiteLLM's health-check routing does (its "safety net": a health check
        alone never turns a group away without a call)."""
        usable = [d for d in deployments if d.problem is None] or list(deployments)
        if len(usable) > 1:
            cooling = self.counters.cooling(d.id for d in usable)
            if cooling:
                left = [d for d in usable if d.id not in cooling]
                if not left:
                    raise self.unavailable(deployments[0].model_name, min(cooling.values()), "cooling down")
                usable = left
        if unhealthy and len(usable) > 1:
            usable = [d for d in usable if d.id not in unhealthy] or usable
        if self.tracks_usage:
            usable = self.under_limits(usable)
        if failed and len(usable) > 1:
            usable = [d for d in usable if d.id not in failed] or usable
        if len(usable) == 1:
            return usable
        tiers: dict[int, list[Deployment]] = {}
        for d in usable:
            tiers.setdefault(d.order if d.order is not None else UNLIMITED, []).append(d)
        out: list[Deployment] = []
        for order in sorted(tiers):
            out += self._order(tiers[order])
        return out

    def unavailable(self, group: str, seconds: float, why: str) -> NoDeploymentAvailable:
        wait = max(1, int(seconds + 0.999))
        return NoDeploymentAvailable(
            f"No deployments available for selected model, Try again in {wait} seconds. Passed model={group}. "
            f"Every deployment is {why}.", headers={"Retry-After": str(wait)})

    def under_limits(self, deployments: list[Deployment]) -> list[Deployment]:
        out = []
        for d in deployments:
            requests, tokens = self.counters.usage(d.id)
            if (d.rpm is None or requests < d.rpm) and (d.tpm is None or tokens < d.tpm):
                out.append(d)
        if not out:
            raise self.unavailable(deployments[0].model_name, self.counters.seconds_to_next_minute(),
                                   "at its rpm/tpm limit for this minute")
        return out

    # --- strategies: a tier -> its deployments in the order to try them ---------------------
    def shuffle(self, tier: list[Deployment]) -> list[Deployment]:
        """simple-shuffle: weighted random order without replacement."""
        pool, out = list(tier), []
        while pool:
            weights = [weight(d) for d in pool]
            pick = self._rng.choices(range(len(pool)), weights=weights)[0] if sum(weights) > 0 else 0
            out.append(pool.pop(pick))
        return out

    def by_score(self, tier: list[Deployment], score: Callable[[Deployment], float]) -> list[Deployment]:
        """Lowest score first; ties in random order (so equal deployments share the load)."""
        keyed = [(score(d), self._rng.random(), d) for d in tier]
        keyed.sort(key=lambda k: (k[0], k[1]))
        return [d for _, _, d in keyed]

    def least_busy(self, tier: list[Deployment]) -> list[Deployment]:
        return self.by_score(tier, lambda d: self.counters.in_flight(d.id))

    def lowest_usage(self, tier: list[Deployment]) -> list[Deployment]:
        return self.by_score(tier, lambda d: self.counters.usage(d.id)[1])

    def cheapest(self, tier: list[Deployment]) -> list[Deployment]:
        return self.by_score(tier, lambda d: sum(self.prices_of(d)) if self.prices_of(d) else float("inf"))

    def lowest_latency(self, tier: list[Deployment]) -> list[Deployment]:
        """Lowest mean recent latency (time to first token for streams); a deployment without
        any yet counts as 0, so each is tried. Those within ``lowest_latency_buffer`` of the
        fastest (0.5: up to 50% slower) share the load at random."""
        latencies = {d.id: self.counters.latency(d.id) or 0.0 for d in tier}
        ranked = self.by_score(tier, lambda d: latencies[d.id])
        best = latencies[ranked[0].id]
        near = [d for d in ranked if latencies[d.id] <= best * (1 + self.settings.lowest_latency_buffer)]
        if len(near) > 1 and self.settings.lowest_latency_buffer > 0:
            self._rng.shuffle(near)
            return near + [d for d in ranked if d not in near]
        return ranked

    @property
    def price_table(self) -> Mapping[str, Any]:
        """The shipped price table (prices.json), read on first use."""
        if self._prices is None:
            self._prices = load_prices()
        return self._prices

    def prices_of(self, d: Deployment) -> tuple[float, float] | None:
        """(input, output) USD per token: model_info, then litellm_params, then the shipped table."""
        configured = configured_price(d)
        return configured if configured is not None else table_price(self.price_table, d)

    # --- outcomes ---------------------------------------------------------------------------
    def failed(self, d: Deployment, group_size: int, error: ProxyError) -> bool:
        """Count a failed attempt; cool the deployment down after more than ``allowed_fails``
        failures this minute, or at once on a 429, unless it is its group's only one. True when
        it was cooled down."""
        if not is_retryable(error) or group_size < 2:
            return False
        fails = self.counters.add_failure(d.id)
        if error.status == 429 or fails > self.settings.allowed_fails:
            self.counters.cool_down(d.id, self.settings.cooldown_time)
            return True
        return False

    def retries_for(self, group: str, error: ProxyError, default: int) -> int:
        """How many retries an error of this kind gets in ``group``: the group's retry policy,
        else ``retry_policy``, when it names the error's kind (it may retry a 400 or 401, as
        LiteLLM's does); else ``default`` for a retryable error and none for the others."""
        name = policy_field(error)
        for policy in (self.settings.model_group_retry_policy.get(group), self.settings.retry_policy):
            if policy and name in policy:
                return policy[name]
        return default if is_retryable(error) else 0

    def retry_delay(self, retries_done: int, error: ProxyError, another_deployment: bool) -> float:
        """Seconds to wait before the next attempt: only ``retry_after`` when it goes to another
        deployment (as LiteLLM: nothing there to wait for); else the upstream Retry-After
        (up to a minute), or exponential backoff with jitter; never less than ``retry_after``."""
        floor = self.settings.retry_after
        if another_deployment:
            return floor
        header = retry_after_header(error)
        if header is not None and header <= MAX_HONOURED_RETRY_AFTER:
            return max(header, floor)
        delay = min(INITIAL_RETRY_DELAY * 2 ** retries_done, MAX_RETRY_DELAY)
        return max(delay * (1 - JITTER * self._rng.random()), floor)

    def fallback_groups(self, group: str, kind: str, requested: Sequence[str] = ()) -> tuple[str, ...]:
        """The groups to fall back to from ``group`` for a failure of ``kind``: the request's own
        ``fallbacks`` first (generic failures only), then the configured list for the group,
        else the ``"*"`` entry, else ``default_fallbacks``."""
        s = self.settings
        if kind == "context_window":
            table, default = s.context_window_fallbacks, ()
        elif kind == "content_policy":
            table, default = s.content_policy_fallbacks, ()
        else:
            if requested:
                return tuple(requested)
            table, default = s.fallbacks, s.default_fallbacks
        return table.get(group) or table.get("*") or default


def weight(d: Deployment) -> float:
    if d.weight != 1.0:
        return max(d.weight, 0.0)
    return float(d.rpm or d.tpm or 1.0)


def configured_price(d: Deployment) -> tuple[float, float] | None:
    """The deployment's own (input, output) USD per token: ``model_info``, then ``litellm_params``."""
    for source in (d.model_info, d.public_params):
        if source.get("input_cost_per_token") is not None or source.get("output_cost_per_token") is not None:
            return float(source.get("input_cost_per_token") or 0), float(source.get("output_cost_per_token") or 0)
    return None


def load_prices() -> dict:
    return orjson.loads((PACKAGE_DIR / "prices.json").read_bytes())


def table_price(prices: Mapping[str, Any], d: Deployment) -> tuple[float, float] | None:
    """A deployment's price from the shipped table: by provider (Azure and OpenRouter's
    ``openai/...`` models by the OpenAI name), the longest listed prefix of the model id."""
    provider, model = d.provider, str(d.model_info.get("base_model") or d.model)
    if provider in ("azure", "openrouter", "hosted_vllm", "openai_like"):
        provider, _, rest = ("openai", "", model) if provider == "azure" else model.partition("/")
        model = rest or model
    table = prices.get(provider) or {}
    if "*" in table:
        return tuple(table["*"])
    best = max((name for name in table if model == name or model.startswith(name + "-")), key=len, default=None)
    return tuple(table[best]) if best else None


def with_settings(router: Router, settings: RouterSettings) -> Router:
    """A router for new settings sharing the old one's counters (a reload keeps what was learned)."""
    return Router(settings, router.counters, router._rng, router._prices)

