"""crypt.py: Fernet encryption of stored provider secrets, and which litellm_params count as secrets."""

import pytest

from tornado_proxy.config import is_secret_name
from tornado_proxy.crypt import PREFIX, Cipher, DecryptError

KEY = "sk-provider-plaintext-4242"


def test_round_trip_hides_the_value():
    cipher = Cipher("salt-one")
    sealed = cipher.encrypt(KEY)
    assert sealed.startswith(PREFIX)
    assert KEY not in sealed
    assert cipher.decrypt(sealed) == KEY
    assert Cipher("salt-one").decrypt(sealed) == KEY  # same key material, another object


def test_encryption_is_not_deterministic():
    cipher = Cipher("salt-one")
    first, second = cipher.encrypt(KEY), cipher.encrypt(KEY)
    assert first != second
    assert cipher.decrypt(first) == cipher.decrypt(second) == KEY


def test_unicode_and_empty_values_round_trip():
    cipher = Cipher("salt-one")
    for value in ("", "ключ-🔑", "a" * 5000):
        assert cipher.decrypt(cipher.encrypt(value)) == value


def test_wrong_key_is_a_decrypt_error_without_the_value():
    sealed = Cipher("salt-one").encrypt(KEY)
    with pytest.raises(DecryptError) as info:
        Cipher("salt-two").decrypt(sealed)
    assert "LITELLM_SALT_KEY" in str(info.value)
    assert sealed not in str(info.value) and KEY not in str(info.value)


@pytest.mark.parametrize("broken", [PREFIX, PREFIX + "not-a-token", PREFIX + "gAAAAA" + "x" * 60])
def test_corrupt_tokens_are_decrypt_errors(broken):
    with pytest.raises(DecryptError):
        Cipher("salt-one").decrypt(broken)


def test_tampered_token_is_rejected():
    cipher = Cipher("salt-one")
    sealed = cipher.encrypt(KEY)
    body = sealed[len(PREFIX):]
    flipped = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
    with pytest.raises(DecryptError):
        cipher.decrypt(PREFIX + flipped)


@pytest.mark.parametrize("plain", ["sk-plain-from-an-old-tool", "", "os.environ/OPENAI_API_KEY", "enc:v2:whatever"])
def test_plain_values_pass_through(plain):
    assert Cipher("salt-one").decrypt(plain) == plain


def test_seal_encrypts_secrets_at_any_depth_and_open_reverses_it():
    cipher = Cipher("salt-one")
    params = {"model": "openai/gpt-4o", "api_key": KEY, "api_base": "http://x/v1", "max_tokens": 10,
              "aws_secret_access_key": "aws-secret", "vertex_credentials": {"type": "service_account"},
              "rpm": 5, "api_version": None}
    sealed = cipher.seal(params, is_secret_name)
    assert sealed["api_key"].startswith(PREFIX) and KEY not in sealed["api_key"]
    assert sealed["aws_secret_access_key"].startswith(PREFIX)
    # a secret that is not a string is stored as encrypted JSON
    assert sealed["vertex_credentials"].startswith("enc:j1:") and "service_account" not in sealed["vertex_credentials"]
    # non-secret names are kept as they are
    for name in ("model", "api_base", "max_tokens", "rpm", "api_version"):
        assert sealed[name] == params[name]
    assert cipher.open(sealed) == params
    assert params["api_key"] == KEY  # the input is not modified


def test_nested_secrets_are_sealed_and_masked():
    from tornado_proxy.modelstore import mask

    cipher = Cipher("salt-one")
    params = {"model": "openai/x", "extra_headers": {"Authorization": f"Bearer {KEY}", "X-Title": "t"}}
    sealed = cipher.seal(params, is_secret_name)
    assert KEY not in str(sealed) and sealed["extra_headers"]["X-Title"] == "t"
    assert cipher.open(sealed) == params
    assert mask(params) == {"model": "openai/x", "extra_headers": {"Authorization": "***", "X-Title": "t"}}


def test_seal_leaves_already_sealed_values_alone():
    cipher = Cipher("salt-one")
    once = cipher.seal({"api_key": KEY}, is_secret_name)
    assert cipher.seal(once, is_secret_name) == once


def test_open_with_a_wrong_key_raises():
    sealed = Cipher("salt-one").seal({"api_key": KEY, "model": "openai/x"}, is_secret_name)
    with pytest.raises(DecryptError):
        Cipher("salt-two").open(sealed)


@pytest.mark.parametrize("name", ["api_key", "API_KEY", "key", "aws_secret_access_key", "aws_session_token",
                                  "azure_ad_token", "vertex_credentials", "password", "client_secret",
                                  "hf_token"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "max_tokens", "max_completion_tokens", "model", "api_base", "api_version", "rpm", "tpm", "timeout",
    "temperature", "weight", "order", "stream_timeout", "custom_llm_provider", "region_name",
    "input_cost_per_token", "output_cost_per_token",
])
def test_not_secret_names(name):
    assert not is_secret_name(name)
