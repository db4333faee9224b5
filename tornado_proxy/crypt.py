"""Encryption at rest for provider secrets stored in PostgreSQL (``cryptography``'s Fernet:
AES-128-CBC + HMAC-SHA256, authenticated, with a timestamped token format).

The key is derived from ``LITELLM_SALT_KEY`` or, failing that, the master key, as LiteLLM does.
Stored values look like ``enc:v1:<token>`` so plain values written by older tools still load.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable, Mapping

import orjson

PREFIX = "enc:v1:"
JSON_PREFIX = "enc:j1:"  # an encrypted JSON value (a secret that is not a string)


class DecryptError(Exception):
    """A stored secret cannot be decrypted with the current key."""


class Cipher:
    def __init__(self, key_material: str):
        # Imported here: cryptography (~8 MB resident) is loaded only by processes that store
        # models in the database.
        from cryptography.fernet import Fernet, InvalidToken

        digest = hashlib.sha256(key_material.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))
        self._invalid_token = InvalidToken

    def encrypt(self, value: str) -> str:
        return PREFIX + self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, value: str) -> str:
        if not value.startswith(PREFIX):
            return value
        try:
            return self._fernet.decrypt(value[len(PREFIX):].encode()).decode()
        except self._invalid_token:
            raise DecryptError("stored secret cannot be decrypted: LITELLM_SALT_KEY (or the master key) "
                               "differs from the one it was written with") from None

    def seal(self, params: Mapping[str, Any], is_secret: Callable[[str], bool]) -> dict:
        """Encrypt every secret-named value, at any depth (``extra_headers.Authorization``).
        Non-string secrets (a credentials object) are stored as encrypted JSON."""
        out = {}
        for k, v in params.items():
            if is_secret(k) and v is not None and not (isinstance(v, str) and v.startswith((PREFIX, JSON_PREFIX))):
                out[k] = self.encrypt(v) if isinstance(v, str) else JSON_PREFIX + self._token(orjson.dumps(v))
            elif isinstance(v, dict):
                out[k] = self.seal(v, is_secret)
            else:
                out[k] = v
        return out

    def open(self, params: Mapping[str, Any]) -> dict:
        out = {}
        for k, v in params.items():
            if isinstance(v, str) and v.startswith(JSON_PREFIX):
                out[k] = orjson.loads(self._plain(v[len(JSON_PREFIX):]))
            elif isinstance(v, str):
                out[k] = self.decrypt(v)
            elif isinstance(v, dict):
                out[k] = self.open(v)
            else:
                out[k] = v
        return out

    def reseal(self, params: Mapping[str, Any], new: Cipher) -> dict:
        """Every encrypted value (at any depth) decrypted with this key and encrypted with ``new``;
        plain values are kept as they are. DecryptError when one does not open with this key."""
        out = {}
        for k, v in params.items():
            if isinstance(v, str) and v.startswith(JSON_PREFIX):
                out[k] = JSON_PREFIX + new._token(self._plain(v[len(JSON_PREFIX):]))
            elif isinstance(v, str) and v.startswith(PREFIX):
                out[k] = new.encrypt(self.decrypt(v))
            elif isinstance(v, dict):
                out[k] = self.reseal(v, new)
            else:
                out[k] = v
        return out

    def _token(self, data: bytes) -> str:
        return self._fernet.encrypt(data).decode()

    def _plain(self, token: str) -> bytes:
        try:
            return self._fernet.decrypt(token.encode())
        except self._invalid_token:
            raise DecryptError("stored secret cannot be decrypted: LITELLM_SALT_KEY (or the master key) "
                               "differs from the one it was written with") from None


def sealed_count(params: Mapping[str, Any]) -> int:
    """How many encrypted values ``params`` holds, at any depth."""
    return sum(sealed_count(v) if isinstance(v, dict) else isinstance(v, str) and v.startswith((PREFIX, JSON_PREFIX))
               for v in params.values())
