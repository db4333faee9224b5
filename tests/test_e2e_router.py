"""Load balancing, retries, fallbacks and cooldowns end to end: the gateway in front of two fake
OpenAI-compatible providers that fail on command (issue 11)."""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from contrib.fake_providers.common import RawReply
from tests.conftest import PROVIDER_KEY, error_of
from tests.test_e2e_upstream_errors import closed_port

CHAT = {"model": "pair", "messages": [{"role": "user", "content": "hello"}]}


def deployment(name: str, base: str, model_id: str, extra: str = "") -> str:
    return f"""
  - model_name: {name}
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {base}
      api_key: {PROVIDER_KEY}{extra}
    model_info:
      id: {model_id}"""


def config(*entries: str, router: str = "") -> str:
    return "model_list:" + "".join(entries) + "\nrouter_settings:\n  cooldown_time: 30\n" + router


def pair(fake_a, fake_b, router: str = "", a: str = "", b: str = "") -> str:
    """Group "pair": dep-a on ``fake_a``, dep-b on ``fake_b`` (``a``/``b``: more litellm_params)."""
    return config(deployment("pair", fake_a.base, "dep-a", a), deployment("pair", fake_b.base, "dep-b", b),
                  router=router)


def stream_body(**kw) -> dict:
    return {**CHAT, "stream": True, **kw}


async def test_a_failing_deployment_is_retried_on_the_other(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b))
    fake_openai.fail_times = 100
    retried = 0
    for n in range(1, 41):  # dep-a is picked first half the time
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200, r.body
        assert r.headers["x-litellm-model-id"] == "dep-b"
        assert r.headers["x-litellm-model-api-base"] == fake_openai_b.base
        assert r.headers["x-litellm-attempted-fallbacks"] == "0"
        retried += int(r.headers["x-litellm-attempted-retries"])
        assert len(fake_openai_b.received) == n  # the retry went to the other one, never dep-a again
        assert len(fake_openai.received) == retried
    assert 1 <= retried <= 4  # dep-a cools down after allowed_fails (3) + 1 failures


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_retryable_statuses_are_retried_on_one_deployment(gateway, fetch, fake_openai, status):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a")))
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 2, status, "0"
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200, r.body
    assert r.headers["x-litellm-attempted-retries"] == "2"
    assert len(fake_openai.received) == 3  # num_retries defaults to 2, as in LiteLLM


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_other_client_errors_are_never_retried(gateway, fetch, fake_openai, fake_openai_b, status):
    gw = await gateway(pair(fake_openai, fake_openai_b))
    fake_openai.fail_times = fake_openai_b.fail_times = 5
    fake_openai.fail_status = fake_openai_b.fail_status = status
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == status
    assert len(fake_openai.received) + len(fake_openai_b.received) == 1
    assert r.headers["x-litellm-attempted-retries"] == "0"


async def test_retries_give_up_after_num_retries(gateway, fetch, fake_openai):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"), router="  num_retries: 1\n"))
    fake_openai.fail_times, fake_openai.retry_after = 10, "0"
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 500 and error_of(r)["type"] == "api_error"
    assert len(fake_openai.received) == 2
    assert r.headers["x-litellm-attempted-retries"] == "1"


async def test_request_body_num_retries_overrides(gateway, fetch, fake_openai):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a")))
    fake_openai.fail_times, fake_openai.retry_after = 10, "0"
    r = await fetch(gw, "/v1/chat/completions", {**CHAT, "num_retries": 0})
    assert r.code == 500 and len(fake_openai.received) == 1
    assert "num_retries" not in fake_openai.received[0].body


async def test_a_malformed_200_is_retried_never_relayed(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, router="  num_retries: 3\n"))
    fake_openai.raw_reply = RawReply(content_type="application/json", frames=(b'{"no": "choices"}',))
    for _ in range(4):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"
        assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hello"


async def test_an_unreachable_deployment_is_retried_on_the_other(gateway, fetch, fake_openai):
    gw = await gateway(config(deployment("pair", f"http://127.0.0.1:{closed_port()}/v1", "dep-dead"),
                              deployment("pair", fake_openai.base, "dep-a")))
    for _ in range(4):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-a"


async def test_a_hanging_deployment_times_out_and_the_other_answers(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, a="\n      timeout: 0.3"))
    fake_openai.latency = 5
    for _ in range(3):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"


async def test_timeout_bounds_the_whole_call(gateway, fetch, fake_openai):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              router="  timeout: 0.5\n  num_retries: 5\n"))
    fake_openai.latency = 5
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 408, r.body
    assert len(fake_openai.received) == 1  # nothing left of the 0.5 s for a retry


async def test_cooldown_skips_a_deployment_then_it_recovers(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b).replace("cooldown_time: 30", "cooldown_time: 0.5"))
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 100, 429, "0"
    for _ in range(3):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"
    assert len(fake_openai.received) <= 1  # one 429 cooled it down: not asked again
    fake_openai.fail_times = 0
    import asyncio
    await asyncio.sleep(0.6)
    seen = set()
    for _ in range(30):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        seen.add(r.headers["x-litellm-model-id"])
    assert seen == {"dep-a", "dep-b"}


async def test_all_cooled_down_is_a_clear_429(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, router="  num_retries: 1\n"))
    for fake in (fake_openai, fake_openai_b):
        fake.fail_times, fake.fail_status, fake.retry_after = 100, 429, "0"
    await fetch(gw, "/v1/chat/completions", CHAT)  # both 429: both cooled down
    before = len(fake_openai.received) + len(fake_openai_b.received)
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 429
    assert "No deployments available" in error_of(r)["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert len(fake_openai.received) + len(fake_openai_b.received) == before


async def test_the_only_deployment_is_never_cooled_down(gateway, fetch, fake_openai):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"), router="  num_retries: 0\n"))
    fake_openai.fail_times, fake_openai.fail_status = 5, 429
    for _ in range(5):
        assert (await fetch(gw, "/v1/chat/completions", CHAT)).code == 429
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and len(fake_openai.received) == 6


async def test_fallbacks_to_another_group(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("backup", fake_openai_b.base, "dep-b"),
                              router='  num_retries: 1\n  fallbacks: [{"pair": ["backup"]}]\n'))
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 10, 503, "0"
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200, r.body
    assert r.headers["x-litellm-model-id"] == "dep-b"
    assert r.headers["x-litellm-attempted-fallbacks"] == "1"
    assert r.headers["x-litellm-attempted-retries"] == "1"
    assert len(fake_openai.received) == 2 and fake_openai_b.received[0].body["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("router", ['  fallbacks: [{"*": ["backup"]}]\n', "  default_fallbacks: [backup]\n"])
async def test_wildcard_and_default_fallbacks(gateway, fetch, fake_openai, fake_openai_b, router):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("backup", fake_openai_b.base, "dep-b"), router="  num_retries: 0\n" + router))
    fake_openai.fail_times = 10
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"


async def test_request_body_fallbacks(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("backup", fake_openai_b.base, "dep-b"), router="  num_retries: 0\n"))
    fake_openai.fail_times = 10
    r = await fetch(gw, "/v1/chat/completions", {**CHAT, "fallbacks": ["backup"]})
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"
    assert "fallbacks" not in fake_openai_b.received[0].body
    assert (await fetch(gw, "/v1/chat/completions", {**CHAT, "fallbacks": "backup"})).code == 400


async def test_context_window_fallbacks_only_on_context_errors(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("big", fake_openai_b.base, "dep-big"),
                              router='  context_window_fallbacks: [{"pair": ["big"]}]\n'))
    too_long = orjson.dumps({"error": {"message": "This model's maximum context length is 8192 tokens.",
                                       "type": "invalid_request_error", "param": "messages",
                                       "code": "context_length_exceeded"}})
    fake_openai.raw_reply = RawReply(status=400, content_type="application/json", frames=(too_long,))
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-big"
    assert len(fake_openai.received) == 1  # a 400 is not retried
    fake_openai.raw_reply = None
    fake_openai.fail_times, fake_openai.fail_status = 1, 400  # another 400: answered as is
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 400 and len(fake_openai_b.received) == 1


async def test_content_policy_fallbacks(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("lenient", fake_openai_b.base, "dep-l"),
                              router='  content_policy_fallbacks: [{"pair": ["lenient"]}]\n'))
    refused = orjson.dumps({"error": {"message": "Your request was rejected as a result of our safety system.",
                                      "type": "invalid_request_error", "param": None,
                                      "code": "content_policy_violation"}})
    fake_openai.raw_reply = RawReply(status=400, content_type="application/json", frames=(refused,))
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-l"


async def test_max_fallbacks(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("f1", fake_openai.base, "dep-f1"),
                              deployment("f2", fake_openai_b.base, "dep-f2"),
                              router='  num_retries: 0\n  max_fallbacks: 1\n  fallbacks: [{"pair": ["f1", "f2"]}]\n'))
    fake_openai.fail_times = 10
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 500 and r.headers["x-litellm-attempted-fallbacks"] == "1"
    assert not fake_openai_b.received


async def test_order_tiers_use_the_backup_only_when_the_primary_fails(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, a="\n      order: 1", b="\n      order: 2"))
    for _ in range(5):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.headers["x-litellm-model-id"] == "dep-a"
    fake_openai.fail_times = 1
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"


async def test_model_group_alias_with_a_strategy(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b,
                            router='  routing_strategy: least-busy\n  model_group_alias: {"alias": "pair"}\n'))
    seen = {(await fetch(gw, "/v1/chat/completions", {**CHAT, "model": "alias"})).headers["x-litellm-model-id"]
            for _ in range(30)}
    assert seen == {"dep-a", "dep-b"}


async def test_simple_shuffle_spreads_by_weight(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, a="\n      weight: 9", b="\n      weight: 1"))
    for _ in range(100):
        assert (await fetch(gw, "/v1/chat/completions", CHAT)).code == 200
    assert len(fake_openai.received) > 2 * len(fake_openai_b.received) > 0


async def test_usage_based_routing_answers_429_at_the_limits(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, router="  routing_strategy: usage-based-routing-v2\n",
                            a="\n      rpm: 1", b="\n      rpm: 1"))
    assert {(await fetch(gw, "/v1/chat/completions", CHAT)).headers["x-litellm-model-id"] for _ in range(2)} \
        == {"dep-a", "dep-b"}
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 429 and "rpm/tpm limit" in error_of(r)["message"] and "Retry-After" in r.headers


def test_unknown_strategy_stops_start_up(tmp_path):
    from tornado_proxy import config as config_module
    from tornado_proxy.app import validate
    from tornado_proxy.config import ConfigError
    path = tmp_path / "config.yaml"
    path.write_text(config(deployment("pair", "http://127.0.0.1:9/v1", "dep-a"), router="  routing_strategy: fastest\n"))
    with pytest.raises(ConfigError, match="'fastest' is not a routing strategy; use one of simple-shuffle, least-busy"):
        validate(config_module.load(path, environ={}))


# --- streams -----------------------------------------------------------------------------------

async def test_stream_failing_before_the_first_byte_is_retried(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, a="\n      order: 1", b="\n      order: 2"))
    fake_openai.fail_times = 1
    r = await fetch(gw, "/v1/chat/completions", stream_body())
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.body.endswith(b"data: [DONE]\n\n") and b"error" not in r.body


@pytest.mark.parametrize("frames", [(), (b": keep-alive\n\n",), (b"data: [DONE]\n\n",)])
async def test_an_empty_stream_is_retried_never_relayed(gateway, fetch, fake_openai, fake_openai_b, frames):
    gw = await gateway(pair(fake_openai, fake_openai_b, a="\n      order: 1", b="\n      order: 2"))
    fake_openai.raw_reply = RawReply(frames=frames)
    r = await fetch(gw, "/v1/chat/completions", stream_body())
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"
    assert b"echo" in r.body and r.headers["x-litellm-attempted-retries"] == "1"


async def test_an_empty_stream_alone_is_a_502(gateway, fetch, fake_openai):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"), router="  num_retries: 1\n"))
    fake_openai.raw_reply = RawReply(frames=())
    r = await fetch(gw, "/v1/chat/completions", stream_body())
    assert r.code == 502 and "before sending any event" in error_of(r)["message"]
    assert len(fake_openai.received) == 2


async def test_stream_failing_after_the_first_byte_is_not_retried(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b, a="\n      order: 1", b="\n      order: 2"))
    fake_openai.fail_mid_stream_after = 1
    r = await fetch(gw, "/v1/chat/completions", stream_body())
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-a"
    assert b'"error"' in r.body and not r.body.endswith(b"data: [DONE]\n\n")
    assert not fake_openai_b.received


async def test_stream_fallback_to_another_group(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"),
                              deployment("backup", fake_openai_b.base, "dep-b"),
                              router='  num_retries: 0\n  fallbacks: [{"pair": ["backup"]}]\n'))
    fake_openai.fail_times = 1
    r = await fetch(gw, "/v1/chat/completions", stream_body())
    assert r.code == 200 and r.headers["x-litellm-attempted-fallbacks"] == "1" and b"[DONE]" in r.body


# --- the openai SDK sees none of it --------------------------------------------------------------

@pytest.fixture
async def gw(gateway, fake_openai, fake_openai_b):
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 100, 429, "0"
    return await gateway(pair(fake_openai, fake_openai_b))


async def test_sdk_gets_answers_while_a_deployment_fails(client, fake_openai_b):
    for _ in range(3):
        reply = await client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "echo: hi"
    chunks = [c async for c in await client.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": "hi there"}], stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi there"


async def test_sdk_sees_the_final_error_class(client, fake_openai_b):
    fake_openai_b.fail_times, fake_openai_b.fail_status, fake_openai_b.retry_after = 100, 429, "0"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hi"}])


async def test_a_client_that_leaves_stops_the_call_and_its_retries(gateway, http, fake_openai, fake_openai_b):
    import asyncio

    from tornado.httpclient import HTTPClientError, HTTPRequest

    from tests.conftest import MASTER_KEY
    gw = await gateway(pair(fake_openai, fake_openai_b))
    fake_openai.latency = fake_openai_b.latency = 2
    request = HTTPRequest(gw.url + "/v1/chat/completions", method="POST", body=orjson.dumps(CHAT),
                          headers={"Authorization": f"Bearer {MASTER_KEY}"}, request_timeout=0.3)
    with pytest.raises(HTTPClientError):
        await http.fetch(request)
    await asyncio.sleep(0.5)
    assert len(fake_openai.received) + len(fake_openai_b.received) == 1  # aborted, and no retry


async def test_a_bad_provider_key_falls_back(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a").replace(PROVIDER_KEY, "sk-wrong-0000"),
                              deployment("backup", fake_openai_b.base, "dep-b"),
                              router='  fallbacks: [{"pair": ["backup"]}]\n'))
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and r.headers["x-litellm-model-id"] == "dep-b"
    assert len(fake_openai.received) == 1  # a 401 is not retried


# --- background health checks feed routing (general_settings.enable_health_check_routing) -------

def user_calls(fake) -> int:
    """Chat calls a fake got from clients, not from the health check (its probe says "ping")."""
    return sum(1 for r in fake.received if r.path.endswith("/chat/completions")
               and r.body.get("messages") != [{"role": "user", "content": "ping"}])


async def report_where(fetch, gw, predicate) -> dict:
    for _ in range(500):
        body = orjson.loads((await fetch(gw, "/health")).body)
        if body["checked_at"] is not None and predicate(body):
            return body
        await asyncio.sleep(0.02)
    pytest.fail("the background health report did not change")


def unhealthy_ids(body: dict) -> set[str]:
    return {e["model_id"] for e in body["unhealthy_endpoints"]}


async def test_background_health_checks_steer_traffic_away_and_back(gateway, fetch, fake_openai, fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b) +
                       "general_settings: {background_health_checks: true, health_check_interval: 0.2}\n")
    await report_where(fetch, gw, lambda b: b["healthy_count"] == 2)

    fake_openai_b.fail_times, fake_openai_b.fail_status = 10**6, 500  # dep-b breaks
    await report_where(fetch, gw, lambda b: unhealthy_ids(b) == {"dep-b"})
    for _ in range(20):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200, r.body
        assert r.headers["x-litellm-model-id"] == "dep-a"
        assert r.headers["x-litellm-attempted-retries"] == "0"  # avoided before any user hit it
    assert user_calls(fake_openai) == 20 and user_calls(fake_openai_b) == 0

    fake_openai_b.fail_times = 0  # and recovers: the next round brings it back
    await report_where(fetch, gw, lambda b: b["unhealthy_count"] == 0)
    used = {(await fetch(gw, "/v1/chat/completions", CHAT)).headers["x-litellm-model-id"] for _ in range(40)}
    assert used == {"dep-a", "dep-b"}
    assert user_calls(fake_openai_b) > 0


async def test_a_group_whose_every_deployment_is_unhealthy_is_still_called(gateway, fetch, fake_openai,
                                                                         fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b) +
                       "general_settings: {background_health_checks: true, health_check_interval: 0.2}\n")
    for fake in (fake_openai, fake_openai_b):
        fake.fail_times, fake.fail_status = 10**6, 500
    await report_where(fetch, gw, lambda b: unhealthy_ids(b) == {"dep-a", "dep-b"})
    for fake in (fake_openai, fake_openai_b):  # healthy again, but the report still says otherwise
        fake.fail_times = 0
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200, r.body  # LiteLLM's safety net: health checks never refuse a call on their own
    assert user_calls(fake_openai) + user_calls(fake_openai_b) == 1


async def test_enable_health_check_routing_false_routes_as_without_checks(gateway, fetch, fake_openai,
                                                                         fake_openai_b):
    gw = await gateway(pair(fake_openai, fake_openai_b) +
                       "general_settings: {background_health_checks: true, health_check_interval: 3600, "
                       "enable_health_check_routing: false}\n")
    fake_openai_b.fail_times, fake_openai_b.fail_status = 1, 500  # fails the first round's probe only
    await report_where(fetch, gw, lambda b: unhealthy_ids(b) == {"dep-b"})
    used = {(await fetch(gw, "/v1/chat/completions", CHAT)).headers["x-litellm-model-id"] for _ in range(40)}
    assert used == {"dep-a", "dep-b"}


async def test_retry_policy_sets_retries_per_error_kind(gateway, fetch, fake_openai):
    policy = ("  num_retries: 3\n  retry_policy: {RateLimitErrorRetries: 0, BadRequestErrorRetries: 1}\n"
              "  model_group_retry_policy: {other: {InternalServerErrorRetries: 1}}\n")
    gw = await gateway(config(deployment("pair", fake_openai.base, "dep-a"), deployment("other", fake_openai.base,
                                                                                        "dep-o"), router=policy))
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 10, 429, "0"
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 429 and len(fake_openai.received) == 1  # RateLimitErrorRetries: 0
    fake_openai.received.clear()
    fake_openai.fail_times, fake_openai.fail_status = 1, 400
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200 and len(fake_openai.received) == 2  # a 400 retried once, as the policy says
    assert r.headers["x-litellm-attempted-retries"] == "1"
    fake_openai.received.clear()
    fake_openai.fail_times, fake_openai.fail_status = 10, 500
    r = await fetch(gw, "/v1/chat/completions", {**CHAT, "model": "other"})
    assert r.code == 500 and len(fake_openai.received) == 2  # the group's policy: 1 retry, not num_retries 3
