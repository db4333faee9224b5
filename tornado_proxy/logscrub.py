"""Secret scrubbing for every log record, Tornado's own included.

Our own log lines never carry headers or bodies, but Tornado's loggers (``tornado.general``,
``tornado.access``, ``tornado.application``) may quote what a client sent: ``Malformed HTTP
message ... Invalid header value 'Bearer sk-...'``. ``SecretFilter`` sits on the log handlers,
so every record that reaches an output passes through it, whichever logger made it.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

MASK = "***"
# Credentials by their shape: a bearer/basic token, an OpenAI-style key, a key header's value.
PATTERNS = (
    re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"]+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{4,}"),
    re.compile(r"(?i)\b(x-api-key|api-key|x-goog-api-key|x-litellm-api-key|authorization|key)(\s*[:=]\s*)[^\s'\"&,]+"),
)
MIN_SECRET = 4  # shorter configured values are not masked: they would mask ordinary words


class SecretFilter(logging.Filter):
    """Masks configured secret values (case-insensitively) and anything shaped like a credential."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        values = sorted({s for s in secrets if s and len(s) >= MIN_SECRET}, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, values)), re.IGNORECASE) if values else None

    def scrub(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(MASK, text)
        text = PATTERNS[0].sub(lambda m: m.group(1) + m.group(2) + MASK, text)
        text = PATTERNS[1].sub("sk-" + MASK, text)
        return PATTERNS[2].sub(lambda m: m.group(1) + m.group(2) + MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


def install(secrets: Iterable[str] = ()) -> SecretFilter:
    """Put one ``SecretFilter`` on every handler of the root logger, where every record of every
    logger (Tornado's included) ends up. The access log does not propagate and is left out: its
    one line per request is built from fields that hold no secrets (``BaseHandler.log_line``),
    and filtering it would cost ~45 us a request."""
    flt = SecretFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    return flt
