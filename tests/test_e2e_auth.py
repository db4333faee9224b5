"""Auth, end to end (issue 2, "Auth"): the master key in each header LiteLLM accepts; 401
``auth_error`` for a missing, malformed or wrong key (never echoed back); public health routes;
no master key configured -> served without a key."""

from __future__ import annotations

import orjson
import pytest

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of, provider_yaml

CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi there"}]}
WRONG_KEY = "sk-wrong-key-DO-NOT-ECHO-4242"


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(provider_yaml(fake_openai))


ACCEPTED = [
    pytest.param({"Authorization": f"Bearer {MASTER_KEY}"}, id="authorization-bearer"),
    pytest.param({"x-api-key": MASTER_KEY}, id="x-api-key"),
    pytest.param({"X-Api-Key": MASTER_KEY}, id="x-api-key-mixed-case"),
    pytest.param({"x-litellm-api-key": f"Bearer {MASTER_KEY}"}, id="x-litellm-api-key-bearer"),
    pytest.param({"api-key": MASTER_KEY}, id="api-key-azure"),
]


@pytest.mark.parametrize("headers", ACCEPTED)
async def test_master_key_accepted_in_each_header(gw, fetch, fake_openai, headers):
    r = await fetch(gw, "/v1/chat/completions", CHAT, key=None, headers=headers)
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hi there"
    sent = fake_openai.received[-1]
    # The client's key never goes upstream, whichever header carried it; the provider key does.
    assert all(MASTER_KEY not in value for value in sent.headers.values())
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    models = await fetch(gw, "/v1/models", key=None, headers=headers)
    assert models.code == 200, models.body


@pytest.mark.parametrize("headers", ACCEPTED)
async def test_master_key_accepted_on_azure_path(gw, fetch, fake_openai, headers):
    r = await fetch(gw, "/openai/deployments/gpt-fake/chat/completions", {"messages": CHAT["messages"]},
                    key=None, headers=headers)
    assert r.code == 200, r.body


REJECTED = [
    pytest.param({}, "No api key", id="missing"),
    pytest.param({"Authorization": "Bearer "}, "", id="bearer-nothing-after"),
    pytest.param({"Authorization": "Bearer"}, "", id="bearer-alone"),
    pytest.param({"Authorization": MASTER_KEY}, "Bearer", id="no-bearer-prefix"),
    pytest.param({"Authorization": f"Basic {MASTER_KEY}"}, "Bearer", id="basic-scheme"),
    pytest.param({"Authorization": f"Bearer {WRONG_KEY}"}, "Invalid", id="wrong-bearer"),
    pytest.param({"x-api-key": WRONG_KEY}, "Invalid", id="wrong-x-api-key"),
    pytest.param({"x-litellm-api-key": f"Bearer {WRONG_KEY}"}, "Invalid", id="wrong-x-litellm-api-key"),
    pytest.param({"api-key": WRONG_KEY}, "Invalid", id="wrong-api-key"),
    pytest.param({"x-api-key": ""}, "", id="empty-x-api-key"),
    pytest.param({"Authorization": f"Bearer {MASTER_KEY}x"}, "Invalid", id="master-key-plus-suffix"),
    pytest.param({"Authorization": f"Bearer {MASTER_KEY[:-1]}"}, "Invalid", id="master-key-prefix"),
    pytest.param({"Authorization": f"Bearer {MASTER_KEY.upper()}"}, "Invalid", id="master-key-upper-case"),
]


@pytest.mark.parametrize("headers, phrase", REJECTED)
@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/embeddings", {"model": "gpt-fake", "input": "hello"}),
    ("GET", "/v1/models", None),
    ("GET", "/model/info", None),
])
async def test_bad_or_missing_key_is_401(gw, fetch, fake_openai, headers, phrase, method, path, body):
    r = await fetch(gw, path, body, method=method, key=None, headers=headers)
    assert r.code == 401, r.body
    error = error_of(r)
    assert error["type"] == "auth_error"
    assert error["code"] == "401"
    assert error["message"].startswith("Authentication Error")
    assert phrase in error["message"]
    assert WRONG_KEY not in r.body.decode()
    assert MASTER_KEY not in r.body.decode()
    assert all(WRONG_KEY not in v and MASTER_KEY not in v for _, v in r.headers.get_all())
    assert fake_openai.received == []


async def test_auth_is_checked_before_the_body(gw, fetch, fake_openai):
    """A bad body with a bad key is a 401, not a 400: the body of a stranger is never parsed."""
    r = await fetch(gw, "/v1/chat/completions", raw=b"not json", method="POST", key=WRONG_KEY)
    assert r.code == 401, r.body
    assert error_of(r)["type"] == "auth_error"


async def test_gateway_serves_after_rejections(gw, fetch, fake_openai):
    for _ in range(3):
        assert (await fetch(gw, "/v1/chat/completions", CHAT, key=WRONG_KEY)).code == 401
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 200, r.body
    assert len(fake_openai.received) == 1


@pytest.mark.parametrize("path", ["/health/liveliness", "/health/liveness", "/health/readiness"])
@pytest.mark.parametrize("key", [None, WRONG_KEY], ids=["no-key", "wrong-key"])
async def test_health_routes_need_no_key(gw, fetch, path, key):
    r = await fetch(gw, path, key=key)
    assert r.code == 200, r.body
    if path != "/health/readiness":
        assert orjson.loads(r.body) == "I'm alive!"


OPEN = "general_settings: {allow_unauthenticated: true}"


async def test_open_mode_opted_into_serves_without_a_key(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai, extra=OPEN), master_key=None)
    assert not gw.config.settings.master_key
    r = await fetch(gw, "/v1/chat/completions", CHAT, key=None)
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hi there"
    models = await fetch(gw, "/v1/models", key=None)
    assert models.code == 200, models.body
    assert [m["id"] for m in orjson.loads(models.body)["data"]] == ["gpt-fake"]
    # Whatever key a client sends along is ignored, never forwarded.
    r = await fetch(gw, "/v1/chat/completions", CHAT, key=WRONG_KEY)
    assert r.code == 200, r.body
    assert all(WRONG_KEY not in v for v in fake_openai.received[-1].headers.values())


async def test_open_mode_is_announced_at_startup(gateway, fake_openai, caplog):
    with caplog.at_level("WARNING"):
        await gateway(provider_yaml(fake_openai, extra=OPEN), master_key=None)
    assert any("NO MASTER KEY, AUTHENTICATION IS OFF" in record.getMessage() for record in caplog.records)


async def test_no_master_key_configured_gets_a_generated_one(gateway, fetch, fake_openai):
    """Without a key and without the opt-in, auth stays on: a key is generated (as `serve` does)."""
    gw = await gateway(provider_yaml(fake_openai), master_key=None)
    generated = gw.config.settings.master_key.reveal()
    assert generated.startswith("sk-") and len(generated) > 30
    for key in (None, MASTER_KEY):
        r = await fetch(gw, "/v1/models", key=key)
        assert r.code == 401, r.body
    assert (await fetch(gw, "/v1/models", key=generated)).code == 200
    assert (await fetch(gw, "/v1/chat/completions", CHAT, key=generated)).code == 200


async def test_a_typo_in_the_master_key_variable_never_serves(gateway, tmp_path):
    from tornado_proxy.config import ConfigError

    with pytest.raises(ConfigError, match="os.environ/MY_MASTR_KEY_TYPO is not set"):
        await gateway("general_settings: {master_key: os.environ/MY_MASTR_KEY_TYPO}\n")


async def test_master_key_from_config_file(gateway, fetch, fake_openai):
    """``general_settings.master_key`` works as well as ``LITELLM_MASTER_KEY``."""
    gw = await gateway(provider_yaml(fake_openai, extra="general_settings: {master_key: sk-from-yaml-1234}"),
                       master_key=None)
    assert (await fetch(gw, "/v1/models", key="sk-from-yaml-1234")).code == 200
    r = await fetch(gw, "/v1/models", key=None)
    assert r.code == 401
    assert error_of(r)["type"] == "auth_error"
