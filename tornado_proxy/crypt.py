"""Encryption at rest for provider secrets stored in PostgreSQL (``cryptography``'s Fernet:
AES-128-CBC + HMAC-SHA256, authenticated, with a timestamped token format).

The key is derived from ``LITELLM_SALT_KEY`` or, failing that, the master key, as LiteLLM does.
Stored values look like ``enc:v1:<token>`` so plain values written by older tools still load.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable, Mapping

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "enc:v1:"


class DecryptError(Exception):
    """A stored secret cannot be decrypted with the current key."""


class Cipher:
    def __init__(self, key_material: str):
        digest = hashlib.sha256(key_material.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def encrypt(self, value: str) -> str:
        return PREFIX + self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, value: str) -> str:
        if not value.startswith(PREFIX):
            return value
        try:
            return self._fernet.decrypt(value[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise DecryptError("stored secret cannot be decrypted: LITELLM_SALT_KEY (or the master key) "
                               "differs from the one it was written with") from None

    def seal(self, params: Mapping[str, Any], is_secret: Callable[[str], bool]) -> dict:
        """Encrypt every secret-named string value (already encrypted ones stay as they are)."""
        return {k: self.encrypt(v) if is_secret(k) and isinstance(v, str) and not v.startswith(PREFIX) else v
                for k, v in params.items()}

    def open(self, params: Mapping[str, Any]) -> dict:
        return {k: self.decrypt(v) if isinstance(v, str) else v for k, v in params.items()}
