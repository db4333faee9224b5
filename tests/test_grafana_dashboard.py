"""contrib/grafana/tornado-proxy.json queries only what the gateway exposes: every metric name in
every panel's PromQL (and in the template variables) is a series on /metrics after a few calls,
and every label it groups by or matches on is a label of that series."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from .conftest import PROVIDER_KEY

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "tornado-proxy.json"
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
# PromQL words that are not metric names (functions, aggregations, modifiers)
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by",
                "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "topk", "bottomk",
                "clamp_min", "clamp_max", "label_values", "offset", "bool"}


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels") or ())


def dashboard_queries(doc: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(doc["panels"]) for t in p.get("targets") or () if t.get("expr")]
    for var in doc.get("templating", {}).get("list", ()):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def parse_query(expr: str) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(metric names, labels grouped by, {metric: labels matched on}) of one PromQL expression."""
    grouped = {label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
               for label in group.split(",") if label.strip()}
    matched: dict[str, set[str]] = {}
    for metric, body in re.findall(rf"({IDENT})\s*\{{([^}}]*)\}}", expr):
        matched.setdefault(metric, set()).update(re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)", body))
    m = re.fullmatch(rf"\s*label_values\(\s*({IDENT})\s*,\s*({IDENT})\s*\)\s*", expr)
    if m:
        return {m.group(1)}, set(), {m.group(1): {m.group(2)}}
    bare = re.sub(r'"[^"]*"', "", expr)                      # strings
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)         # matchers, ranges
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", bare)  # grouping labels
    names = {w for w in re.findall(IDENT, bare) if w not in PROMQL_WORDS and not re.fullmatch(r"[\d.e]+", w)}
    return names, grouped, matched


def test_query_parser():
    names, grouped, matched = parse_query(
        'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{model=~"$model", s!="a"}[$__rate_interval])))'
        " / sum(y_total) * 3600")
    assert names == {"x_bucket", "y_total"} and grouped == {"le", "model"} and matched == {"x_bucket": {"model", "s"}}


def scraped(text: str) -> dict[str, set[str]]:
    """Every sample name on /metrics -> the label names its samples carry."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def problems(queries: list[str], series: dict[str, set[str]]) -> list[str]:
    """What in ``queries`` does not match the scraped ``series`` (empty: all good)."""
    found = []
    for expr in queries:
        names, grouped, matched = parse_query(expr)
        if not names:
            found.append(f"{expr!r}: no metric name")
        for name in names:
            if name not in series:
                found.append(f"{name} (in {expr!r}) is not on /metrics")
            elif grouped - series[name]:
                found.append(f"{expr!r}: {name} has no label {grouped - series[name]}")
        for name, labels in matched.items():
            if name in series and labels - series[name]:
                found.append(f"{expr!r}: {name} has no label {labels - series[name]}")
    return found


def config(openai_a, openai_b, anthropic, dsn: str) -> str:
    return f"""
model_list:
  - model_name: gpt-fake
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{openai_a.base}", api_key: {PROVIDER_KEY}}}
    model_info: {{id: dep-a}}
  - model_name: gpt-fake
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{openai_b.base}", api_key: {PROVIDER_KEY}}}
    model_info: {{id: dep-b}}
  - model_name: backup
    litellm_params: {{model: anthropic/claude-3-5-haiku-20241022, api_base: "{anthropic.base}", api_key: {PROVIDER_KEY}}}
    model_info: {{id: dep-c}}
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
router_settings:
  num_retries: 1
  retry_after: 0
  cooldown_time: 60
  fallbacks: [{{"gpt-fake": ["backup"]}}]
litellm_settings:
  cache: true
"""


def chat(text: str) -> dict:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": text}]}


async def exercise(gw, fetch, fake_openai, fake_openai_b, fake_anthropic) -> None:
    """Calls that give every series the dashboard reads at least one sample."""
    assert (await fetch(gw, "/v1/chat/completions", chat("one"))).code == 200      # cache miss, tokens, spend
    hit = await fetch(gw, "/v1/chat/completions", chat("one"))
    assert hit.code == 200 and hit.headers["x-litellm-cache-hit"] == "True"
    r = await fetch(gw, "/key/generate", {"rpm_limit": 1})
    key = orjson.loads(r.body)["key"]
    assert (await fetch(gw, "/v1/chat/completions", chat("two"), key=key)).code == 200
    assert (await fetch(gw, "/v1/chat/completions", chat("three"), key=key)).code == 429  # rate-limit rejection
    for fake in (fake_openai, fake_openai_b):
        fake.fail_times, fake.fail_status, fake.retry_after = 1, 429, "0"
    r = await fetch(gw, "/v1/chat/completions", chat("four"))  # both fail (cooled down, a retry), backup answers
    assert r.code == 200 and r.headers["x-litellm-attempted-fallbacks"] == "1"
    fake_anthropic.fail_times, fake_anthropic.fail_status = 5, 500
    r = await fetch(gw, "/v1/chat/completions", chat("five"))  # group cooled down, the fallback fails too
    assert r.code >= 400


async def test_every_dashboard_query_hits_exposed_series(gateway, fetch, fake_openai, fake_openai_b, fake_anthropic,
                                                         pg_dsn):
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 39
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    for p in panels(doc["panels"]):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    gw = await gateway(config(fake_openai, fake_openai_b, fake_anthropic, pg_dsn))
    await exercise(gw, fetch, fake_openai, fake_openai_b, fake_anthropic)
    # a Redis cache that does not answer: the cache-errors series
    broken = await gateway("""
model_list:
  - model_name: gpt-fake
    litellm_params: {model: mock/gpt-fake}
litellm_settings:
  cache: true
  cache_params: {type: redis, host: 127.0.0.1, port: 1}
""")
    assert (await fetch(broken, "/v1/chat/completions", chat("six"))).code == 200
    series: dict[str, set[str]] = {}
    for g in (gw, broken):
        r = await fetch(g, "/metrics")
        assert r.code == 200
        for name, labels in scraped(r.body.decode()).items():
            series.setdefault(name, set()).update(labels)

    queries = dashboard_queries(doc)
    assert len(queries) >= 20
    assert problems(queries, series) == []
    # the check is not vacuous: a name prometheus_client does not expose (no _total), an unknown
    # label in by (...) and in a matcher are each caught
    wrong = ["sum(rate(litellm_spend_metric[5m]))", "sum by (nope) (litellm_in_flight_requests)",
             'litellm_input_tokens_total{team="x"}']
    assert len(problems(wrong, series)) == 3
    used = set().union(*(parse_query(expr)[0] for expr in queries))
    # what the dashboard promises to show is there
    for wanted in ("litellm_request_total_latency_metric_bucket", "litellm_overhead_latency_metric_bucket",
                   "litellm_deployment_cooled_down_total", "litellm_deployment_state", "litellm_request_retries_total",
                   "litellm_deployment_successful_fallbacks_total", "litellm_deployment_failed_fallbacks_total",
                   "litellm_rate_limit_rejections_total", "litellm_in_flight_requests", "litellm_spend_metric_total",
                   "litellm_cache_hits_metric_total", "litellm_cache_misses_metric_total",
                   "litellm_input_tokens_total", "litellm_output_tokens_total",
                   "litellm_deployment_failure_responses_total"):
        assert wanted in used, wanted

