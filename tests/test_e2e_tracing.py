"""OpenTelemetry tracing end to end: the gateway exports OTLP/HTTP (protobuf) to a fake collector
on loopback, which decodes each ExportTraceServiceRequest with the opentelemetry-proto classes."""

from __future__ import annotations

import socket

import orjson
import pytest
import tornado.web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from contrib.fake_providers.common import listen
from .conftest import PROVIDER_KEY, wait_for

PROMPT = "the-secret-prompt-7f3a"
COMPLETION = "the-private-completion-91bc"
SPAN_SERVER, SPAN_CLIENT = Span.SpanKind.SPAN_KIND_SERVER, Span.SpanKind.SPAN_KIND_CLIENT


class Collector:
    """What the fake collector received: every span, with its resource attributes."""

    def __init__(self):
        self.spans: list[Span] = []
        self.resources: list[dict] = []
        self.content_types: list[str] = []

    def server_span(self, call_id: str) -> Span | None:
        return next((s for s in self.spans if s.kind == SPAN_SERVER and attrs(s).get("litellm.call_id") == call_id),
                    None)

    def children(self, parent: Span) -> list[Span]:
        found = [s for s in self.spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id]
        return sorted(found, key=lambda s: s.start_time_unix_nano)


class TracesHandler(tornado.web.RequestHandler):
    def initialize(self, collector: Collector):
        self.collector = collector

    def post(self):
        request = ExportTraceServiceRequest()
        request.ParseFromString(self.request.body)
        self.collector.content_types.append(self.request.headers.get("Content-Type", ""))
        for rs in request.resource_spans:
            self.collector.resources.append(attrs(rs.resource))
            for ss in rs.scope_spans:
                self.collector.spans.extend(ss.spans)
        self.set_header("Content-Type", "application/x-protobuf")
        self.finish(ExportTraceServiceResponse().SerializeToString())


def value_of(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(item) -> dict:
    return {kv.key: value_of(kv.value) for kv in item.attributes}


@pytest.fixture
async def collector():
    found = Collector()
    server, port = listen(tornado.web.Application([("/v1/traces", TracesHandler, {"collector": found})]))
    found.base = f"http://127.0.0.1:{port}"
    yield found
    server.stop()
    await server.close_all_connections()


def traced_config(fake, litellm: str = "", router: str = "") -> str:
    return f"""
model_list:
  - model_name: gpt-fake
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
    model_info: {{id: dep-a}}
litellm_settings:
  callbacks: ["otel"]
{litellm}
router_settings:
  num_retries: 0
{router}
"""


def otel_env(endpoint: str) -> dict:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "20",
            "OTEL_SERVICE_NAME": "gateway-under-test", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}


CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0.25, "max_tokens": 50}


async def traced_call(collector, fetch, gw, body=None, headers=None, attempts: int = 1):
    """One call, then its server span and its attempt spans once the collector has them all."""
    r = await fetch(gw, "/v1/chat/completions", body or CHAT, headers=headers)
    call_id = r.headers["x-litellm-call-id"]
    await wait_for(lambda: (s := collector.server_span(call_id)) is not None
                   and len(collector.children(s)) == attempts, timeout=10)
    span = collector.server_span(call_id)
    return r, span, collector.children(span)


def assert_no_text(collector, *texts: str) -> None:
    for span in collector.spans:
        for key, value in attrs(span).items():
            for text in texts:
                assert text not in str(value), (span.name, key)
        assert all(text not in span.status.message for text in texts)


async def test_plain_chat_call_is_one_server_span_with_one_attempt(gateway, fetch, fake_openai, collector):
    fake_openai.reply_text = COMPLETION
    gw = await gateway(traced_config(fake_openai), env=otel_env(collector.base))
    r, span, (attempt,) = await traced_call(collector, fetch, gw)
    assert r.code == 200
    usage = orjson.loads(r.body)["usage"]
    a = attrs(span)
    assert span.name == "POST /chat/completions" and span.kind == SPAN_SERVER
    assert span.status.code != Status.StatusCode.STATUS_CODE_ERROR
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-fake"
    assert a["gen_ai.response.model"] == orjson.loads(r.body)["model"]
    assert a["gen_ai.provider.name"] == a["gen_ai.system"] == "openai"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] > 0
    assert a["gen_ai.request.temperature"] == 0.25 and a["gen_ai.request.max_tokens"] == 50
    assert a["http.response.status_code"] == 200 and a["http.route"] == "/chat/completions"
    assert a["litellm.model_group"] == "gpt-fake" and a["litellm.model_id"] == "dep-a"
    assert a["litellm.retries"] == 0 and a["litellm.fallbacks"] == 0
    assert a["litellm.cache_hit"] is False and a["litellm.stream"] is False
    b = attrs(attempt)
    assert attempt.name == "chat gpt-4o-mini" and attempt.kind == SPAN_CLIENT
    assert attempt.trace_id == span.trace_id and not span.parent_span_id
    assert b["gen_ai.request.model"] == "gpt-4o-mini" and b["gen_ai.provider.name"] == "openai"
    assert b["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert b["http.response.status_code"] == 200 and b["litellm.model_id"] == "dep-a"
    assert {"service.name": "gateway-under-test"}.items() <= collector.resources[0].items()
    assert collector.content_types[0] == "application/x-protobuf"
    assert_no_text(collector, PROMPT, COMPLETION)


async def test_streamed_call(gateway, fetch, fake_openai, collector):
    fake_openai.reply_text = COMPLETION
    gw = await gateway(traced_config(fake_openai), env=otel_env(collector.base))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r, span, (attempt,) = await traced_call(collector, fetch, gw, body)
    assert r.code == 200 and b"data: [DONE]" in r.body
    a = attrs(span)
    assert a["litellm.stream"] is True and a["http.response.status_code"] == 200
    assert a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["litellm.time_to_first_token_s"] > 0
    assert attrs(attempt)["gen_ai.usage.output_tokens"] == a["gen_ai.usage.output_tokens"]
    assert_no_text(collector, PROMPT, COMPLETION)


async def test_retried_call_has_two_attempt_spans(gateway, fetch, fake_openai, collector):
    gw = await gateway(traced_config(fake_openai, router="  num_retries: 1\n"), env=otel_env(collector.base))
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 1, 500, "0"
    r, span, (first, second) = await traced_call(collector, fetch, gw, attempts=2)
    assert r.code == 200 and len(fake_openai.received) == 2
    assert attrs(span)["litellm.retries"] == 1
    assert span.status.code != Status.StatusCode.STATUS_CODE_ERROR
    assert first.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert attrs(first)["error.type"] == "500" and attrs(first)["http.response.status_code"] == 500
    assert attrs(first)["litellm.attempt"] == 1 and attrs(second)["litellm.attempt"] == 2
    assert second.status.code != Status.StatusCode.STATUS_CODE_ERROR
    assert "error.type" not in attrs(second) and attrs(second)["http.response.status_code"] == 200
    assert_no_text(collector, PROMPT)


async def test_failed_call_has_error_status(gateway, fetch, fake_openai, collector):
    gw = await gateway(traced_config(fake_openai), env=otel_env(collector.base))
    fake_openai.fail_times, fake_openai.fail_status = 5, 503
    r, span, (attempt,) = await traced_call(collector, fetch, gw)
    assert r.code == 503
    for s in (span, attempt):
        assert s.status.code == Status.StatusCode.STATUS_CODE_ERROR
        assert attrs(s)["error.type"] == "503" and attrs(s)["http.response.status_code"] == 503
    assert "gen_ai.usage.input_tokens" not in attrs(span)
    assert_no_text(collector, PROMPT)


async def test_incoming_traceparent_is_the_parent(gateway, fetch, fake_openai, collector):
    gw = await gateway(traced_config(fake_openai), env=otel_env(collector.base))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r, span, (attempt,) = await traced_call(collector, fetch, gw,
                                            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert r.code == 200
    assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
    assert attempt.trace_id.hex() == trace_id and attempt.parent_span_id == span.span_id


async def test_content_is_recorded_only_when_asked(gateway, fetch, fake_openai, collector):
    fake_openai.reply_text = COMPLETION
    gw = await gateway(traced_config(fake_openai, litellm="  otel_log_content: true\n"), env=otel_env(collector.base))
    _, span, _ = await traced_call(collector, fetch, gw)
    a = attrs(span)
    assert orjson.loads(a["gen_ai.input.messages"]) == CHAT["messages"]
    assert COMPLETION in a["gen_ai.output.messages"]
    _, span, _ = await traced_call(collector, fetch, gw, {**CHAT, "stream": True})
    assert COMPLETION in attrs(span)["gen_ai.output.messages"]


async def test_turn_off_message_logging_wins(gateway, fetch, fake_openai, collector):
    fake_openai.reply_text = COMPLETION
    settings = "  otel_log_content: true\n  turn_off_message_logging: true\n"
    gw = await gateway(traced_config(fake_openai, litellm=settings), env=otel_env(collector.base))
    await traced_call(collector, fetch, gw)
    assert_no_text(collector, PROMPT, COMPLETION)


async def test_env_endpoint_alone_turns_tracing_on(gateway, fetch, fake_openai, collector):
    config = traced_config(fake_openai).replace('  callbacks: ["otel"]\n', "  drop_params: true\n")
    gw = await gateway(config, env=otel_env(collector.base))
    r, span, _ = await traced_call(collector, fetch, gw)
    assert r.code == 200 and attrs(span)["litellm.model_group"] == "gpt-fake"


async def test_collector_that_refuses_connections_costs_nothing(gateway, fetch, fake_openai, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = await gateway(traced_config(fake_openai), env=otel_env(f"http://127.0.0.1:{port}"))
    with caplog.at_level("WARNING", logger="opentelemetry"):
        for body in (CHAT, {**CHAT, "stream": True}, CHAT):
            r = await fetch(gw, "/v1/chat/completions", body)
            assert r.code == 200
        await gw.stop()  # the final flush meets the refusing collector and still ends
    assert gw.task.done() and gw.task.exception() is None
    # the spans were really sent (and refused): the exporter said so
    assert any(r.name.startswith("opentelemetry.exporter") for r in caplog.records), caplog.records


async def test_stop_flushes_queued_spans(gateway, fetch, fake_openai, collector):
    """A long batch delay keeps spans queued; stopping the gateway (what SIGTERM does) sends them."""
    gw = await gateway(traced_config(fake_openai), env={**otel_env(collector.base), "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and collector.spans == []
    await gw.stop()
    assert collector.server_span(r.headers["x-litellm-call-id"]) is not None
    assert len(collector.spans) == 2


async def test_stream_that_fails_midway_is_an_error(gateway, fetch, fake_openai, collector):
    gw = await gateway(traced_config(fake_openai), env=otel_env(collector.base))
    fake_openai.stream_chunks, fake_openai.fail_mid_stream_after = 6, 2
    r, span, (attempt,) = await traced_call(collector, fetch, gw, {**CHAT, "stream": True})
    assert r.code == 200 and b'"error"' in r.body  # the error went out as the last event
    assert span.status.code == attempt.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert attrs(span)["http.response.status_code"] == 200  # what the client got
    assert attrs(span)["error.type"] == attrs(attempt)["error.type"] != "200"
