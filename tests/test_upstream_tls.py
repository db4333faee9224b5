"""Upstream TLS verification (``ssl_verify`` as in LiteLLM): a fake OpenAI provider served over
HTTPS with a certificate from a throwaway CA (trustme). Without the CA the call fails with a 502
naming the certificate problem; ``ssl_verify: <ca path>`` (per deployment or global, or
``SSL_CERT_FILE``) and ``ssl_verify: false`` make it work. Also the pure parsing of the value."""

from __future__ import annotations

import ssl

import orjson
import pytest
import trustme

from contrib.fake_providers import openai_compat
from contrib.fake_providers.common import listen
from tornado_proxy.app import validate
from tornado_proxy.config import ConfigError, load, ssl_verify_value

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of

HELLO = {"model": "tls-model", "messages": [{"role": "user", "content": "hello over tls"}]}


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_fake(ca):
    """The fake OpenAI provider behind HTTPS, its certificate issued by ``ca`` for 127.0.0.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    state = openai_compat.FakeState(api_key=PROVIDER_KEY)
    server, port = listen(openai_compat.make_app(state), ssl_options=context)
    state.base = f"https://127.0.0.1:{port}/v1"
    try:
        yield state
    finally:
        server.stop()
        await server.close_all_connections()


def model(name: str, base: str, ssl_verify: str | None = None) -> str:
    line = f"\n      ssl_verify: {ssl_verify}" if ssl_verify is not None else ""
    return f"""
  - model_name: {name}
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {base}
      api_key: {PROVIDER_KEY}{line}"""


def config(*models: str, litellm_settings: str = "") -> str:
    return "model_list:" + "".join(models) + "\nrouter_settings:\n  num_retries: 0\n" + litellm_settings


def streamed_text(body: bytes) -> str:
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])


async def chat(fetch, gw, name: str = "tls-model", stream: bool = False):
    return await fetch(gw, "/v1/chat/completions", {**HELLO, "model": name, "stream": stream})


async def test_untrusted_certificate_is_a_clear_502_without_secrets(gateway, fetch, tls_fake):
    gw = await gateway(config(model("tls-model", tls_fake.base)))
    for stream in (False, True):
        response = await chat(fetch, gw, stream=stream)
        assert response.code == 502, response.body
        error = error_of(response)
        assert "TLS certificate could not be verified" in error["message"]
        assert "ssl_verify" in error["message"]
        assert PROVIDER_KEY not in response.body.decode() and MASTER_KEY not in response.body.decode()
    assert tls_fake.received == []  # nothing was sent to a server the gateway does not trust


async def test_deployment_ca_bundle_and_verify_false_both_work(gateway, fetch, tls_fake, ca_file):
    gw = await gateway(config(model("tls-model", tls_fake.base, ca_file),
                              model("tls-off", tls_fake.base, "false"),
                              model("tls-default", tls_fake.base)))
    for name in ("tls-model", "tls-off"):
        response = await chat(fetch, gw, name)
        assert response.code == 200, response.body
        assert orjson.loads(response.body)["choices"][0]["message"]["content"] == "echo: hello over tls"
        response = await chat(fetch, gw, name, stream=True)
        assert response.code == 200, response.body
        assert streamed_text(response.body) == "echo: hello over tls"
    # pooled libcurl handles that verified with the deployment's CA do not lend it to the others
    for stream in (False, True, False):
        assert (await chat(fetch, gw, "tls-default", stream=stream)).code == 502
    assert (await chat(fetch, gw, "tls-model")).code == 200


async def test_global_ssl_verify_and_ssl_cert_file(gateway, fetch, tls_fake, ca_file):
    gw = await gateway(config(model("tls-model", tls_fake.base),
                              litellm_settings=f"litellm_settings:\n  ssl_verify: {ca_file}\n"))
    assert (await chat(fetch, gw)).code == 200
    gw = await gateway(config(model("tls-model", tls_fake.base)), env={"SSL_CERT_FILE": ca_file})
    assert (await chat(fetch, gw, stream=True)).code == 200
    gw = await gateway(config(model("tls-model", tls_fake.base)), env={"SSL_VERIFY": "False"})
    assert (await chat(fetch, gw)).code == 200
    # a deployment that asks for verification is verified even when the default is off
    gw = await gateway(config(model("tls-model", tls_fake.base, "true")), env={"SSL_VERIFY": "False"})
    assert (await chat(fetch, gw)).code == 502


@pytest.mark.parametrize("raw, expected", [
    (True, True), (False, False), ("False", False), ("false", False), ("0", False), ("True", True), ("yes", True),
])
def test_ssl_verify_values(raw, expected):
    assert ssl_verify_value(raw, "x") is expected


def test_ssl_verify_path_must_be_readable(ca_file, tmp_path):
    assert ssl_verify_value(ca_file, "x") == ca_file
    with pytest.raises(ConfigError, match=r"model_list\[0\].litellm_params.ssl_verify: cannot read the CA bundle"):
        ssl_verify_value(str(tmp_path / "missing.pem"), "model_list[0].litellm_params.ssl_verify")


def test_unreadable_ca_paths_stop_start_up(tmp_path):
    """What ``serve`` and ``proxyctl check`` run before starting: the file and the key are named."""
    missing = str(tmp_path / "nope.pem")
    path = tmp_path / "config.yaml"
    cases = [
        (config(model("tls-model", "https://127.0.0.1:9/v1", missing)), {},
         r"model_list\[0\].litellm_params.ssl_verify: cannot read the CA bundle"),
        (config(model("tls-model", "https://127.0.0.1:9/v1"), litellm_settings=f"litellm_settings:\n  ssl_verify: {missing}\n"),
         {}, "litellm_settings.ssl_verify: cannot read the CA bundle"),
        (config(model("tls-model", "https://127.0.0.1:9/v1")), {"SSL_CERT_FILE": missing},
         "environment SSL_CERT_FILE: cannot read the CA bundle"),
    ]
    for text, env, message in cases:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            validate(load(path, environ=env))
