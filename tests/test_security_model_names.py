"""Issue 9, items 1 and 11: a requested model name can steer neither a provider's URL (path
traversal, query, fragment, encoded or not, with the provider's key attached) nor a response
header (CR/LF and other control characters), and it has a length cap.

Pure tests of the one mechanism (``providers.base.url_segment`` / ``path_problem``,
``registry.check_model_name``, ``Registry.resolve``), then the attack end to end through
wildcard groups for every provider, by the body and by the ``/engines/{model}/...`` and
``/openai/deployments/{model}/...`` path aliases: a 400 in OpenAI's shape and nothing sent
upstream, while ordinary names still reach the fake provider at the expected path."""

from urllib.parse import quote

import orjson
import pytest

from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.providers.base import Deployment, path_problem, url_segment
from tornado_proxy.providers.gemini import GeminiProvider, model_path
from tornado_proxy.providers.openai import AzureProvider
from tornado_proxy.registry import MAX_MODEL_NAME, Registry, check_model_name

from .conftest import PROVIDER_KEY, error_of

USER = [{"role": "user", "content": "hello big world"}]


# --- url_segment: one path segment, or a 400 -----------------------------------------------------

@pytest.mark.parametrize("value,encoded", [
    ("gemini-1.5-pro", "gemini-1.5-pro"),
    ("gemini-2.0-flash-001", "gemini-2.0-flash-001"),
    ("text-embedding-004", "text-embedding-004"),
    ("my_deploy.v2~x", "my_deploy.v2~x"),
    ("a..b", "a..b"),                      # dots inside a segment are not a dot segment
    ("...", "..."),
    ("odd name", "odd%20name"),
    ("ft:gpt-4o:org", "ft%3Agpt-4o%3Aorg"),  # nothing but unreserved characters stays as is
    ("a@b;c=d&e+f", "a%40b%3Bc%3Dd%26e%2Bf"),
    ("50%", "50%25"),                      # a lone '%' is a character, encoded as one
    ("a%41b", "a%2541b"),                  # an escape of a harmless character is kept literally
    ("caf\u00e9", "caf%C3%A9"),
])
def test_url_segment_encodes_a_legitimate_name_as_one_segment(value, encoded):
    assert url_segment(value) == encoded
    assert "/" not in encoded and "?" not in encoded and "#" not in encoded


@pytest.mark.parametrize("value,reason", [
    ("", "empty"),
    (".", "'..' path segment"),
    ("..", "'..' path segment"),
    ("%2e%2e", "'..' path segment (percent-encoded)"),
    ("%2E%2E", "'..' path segment (percent-encoded)"),
    (".%2e", "'..' path segment (percent-encoded)"),
    ("%252e%252e", "'..' path segment (percent-encoded)"),     # double-encoded
    ("%25252e%25252e", "'..' path segment (percent-encoded)"),  # triple-encoded
    ("%2525252e", "percent-encoded too many times"),
    ("a/b", "'/'"),
    ("../x", "'/'"),
    ("a%2fb", "'/' (percent-encoded)"),
    ("a%2Fb", "'/' (percent-encoded)"),
    ("a%252fb", "'/' (percent-encoded)"),
    ("x?key=1", "'?'"),
    ("x%3fkey=1", "'?' (percent-encoded)"),
    ("x%253Fkey=1", "'?' (percent-encoded)"),
    ("x#", "'#'"),
    ("x%23", "'#' (percent-encoded)"),
    ("a\\b", "backslash"),
    ("a%5cb", "backslash"),
    ("a\x00", "control characters"),
    ("a%00", "control characters"),
    ("a\r\nX-Evil: 1", "control characters"),
    ("a%0d%0a", "control characters"),
    ("a\x7f", "control characters"),
    ("a\x85", "control characters"),
    ("a\u2028", "control characters"),
    ("a\u2029", "control characters"),
    ("a\t", "control characters"),
])
def test_url_segment_refuses_what_is_not_one_segment(value, reason):
    with pytest.raises(InvalidRequestError) as exc:
        url_segment(value)
    err = exc.value
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", "model")
    assert reason in err.message


def test_url_segment_names_the_parameter_and_does_not_echo_the_value():
    with pytest.raises(InvalidRequestError) as exc:
        url_segment("SECRETPART/" + "x" * 10_000, param="deployment")
    assert exc.value.param == "deployment"
    assert "SECRETPART" not in exc.value.message and len(exc.value.message) < 200


@pytest.mark.parametrize("name", [
    "gemini/gemini-2.0-flash", "openrouter/openai/gpt-4o:free", "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct",
    "ollama/llama3.2:latest", "gemini/tunedModels/my-tune", "azure/my.deploy-01", "a..b/c...d",
])
def test_path_problem_allows_ordinary_multi_segment_names(name):
    assert path_problem(name) is None


@pytest.mark.parametrize("name", [
    "gemini/../../SSRFHIT/x?secret=1#", "gemini/..", "gemini/./x", "gemini/%2e%2e/%2e%2e/SSRFHIT",
    "gemini/..%2f..%2fSSRFHIT", "gemini/%252e%252e/x", "gemini/x?secret=1", "gemini/x%3Fsecret=1",
    "gemini/x#", "gemini/x%23", "gemini\\..\\x", "gemini/x%5c..", "gemini/x\x00", "gemini/x%00",
    "gemini/x\r\n", "gemini/x\u2028",
])
def test_path_problem_refuses_traversal_query_fragment_and_controls(name):
    assert path_problem(name) is not None


# --- check_model_name: any requested name -------------------------------------------------------

def test_check_model_name_keeps_ordinary_names_and_the_longest_allowed():
    for name in ("gpt-4o", "openai/gpt-4o-mini", "my group (eu)", "x" * MAX_MODEL_NAME):
        assert check_model_name(name) == name


@pytest.mark.parametrize("name,reason", [
    ("x" * (MAX_MODEL_NAME + 1), f"longer than {MAX_MODEL_NAME}"),
    ("openai/gpt\r\nX-Injected: 1", "control characters"),
    ("gpt\n", "control characters"),
    ("gpt\x00", "control characters"),
    ("gpt\x1b[31m", "control characters"),
    ("gpt\x7f", "control characters"),
    ("gpt\x85", "control characters"),
    ("gpt\u2028", "control characters"),
    ("gpt\u2029", "control characters"),
])
def test_check_model_name_refuses_long_names_and_control_characters(name, reason):
    with pytest.raises(InvalidRequestError) as exc:
        check_model_name(name)
    assert (exc.value.status, exc.value.param) == (400, "model")
    assert reason in exc.value.message
    assert "Injected" not in exc.value.message and "xxxx" not in exc.value.message


# --- Registry.resolve: before any provider ---------------------------------------------------------

def registry() -> Registry:
    return Registry.build([
        Deployment(id="g", model_name="gemini/*", provider="gemini", model="*"),
        Deployment(id="o", model_name="team/*", provider="openai", model="gpt-*"),
        Deployment(id="p", model_name="plain", provider="openai", model="gpt-4o"),
    ], aliases={"short": "plain"})


def test_resolve_expands_an_ordinary_wildcard_name():
    assert [d.model for d in registry().resolve("gemini/gemini-2.0-flash")] == ["gemini-2.0-flash"]
    assert [d.model for d in registry().resolve("gemini/tunedModels/my-tune")] == ["tunedModels/my-tune"]
    assert [d.model for d in registry().resolve("team/4o")] == ["gpt-4o"]
    assert [d.id for d in registry().resolve("short")] == ["p"]


@pytest.mark.parametrize("name", [
    "gemini/../../SSRFHIT/x?secret=1#", "gemini/%2e%2e/%2e%2e/SSRFHIT", "gemini/%252e%252e%252fSSRFHIT",
    "gemini/x%3fkey=1", "gemini/x%23", "gemini/..\\x", "team/../x",
])
def test_resolve_refuses_a_wildcard_name_that_could_steer_a_url(name):
    with pytest.raises(InvalidRequestError) as exc:
        registry().resolve(name)
    assert (exc.value.param, exc.value.status) == ("model", 400)
    assert exc.value.message.startswith("Invalid model name: it ")
    assert "SSRFHIT" not in exc.value.message


@pytest.mark.parametrize("name", ["gemini/x\r\nX-Injected: 1", "plain\x00", "x" * (MAX_MODEL_NAME + 1)])
def test_resolve_refuses_control_characters_and_long_names_in_any_name(name):
    with pytest.raises(InvalidRequestError) as exc:
        registry().resolve(name)
    assert exc.value.param == "model" and "Injected" not in exc.value.message


# --- the providers that put a name in a URL --------------------------------------------------------

@pytest.mark.parametrize("model,path", [
    ("gemini-2.0-flash", "models/gemini-2.0-flash"),
    ("gemini-1.5-pro", "models/gemini-1.5-pro"),
    ("models/gemini-pro", "models/gemini-pro"),
    ("tunedModels/my-tune-123", "tunedModels/my-tune-123"),
])
def test_gemini_model_path_keeps_legitimate_names(model, path):
    assert model_path(model) == path


@pytest.mark.parametrize("model", [
    "../../SSRFHIT/x?secret=1#", "..", "models/..", "tunedModels/%2e%2e", "other/x", "a/b/c", "models/x%2fy",
    "x?alt=json", "x#", "x%3Fkey=1", "models/", "",
])
def test_gemini_refuses_a_model_that_is_not_a_collection_and_one_segment(model):
    d = Deployment(id="g", model_name="g", provider="gemini", model=model, api_base="http://h.test/v1beta")
    with pytest.raises(InvalidRequestError) as exc:
        GeminiProvider().build_request(d, "chat", {"messages": USER}, stream=False)
    assert exc.value.param == "model"


def test_azure_puts_the_deployment_in_one_segment():
    d = Deployment(id="a", model_name="a", provider="azure", model="my deploy", api_base="http://h.test",
                   api_version="2024-10-21")
    url = AzureProvider().build_request(d, "chat", {"messages": USER}, stream=False).url
    assert url == "http://h.test/openai/deployments/my%20deploy/chat/completions?api-version=2024-10-21"


# --- end to end: the attack through wildcard groups, per provider ---------------------------------

def wildcard_yaml(fake_openai, fake_anthropic, fake_gemini, fake_ollama) -> str:
    def entry(prefix: str, base: str, extra: str = "") -> str:
        return f"""
  - model_name: "{prefix}/*"
    litellm_params:
      model: "{prefix}/*"
      api_base: {base}
      api_key: {PROVIDER_KEY}{extra}"""
    return "model_list:" + "".join([
        entry("gemini", fake_gemini.base),
        entry("azure", f"http://127.0.0.1:{fake_openai.port}", '\n      api_version: "2024-10-21"'),
        entry("openai", fake_openai.base),
        entry("ollama", fake_ollama.base),
        entry("ollama_chat", fake_ollama.base),
        entry("anthropic", fake_anthropic.base),
    ]) + "\n"


@pytest.fixture
def fakes(fake_openai, fake_anthropic, fake_gemini, fake_ollama):
    return {"openai": fake_openai, "azure": fake_openai, "anthropic": fake_anthropic, "gemini": fake_gemini,
            "ollama": fake_ollama, "ollama_chat": fake_ollama}


@pytest.fixture
async def gw(gateway, fake_openai, fake_anthropic, fake_gemini, fake_ollama):
    return await gateway(wildcard_yaml(fake_openai, fake_anthropic, fake_gemini, fake_ollama))


def received(fakes) -> list:
    return [r for fake in {id(f): f for f in fakes.values()}.values() for r in fake.received]


# What a client appends to a provider prefix. Each would have left the intended path, or the
# intended segment, on its way to the provider.
ATTACKS = [
    "../../SSRFHIT/x?secret=1#",
    "..",
    "../SSRFHIT",
    "%2e%2e/%2e%2e/SSRFHIT/x",
    "%2E%2E%2F%2E%2E%2FSSRFHIT",
    "..%2f..%2fSSRFHIT",
    "%252e%252e%252fSSRFHIT",
    "x?secret=1",
    "x%3fsecret=1",
    "x#frag",
    "x%23frag",
    "..\\..\\SSRFHIT",
    "x%5c..%5cSSRFHIT",
    "x%00",
]
# A name that passes the general check but is more than one segment where the provider needs
# one: refused by the provider's URL builder itself.
SEGMENT_ATTACKS = {"gemini": ["other/SSRFHIT", "models/x%2fSSRFHIT", "tunedModels/a/SSRFHIT"],
                   "azure": ["SSRFHIT/x", "x%2fSSRFHIT"]}


def route_for(how: str, name: str) -> tuple[str, dict]:
    """(path, body) sending ``name`` by the body or in the path of an alias (encoded so that the
    gateway decodes it back to exactly ``name``)."""
    body = {"model": "ignored-when-in-path" if how != "body" else name, "messages": USER, "max_tokens": 5}
    if how == "body":
        return "/v1/chat/completions", body
    return how.format(model=quote(name, safe="")), body


ROUTES = ["body", "/engines/{model}/chat/completions", "/openai/deployments/{model}/chat/completions"]
ORDINARY = {
    "gemini": ("gemini-2.0-flash", "/v1beta/models/gemini-2.0-flash:generateContent"),
    "azure": ("my-gpt4o", "/openai/deployments/my-gpt4o/chat/completions"),
    "openai": ("gpt-4o-mini", "/v1/chat/completions"),
    "ollama": ("llama3.2", "/api/generate"),
    "ollama_chat": ("llama3.2", "/api/chat"),
    "anthropic": ("claude-3-5-haiku-20241022", "/v1/messages"),
}


@pytest.mark.parametrize("how", ROUTES)
@pytest.mark.parametrize("prefix", list(ORDINARY))
async def test_traversal_in_a_wildcard_name_is_a_400_and_nothing_goes_upstream(gw, fakes, fetch, prefix, how):
    for suffix in ATTACKS + SEGMENT_ATTACKS.get(prefix, []):
        name = f"{prefix}/{suffix}"
        path, body = route_for(how, name)
        resp = await fetch(gw, path, body)
        assert resp.code == 400, (name, path, resp.code, resp.body)
        err = error_of(resp)
        assert (err["type"], err["param"]) == ("invalid_request_error", "model"), (name, err)
        assert err["message"].startswith("Invalid model name"), (name, err)
        assert "SSRFHIT" not in err["message"] and "secret" not in err["message"], (name, err)
        assert received(fakes) == [], (name, received(fakes))
    # the same route with an ordinary name does reach the fake: it would have seen an attack
    model, upstream_path = ORDINARY[prefix]
    path, body = route_for(how, f"{prefix}/{model}")
    resp = await fetch(gw, path, body)
    assert resp.code == 200, resp.body
    sent = received(fakes)
    assert [r.path for r in sent] == [upstream_path]
    assert "SSRFHIT" not in repr(sent)


@pytest.mark.parametrize("path", [
    "/engines/{model}/embeddings", "/openai/deployments/{model}/embeddings", "/v1/embeddings",
    "/engines/{model}/completions", "/v1/completions",
])
@pytest.mark.parametrize("prefix", ["gemini", "azure"])
async def test_traversal_through_the_other_endpoints(gw, fakes, fetch, prefix, path):
    for suffix in ("../../SSRFHIT/x?secret=1#", "%2e%2e%2fSSRFHIT", "x%2fSSRFHIT"):
        name = f"{prefix}/{suffix}"
        body = {"model": name, "input": "hi", "prompt": "hi"}
        resp = await fetch(gw, path.format(model=quote(name, safe="")), body)
        assert resp.code == 400, (name, path, resp.body)
        assert error_of(resp)["param"] == "model"
    assert received(fakes) == []


async def test_raw_encoded_traversal_in_the_engines_path(gw, fakes, fetch):
    """The path exactly as an attacker types it (one level of encoding, decoded by the gateway)."""
    for path in ("/engines/gemini%2F..%2F..%2FSSRFHIT%2Fx%3Fsecret%3D1%23/chat/completions",
                 "/engines/gemini%2F%252e%252e%2FSSRFHIT/chat/completions",
                 "/openai/deployments/azure%2F..%2FSSRFHIT/chat/completions"):
        resp = await fetch(gw, path, {"model": "x", "messages": USER})
        assert resp.code == 400, (path, resp.body)
        assert error_of(resp)["param"] == "model"
    assert received(fakes) == []


async def test_traversal_through_v1_messages_is_refused_in_anthropic_shape(gw, fakes, fetch):
    for name in ("anthropic/../../SSRFHIT?x=1#", "gemini/%2e%2e/SSRFHIT"):
        resp = await fetch(gw, "/v1/messages", {"model": name, "messages": USER, "max_tokens": 5})
        assert resp.code == 400, resp.body
        body = orjson.loads(resp.body)
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert "SSRFHIT" not in body["error"]["message"]
    assert received(fakes) == []


async def test_ordinary_wildcard_names_still_work_end_to_end(gw, fakes, fetch):
    for prefix, (model, upstream_path) in ORDINARY.items():
        resp = await fetch(gw, "/v1/chat/completions", {"model": f"{prefix}/{model}", "messages": USER,
                                                        "max_tokens": 5})
        assert resp.code == 200, (prefix, resp.body)
        assert resp.headers["x-litellm-model-group"] == f"{prefix}/{model}"
        sent = fakes[prefix].received[-1]
        assert sent.path == upstream_path, prefix
        assert PROVIDER_KEY in orjson.dumps(sent.headers).decode(), prefix
    gemini_embed = await fetch(gw, "/v1/embeddings", {"model": "gemini/text-embedding-004", "input": "hi"})
    assert gemini_embed.code == 200, gemini_embed.body
    assert fakes["gemini"].received[-1].path == "/v1beta/models/text-embedding-004:embedContent"


# --- item 11: control characters and length in any model name --------------------------------------

@pytest.mark.parametrize("name", [
    "openai/x\r\nX-Injected: 1", "gemini/x\r\nX-Injected: 1", "openai/x\n", "openai/x\x00", "openai/x\x7f",
    "openai/x\u2028", "openai/x\x85", "no-such-group\r\nX-Injected: 1",
])
async def test_control_characters_in_a_model_name_are_a_400_not_a_500(gw, fakes, fetch, name):
    for how in ("body", "/engines/{model}/chat/completions"):
        path, body = route_for(how, name)
        resp = await fetch(gw, path, body)
        assert resp.code == 400, (name, how, resp.code, resp.body)
        err = error_of(resp)
        assert (err["type"], err["param"]) == ("invalid_request_error", "model")
        assert "control characters" in err["message"]
        assert "x-injected" not in {k.lower() for k in resp.headers}
    assert received(fakes) == []


async def test_model_name_length_is_capped(gw, fakes, fetch):
    longest = "openai/" + "a" * (MAX_MODEL_NAME - len("openai/"))
    ok = await fetch(gw, "/v1/chat/completions", {"model": longest, "messages": USER})
    assert ok.code == 200, ok.body
    assert received(fakes)[-1].body["model"] == longest.removeprefix("openai/")
    for name in (longest + "a", "openai/" + "b" * 20_000):
        resp = await fetch(gw, "/v1/chat/completions", {"model": name, "messages": USER})
        assert resp.code == 400, resp.body
        err = error_of(resp)
        assert err["param"] == "model" and f"longer than {MAX_MODEL_NAME}" in err["message"]
        assert "bbbb" not in err["message"] and "aaaa" not in err["message"]
    assert len(received(fakes)) == 1
