"""Prometheus metrics (prometheus_client), correct across pre-forked workers through its
multiprocess mode. Names follow the LiteLLM proxy's so existing dashboards keep working."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: str) -> None:
    """Switch prometheus_client to per-process files in ``directory``; call before forking and
    before any ``Metrics`` is built (the value class is chosen when a metric is created)."""
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("litellm_proxy_total_requests_metric", "Requests by route, model group and status",
                                ["route", "model", "status"], registry=r)
        self.latency = Histogram("litellm_request_total_latency_metric", "Total request time in seconds",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("litellm_llm_api_latency_metric", "Time spent upstream in seconds",
                                          ["model", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("litellm_in_flight_requests", "Requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.input_tokens = Counter("litellm_input_tokens", "Prompt tokens by model group", ["model"], registry=r)
        self.output_tokens = Counter("litellm_output_tokens", "Completion tokens by model group", ["model"],
                                     registry=r)
        self.spend = Counter("litellm_spend_metric", "Spend in USD by model group", ["model"], registry=r)
        self.soft_budget_crossed = Counter("litellm_soft_budget_crossed", "Keys, teams and users that reached "
                                           "their soft_budget (a warning; requests go on)", ["kind"], registry=r)
        self.spend_log_dropped = Counter("litellm_spend_log_dropped", "Spend-log events lost because neither "
                                         "PostgreSQL nor the spill file could take them", registry=r)
        self.cache_hits = Counter("litellm_cache_hits_metric", "Requests answered from the response cache",
                                  ["model"], registry=r)
        self.cache_misses = Counter("litellm_cache_misses_metric", "Cache lookups that found no usable entry",
                                    ["model"], registry=r)
        self.cache_errors = Counter("litellm_cache_errors_metric", "Cache reads and writes skipped because the "
                                    "cache (Redis) did not answer", ["model"], registry=r)
        self.overhead_latency = Histogram("litellm_overhead_latency_metric", "Time the gateway added to a call "
                                          "that went upstream (total minus upstream), in seconds", ["model"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        # Per deployment (LiteLLM's names): attempts, cooldowns, and 0 healthy / 1 partial outage
        # (its latest attempt failed) / 2 complete outage (cooled down)
        deployment = ["model", "model_id", "api_provider"]
        self.deployment_successes = Counter("litellm_deployment_success_responses", "Successful upstream "
                                            "attempts by deployment", deployment, registry=r)
        self.deployment_failures = Counter("litellm_deployment_failure_responses", "Failed upstream attempts by "
                                           "deployment and status", deployment + ["exception_status"], registry=r)
        self.deployment_cooled_down = Counter("litellm_deployment_cooled_down", "Times a deployment was put in "
                                              "cooldown", deployment + ["exception_status"], registry=r)
        self.deployment_state = Gauge("litellm_deployment_state", "0 healthy, 1 partial outage (latest attempt "
                                      "failed), 2 complete outage (cooled down)", deployment, registry=r,
                                      multiprocess_mode="mostrecent")
        self.retries = Counter("litellm_request_retries", "Attempts after the first within a model group",
                               ["model"], registry=r)
        fallback = ["requested_model", "fallback_model"]
        self.fallbacks_ok = Counter("litellm_deployment_successful_fallbacks", "Calls a fallback group answered",
                                    fallback, registry=r)
        self.fallbacks_failed = Counter("litellm_deployment_failed_fallbacks", "Fallback groups that failed too",
                                        fallback, registry=r)
        self.rate_limit_rejections = Counter("litellm_rate_limit_rejections", "Requests refused (429) by a key's, "
                                             "team's or user's rpm / tpm / parallel limit", ["scope", "limit_type"],
                                             registry=r)
        # Labelled children, looked up once each. Bounded: routes come from routes.yaml and models
        # are only ever resolved model groups (never a client's unknown model name).
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def record(self, route: str, model: str, status: int, elapsed: float, provider: str | None,
               upstream_s: float, usage: dict | None) -> None:
        """Everything one finished request adds."""
        self.child(self.requests, route, model, str(status)).inc()
        self.child(self.latency, route, model).observe(elapsed)
        if provider is not None:
            self.child(self.upstream_latency, model, provider).observe(upstream_s)
            self.child(self.overhead_latency, model).observe(max(elapsed - upstream_s, 0.0))
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and prompt > 0:
                self.child(self.input_tokens, model).inc(prompt)
            if isinstance(completion, int) and completion > 0:
                self.child(self.output_tokens, model).inc(completion)

    def attempt_ended(self, group: str, model_id: str, provider: str, status: int | None, cooled: bool) -> None:
        """One upstream attempt: ``status`` None when it succeeded, else the error's status."""
        labels = (group, model_id, provider)
        if status is None:
            self.child(self.deployment_successes, *labels).inc()
            self.child(self.deployment_state, *labels).set(0)
            return
        self.child(self.deployment_failures, *labels, str(status)).inc()
        if cooled:
            self.child(self.deployment_cooled_down, *labels, str(status)).inc()
        self.child(self.deployment_state, *labels).set(2 if cooled else 1)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
