"""HTTPS for ``shelfcast serve``: browsers give a page the camera only in a secure context, so a
seller on a cloud machine needs it. One ``ssl.SSLContext`` from a PEM certificate chain and key
(what Let's Encrypt writes: ``fullchain.pem`` and ``privkey.pem``); every problem with them is a
``TlsError`` whose message names the file and what is wrong, for the CLI to print before it starts.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsError(ValueError):
    """The certificate or key cannot be used; the message says which and why."""


def _readable(path: Path, what: str, marker: bytes, expected: str) -> None:
    # Open it ourselves first: OpenSSL's errors do not say which of the two files it could not read.
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise TlsError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if marker not in head:
        found = "a PEM file of another kind" if b"-----BEGIN " in head else "not PEM"
        raise TlsError(f"the TLS {what} {path} is {found} (expected {expected})")


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, which a service never answers.
    raise TlsError("encrypted")


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with ``cert`` (leaf first, then intermediates) and its private ``key``."""
    _readable(cert, "certificate", b"-----BEGIN CERTIFICATE-----", "a '-----BEGIN CERTIFICATE-----' block")
    # PKCS#8 or the older "RSA"/"EC" forms all end their header so.
    _readable(key, "key", b"PRIVATE KEY-----", "a '-----BEGIN PRIVATE KEY-----' block")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load(context, cert, key)
    return context


def load(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """(Re)load the pair into ``context``: later handshakes use it (a renewed certificate without a
    restart; connections already open keep theirs)."""
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except TlsError:
        raise TlsError(f"the TLS key {key} is encrypted with a passphrase; give the server an unencrypted "
                       "key file (readable only by its user)") from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"the TLS key {key} does not belong to the certificate {cert}") from None
        raise TlsError(f"cannot use the TLS certificate {cert} with the key {key}: {reason}") from None
    except OSError as exc:
        raise TlsError(f"cannot read the TLS certificate {cert} or key {key}: {exc.strerror or exc}") from None
