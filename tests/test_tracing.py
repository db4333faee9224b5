"""tracing.py without servers: settings from litellm_settings and the environment, the callbacks
no longer reported as unsupported, the missing-packages error, and the disabled path importing
nothing from OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tornado_proxy import tracing
from tornado_proxy.app import validate
from tornado_proxy.config import ConfigError, load
from tornado_proxy.tracing import TraceSettings

OTEL = {"callbacks": ["otel"]}


def test_off_unless_asked():
    assert TraceSettings.parse({}, {}) is None
    assert TraceSettings.parse({"success_callback": ["langfuse"]}, {"OTEL_ENDPOINT": "http://c:4318"}) is None
    assert TraceSettings.parse({"callbacks": "otel"}, {}).enabled_by == 'litellm_settings.callbacks: ["otel"]'
    assert TraceSettings.parse({"failure_callback": ["langfuse", "otel"]}, {}) is not None
    assert TraceSettings.parse({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).enabled_by == \
        "OTEL_EXPORTER_OTLP_ENDPOINT"


@pytest.mark.parametrize("env, endpoint", [
    ({}, "http://localhost:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
    ({"OTEL_ENDPOINT": "https://api.example.com"}, "https://api.example.com/v1/traces"),
    ({"OTEL_ENDPOINT": "http://c:4318/v1/traces"}, "http://c:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/custom", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
     "http://t:1/custom"),
])
def test_endpoint(env, endpoint):
    assert TraceSettings.parse(OTEL, env).endpoint == endpoint


def test_headers_service_and_batching():
    s = TraceSettings.parse(OTEL, {"OTEL_HEADERS": "Authorization=Bearer%20abc,x-team=blue",
                                   "OTEL_SERVICE_NAME": "gw", "OTEL_BSP_SCHEDULE_DELAY": "250",
                                   "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "3"})
    assert dict(s.headers) == {"authorization": "Bearer abc", "x-team": "blue"}
    assert "abc" not in repr(s)  # headers may hold an API key
    assert (s.service_name, s.schedule_delay_ms, s.timeout) == ("gw", 250.0, 3.0)
    standard = TraceSettings.parse(OTEL, {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=k1", "OTEL_HEADERS": "api-key=k2"})
    assert dict(standard.headers) == {"api-key": "k1"}
    assert TraceSettings.parse(OTEL, {}).service_name == "litellm"


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="OTEL_BSP_SCHEDULE_DELAY"):
        TraceSettings.parse(OTEL, {"OTEL_BSP_SCHEDULE_DELAY": "soon"})
    with pytest.raises(ConfigError, match="OTLP over HTTP"):
        TraceSettings.parse(OTEL, {"OTEL_EXPORTER": "otlp_grpc"})
    with pytest.raises(ConfigError, match="OTLP over HTTP"):
        TraceSettings.parse(OTEL, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


@pytest.mark.parametrize("settings, env, expected", [
    ({}, {}, False),
    ({"otel_log_content": True}, {}, True),
    ({}, {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}, True),
    ({"otel_log_content": True, "turn_off_message_logging": True}, {}, False),
    ({"turn_off_message_logging": True}, {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}, False),
])
def test_content_logging_is_opt_in(settings, env, expected):
    assert TraceSettings.parse({**OTEL, **settings}, env).log_content is expected


def test_otel_callbacks_are_not_reported_unsupported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        litellm_settings:
          callbacks: ["otel"]
          success_callback: ["otel"]
          failure_callback: ["langfuse", "otel"]
          otel_log_content: false
          turn_off_message_logging: true
    """))
    assert load(path, environ={}).ignored == ("litellm_settings.failure_callback",)


def test_missing_packages_is_a_one_line_startup_error(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text('litellm_settings: {callbacks: ["otel"]}\n')
    monkeypatch.setattr(tracing, "REQUIRED_MODULES", ("opentelemetry.sdk", "opentelemetry_not_installed.here"))
    with pytest.raises(ConfigError) as err:
        validate(load(path, environ={}))
    assert "\n" not in str(err.value)
    assert "pip install 'tornado-proxy[otel]'" in str(err.value) and 'callbacks: ["otel"]' in str(err.value)


def test_disabled_path_imports_no_opentelemetry(tmp_path):
    """Without tracing, building the gateway loads no OpenTelemetry module (a fresh interpreter)."""
    path = tmp_path / "c.yaml"
    path.write_text("model_list: [{model_name: m, litellm_params: {model: openai/gpt-4o-mini, api_key: k}}]\n")
    code = textwrap.dedent(f"""
        import sys
        from tornado_proxy.app import Gateway, make_application, validate
        from tornado_proxy.config import load
        config = load({str(path)!r}, environ={{}})
        validate(config)
        gw = Gateway(config)
        make_application(gw)
        assert gw.tracer is None
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
