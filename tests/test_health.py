"""health.py without servers: probe requests per mode, what is skipped, reports and their file,
the freshness rule of ``unhealthy_ids``, and the monitor's in-memory set."""

from __future__ import annotations

import dataclasses

import pytest

from tornado_proxy.app import Gateway
from tornado_proxy.config import Secret, Settings
from tornado_proxy.health import (EndpointHealth, HealthMonitor, HealthReport, MemoryReports, ReportFile,
                                  max_report_age, probe_request, probe_target, probe_timeout, reports_path,
                                  skip_reason, unhealthy_ids)
from tornado_proxy.providers.base import Deployment


def deployment(**kwargs) -> Deployment:
    base = dict(id="d1", model_name="group", provider="openai", model="gpt-4o-mini",
                api_base="https://user:pw@api.example.com/v1?key=x", api_key=Secret("sk-secret-123456"),
                public_params={"model": "openai/gpt-4o-mini"})
    return Deployment(**{**base, **kwargs})


def entry(model_id: str, error: str | None = None) -> EndpointHealth:
    return EndpointHealth(model_id=model_id, model="openai/x", api_base=None, error=error,
                          exception_status=500 if error else None)


@pytest.mark.parametrize("mode, endpoint, body", [
    (None, "chat", {"model": "group", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}),
    ("chat", "chat", {"model": "group", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}),
    ("embedding", "embeddings", {"model": "group", "input": "ping"}),
    ("completion", "completions", {"model": "group", "prompt": "ping", "max_tokens": 1}),
])
def test_probe_request_per_mode(mode, endpoint, body):
    d = deployment(model_info={"mode": mode} if mode else {})
    assert probe_request(d) == (endpoint, body)


def test_health_check_model_replaces_the_model_with_or_without_the_provider_prefix():
    assert probe_target(deployment(model_info={"health_check_model": "openai/gpt-4o"})).model == "gpt-4o"
    assert probe_target(deployment(model_info={"health_check_model": "gpt-4o"})).model == "gpt-4o"
    d = deployment()
    assert probe_target(d) is d


def test_skipped_deployments_name_why():
    assert skip_reason(deployment()) is None
    assert skip_reason(deployment(problem="Unsupported provider 'x'")) == "Unsupported provider 'x'"
    assert "health_check_model" in skip_reason(deployment(model="*", model_name="openai/*"))
    assert skip_reason(deployment(model="*", model_info={"health_check_model": "openai/gpt-4o"})) is None


def test_probe_timeout_prefers_the_deployments_own():
    assert probe_timeout(deployment(), 5.0) == 5.0
    assert probe_timeout(deployment(model_info={"health_check_timeout": "2.5"}), 5.0) == 2.5
    assert probe_timeout(deployment(model_info={"health_check_timeout": "soon"}), 5.0) == 5.0
    assert probe_timeout(deployment(model_info={"health_check_timeout": -1}), 5.0) == 5.0


def test_report_body_has_litellms_keys_and_round_trips():
    report = HealthReport(100.0, healthy=(entry("a"),), unhealthy=(entry("b", "boom"),),
                          skipped=(dataclasses.replace(entry("c"), reason="wildcard"),))
    body = report.to_body()
    assert body["healthy_count"] == 1 and body["unhealthy_count"] == 1
    assert body["unhealthy_endpoints"] == [{"model": "openai/x", "model_id": "b", "api_base": None,
                                            "error": "boom", "exception_status": 500}]
    assert body["skipped_endpoints"][0]["reason"] == "wildcard"
    assert HealthReport.from_bytes(report.to_bytes()) == report
    assert report.only(["b", "c"]).to_body()["healthy_count"] == 0


def test_unhealthy_ids_only_from_a_fresh_report():
    report = HealthReport(1000.0, healthy=(entry("a"),), unhealthy=(entry("b", "x"), entry("c", "y")))
    assert unhealthy_ids(report, max_age=60, now=1030.0) == frozenset({"b", "c"})
    assert unhealthy_ids(report, max_age=60, now=1061.0) == frozenset()
    assert unhealthy_ids(None, max_age=60) == frozenset()
    assert unhealthy_ids(HealthReport(None), max_age=60) == frozenset()


def test_report_file_is_replaced_whole_and_reparsed_only_when_changed(tmp_path):
    path = reports_path(tmp_path / "proxyctl-4000.state")
    assert path.name == "proxyctl-4000.health"
    writer, reader = ReportFile(path), ReportFile(path)
    assert reader.read() is None
    first = HealthReport(1.0, healthy=(entry("a"),))
    writer.write(first)
    assert reader.read() == first
    assert reader.read() is reader.read()  # unchanged file: the parsed report is kept
    second = HealthReport(2.0, unhealthy=(entry("a", "down"),))
    writer.write(second)
    assert reader.read() == second
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    path.write_text("{not json")
    assert reader.read() is None
    writer.remove()
    assert reader.read() is None


def test_monitor_keeps_the_unhealthy_set_in_memory_for_the_gateway():
    settings = Settings(background_health_checks=True, health_check_interval=10, health_check_timeout=1)
    reports = MemoryReports()
    monitor = HealthMonitor(reports, runs_checks=False)
    reports.write(HealthReport(10**12, unhealthy=(entry("b", "x"),)))  # far future: always fresh
    monitor.refresh(settings)
    assert monitor.unhealthy == frozenset({"b"})
    monitor.refresh(dataclasses.replace(settings, background_health_checks=False))
    assert monitor.unhealthy == frozenset()
    reports.write(HealthReport(1.0, unhealthy=(entry("b", "x"),)))  # long stale
    monitor.refresh(settings)
    assert monitor.unhealthy == frozenset()
    assert max_report_age(settings) == 21


def test_gateway_exposes_the_monitors_set(tmp_path):
    from tornado_proxy.config import load

    path = tmp_path / "c.yaml"
    path.write_text("model_list: []\n")
    monitor = HealthMonitor(MemoryReports(), runs_checks=False)
    gw = Gateway(load(path, environ={}), health=monitor)
    assert gw.unhealthy_deployment_ids() == frozenset()
    monitor.unhealthy = frozenset({"x"})
    assert gw.unhealthy_deployment_ids() == frozenset({"x"})
