"""router.py: order tiers and the weighted simple-shuffle, deterministic with a seeded Random."""

import collections
import random

from tornado_proxy.providers.base import Deployment
from tornado_proxy.router import Router, weight


def dep(id, weight=1.0, rpm=None, tpm=None, order=None) -> Deployment:
    return Deployment(id=id, model_name="g", provider="openai", model="m", weight=weight, rpm=rpm, tpm=tpm,
                      order=order)


def ids(plan) -> list[str]:
    return [d.id for d in plan]


def first_counts(deployments, runs=2000, seed=1234) -> collections.Counter:
    router = Router(random.Random(seed))
    return collections.Counter(router.plan(deployments)[0].id for _ in range(runs))


def test_single_deployment():
    d = dep("a")
    assert Router().plan([d]) == [d]


def test_plan_is_a_permutation():
    group = [dep(c) for c in "abcde"]
    plan = Router(random.Random(0)).plan(group)
    assert sorted(ids(plan)) == list("abcde")


def test_seeded_random_is_deterministic():
    group = [dep("a", weight=1), dep("b", weight=2), dep("c", weight=5)]
    first = ids(Router(random.Random(7)).plan(group))
    r1, r2 = Router(random.Random(7)), Router(random.Random(7))
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
    router = Router(random.Random(3))
    for _ in range(200):
        assert ids(router.plan([dep("never", weight=0), dep("x"), dep("y")]))[-1] == "never"


def test_all_zero_weights_still_plan_everything():
    plan = Router(random.Random(3)).plan([dep("a", weight=0), dep("b", weight=0)])
    assert sorted(ids(plan)) == ["a", "b"]


def test_order_tiers_come_first_lowest_order_first():
    group = [dep("none1"), dep("o2", order=2), dep("o1a", order=1), dep("none2"), dep("o1b", order=1, weight=50)]
    router = Router(random.Random(11))
    for _ in range(100):
        plan = ids(router.plan(group))
        assert set(plan[:2]) == {"o1a", "o1b"}
        assert plan[2] == "o2"
        assert set(plan[3:]) == {"none1", "none2"}


def test_order_tier_beats_weight():
    group = [dep("heavy", weight=1000), dep("preferred", order=1, weight=0.001)]
    router = Router(random.Random(5))
    assert all(ids(router.plan(group))[0] == "preferred" for _ in range(100))
