"""routes.py: path templates, alias expansion, start-up checks; a YAML alias serves end to end."""

import re

import orjson
import pytest

from tornado_proxy.app import HANDLERS
from tornado_proxy.config import ConfigError, RouteSpec, load_default_routes, resource_dir
from tornado_proxy.routes import build, check, compile_path
from tornado_proxy.schemas import Schemas

from .conftest import error_of


@pytest.fixture(scope="module")
def schemas():
    return Schemas(resource_dir("schemas"))


def spec(path, handler="models", aliases=(), methods=("GET",), schema=None, auth="key") -> RouteSpec:
    return RouteSpec(path=path, aliases=tuple(aliases), methods=frozenset(methods), handler=handler,
                     schema=schema, auth=auth)


def match(template: str, path: str):
    m = re.match(compile_path(template), path)
    return m.groupdict() if m else None


# --- templates ------------------------------------------------------------------------------

@pytest.mark.parametrize("template, path, expected", [
    ("/chat/completions", "/chat/completions", {}),
    ("/chat/completions", "/chat/completions/x", None),
    ("/chat/completions", "/v1/chat/completions", None),
    ("/openai/deployments/{model}/chat/completions", "/openai/deployments/gpt-4o/chat/completions",
     {"model": "gpt-4o"}),
    ("/openai/deployments/{model}/chat/completions", "/openai/deployments/a/b/chat/completions", None),
    ("/openai/deployments/{model}/chat/completions", "/openai/deployments//chat/completions", None),
    ("/models/{model_id:path}", "/models/openrouter/openai/gpt-4o", {"model_id": "openrouter/openai/gpt-4o"}),
    ("/models/{model_id:path}", "/models/gpt-4o", {"model_id": "gpt-4o"}),
    ("/models/{model_id:path}", "/models/", None),
    ("/x/{a}/y/{b}", "/x/1/y/2", {"a": "1", "b": "2"}),
    # literal parts are literal: "." is not a wildcard
    ("/v1.0/models", "/v1x0/models", None),
    ("/v1.0/models", "/v1.0/models", {}),
])
def test_compile_path(template, path, expected):
    assert match(template, path) == expected


@pytest.mark.parametrize("template", [
    "/x/{model",                   # unbalanced
    "/x/model}",
    "/x/{1model}/y",               # not an identifier
    "/x/{model:int}",              # unknown converter
    "/a/{bad-name}/b/{model}",     # bad template before a good one
    "/a/{}/b",
])
def test_bad_templates_name_the_route(template):
    with pytest.raises(ConfigError, match=re.escape(template)):
        compile_path(template)


# --- checks ---------------------------------------------------------------------------------

def test_default_routes_pass_the_checks(schemas):
    check(load_default_routes(), HANDLERS, schemas)


def test_unknown_handler_names_the_route(schemas):
    with pytest.raises(ConfigError) as info:
        check([spec("/ok"), spec("/my/route", handler="chat_completionz")], HANDLERS, schemas)
    message = str(info.value)
    assert "/my/route" in message and "chat_completionz" in message and "chat_completions" in message


def test_unknown_schema_names_the_route(schemas):
    with pytest.raises(ConfigError) as info:
        check([spec("/my/chat", handler="chat_completions", schema="chat_completion", methods=("POST",))],
              HANDLERS, schemas)
    assert "/my/chat" in str(info.value) and "chat_completion" in str(info.value)


@pytest.mark.parametrize("routes, named", [
    ([spec("/a"), spec("/a", handler="model_info")], "/a"),
    ([spec("/a", aliases=["/b"]), spec("/c", aliases=["/b"])], "/b"),
    ([spec("/a", aliases=["/a"])], "/a"),
    ([spec("/a"), spec("/b", aliases=["/a"])], "/a"),
])
def test_duplicate_paths_are_rejected(schemas, routes, named):
    with pytest.raises(ConfigError) as info:
        check(routes, HANDLERS, schemas)
    assert named in str(info.value) and "already served" in str(info.value)


def test_build_expands_aliases(schemas):
    gw = object()
    route = spec("/chat/completions", handler="chat_completions", schema="chat_completions", methods=("POST",),
                 aliases=["/v1/chat/completions", "/openai/deployments/{model}/chat/completions"])
    rules = build([route, spec("/models")], HANDLERS, schemas, gw)
    assert [r.regex.pattern for r in rules] == [
        compile_path("/chat/completions"), compile_path("/v1/chat/completions"),
        compile_path("/openai/deployments/{model}/chat/completions"), compile_path("/models")]
    assert all(r.handler_class is HANDLERS["chat_completions"] for r in rules[:3])
    assert rules[3].handler_class is HANDLERS["models"]
    assert all(r.kwargs["gw"] is gw for r in rules)
    assert rules[0].kwargs["route"] is route and rules[2].kwargs["route"] is route
    assert rules[0].name == "chat_completions" and rules[1].name is None


def test_build_checks_first(schemas):
    with pytest.raises(ConfigError):
        build([spec("/a", handler="nope")], HANDLERS, schemas, object())


# --- end to end: the URL table comes from YAML ---------------------------------------------------

CUSTOM_ROUTES = """
model_list:
  - model_name: demo
    litellm_params: {model: mock/demo}
routes:
  - path: /chat/completions
    aliases: [/my/team/chat, "/teams/{team}/chat"]
    methods: [POST]
    handler: chat_completions
    schema: chat_completions
    auth: key
  - path: /health/liveliness
    methods: [GET]
    handler: liveliness
    auth: none
"""
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello alias"}]}


async def test_alias_added_in_yaml_serves(gateway, fetch):
    gw = await gateway(CUSTOM_ROUTES)
    for path in ("/chat/completions", "/my/team/chat", "/teams/red/chat"):
        r = await fetch(gw, path, CHAT)
        assert r.code == 200, (path, r.body)
        assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "hello alias"
    # only what the YAML declares is served
    r = await fetch(gw, "/v1/chat/completions", CHAT)
    assert r.code == 404 and error_of(r)["type"] == "not_found_error"
    r = await fetch(gw, "/v1/models")
    assert r.code == 404
    r = await fetch(gw, "/health/liveliness", key=None)
    assert r.code == 200 and orjson.loads(r.body) == "I'm alive!"


async def test_methods_are_narrowed_per_route(gateway, fetch):
    gw = await gateway(CUSTOM_ROUTES)
    r = await fetch(gw, "/my/team/chat")
    assert r.code == 405
    assert r.headers["Allow"] == "POST"
    assert error_of(r)["type"] == "method_not_allowed"
    r = await fetch(gw, "/health/liveliness", method="POST", raw=b"{}", key=None)
    assert r.code == 405 and r.headers["Allow"] == "GET"


async def test_route_auth_level_comes_from_yaml(gateway, fetch):
    gw = await gateway(CUSTOM_ROUTES)
    r = await fetch(gw, "/my/team/chat", CHAT, key=None)
    assert r.code == 401 and error_of(r)["type"] == "auth_error"
