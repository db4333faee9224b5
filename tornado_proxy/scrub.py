"""``Scrubber``: removes a deployment's secrets from what its provider said in an error.

A provider's error text is relayed to the client (a non-2xx body, an error event inside a
stream), and providers do echo keys: "Incorrect API key provided: sk-pro***", a proxy quoting
the request's headers, a URL with the key in its query. Each secret is searched for
case-insensitively and in the encodings it travels in: URL-encoded, JSON-escaped, and base64
(alone, or inside a longer base64 text such as the ``user:key`` of Basic auth). Pure; built once
per deployment (``Deployment.scrubber``), used only on error paths, never on normal chunks.
"""

from __future__ import annotations

import base64
import re
from typing import Iterable, Mapping
from urllib.parse import quote, quote_plus

import orjson

REDACTED = "***"
MIN_SECRET_CHARS = 6  # shorter "keys" ("none", "EMPTY") are placeholders, and scrubbing them mangles text
MIN_BASE64_CHARS = 8  # a shorter key's base64 fragments are too short to tell from other text
# extra_headers whose values are secrets (auth headers, anything named like a key or token)
SECRET_HEADER = re.compile(r"auth|key|token|secret|password|cookie|signature|credential", re.IGNORECASE)


def base64_forms(secret: bytes) -> set[str]:
    """The base64 text of ``secret`` at each of the three byte alignments it can have inside a
    longer encoded text, cut to the characters that depend on the secret's bytes alone; plus
    the URL-safe alphabet."""
    forms = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode()
        first = -(-offset * 8 // 6)                 # first character with no padding bits in it
        last = (offset + len(secret)) * 8 // 6      # one past the last such character
        core = encoded[first:last]
        forms |= {core, core.replace("+", "-").replace("/", "_")}
    return forms


def secret_forms(secret: str) -> set[str]:
    forms = {secret, quote(secret, safe=""), quote_plus(secret),
             orjson.dumps(secret).decode()[1:-1]}
    forms |= {f.replace("/", "\\/") for f in set(forms)}  # JSON that escapes the solidus
    if len(secret) >= MIN_BASE64_CHARS:
        forms |= base64_forms(secret.encode())
    return {f for f in forms if f}


class Scrubber:
    """Replaces every form of the given secrets with ``***``."""

    def __init__(self, secrets: Iterable[str]):
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_CHARS:
                forms |= secret_forms(secret)
        # longest first, so a form is never half-replaced through a shorter one it contains
        alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        self._text = re.compile(alternatives, re.IGNORECASE) if forms else None
        self._bytes = re.compile(alternatives.encode(), re.IGNORECASE) if forms else None

    @classmethod
    def of(cls, api_key: str | None, extra_headers: Mapping[str, str]) -> Scrubber:
        """A deployment's secrets: its api_key, and extra header values that look like one (an
        ``Authorization: Bearer x`` value both whole and as its credential ``x``)."""
        secrets = [api_key] if api_key else []
        for name, value in extra_headers.items():
            if isinstance(value, str) and SECRET_HEADER.search(name):
                secrets.append(value)
                secrets.append(value.rsplit(" ", 1)[-1])
        return cls(secrets)

    def __bool__(self) -> bool:
        return self._text is not None

    def text(self, text: str) -> str:
        return self._text.sub(REDACTED, text) if self._text is not None and text else text

    def bytes(self, data: bytes) -> bytes:
        return self._bytes.sub(REDACTED.encode(), data) if self._bytes is not None and data else data

    def error(self, exc):
        """A ProxyError built from a provider's words, its message and param scrubbed (in place)."""
        if self._text is not None:
            exc.message = self.text(exc.message)
            exc.args = (exc.message,)
            if isinstance(exc.param, str):
                exc.param = self.text(exc.param)
        return exc
