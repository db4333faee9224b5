"""``auth.presented_key`` / ``authenticate`` / ``authorize``: pure, no server."""

from __future__ import annotations

import pytest
from tornado.httputil import HTTPHeaders

from tornado_proxy import auth
from tornado_proxy.auth import ANONYMOUS, MASTER, authenticate, authorize, presented_key
from tornado_proxy.config import Secret
from tornado_proxy.errors import AuthenticationError, PermissionDeniedError

KEY = "sk-master-unit-0123456789"
OTHER = "sk-someone-else-424242"


def headers(**pairs) -> HTTPHeaders:
    """Real (case-insensitive) request headers; ``x_api_key=`` -> ``x-api-key``. (A plain dict
    stands in where a value ends in whitespace, which Tornado's parser would have stripped.)"""
    h = HTTPHeaders()
    for name, value in pairs.items():
        h.add(name.replace("_", "-"), value)
    return h


@pytest.mark.parametrize("given, expected", [
    (headers(Authorization=f"Bearer {KEY}"), KEY),
    (headers(authorization=f"Bearer {KEY}"), KEY),
    (headers(Authorization=f"Bearer   {KEY}"), KEY),
    (headers(x_api_key=KEY), KEY),
    ({"x-api-key": f" {KEY} "}, KEY),
    (headers(x_litellm_api_key=f"Bearer {KEY}"), KEY),
    (headers(x_litellm_api_key=KEY), KEY),
    (headers(api_key=KEY), KEY),
    ({"Authorization": "Bearer "}, ""),
    ({"Authorization": "Bearer \t "}, ""),
    (headers(x_api_key=""), ""),
    (headers(), None),
    (headers(Cookie=f"token={KEY}", X_Forwarded_For="10.0.0.1"), None),
], ids=["bearer", "bearer-lower-name", "bearer-padded", "x-api-key", "x-api-key-padded",
        "x-litellm-bearer", "x-litellm-plain", "api-key", "bearer-empty", "bearer-blank", "x-api-key-empty", "none",
        "unrelated-headers"])
def test_presented_key(given, expected):
    assert presented_key(given) == expected


@pytest.mark.parametrize("value", [KEY, f"Basic {KEY}", f"bearer{KEY}", f"Token {KEY}", "Bearer"])
def test_authorization_without_bearer_prefix_is_malformed(value):
    with pytest.raises(AuthenticationError) as caught:
        presented_key(headers(Authorization=value))
    assert caught.value.message == auth.MALFORMED
    assert caught.value.status == 401 and caught.value.type == "auth_error"
    assert KEY not in caught.value.message


def test_x_litellm_api_key_wins_over_authorization():
    """LiteLLM's order: the custom header first (clients whose SDK owns ``Authorization``)."""
    h = headers(x_litellm_api_key=f"Bearer {KEY}", Authorization=f"Bearer {OTHER}")
    assert presented_key(h) == KEY
    h = headers(x_litellm_api_key=f"Bearer {KEY}", Authorization="not-bearer")
    assert presented_key(h) == KEY


def test_authorization_wins_over_x_api_key():
    assert presented_key(headers(Authorization=f"Bearer {KEY}", x_api_key=OTHER)) == KEY


MASTER_SECRET = Secret(KEY)


@pytest.mark.parametrize("level", ["key", "master"])
@pytest.mark.parametrize("given", [
    headers(Authorization=f"Bearer {KEY}"), headers(x_api_key=KEY),
    headers(x_litellm_api_key=f"Bearer {KEY}"), headers(api_key=KEY),
], ids=["bearer", "x-api-key", "x-litellm-api-key", "api-key"])
def test_master_key_authenticates(given, level):
    principal = authenticate(given, level, MASTER_SECRET)
    assert principal == MASTER and principal.is_admin
    authorize(principal, level)


@pytest.mark.parametrize("given, message", [
    (headers(), auth.MISSING),
    ({"Authorization": "Bearer "}, auth.MISSING),
    (headers(x_api_key=""), auth.MISSING),
    (headers(Authorization=KEY), auth.MALFORMED),
    (headers(Authorization=f"Bearer {OTHER}"), auth.INVALID),
    (headers(x_api_key=OTHER), auth.INVALID),
    (headers(Authorization=f"Bearer {KEY[:-1]}"), auth.INVALID),
    (headers(Authorization=f"Bearer {KEY}0"), auth.INVALID),
    (headers(Authorization=f"Bearer {KEY.upper()}"), auth.INVALID),
    (headers(Authorization="Bearer sk-m\u00e4ster"), auth.INVALID),
], ids=["missing", "bearer-empty", "x-api-key-empty", "no-bearer", "wrong", "wrong-x-api-key", "prefix",
        "suffix", "upper-case", "non-ascii"])
@pytest.mark.parametrize("level", ["key", "master"])
def test_bad_or_missing_key_is_401(given, message, level):
    with pytest.raises(AuthenticationError) as caught:
        authenticate(given, level, MASTER_SECRET)
    error = caught.value
    assert error.message == message
    assert error.to_body()["error"]["type"] == "auth_error"
    assert error.to_body()["error"]["code"] == "401"
    assert OTHER not in str(error.to_body()) and KEY not in str(error.to_body())


@pytest.mark.parametrize("given", [headers(), headers(Authorization=f"Bearer {OTHER}"), headers(Authorization="x")])
def test_public_routes_need_no_key(given):
    assert authenticate(given, "none", MASTER_SECRET) is None
    authorize(None, "none")


@pytest.mark.parametrize("master_key", [None, Secret("")], ids=["none", "empty"])
@pytest.mark.parametrize("given", [headers(), headers(Authorization=f"Bearer {OTHER}"), headers(Authorization="x")])
def test_no_master_key_means_anonymous_admin(given, master_key):
    principal = authenticate(given, "key", master_key)
    assert principal == ANONYMOUS and principal.is_admin
    authorize(principal, "master")


def test_master_level_refuses_no_principal():
    with pytest.raises(PermissionDeniedError) as caught:
        authorize(None, "master")
    assert caught.value.status == 403
    authorize(None, "key")
