"""``GET /spend/logs`` and ``GET /global/spend/report``: filters, LiteLLM's answer shapes,
admin only, and no key's text in any answer."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from tornado_proxy.keystore import hash_key

from .conftest import MASTER_KEY, error_of
from .test_spend import body, chat, db_yaml, expected_cost, rows_present


@pytest.fixture
async def gw(pg_dsn, gateway):
    return await gateway(db_yaml(pg_dsn))


@pytest.fixture
async def traffic(gw, fetch, pg_dsn):
    """Two teams' keys, a user's key and the master key, each with calls; waits for their rows."""
    await fetch(gw, "/team/new", {"team_id": "red", "team_alias": "Red Team"})
    await fetch(gw, "/team/new", {"team_id": "blue"})
    red = body(await fetch(gw, "/key/generate", {"team_id": "red", "user_id": "ann"}))
    blue = body(await fetch(gw, "/key/generate", {"team_id": "blue"}))
    calls = {}
    for made, n, customer in ((red, 2, "acme"), (blue, 1, None)):
        for _ in range(n):
            reply = await chat(gw, made["key"], **({"user": customer} if customer else {}))
            calls[reply.headers["x-litellm-call-id"]] = (made, expected_cost(reply.parse().usage))
    free = await chat(gw, red["key"], "free")
    calls[free.headers["x-litellm-call-id"]] = (red, 0.0)
    await chat(gw, MASTER_KEY)
    await rows_present(pg_dsn, len(calls) + 1)
    return red, blue, calls


async def test_spend_logs_filters(gw, fetch, traffic):
    red, blue, calls = traffic
    rows = body(await fetch(gw, "/spend/logs"))
    assert len(rows) == len(calls) + 1
    row = rows[0]
    for field in ("request_id", "api_key", "team_id", "user", "end_user", "model", "model_group", "model_id",
                  "api_base", "prompt_tokens", "completion_tokens", "total_tokens", "spend", "startTime", "endTime",
                  "status", "cache_hit", "metadata", "call_type", "request_tags"):
        assert field in row
    by_key = body(await fetch(gw, f"/spend/logs?api_key={red['key']}"))
    assert {r["request_id"] for r in by_key} == {i for i, (m, _) in calls.items() if m is red}
    assert body(await fetch(gw, f"/spend/logs?api_key={red['token']}")) == by_key
    assert {r["team_id"] for r in body(await fetch(gw, "/spend/logs?team_id=blue"))} == {"blue"}
    assert {r["user"] for r in body(await fetch(gw, "/spend/logs?user_id=ann"))} == {"ann"}
    one = next(iter(calls))
    found = body(await fetch(gw, f"/spend/logs?request_id={one}"))
    assert [r["request_id"] for r in found] == [one] and found[0]["spend"] == pytest.approx(calls[one][1])
    master = body(await fetch(gw, f"/spend/logs?api_key={hash_key(MASTER_KEY)}"))
    assert len(master) == 1
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert len(body(await fetch(gw, f"/spend/logs?start_date={today}&end_date={today}"))) == len(calls) + 1
    assert body(await fetch(gw, "/spend/logs?start_date=2001-01-01&end_date=2001-01-02")) == []
    r = await fetch(gw, "/spend/logs?start_date=yesterday")
    assert r.code == 400 and error_of(r)["param"] == "start_date"
    text = orjson.dumps(body(await fetch(gw, "/spend/logs"))).decode()
    assert red["key"] not in text and blue["key"] not in text and MASTER_KEY not in text


async def test_global_spend_report_shapes(gw, fetch, traffic):
    red, blue, calls = traffic
    red_total = sum(c for m, c in calls.values() if m is red)
    blue_total = sum(c for m, c in calls.values() if m is blue)
    report = body(await fetch(gw, "/global/spend/report"))
    assert len(report) == 1 and set(report[0]) == {"group_by_day", "teams"}
    teams = {t["team_name"]: t for t in report[0]["teams"]}
    assert set(teams) == {"Red Team", "blue", "Unassigned Team"}
    assert teams["Red Team"]["total_spend"] == pytest.approx(red_total)
    assert teams["blue"]["total_spend"] == pytest.approx(blue_total)
    assert {m["api_key"] for m in teams["Red Team"]["metadata"]} == {red["token"]}
    assert {m["model"] for m in teams["Red Team"]["metadata"]} == {"cheap", "free"}
    customers = body(await fetch(gw, "/global/spend/report?group_by=customer"))[0]["customers"]
    assert {c["customer"] for c in customers} == {"acme", None}
    models = body(await fetch(gw, "/global/spend/report?group_by=model"))[0]["models"]
    assert {m["model"] for m in models} == {"cheap", "free"}
    keys = body(await fetch(gw, "/global/spend/report?group_by=api_key"))
    assert {k["api_key"] for k in keys} == {red["token"], blue["token"], hash_key(MASTER_KEY)}
    one = body(await fetch(gw, f"/global/spend/report?api_key={red['key']}"))
    assert [k["api_key"] for k in one] == [red["token"]]
    assert one[0]["total_cost"] == pytest.approx(red_total)
    assert {d["model"] for d in one[0]["model_details"]} == {"cheap", "free"}
    by_user = body(await fetch(gw, "/global/spend/report?internal_user_id=ann"))
    assert [k["api_key"] for k in by_user] == [red["token"]]
    assert body(await fetch(gw, "/global/spend/report?start_date=2001-01-01&end_date=2001-01-31")) == []
    r = await fetch(gw, "/global/spend/report?group_by=planet")
    assert r.code == 400 and error_of(r)["param"] == "group_by"


async def test_spend_totals_in_info_answers(gw, fetch, traffic, pg_dsn):
    red, blue, calls = traffic
    red_total = sum(c for m, c in calls.values() if m is red)
    info = body(await fetch(gw, f"/key/info?key={red['token']}"))["info"]
    assert info["spend"] == pytest.approx(red_total) and info["model_spend"]["cheap"] == pytest.approx(red_total)
    assert body(await fetch(gw, "/team/info?team_id=red"))["team_info"]["spend"] == pytest.approx(red_total)
    assert body(await fetch(gw, "/user/info?user_id=ann"))["user_info"]["spend"] == pytest.approx(red_total)
    own = body(await fetch(gw, "/key/info", key=blue["key"]))["info"]
    assert own["spend"] == pytest.approx(sum(c for m, c in calls.values() if m is blue))


async def test_spend_endpoints_are_admin_only(gw, fetch):
    made = body(await fetch(gw, "/key/generate", {}))
    for path in ("/spend/logs", "/global/spend/report"):
        r = await fetch(gw, path, key=made["key"])
        assert r.code == 403 and made["key"] not in r.body.decode()
        assert (await fetch(gw, path, key=None)).code == 401
    admin = body(await fetch(gw, "/user/new", {"user_id": "boss", "user_role": "proxy_admin"}))
    assert (await fetch(gw, "/spend/logs", key=admin["key"])).code == 200


async def test_without_database_the_spend_endpoints_say_why(gateway, fetch):
    gw = await gateway("model_list: []\n")
    r = await fetch(gw, "/spend/logs")
    assert r.code == 400 and "database storage" in error_of(r)["message"]
