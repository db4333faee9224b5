"""Response caching end to end: a gateway with litellm_settings.cache in front of the fake
OpenAI provider, whose request counts prove that hits never reached it."""

import asyncio
import uuid

import openai
import orjson
import redis

from tests.conftest import MASTER_KEY, provider_yaml, wait_for

CHAT = "/v1/chat/completions"

def config(fake, params: str = "type: local") -> str:
    return provider_yaml(fake, extra=f"""
    litellm_settings:
      cache: true
      cache_params:
        {params}
    """)

def ask(text: str = "hello", **extra) -> dict:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": text}], **extra}

def sse_payloads(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]

async def test_hit_skips_provider_and_miss_by_field(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai))
    first = await fetch(gw, CHAT, ask(user="a", metadata={"x": 1}))
    assert first.code == 200 and "x-litellm-cache-hit" not in first.headers
    second = await fetch(gw, CHAT, ask(user="b"))
    assert second.code == 200 and second.headers["x-litellm-cache-hit"] == "True"
    assert second.headers["x-litellm-cache-key"] == first.headers["x-litellm-cache-key"]
    a, b = orjson.loads(first.body), orjson.loads(second.body)
    assert b["choices"] == a["choices"] and b["id"] != a["id"] and b["object"] == "chat.completion"
    assert fake_openai.count("/chat/completions") == 1
    for changed in (ask("other"), ask(temperature=0.5), ask(max_tokens=7)):
        assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, changed)).headers
    assert fake_openai.count("/chat/completions") == 4
    assert all("cache" not in r.body for r in fake_openai.received)
    metrics = (await fetch(gw, "/metrics")).body.decode()
    assert 'litellm_cache_hits_metric_total{model="gpt-fake"} 1.0' in metrics

async def test_controls(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai))
    assert (await fetch(gw, CHAT, ask(cache={"no-store": True}))).code == 200
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask())).headers  # nothing was stored
    assert (await fetch(gw, CHAT, ask())).headers["x-litellm-cache-hit"] == "True"
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask(cache={"no-cache": True}))).headers
    assert fake_openai.count("/chat/completions") == 3
    # a namespace is a separate cache
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask(cache={"namespace": "n1"}))).headers
    assert (await fetch(gw, CHAT, ask(cache={"namespace": "n1"}))).headers["x-litellm-cache-hit"] == "True"
    # s-maxage: an entry older than this is not accepted
    await asyncio.sleep(1.1)
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask(cache={"s-maxage": 1}))).headers
    bad = await fetch(gw, CHAT, ask(cache={"ttl": "soon"}))
    assert bad.code == 400 and orjson.loads(bad.body)["error"]["param"] == "cache"

async def test_ttl_expiry(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai))
    await fetch(gw, CHAT, ask(cache={"ttl": 0.3}))
    await asyncio.sleep(0.6)
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask())).headers
    assert fake_openai.count("/chat/completions") == 2

async def test_default_off_caches_only_requests_that_ask(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai, "mode: default_off"))
    await fetch(gw, CHAT, ask())
    assert "x-litellm-cache-key" not in (await fetch(gw, CHAT, ask())).headers
    await fetch(gw, CHAT, ask(cache={"use-cache": True}))
    assert (await fetch(gw, CHAT, ask(cache={}))).headers["x-litellm-cache-hit"] == "True"
    assert fake_openai.count("/chat/completions") == 3

async def test_stream_and_plain_crossover(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai))
    fake_openai.stream_chunks = 3
    streamed = await fetch(gw, CHAT, ask(stream=True, stream_options={"include_usage": True}))
    text = "".join(c["delta"].get("content") or "" for p in sse_payloads(streamed.body)[:-1]
                   for c in orjson.loads(p)["choices"])
    plain = await fetch(gw, CHAT, ask())
    assert plain.headers["x-litellm-cache-hit"] == "True"
    assert orjson.loads(plain.body)["choices"][0]["message"]["content"] == text
    # the other way: a plain answer replayed as a stream the SDK reads
    other = ask("second")
    await fetch(gw, CHAT, other)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0)
    stream = await client.chat.completions.create(**other, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok tok tok "
    assert chunks[-1].usage is not None and len({c.id for c in chunks}) == 1
    await client.close()
    assert fake_openai.count("/chat/completions") == 2

async def test_errors_and_tool_calls_are_not_stored(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai))
    fake_openai.fail_times, fake_openai.fail_status = 1, 400
    assert (await fetch(gw, CHAT, ask())).code == 400
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask())).headers
    fake_openai.fail_mid_stream_after = 1
    fake_openai.stream_chunks = 3
    await fetch(gw, CHAT, ask("partial", stream=True))
    fake_openai.fail_mid_stream_after = None
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask("partial"))).headers
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    await fetch(gw, CHAT, ask("weather in Paris", tools=tools))
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask("weather in Paris", tools=tools))).headers

async def test_redis_shared_by_two_instances_and_flush(gateway, fetch, fake_openai, redis_url):
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    params = f"type: redis\n        url: {redis_url}\n        namespace: {namespace}"
    one, two = await gateway(config(fake_openai, params)), await gateway(config(fake_openai, params))
    first = await fetch(one, CHAT, ask())
    key = first.headers["x-litellm-cache-key"]
    r = redis.Redis.from_url(redis_url)
    await wait_for(lambda: r.exists(f"litellm-cache:{namespace}:{key}"))
    assert (await fetch(two, CHAT, ask())).headers["x-litellm-cache-hit"] == "True"
    assert fake_openai.count("/chat/completions") == 1
    ping = await fetch(two, "/cache/ping")
    assert ping.code == 200 and orjson.loads(ping.body)["cache_type"] == "redis"
    assert (await fetch(two, "/cache/ping", key="sk-wrong")).code in (401, 403)
    flushed = await fetch(one, f"/cache/flushall?namespace={namespace}", method="POST", raw=b"")
    assert flushed.code == 200 and orjson.loads(flushed.body)["deleted"] == 1
    assert "x-litellm-cache-hit" not in (await fetch(two, CHAT, ask())).headers
    r.close()

async def test_redis_unreachable_requests_still_answered(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai, "type: redis\n        host: 127.0.0.1\n        port: 1"))
    for _ in range(3):
        response = await fetch(gw, CHAT, ask())
        assert response.code == 200 and "x-litellm-cache-hit" not in response.headers
    assert fake_openai.count("/chat/completions") == 3
    assert (await fetch(gw, "/cache/ping")).code == 503
    metrics = (await fetch(gw, "/metrics")).body.decode()

    assert 'litellm_cache_errors_metric_total{model="gpt-fake"}' in metrics

async def test_local_ping_flush_and_cache_off(gateway, fetch, fake_openai):
    gw = await gateway(config(fake_openai))
    await fetch(gw, CHAT, ask())
    assert (await fetch(gw, "/cache/ping")).code == 200
    assert orjson.loads((await fetch(gw, "/cache/flushall", method="POST", raw=b"")).body)["deleted"] == 1
    assert "x-litellm-cache-hit" not in (await fetch(gw, CHAT, ask())).headers
    off = await gateway(provider_yaml(fake_openai))
    assert (await fetch(off, "/cache/ping")).code == 503
    response = await fetch(off, CHAT, ask(cache={"no-cache": True}))
    assert response.code == 200 and "x-litellm-cache-key" not in response.headers

async def test_spend_log_records_hit_at_zero_cost(gateway, fetch, fake_openai, pg_dsn):
    extra = f"""
    general_settings:
      database_url: "{pg_dsn}"
      store_model_in_db: true
    litellm_settings:
      cache: true
    """
    gw = await gateway(provider_yaml(fake_openai, extra=extra), env={"LITELLM_SALT_KEY": "salt-0123456789"})
    await fetch(gw, CHAT, ask())
    assert (await fetch(gw, CHAT, ask())).headers["x-litellm-cache-hit"] == "True"

    async def logged():
        rows = orjson.loads((await fetch(gw, "/spend/logs")).body)
        return rows if len(rows) >= 2 else None

    rows = None
    for _ in range(100):
        rows = await logged()
        if rows:
            break
        await asyncio.sleep(0.05)
    assert rows, "spend logs were not written"
    hits = [r for r in rows if r["cache_hit"] in (True, "True")]
    assert len(hits) == 1 and hits[0]["spend"] == 0

async def test_unsupported_type_warns(gateway, fetch, fake_openai, caplog):
    gw = await gateway(config(fake_openai, "type: redis-semantic"))
    response = await fetch(gw, CHAT, ask())
    assert response.code == 200 and "x-litellm-cache-key" not in response.headers
    assert any("redis-semantic" in r.getMessage() and "NOT cached" in r.getMessage() for r in caplog.records)
