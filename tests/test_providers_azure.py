"""``azure/<deployment>``: request building, defaults from the environment, stream filtering
and error mapping, tested without servers."""

import orjson
import pytest

from tornado_proxy.config import ModelSpec
from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.providers import PROVIDERS, provider_for
from tornado_proxy.providers.base import StreamState, UpstreamReply
from tornado_proxy.providers.openai import AZURE_API_VERSION, AzureProvider
from tornado_proxy.registry import build_deployment

KEY = "azure-secret-key-for-unit-tests"
BASE = "https://my-resource.openai.azure.com"
MESSAGES = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "1"},
            {"role": "tool", "tool_call_id": "c2", "content": "2"}]


def deployment(model="azure/my-gpt", environ=None, **params):
    return build_deployment(ModelSpec("group", {"model": model, **params}, {}, "model_list[0]"), environ or {})


def test_registered_and_not_reported_unsupported():
    d = deployment(api_base=BASE)
    assert isinstance(provider_for(d), AzureProvider) and PROVIDERS["azure"] is provider_for(d)
    assert d.problem is None and d.model == "my-gpt"


@pytest.mark.parametrize("params,environ,url", [
    ({"api_base": BASE, "api_version": "2024-06-01"}, {},
     f"{BASE}/openai/deployments/my-gpt/chat/completions?api-version=2024-06-01"),
    ({"api_base": BASE + "/"}, {},
     f"{BASE}/openai/deployments/my-gpt/chat/completions?api-version={AZURE_API_VERSION}"),
    ({"api_base": BASE + "/openai/"}, {"AZURE_API_VERSION": "2025-04-01-preview"},
     f"{BASE}/openai/deployments/my-gpt/chat/completions?api-version=2025-04-01-preview"),
    ({}, {"AZURE_API_BASE": BASE},
     f"{BASE}/openai/deployments/my-gpt/chat/completions?api-version={AZURE_API_VERSION}"),
    ({"api_base": BASE, "api_version": "v1"}, {}, f"{BASE}/openai/v1/chat/completions"),
    ({"api_base": BASE, "api_version": "latest"}, {}, f"{BASE}/openai/v1/chat/completions"),
    ({"api_base": BASE, "api_version": "preview"}, {}, f"{BASE}/openai/v1/chat/completions?api-version=preview"),
    ({"api_base": BASE, "api_version": "2024-10-21"}, {"AZURE_API_VERSION": "2023-05-15"},
     f"{BASE}/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21"),  # the config wins
])
def test_url(params, environ, url):
    d = deployment(environ=environ, **params)
    assert AzureProvider().build_request(d, "chat", {"model": "group", "messages": MESSAGES}, False).url == url


@pytest.mark.parametrize("endpoint,path", [("chat", "chat/completions"), ("completions", "completions"),
                                           ("embeddings", "embeddings")])
def test_endpoint_paths(endpoint, path):
    d = deployment(api_base=BASE, api_version="2024-10-21")
    req = AzureProvider().build_request(d, endpoint, {"model": "group"}, False)
    assert req.url == f"{BASE}/openai/deployments/my-gpt/{path}?api-version=2024-10-21"


def test_deployment_name_is_escaped_in_the_path():
    d = deployment("azure/odd name:x", api_base=BASE)
    assert "/openai/deployments/odd%20name%3Ax/chat/completions?" in \
        AzureProvider().build_request(d, "chat", {"model": "g"}, False).url


@pytest.mark.parametrize("name", ["odd/x", "..", "odd%2Fx", "x?y=1", "x#", "%2e%2e"])
def test_deployment_name_that_is_not_one_segment_is_refused(name):
    with pytest.raises(InvalidRequestError) as exc:
        AzureProvider().build_request(deployment("azure/" + name, api_base=BASE), "chat", {"model": "g"}, False)
    assert exc.value.status == 400 and exc.value.param == "model"


def test_body_passes_through_and_key_goes_in_api_key():
    d = deployment(api_base=BASE, api_key=KEY, temperature=0.5, extra_headers={"x-ms-client": "t"})
    body = {"model": "group", "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": True, "stream_options": {"include_usage": True}, "mock_response": "no",
            "n": 2, "future_param": [1]}
    req = AzureProvider().build_request(d, "chat", body, True)
    assert req.method == "POST"
    assert req.headers == {"Content-Type": "application/json", "x-ms-client": "t", "api-key": KEY}
    sent = orjson.loads(req.body)
    assert sent == {**{k: v for k, v in body.items() if k != "mock_response"}, "model": "my-gpt",
                    "temperature": 0.5}
    assert KEY not in req.url


def test_env_defaults():
    environ = {"AZURE_API_BASE": BASE, "AZURE_API_KEY": KEY, "AZURE_API_VERSION": "2025-01-01-preview"}
    d = deployment(environ=environ)
    assert (d.api_base, d.api_key.reveal(), d.api_version) == (BASE, KEY, "2025-01-01-preview")
    d = deployment(environ={"AZURE_OPENAI_API_KEY": "other"}, api_base=BASE)
    assert d.api_key.reveal() == "other" and d.api_version == AZURE_API_VERSION
    assert KEY not in repr(deployment(environ=environ))


def test_missing_api_base_is_a_problem_not_a_crash():
    d = deployment()
    assert d.problem == "Provider 'azure' needs an api_base for model 'azure/my-gpt'"


# --- stream ---------------------------------------------------------------------------------------

FILTER_CHUNK = b'{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0}]}'
CONTENT_CHUNK = (b'{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},'
                 b'"finish_reason":null,"content_filter_results":{}}]}')
USAGE_CHUNK = b'{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'


@pytest.mark.parametrize("data,relayed", [
    (FILTER_CHUNK, []),
    (CONTENT_CHUNK, [CONTENT_CHUNK]),
    (USAGE_CHUNK, [USAGE_CHUNK]),
    (b'{"choices":[],"prompt_filter_results":[],"usage":{"total_tokens":1}}',
     [b'{"choices":[],"prompt_filter_results":[],"usage":{"total_tokens":1}}']),
    (b"[DONE]", []),
])
def test_stream_events(data, relayed):
    state = StreamState(include_usage=True)
    assert AzureProvider().parse_event("chat", data, state) == relayed
    assert state.done == (data == b"[DONE]")


def test_stream_usage_is_kept():
    state = StreamState()
    AzureProvider().parse_event("chat", USAGE_CHUNK, state)
    assert state.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


# --- errors ---------------------------------------------------------------------------------------

def azure_error(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


@pytest.mark.parametrize("status,body,headers,type_,text", [
    (401, azure_error("401", "Access denied due to invalid subscription key."), {}, "authentication_error",
     "Access denied"),
    (404, azure_error("DeploymentNotFound", "The API deployment for this resource does not exist."), {},
     "not_found_error", "deployment for this resource does not exist"),
    (429, azure_error("429", "Please retry after 6 seconds."), {"Retry-After": "6"}, "rate_limit_error",
     "retry after 6 seconds"),
    (400, orjson.dumps({"error": {"message": "The response was filtered", "type": None, "param": "prompt",
                                  "code": "content_filter", "status": 400}}), {}, "invalid_request_error",
     "The response was filtered"),
    (500, b"upstream connect error", {}, "api_error", "upstream connect error"),
    (503, azure_error("503", "The service is temporarily unable to process your request."), {},
     "service_unavailable", "temporarily unable"),
])
def test_errors(status, body, headers, type_, text):
    d = deployment(api_base=BASE, api_key=KEY)
    err = AzureProvider().parse_error(UpstreamReply(status, headers, body), d)
    assert err.status == status and err.type == type_
    assert err.message.startswith("AzureException - azure/my-gpt: ") and text in err.message
    assert err.headers == ({"Retry-After": "6"} if headers else {})


def test_error_scrubs_the_key():
    d = deployment(api_base=BASE, api_key=KEY)
    err = AzureProvider().parse_error(UpstreamReply(401, {}, azure_error("401", f"bad key {KEY}")), d)
    assert KEY not in err.message and "***" in err.message
