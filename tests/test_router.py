"""router.py: order tiers and the weighted simple-shuffle, deterministic with a seeded Random."""

import collections
import re
import random

from tornado_proxy.providers.base import Deployment
from tornado_proxy.router import Router, weight


def dep(id, weight=1.0, rpm=None, tpm=None, order=None) -> Deployment:
    return Deployment(id=id, model_name="g", provider="openai", model="m", weight=weight, rpm=rpm, tpm=tpm,
                      order=order)


def ids(plan) -> list[str]:
    return [d.id for d in plan]


def first_counts(deployments, runs=2000, seed=1234) -> collections.Counter:
    router = Router(rng=random.Random(seed))
    return collections.Counter(router.plan(deployments)[0].id for _ in range(runs))


def test_single_deployment():
    d = dep("a")
    assert Router().plan([d]) == [d]


def test_plan_is_a_permutation():
    group = [dep(c) for c in "abcde"]
    plan = Router(rng=random.Random(0)).plan(group)
    assert sorted(ids(plan)) == list("abcde")


def test_seeded_random_is_deterministic():
    group = [dep("a", weight=1), dep("b", weight=2), dep("c", weight=5)]
    first = ids(Router(rng=random.Random(7)).plan(group))
    r1, r2 = Router(rng=random.Random(7)), Router(rng=random.Random(7))
    seq1 = [ids(r1.plan(group)) for _ in range(50)]
    seq2 = [ids(r2.plan(group)) for _ in range(50)]
    assert seq1 == seq2 and seq1[0] == first
    assert len({tuple(p) for p in seq1}) > 1  # it does shuffle


def test_weights_bias_the_first_pick():
    counts = first_counts([dep("heavy", weight=9), dep("light", weight=1)])
    assert counts["heavy"] > 3 * counts["light"] > 0


def test_rpm_and_tpm_are_weights_when_no_weight_is_given():
    counts = first_counts([dep("big", rpm=900), dep("small", rpm=100)])
    assert counts["big"] > 3 * counts["small"] > 0
    counts = first_counts([dep("big", tpm=90000), dep("small", tpm=10000)])
    assert counts["big"] > 3 * counts["small"] > 0


def test_weight_function():
    assert weight(dep("a")) == 1.0
    assert weight(dep("a", weight=3)) == 3.0
    assert weight(dep("a", rpm=60)) == 60.0
    assert weight(dep("a", weight=2, rpm=60)) == 2.0
    assert weight(dep("a", weight=0)) == 0.0
    assert weight(dep("a", weight=-1)) == 0.0


def test_zero_weight_goes_last():
    router = Router(rng=random.Random(3))
    for _ in range(200):
        assert ids(router.plan([dep("never", weight=0), dep("x"), dep("y")]))[-1] == "never"


def test_all_zero_weights_still_plan_everything():
    plan = Router(rng=random.Random(3)).plan([dep("a", weight=0), dep("b", weight=0)])
    assert sorted(ids(plan)) == ["a", "b"]


def test_order_tiers_come_first_lowest_order_first():
    group = [dep("none1"), dep("o2", order=2), dep("o1a", order=1), dep("none2"), dep("o1b", order=1, weight=50)]
    router = Router(rng=random.Random(11))
    for _ in range(100):
        plan = ids(router.plan(group))
        assert set(plan[:2]) == {"o1a", "o1b"}
        assert plan[2] == "o2"
        assert set(plan[3:]) == {"none1", "none2"}


def test_order_tier_beats_weight():
    group = [dep("heavy", weight=1000), dep("preferred", order=1, weight=0.001)]
    router = Router(rng=random.Random(5))
    assert all(ids(router.plan(group))[0] == "preferred" for _ in range(100))


# --- strategies, cooldowns, failure policy (issue 11) ------------------------------------------

import pytest

from tornado_proxy.config import ConfigError
from tornado_proxy.counters import LocalCounters
from tornado_proxy.errors import InvalidRequestError, UpstreamError, upstream_error
from tornado_proxy.router import NoDeploymentAvailable, RouterSettings, fallback_kind, is_retryable, table_price, load_prices


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make(strategy="simple-shuffle", seed=1, clock=None, **settings):
    clock = clock or Clock()
    counters = LocalCounters(clock=clock, wall=clock)
    return Router(RouterSettings(routing_strategy=strategy, **settings), counters, random.Random(seed)), counters, clock


def picks(router, group, runs=2000, failed=(), unhealthy=()):
    return collections.Counter(router.pick(group, failed, unhealthy).id for _ in range(runs))


def dep2(id, **kw) -> Deployment:
    base = dict(id=id, model_name="g", provider="openai", model="gpt-4o-mini")
    base.update(kw)
    return Deployment(**base)


def test_settings_parse_defaults_as_litellm():
    s = RouterSettings.parse({})
    assert (s.routing_strategy, s.num_retries, s.allowed_fails, s.cooldown_time, s.max_fallbacks) == \
        ("simple-shuffle", 2, 3, 5.0, 5)


def test_settings_parse_reads_litellm_settings_and_fallback_lists():
    s = RouterSettings.parse({"fallbacks": [{"a": ["b", "c"]}, {"*": "d"}], "default_fallbacks": ["z"],
                              "context_window_fallbacks": [{"a": ["big"]}],
                              "routing_strategy_args": {"lowest_latency_buffer": 0.5}},
                             {"num_retries": 4, "content_policy_fallbacks": [{"a": ["safe"]}]})
    assert s.num_retries == 4 and s.lowest_latency_buffer == 0.5
    assert s.fallbacks == {"a": ("b", "c"), "*": ("d",)}
    assert s.context_window_fallbacks == {"a": ("big",)} and s.content_policy_fallbacks == {"a": ("safe",)}
    assert s.default_fallbacks == ("z",)
    assert RouterSettings.parse({"num_retries": 1}, {"num_retries": 4}).num_retries == 1  # router_settings wins


@pytest.mark.parametrize("router_settings, message", [
    ({"routing_strategy": "round-robin"}, "simple-shuffle, least-busy, latency-based-routing, usage-based-routing-v2, "
                                          "cost-based-routing"),
    ({"num_retries": "many"}, "router_settings.num_retries: expected a number"),
    ({"cooldown_time": -1}, "router_settings.cooldown_time: must be at least 0"),
    ({"fallbacks": ["b"]}, "router_settings.fallbacks: expected a list like"),
    ({"fallbacks": [{"a": [1]}]}, "router_settings.fallbacks[0].a: expected a list of model group names"),
])
def test_settings_errors_name_the_key(router_settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RouterSettings.parse(router_settings)


def test_least_busy_prefers_fewest_in_flight():
    router, counters, _ = make("least-busy")
    group = [dep2("a"), dep2("b"), dep2("c")]
    counters.started("a"); counters.started("a"); counters.started("b")
    assert router.pick(group).id == "c"
    counters.started("c"); counters.started("c")
    assert router.pick(group).id == "b"
    counters.ended("a"); counters.ended("a")
    assert router.pick(group).id == "a"


def test_least_busy_spreads_ties():
    router, _, _ = make("least-busy")
    counts = picks(router, [dep2("a"), dep2("b")])
    assert 800 < counts["a"] < 1200


def test_latency_based_picks_the_fastest_and_tries_unknown_ones():
    router, counters, _ = make("latency-based-routing")
    group = [dep2("slow"), dep2("fast"), dep2("new")]
    for _ in range(3):
        counters.add_latency("slow", 2.0)
        counters.add_latency("fast", 0.2)
    assert router.pick(group).id == "new"  # no measurement yet: tried first
    counters.add_latency("new", 1.0)
    assert set(picks(router, group, 200)) == {"fast"}


def test_latency_buffer_shares_load_between_near_equal_deployments():
    router, counters, _ = make("latency-based-routing", lowest_latency_buffer=0.5)
    group = [dep2("a"), dep2("b"), dep2("far")]
    counters.add_latency("a", 1.0); counters.add_latency("b", 1.3); counters.add_latency("far", 3.0)
    counts = picks(router, group)
    assert counts["far"] == 0 and 800 < counts["a"] < 1200


def test_usage_based_v2_prefers_fewest_tokens_and_respects_limits():
    router, counters, clock = make("usage-based-routing-v2")
    group = [dep2("a", rpm=2), dep2("b", tpm=100)]
    counters.add_tokens("a", 50); counters.add_tokens("b", 10)
    assert router.pick(group).id == "b"
    counters.add_tokens("b", 100)  # b at its tpm
    assert router.pick(group).id == "a"
    counters.add_request("a"); counters.add_request("a")  # a at its rpm
    with pytest.raises(NoDeploymentAvailable) as caught:
        router.pick(group)
    assert caught.value.status == 429 and int(caught.value.headers["Retry-After"]) >= 1
    clock.now += 60  # next minute: limits reset
    assert router.pick(group).id in ("a", "b")


def test_usage_limits_apply_to_a_single_deployment_too():
    router, counters, _ = make("usage-based-routing-v2")
    counters.add_request("only")
    with pytest.raises(NoDeploymentAvailable):
        router.pick([dep2("only", rpm=1)])


def test_cost_based_picks_the_cheapest_price_source_order():
    router, _, _ = make("cost-based-routing")
    configured = dep2("configured", model_info={"input_cost_per_token": 1e-9, "output_cost_per_token": 1e-9})
    params = dep2("params", public_params={"input_cost_per_token": 1e-8, "output_cost_per_token": 1e-8})
    mini = dep2("mini", model="gpt-4o-mini-2024-07-18")
    big = dep2("big", model="gpt-4o")
    unknown = dep2("unknown", model="something-custom")
    assert ids(router.plan([big, unknown, mini, params, configured])) == ["configured", "params", "mini", "big", "unknown"]


@pytest.mark.parametrize("provider, model, info, expected", [
    ("openai", "gpt-4o-mini", {}, "gpt-4o-mini"),
    ("openai", "gpt-4o-2024-08-06", {}, "gpt-4o"),
    ("azure", "my-deployment", {"base_model": "gpt-4o"}, "gpt-4o"),
    ("openrouter", "openai/gpt-4.1-mini", {}, "gpt-4.1-mini"),
    ("anthropic", "claude-3-5-haiku-20241022", {}, "claude-3-5-haiku"),
    ("gemini", "gemini-2.0-flash", {}, "gemini-2.0-flash"),
])
def test_price_table_lookup(provider, model, info, expected):
    prices = load_prices()
    assert "_source" in prices and "_date" in prices
    table = prices["openai" if provider in ("azure", "openrouter") else provider]
    assert table_price(prices, dep2("x", provider=provider, model=model, model_info=info)) == tuple(table[expected])


def test_strategies_keep_order_tiers():
    for strategy in ("least-busy", "latency-based-routing", "cost-based-routing", "usage-based-routing-v2"):
        router, _, _ = make(strategy)
        group = [dep2("backup", order=2, model="gpt-4o-mini"), dep2("primary", order=1, model="gpt-4")]
        assert router.pick(group).id == "primary", strategy


def test_failed_deployments_are_skipped_while_others_remain():
    router, _, _ = make()
    group = [dep2("a"), dep2("b"), dep2("c")]
    assert set(picks(router, group, 300, failed={"a"})) == {"b", "c"}
    assert set(picks(router, group, 50, failed={"a", "b", "c"})) <= {"a", "b", "c"}  # all failed: any again


def test_lower_tier_is_used_when_the_preferred_one_failed():
    router, _, _ = make()
    group = [dep2("primary", order=1), dep2("backup", order=2)]
    assert router.pick(group, failed={"primary"}).id == "backup"


ERR_500 = upstream_error(500, "boom")
ERR_429 = upstream_error(429, "slow down", headers={"retry-after": "3"})


def test_cooldown_after_more_than_allowed_fails():
    router, counters, clock = make(allowed_fails=1, cooldown_time=5)
    group = [dep2("a"), dep2("b")]
    router.failed(group[0], 2, ERR_500)
    assert counters.cooling(["a"]) == {}
    router.failed(group[0], 2, ERR_500)
    assert "a" in counters.cooling(["a"])
    assert set(picks(router, group, 100)) == {"b"}
    clock.now += 5.01
    assert set(picks(router, group, 300)) == {"a", "b"}  # recovered


def test_a_429_cools_down_at_once_unless_the_deployment_is_alone():
    router, counters, _ = make()
    router.failed(dep2("a"), 2, ERR_429)
    assert "a" in counters.cooling(["a"])
    router.failed(dep2("solo"), 1, ERR_429)
    for _ in range(10):
        router.failed(dep2("solo"), 1, ERR_500)
    assert counters.cooling(["solo"]) == {}


def test_client_errors_never_cool_down():
    router, counters, _ = make(allowed_fails=0)
    router.failed(dep2("a"), 2, upstream_error(400, "bad"))
    assert counters.cooling(["a"]) == {}


def test_all_cooled_down_is_a_429_with_retry_after():
    router, counters, _ = make(cooldown_time=7)
    group = [dep2("a"), dep2("b")]
    router.failed(group[0], 2, ERR_429)
    router.failed(group[1], 2, ERR_429)
    with pytest.raises(NoDeploymentAvailable) as caught:
        router.pick(group)
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "7"}
    assert "No deployments available" in caught.value.message


@pytest.mark.parametrize("error, retryable, kind", [
    (upstream_error(500, "x"), True, "default"),
    (upstream_error(503, "x"), True, "default"),
    (upstream_error(429, "x"), True, "default"),
    (upstream_error(408, "x"), True, "default"),
    (UpstreamError("not JSON", status=502), True, "default"),
    (upstream_error(401, "bad key"), False, "default"),
    (upstream_error(404, "no such model"), False, "default"),
    (upstream_error(400, "This model's maximum context length is 8192 tokens"), False, "context_window"),
    (upstream_error(400, "Your request was rejected as a result of our safety system"), False, "content_policy"),
    (upstream_error(400, "Invalid value for temperature"), False, None),
    (upstream_error(422, "x"), False, None),
    (InvalidRequestError("bad"), False, None),
])
def test_error_policy(error, retryable, kind):
    assert is_retryable(error) is retryable
    assert fallback_kind(error) == kind


def test_retry_delay():
    router, _, _ = make(retry_after=0.1)
    assert router.retry_delay(0, ERR_429, another_deployment=True) == 0.1  # nothing to wait for elsewhere
    assert router.retry_delay(0, ERR_429, another_deployment=False) == 3.0  # Retry-After honoured
    assert router.retry_delay(0, upstream_error(429, "x", headers={"Retry-After": "600"}), False) <= 8.0
    delays = [router.retry_delay(n, ERR_500, False) for n in range(6) for _ in range(50)]
    assert all(0.1 <= d <= 8.0 for d in delays)
    first = [router.retry_delay(0, ERR_500, False) for _ in range(200)]
    assert max(first) <= 0.5 and len(set(first)) > 100  # jitter
    assert max(router.retry_delay(3, ERR_500, False) for _ in range(50)) > 0.5  # grows


@pytest.mark.parametrize("kind, requested, expected", [
    ("default", (), ("b", "c")),
    ("default", ("mine",), ("mine",)),
    ("context_window", (), ("big",)),
    ("content_policy", (), ()),
])
def test_fallback_groups(kind, requested, expected):
    router, _, _ = make(fallbacks={"a": ("b", "c"), "*": ("any",)}, context_window_fallbacks={"a": ("big",)},
                        default_fallbacks=("z",))
    assert router.fallback_groups("a", kind, requested) == expected


def test_fallback_wildcard_then_default_fallbacks():
    router, _, _ = make(fallbacks={"*": ("any",)})
    assert router.fallback_groups("other", "default") == ("any",)
    router, _, _ = make(default_fallbacks=("z",))
    assert router.fallback_groups("other", "default") == ("z",)


def test_deployments_with_a_problem_are_avoided_while_others_work():
    router, _, _ = make()
    group = [dep2("broken", problem="no api_base"), dep2("ok")]
    assert set(picks(router, group, 100)) == {"ok"}


# --- background health results (the caller passes the unhealthy ids in) ----------------------

def test_unhealthy_deployments_are_skipped_while_a_healthy_one_remains():
    router, _, _ = make()
    group = [dep2("a"), dep2("b"), dep2("c")]
    assert set(picks(router, group, 300, unhealthy={"a"})) == {"b", "c"}
    assert set(picks(router, group, 300, unhealthy=frozenset())) == {"a", "b", "c"}
    assert set(picks(router, group, 300, unhealthy={"not-in-this-group"})) == {"a", "b", "c"}


def test_a_group_whose_every_deployment_is_unhealthy_still_tries_them():
    router, _, _ = make()
    group = [dep2("a"), dep2("b")]
    assert set(picks(router, group, 300, unhealthy={"a", "b"})) == {"a", "b"}  # LiteLLM's safety net
    assert router.pick([dep2("solo")], unhealthy={"solo"}).id == "solo"


def test_unhealthy_is_a_preference_cooldowns_still_rule():
    router, _, _ = make()
    group = [dep2("a"), dep2("b")]
    router.failed(group[1], 2, ERR_429)  # b, the healthy one, cools down: the unhealthy a is tried
    assert set(picks(router, group, 100, unhealthy={"a"})) == {"a"}
    router.failed(group[0], 2, ERR_429)  # both cooling: the 429 as without health checks
    with pytest.raises(NoDeploymentAvailable):
        router.pick(group, unhealthy={"a"})


def test_unhealthy_ones_are_skipped_within_order_tiers_and_before_failed_ones():
    router, _, _ = make()
    group = [dep2("primary", order=1), dep2("backup", order=2)]
    assert router.pick(group, unhealthy={"primary"}).id == "backup"
    assert router.plan(group, unhealthy={"primary"}) == [group[1]]
    # the only healthy one failed in this call: it is tried again rather than the unhealthy one
    assert router.pick(group, failed={"backup"}, unhealthy={"primary"}).id == "backup"


def test_retry_policy_sets_retries_per_error_kind_and_group():
    settings = RouterSettings.parse({
        "num_retries": 2,
        "retry_policy": {"BadRequestErrorRetries": 1, "RateLimitErrorRetries": 5, "TimeoutErrorRetries": 0},
        "model_group_retry_policy": {"strict": {"RateLimitErrorRetries": 0, "InternalServerErrorRetries": 4}}})
    router = Router(settings)
    rate, server = upstream_error(429, "slow"), upstream_error(500, "boom")
    bad, auth = InvalidRequestError("bad"), upstream_error(401, "no")
    timeout = UpstreamError("Timeout", status=408)
    assert router.retries_for("any", rate, 2) == 5
    assert router.retries_for("any", timeout, 2) == 0
    assert router.retries_for("any", bad, 2) == 1          # a policy may retry a 400, as LiteLLM's
    assert router.retries_for("any", server, 3) == 3       # not in the policy: num_retries
    assert router.retries_for("any", auth, 3) == 0         # not in the policy, not retryable
    assert router.retries_for("strict", rate, 2) == 0      # the group's policy first
    assert router.retries_for("strict", server, 2) == 4
    assert router.retries_for("strict", bad, 2) == 1       # then the global one
    policy_error = InvalidRequestError("blocked by the content filter")
    assert Router(RouterSettings.parse({"retry_policy": {"ContentPolicyViolationErrorRetries": 2}})) \
        .retries_for("g", policy_error, 0) == 2


@pytest.mark.parametrize("router_settings, message", [
    ({"retry_policy": {"NoSuchRetries": 1}}, "router_settings.retry_policy.NoSuchRetries: not a retry policy"),
    ({"retry_policy": {"RateLimitErrorRetries": -1}}, "router_settings.retry_policy.RateLimitErrorRetries"),
    ({"retry_policy": ["x"]}, "router_settings.retry_policy: expected a mapping"),
    ({"model_group_retry_policy": {"g": {"TimeoutErrorRetries": "3"}}},
     "router_settings.model_group_retry_policy.g.TimeoutErrorRetries"),
])
def test_retry_policy_errors_name_the_key(router_settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RouterSettings.parse(router_settings)
