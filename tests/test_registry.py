"""registry.py: model groups, wildcards, aliases, derived ids, problems, numeric params."""

import pytest

from tornado_proxy.config import ConfigError, ModelSpec
from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.registry import build_deployment, build_registry, derive_id

KEY = "sk-registry-secret-1234"


def entry(name, model, i=0, info=None, **params) -> ModelSpec:
    return ModelSpec(model_name=name, litellm_params={"model": model, **params}, model_info=info or {},
                     where=f"model_list[{i}]")


def registry(*specs, aliases=None, environ=None):
    return build_registry(specs, environ or {}, aliases=aliases)


def test_groups_collect_deployments_in_order():
    r = registry(entry("gpt", "openai/gpt-4o", 0, api_key="a"), entry("gpt", "openai/gpt-4o-mini", 1, api_key="b"),
                 entry("demo", "mock/demo", 2))
    assert [d.model for d in r.resolve("gpt")] == ["gpt-4o", "gpt-4o-mini"]
    assert [d.provider for d in r.resolve("demo")] == ["mock"]
    assert r.model_names() == ["gpt", "demo"]
    assert r.generation == 1


def test_unknown_model_is_a_400_naming_it():
    r = registry(entry("gpt", "openai/gpt-4o"))
    with pytest.raises(InvalidRequestError) as info:
        r.resolve("claude-3")
    assert info.value.status == 400 and "claude-3" in info.value.message and info.value.param == "model"


def test_wildcard_openai_star():
    r = registry(entry("openai/*", "openai/*", api_key="k"), entry("gpt-4o", "openai/gpt-4o", 1))
    (d,) = r.resolve("openai/gpt-4.1-mini")
    assert d.provider == "openai" and d.model == "gpt-4.1-mini" and d.model_name == "openai/*"
    assert r.resolve("gpt-4o")[0].model == "gpt-4o"  # exact names win over patterns
    with pytest.raises(InvalidRequestError):
        r.resolve("anthropic/claude")
    assert "openai/*" in r.model_names()


def test_most_specific_wildcard_wins():
    r = registry(entry("*", "openai/*", 0), entry("openrouter/*", "openrouter/*", 1))
    assert r.resolve("openrouter/meta/llama")[0].provider == "openrouter"
    assert r.resolve("openrouter/meta/llama")[0].model == "meta/llama"
    (d,) = r.resolve("some-model")
    assert d.provider == "openai" and d.model == "some-model"


def test_wildcard_with_fixed_model_keeps_it():
    r = registry(entry("team-*", "openai/gpt-4o"))
    assert r.resolve("team-red")[0].model == "gpt-4o"


def test_model_group_alias():
    aliases = {"gpt-4": "gpt-4o", "hidden": {"model": "gpt-4o", "hidden": True}, "wild": "openai/x"}
    r = registry(entry("gpt-4o", "openai/gpt-4o"), entry("openai/*", "openai/*", 1), aliases=aliases)
    assert r.resolve("gpt-4")[0].model_name == "gpt-4o"
    assert r.resolve("hidden")[0].model_name == "gpt-4o"
    assert r.resolve("wild")[0].model == "x"
    assert {"gpt-4", "hidden"} <= set(r.model_names())


def test_derived_ids_are_stable_and_distinct():
    a1 = entry("gpt", "openai/gpt-4o", 0, api_key="k", rpm=10)
    a2 = entry("gpt", "openai/gpt-4o", 5, rpm=10, api_key="k")  # same entry, other position/key order
    b = entry("gpt", "openai/gpt-4o", 1, api_key="k", rpm=11)
    assert derive_id(a1) == derive_id(a2)
    assert derive_id(a1) != derive_id(b)
    assert registry(a1).deployments[0].id == registry(a1).deployments[0].id == derive_id(a1)
    assert len(derive_id(a1)) == 64
    assert KEY not in derive_id(entry("gpt", "openai/gpt-4o", api_key=KEY))


def test_configured_id_is_kept_as_a_string():
    r = registry(entry("gpt", "openai/gpt-4o", info={"id": 42, "mode": "chat"}))
    (d,) = r.deployments
    assert d.id == "42" and d.model_info == {"id": "42", "mode": "chat"}
    assert r.by_id["42"] is d


@pytest.mark.parametrize("model, provider", [
    ("cohere/command-r", "cohere"),
    ("bedrock/anthropic.claude-v2", "bedrock"),
    ("someday/model-x", "someday"),
])
def test_unsupported_provider_is_a_problem_not_an_exception(model, provider):
    r = registry(entry("ok", "mock/demo", 0), entry("later", model, 1))
    (d,) = r.resolve("later")
    assert d.provider == provider and d.problem
    assert provider in d.problem and model in d.problem
    (problem,) = r.problems()
    assert "later" in problem and provider in problem


def test_vllm_without_api_base_is_a_problem():
    (d,) = registry(entry("v", "hosted_vllm/llama")).deployments
    assert "api_base" in d.problem
    (d,) = registry(entry("v", "hosted_vllm/llama", api_base="http://vllm:8000/v1")).deployments
    assert d.problem is None


def test_no_prefix_means_openai_and_custom_llm_provider():
    (d,) = registry(entry("g", "gpt-4o")).deployments
    assert (d.provider, d.model, d.api_base) == ("openai", "gpt-4o", "https://api.openai.com/v1")
    (d,) = registry(entry("g", "openrouter/meta/llama", custom_llm_provider="openrouter")).deployments
    assert (d.provider, d.model) == ("openrouter", "meta/llama")


def test_numeric_strings_are_numbers():
    d = build_deployment(entry("g", "openai/gpt-4o", rpm="100", tpm="20000", weight="2.5", order="2",
                               timeout="30", stream_timeout="5.5"), {})
    assert (d.rpm, d.tpm, d.weight, d.order, d.timeout, d.stream_timeout) == (100, 20000, 2.5, 2, 30.0, 5.5)
    d = build_deployment(entry("g", "openai/gpt-4o", rpm=7, weight=3), {})
    assert (d.rpm, d.weight, d.tpm, d.order, d.timeout) == (7, 3.0, None, None, None)


def test_weight_zero_is_kept():
    assert build_deployment(entry("g", "openai/gpt-4o", weight=0), {}).weight == 0.0
    assert build_deployment(entry("g", "openai/gpt-4o", weight="0"), {}).weight == 0.0
    assert build_deployment(entry("g", "openai/gpt-4o"), {}).weight == 1.0


def test_bad_number_names_the_key():
    with pytest.raises(ConfigError) as info:
        build_deployment(entry("g", "openai/gpt-4o", 3, rpm="lots"), {})
    assert "model_list[3].litellm_params.rpm" in str(info.value)


def test_provider_defaults_from_environment():
    env = {"OPENROUTER_API_KEY": KEY, "OR_SITE_URL": "https://me.example", "OR_APP_NAME": "MyApp"}
    (d,) = registry(entry("g", "openrouter/openai/gpt-3.5-turbo"), environ=env).deployments
    assert d.api_base == "https://openrouter.ai/api/v1" and d.model == "openai/gpt-3.5-turbo"
    assert d.api_key.reveal() == KEY
    assert d.extra_headers == {"HTTP-Referer": "https://me.example", "X-Title": "MyApp"}


def test_secrets_stay_out_of_public_params_and_repr():
    (d,) = registry(entry("g", "openai/gpt-4o", api_key=KEY, aws_secret_access_key="s3cr3t-aws",
                          temperature=0.2)).deployments
    assert d.public_params == {"model": "openai/gpt-4o", "temperature": 0.2}
    assert d.defaults == {"temperature": 0.2}
    assert KEY not in repr(d) and d.api_key.reveal() == KEY


def test_resolution_order_groups_then_ids_and_litellm_models_then_wildcards():
    """LiteLLM's router also takes a deployment's model id and its litellm_params.model."""
    specs = [
        ModelSpec("gpt-3.5-turbo", {"model": "openrouter/openai/gpt-3.5-turbo", "api_key": "k"}, {"id": "or-35"}, "m[0]"),
        ModelSpec("openrouter/*", {"model": "openrouter/*", "api_key": "k"}, {"id": "or-any"}, "m[1]"),
        ModelSpec("openai/gpt-4o", {"model": "openai/gpt-4o-2024-08-06"}, {"id": "group-wins"}, "m[2]"),
        ModelSpec("other", {"model": "openai/gpt-4o"}, {"id": "by-litellm-model"}, "m[3]"),
    ]
    registry = build_registry(specs, {})
    ids = lambda name: [d.id for d in registry.resolve(name)]  # noqa: E731
    assert ids("gpt-3.5-turbo") == ["or-35"]                       # the group
    assert ids("openrouter/openai/gpt-3.5-turbo") == ["or-35"]     # its litellm_params.model, before the wildcard
    assert ids("or-35") == ["or-35"]                               # its model id
    assert ids("openrouter/meta/llama-3") == ["or-any"]            # the wildcard
    assert registry.resolve("openrouter/meta/llama-3")[0].model == "meta/llama-3"
    assert ids("openai/gpt-4o") == ["group-wins"]                  # a group name beats a litellm model
    assert "openrouter/*" not in registry.by_litellm_model
    with pytest.raises(InvalidRequestError):
        registry.resolve("openrouter")


def test_unset_api_base_makes_the_deployment_unusable_not_public():
    spec = ModelSpec("m", {"model": "openai/gpt-4o", "api_base": None}, {}, "m[0]", unset={"api_base": "MY_BASE"})
    d = build_deployment(spec, {"OPENAI_API_BASE": "https://elsewhere"})
    assert "os.environ/MY_BASE" in d.problem
