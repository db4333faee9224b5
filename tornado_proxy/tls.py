"""Serving HTTPS: the ``ssl.SSLContext`` every worker's HTTP server uses, built and checked once,
before forking, from ``--ssl-certfile`` / ``--ssl-keyfile`` (LiteLLM's ``--ssl_certfile_path`` /
``--ssl_keyfile_path``, env ``SSL_CERTFILE_PATH`` / ``SSL_KEYFILE_PATH``).

Every problem is a ``TlsError`` whose message is the one line to print: a file that cannot be
read, a file that is not PEM, an encrypted key, a key that does not belong to the certificate.
"""

from __future__ import annotations

import ssl


class TlsError(Exception):
    """The HTTPS files cannot be used; the message says which and why."""


def server_context(certfile: str, keyfile: str, ciphers: str | None = None) -> ssl.SSLContext:
    """A server context with Python's modern defaults (no compression, server cipher order,
    forward-secret ciphers) and TLS 1.2 as the oldest version offered."""
    for path, what in ((certfile, "certificate file"), (keyfile, "key file")):
        read_file(path, what)
    check_certificates(certfile)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile, password=refuse_password(keyfile))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"the key in {keyfile} does not match the certificate in {certfile}") from None
        raise TlsError(f"{keyfile}: no PEM private key in it") from None
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TlsError(f"--ciphers {ciphers!r}: OpenSSL knows no cipher in this list") from None
    return context


def read_file(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def check_certificates(certfile: str) -> None:
    """The certificate file must hold at least one PEM certificate (loaded alone, as a trust
    store, so that its problems are told apart from the key's)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=certfile)
    except ssl.SSLError:
        raise TlsError(f"{certfile}: no PEM certificate in it") from None


def refuse_password(keyfile: str):
    """OpenSSL would prompt on the terminal for an encrypted key's passphrase: refuse instead."""

    def password() -> str:
        raise TlsError(f"{keyfile}: the private key is encrypted; give the gateway an unencrypted key "
                       "(readable only by its user)")

    return password
