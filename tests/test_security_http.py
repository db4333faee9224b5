"""Issue 9, the HTTP side: what an unauthenticated or malformed client can make a worker do.

Each test reproduces an attack over a raw loopback socket (so nothing smooths the bytes over)
and asserts on the answer, the connection and the gateway's state afterwards."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid

import orjson
import pytest
from tornado.iostream import IOStream, StreamClosedError

from tornado_proxy.config import Settings
from tornado_proxy.logscrub import SecretFilter

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of, provider_yaml

MB = 1024 * 1024
CHAT = orjson.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]})


async def connect(gw) -> IOStream:
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", gw.port))
    return stream


async def read_response(stream: IOStream) -> tuple[int, dict[str, str], bytes]:
    head = await stream.read_until(b"\r\n\r\n", max_bytes=65536)
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    body = await stream.read_bytes(int(headers.get("content-length", "0")))
    return status, headers, body


def request(method: str, path: str, body: bytes = b"", key: str | None = MASTER_KEY, extra: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\n".encode()
    if key:
        head += f"Authorization: Bearer {key}\r\n".encode()
    if body or method == "POST":
        head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
    return head + extra + b"\r\n" + body


def json_error(status: int, body: bytes) -> dict:
    parsed = orjson.loads(body)
    assert set(parsed["error"]) == {"message", "type", "param", "code"}, parsed
    assert parsed["error"]["code"] == str(status)
    return parsed["error"]


async def in_flight(fetch, gw) -> float:
    """litellm_in_flight_requests as /metrics reports it, less the /metrics request itself."""
    text = (await fetch(gw, "/metrics")).body.decode()
    line = next(l for l in text.splitlines() if l.startswith("litellm_in_flight_requests"))
    return float(line.split()[-1]) - 1


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(provider_yaml(fake_openai))


async def assert_serving(fetch, gw) -> None:
    r = await fetch(gw, "/v1/chat/completions", raw=CHAT)
    assert r.code == 200, r.body


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- 2. nothing is read before the key is checked; per-route body limits ---------------------------

@pytest.mark.parametrize("method,path,status", [
    ("POST", "/model/new", 401), ("GET", "/v1/models", 401), ("POST", "/v1/chat/completions", 401),
    ("GET", "/health/readiness", 413), ("GET", "/metrics", 413), ("GET", "/health/liveliness", 413),
])
async def test_a_huge_body_is_answered_from_the_head_alone(gw, fetch, method, path, status):
    """60 MB announced, none sent: the answer must come without reading any of it."""
    stream = await connect(gw)
    await stream.write(f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {60 * MB}\r\n\r\n".encode())
    got, headers, body = await asyncio.wait_for(read_response(stream), 10)
    assert got == status
    json_error(status, body)
    assert headers.get("connection") == "close"  # the body was not read: the connection cannot be reused
    stream.close()
    await assert_serving(fetch, gw)


async def test_unauthenticated_uploads_do_not_grow_memory(gw, fetch):
    """The attack: 8 connections streaming 20 MB bodies, without a key, at routes that used to
    buffer the whole body before looking at the key. Memory must not follow the uploads."""
    before = rss_bytes()
    chunk = b"%x\r\n" % (256 * 1024) + b"x" * (256 * 1024) + b"\r\n"

    async def upload(path: str) -> int:
        stream = await connect(gw)
        await stream.write(f"POST {path} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sent = 0
        try:
            for _ in range(80):  # 20 MB
                await stream.write(chunk)
                sent += len(chunk)
        except StreamClosedError:
            pass
        stream.close()
        return sent

    paths = ["/model/new", "/v1/models", "/health/readiness", "/metrics"] * 2
    sent = await asyncio.gather(*(upload(p) for p in paths))
    assert min(sent) < 20 * MB  # the gateway hung up on every one of them
    assert rss_bytes() - before < 48 * MB, (before, rss_bytes())
    await assert_serving(fetch, gw)


@pytest.mark.parametrize("method,path,size", [("GET", "/v1/models", 100 * 1024),
                                              ("GET", "/health/readiness", 100 * 1024),
                                              ("POST", "/model/new", 2 * MB)])
async def test_routes_without_big_bodies_have_small_limits(gw, fetch, method, path, size):
    r = await fetch(gw, path, method=method, raw=b"{" + b" " * size + b"}")
    assert r.code == 413, r.body[:200]
    assert error_of(r)["param"] == "request_body"


async def test_chat_still_takes_bodies_up_to_the_configured_limit(gw, fetch, fake_openai):
    body = orjson.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "x" * (3 * MB)}]})
    r = await fetch(gw, "/v1/chat/completions", raw=body)
    assert r.code == 200, r.body[:200]
    assert len(fake_openai.received) == 1


# -- 8. in-flight is released however the request ends ------------------------------------------

CUT_REQUESTS = [
    pytest.param(request("POST", "/v1/chat/completions", extra=b"")[:-2].replace(b"Content-Length: 0",
                 b"Content-Length: 5000") + b"\r\n" + b'{"model": "gpt-fa', id="disconnect-mid-upload"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode()
                 + b"\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", id="unequal-content-lengths"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode()
                 + b"\r\nContent-Length: -1\r\n\r\n", id="negative-content-length"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode()
                 + b"\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="length-and-chunked"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode()
                 + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % (40 * MB) + b"x" * 1000,
                 id="chunked-over-the-cap"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode()
                 + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", id="disconnect-mid-chunk"),
]


@pytest.mark.parametrize("raw", CUT_REQUESTS)
async def test_no_request_stays_in_flight_for_ever(gw, fetch, raw):
    for _ in range(3):
        stream = await connect(gw)
        await stream.write(raw)
        await asyncio.sleep(0.05)
        stream.close()
    deadline = asyncio.get_running_loop().time() + 5
    while await in_flight(fetch, gw) != 0:
        assert asyncio.get_running_loop().time() < deadline, "a request stayed in flight"
        await asyncio.sleep(0.05)
    await assert_serving(fetch, gw)


# -- 9. keep-alive after an early answer --------------------------------------------------------

@pytest.mark.parametrize("first,status", [
    (request("POST", "/v1/chat/completions", CHAT, key=None), 401),
    (request("POST", "/v1/chat/completions", CHAT, key="sk-wrong"), 401),
    (request("GET", "/v1/models", key=None), 401),
    (request("POST", "/v1/nowhere", CHAT), 404),
    (request("GET", "/v1/chat/completions"), 405),
    (request("POST", "/model/info", CHAT), 405),
])
async def test_an_early_error_leaves_the_connection_usable(gw, first, status):
    stream = await connect(gw)
    await stream.write(first)
    got, headers, body = await read_response(stream)
    assert got == status
    json_error(status, body)
    assert headers.get("connection") != "close"
    await stream.write(request("POST", "/v1/chat/completions", CHAT))  # the same connection, reused
    got, _, body = await read_response(stream)
    assert got == 200, body
    stream.close()


async def test_an_early_error_on_an_unread_body_announces_the_close(gw):
    stream = await connect(gw)
    await stream.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    got, headers, body = await read_response(stream)
    assert got == 401
    assert headers["connection"] == "close"
    stream.close()


# -- 10. framing errors get a JSON answer with the right status --------------------------------

KEY_LINE = b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\n"


@pytest.mark.parametrize("raw,status", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY_LINE + b"Transfer-Encoding: chunked\r\n\r\n"
     + b"%x\r\n" % (100 * MB) + b"x" * 4096, 413),
    (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
    (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nthis line has no colon\r\n\r\n", 400),
    (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x00b\r\n\r\n", 400),
    (b"GET /v1/models HTTP/9.9\r\nHost: gw\r\n\r\n", 400),
    (b"NOT A REQUEST LINE\r\nHost: gw\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY_LINE + b"Content-Length: 5\r\n"
     b"Content-Length: 6\r\n\r\nhello!", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY_LINE + b"Content-Length: -1\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY_LINE + b"Content-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY_LINE + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY_LINE + b"Transfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nxx\r\n", 400),
], ids=["chunked-100MB", "header-70KB", "no-colon", "nul-in-header", "bad-version", "bad-request-line",
        "unequal-lengths", "negative-length", "length-and-chunked", "unknown-coding", "bad-chunk-size"])
async def test_framing_errors_are_answered_in_json(gw, fetch, raw, status):
    stream = await connect(gw)
    try:
        await stream.write(raw)
    except StreamClosedError:
        pass
    got, headers, body = await asyncio.wait_for(read_response(stream), 10)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    json_error(status, body)
    stream.close()
    await assert_serving(fetch, gw)


# -- 5. nothing a client sends in a header reaches the log ---------------------------------------

async def test_a_malformed_header_carrying_the_key_is_not_logged(gw, fetch, caplog):
    caplog.set_level(logging.DEBUG)
    for raw in (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode() + b"\x00\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + MASTER_KEY.encode() + b"\x0b\r\n\r\n"):
        stream = await connect(gw)
        await stream.write(raw)
        got, _, body = await read_response(stream)
        assert got == 400
        assert MASTER_KEY.encode() not in body
        stream.close()
    assert caplog.records  # the refusal itself is logged...
    assert not [r for r in caplog.records if MASTER_KEY in r.getMessage()]  # ...without the key


def test_the_log_filter_masks_keys_in_tornados_own_messages():
    flt = SecretFilter([MASTER_KEY, PROVIDER_KEY])
    cases = [
        ("Malformed HTTP message from %s: %s", ("127.0.0.1", f"Invalid header value 'Bearer {MASTER_KEY}\\x00'")),
        ("upstream said %s", (PROVIDER_KEY.upper(),)),
        ("x-api-key: %s", ("some-other-secret-value",)),
        ("%s", ("sk-live-ABCDEFGHIJKLMNOP",)),
    ]
    for msg, args in cases:
        record = logging.LogRecord("tornado.general", logging.INFO, __file__, 1, msg, args, None)
        assert flt.filter(record)
        text = record.getMessage()
        for secret in (MASTER_KEY, PROVIDER_KEY, "some-other-secret-value", "ABCDEFGHIJKLMNOP"):
            assert secret.lower() not in text.lower(), text
        assert "***" in text


# -- 6. metrics: bounded labels, optional auth ---------------------------------------------------

async def test_made_up_names_under_a_wildcard_do_not_become_metric_labels(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai, name="wild/*", model="openai/*"))
    names = [f"wild/{uuid.uuid4().hex}" for _ in range(30)]
    for name in names:
        r = await fetch(gw, "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]})
        assert r.code == 200, r.body
    text = (await fetch(gw, "/metrics")).body.decode()
    assert not [n for n in names if n.split("/")[1] in text]
    assert 'model="wild/*"' in text
    assert 'litellm_proxy_total_requests_metric_total{model="wild/*",route="/chat/completions",status="200"} 30.0' \
        in text


async def test_metrics_can_require_a_key(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai, extra="general_settings:\n      require_auth_for_metrics_endpoint: true"))
    assert (await fetch(gw, "/metrics", key=None)).code == 401
    assert (await fetch(gw, "/metrics", key="sk-wrong")).code == 401
    r = await fetch(gw, "/metrics")
    assert r.code == 200 and b"litellm_in_flight_requests" in r.body


async def test_metrics_are_open_by_default(gw, fetch):
    assert (await fetch(gw, "/metrics", key=None)).code == 200


# -- 13. X-Forwarded-For only from trusted proxies -----------------------------------------------

def logged_ips(caplog) -> list[str]:
    return [orjson.loads(r.getMessage())["remote_ip"] for r in caplog.records if r.name == "tornado_proxy.access"]


@pytest.mark.parametrize("trusted,forwarded,expected", [
    (None, "203.0.113.9", "127.0.0.1"),
    ("[10.0.0.0/8]", "203.0.113.9", "127.0.0.1"),
    ("[127.0.0.1]", "203.0.113.9", "203.0.113.9"),
    ("[127.0.0.0/8, 10.0.0.0/8]", "198.51.100.7, 10.1.2.3", "198.51.100.7"),
    ("[127.0.0.1]", "not-an-ip", "127.0.0.1"),
])
async def test_forwarded_addresses_are_believed_only_from_trusted_proxies(gateway, fetch, fake_openai, caplog,
                                                                          trusted, forwarded, expected):
    extra = f"general_settings:\n      trusted_proxies: {trusted}" if trusted else ""
    gw = await gateway(provider_yaml(fake_openai, extra=extra))
    caplog.set_level(logging.INFO, logger="tornado_proxy.access")
    r = await fetch(gw, "/v1/models", headers={"X-Forwarded-For": forwarded, "X-Real-Ip": "192.0.2.1"})
    assert r.code == 200
    assert logged_ips(caplog)[-1] == expected


async def test_a_bad_trusted_proxy_entry_is_a_config_error(gateway, fake_openai):
    from tornado_proxy.config import ConfigError
    with pytest.raises(ConfigError, match="trusted_proxies"):
        await gateway(provider_yaml(fake_openai, extra="general_settings:\n      trusted_proxies: [not-a-net]"))


# -- 14. idle keep-alive connections are closed ---------------------------------------------------

def test_the_idle_timeout_defaults_to_what_load_balancers_expect():
    assert 60 < Settings().keepalive_timeout <= 120


async def test_an_idle_connection_is_closed_after_keepalive_timeout(gateway, fake_openai):
    gw = await gateway(provider_yaml(fake_openai, extra="general_settings:\n      keepalive_timeout: 0.3"))
    stream = await connect(gw)
    await stream.write(request("GET", "/v1/models"))
    got, headers, _ = await read_response(stream)
    assert got == 200 and headers.get("connection") != "close"
    with pytest.raises(StreamClosedError):
        await asyncio.wait_for(stream.read_bytes(1), 10)  # the server hangs up on its own


# -- 7. models created through the API may not read the gateway's own secrets ----------------------

def db_yaml(dsn: str, extra: str = "") -> str:
    return f"""
    model_list: []
    general_settings:
      store_model_in_db: true
      database_url: "{dsn}"
      {extra}
    """


@pytest.mark.parametrize("params", [
    {"api_key": "os.environ/DATABASE_URL"},
    {"api_key": "os.environ/LITELLM_MASTER_KEY"},
    {"api_key": "os.environ/LITELLM_SALT_KEY"},
    {"api_key": "os.environ/REDIS_PASSWORD"},
    {"api_key": "sk-x", "extra_headers": {"X-Master": "os.environ/LITELLM_MASTER_KEY"}},
    {"api_key": "sk-x", "api_base": "os.environ/DATABASE_URL"},
    {"api_key": "os.environ/MY_GATEWAY_KEY"},  # what this config's general_settings reads
], ids=["database-url", "master-key", "salt-key", "redis", "header", "api-base", "config-referenced"])
async def test_api_models_cannot_reference_the_gateways_own_secrets(gateway, fetch, fake_openai, pg_dsn, params):
    env = {"DATABASE_URL": pg_dsn, "LITELLM_SALT_KEY": "salt-0123456789", "REDIS_PASSWORD": "redis-secret",
           "MY_GATEWAY_KEY": "gw-secret-value"}
    gw = await gateway(db_yaml(pg_dsn, "ui_access_mode: os.environ/MY_GATEWAY_KEY"), env=env)
    body = {"model_name": "stolen", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": fake_openai.base,
                                                       **params}}
    r = await fetch(gw, "/model/new", body)
    assert r.code == 400, r.body
    error = error_of(r)
    name = next(v for v in [*params.values(), *params.get("extra_headers", {}).values()]
                if isinstance(v, str) and v.startswith("os.environ/"))
    assert name in error["message"]
    r = await fetch(gw, "/v1/chat/completions", {"model": "stolen", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 400
    assert fake_openai.received == []  # nothing left the gateway
    for secret in (pg_dsn, MASTER_KEY, "salt-0123456789", "redis-secret", "gw-secret-value"):
        assert secret not in r.body.decode()


async def test_api_models_may_reference_provider_variables(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(db_yaml(pg_dsn), env={"TEAM_OPENAI_KEY": PROVIDER_KEY})
    r = await fetch(gw, "/model/new", {"model_name": "ok", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": fake_openai.base, "api_key": "os.environ/TEAM_OPENAI_KEY"}})
    assert r.code == 200, r.body
    r = await fetch(gw, "/v1/chat/completions", {"model": "ok", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 200, r.body
    assert fake_openai.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_a_stored_row_reading_a_gateway_secret_is_not_served(gateway, fetch, fake_openai, pg_dsn):
    """A row written straight into the table (an older version, a manual INSERT) is checked too."""
    import psycopg2
    from psycopg2.extras import Json
    conn = psycopg2.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO proxy_models (id, model_name, litellm_params, model_info, source) "
                    "VALUES (%s, %s, %s, %s, 'api')",
                    ("sneaky", "sneaky", Json({"model": "openai/gpt-4o-mini", "api_base": fake_openai.base,
                                                "api_key": "os.environ/LITELLM_MASTER_KEY"}), Json({"id": "sneaky"})))
    conn.close()
    gw = await gateway(db_yaml(pg_dsn))
    r = await fetch(gw, "/v1/chat/completions", {"model": "sneaky", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 400
    assert "LITELLM_MASTER_KEY" in error_of(r)["message"]
    assert fake_openai.received == []
