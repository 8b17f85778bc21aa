"""Keys and signed room tokens.

Room tokens are ``base64url(payload).base64url(hmac_sha256(payload))`` with payload
``{"r": room, "o": role, "e": expiry}``: stateless, expiring, checked in constant time. The signing
secret lives in the data dir so tokens survive a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .errors import ApiError

# "relay": another node of the cluster pulling a room from its origin (issued by nodes, never by the API).
ROLES = ("host", "seller", "buyer", "viewer", "assistant", "relay")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenClaims:
    room: str
    role: str
    expires_at: float


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> "TokenSigner":
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "token-secret"
        if not path.exists():
            path.write_bytes(secrets.token_bytes(32))
            path.chmod(0o600)
        return cls(path.read_bytes())

    def rekey(self, secret: bytes) -> None:
        """Use the cluster's shared secret (before serving anything)."""
        self._secret = secret

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def issue(self, room: str, role: str, expires_at: float) -> str:
        payload = json.dumps({"r": room, "o": role, "e": int(expires_at)}, separators=(",", ":"))
        raw = payload.encode()
        return f"{_b64(raw)}.{_b64(self._sign(raw))}"

    def verify(self, token: str, now: float) -> TokenClaims | None:
        """Claims of a valid, unexpired token; None for anything else (never raises)."""
        try:
            payload_part, sig_part = token.split(".")
            raw = _unb64(payload_part)
            sig = _unb64(sig_part)
        except (ValueError, UnicodeError):
            return None
        if not hmac.compare_digest(sig, self._sign(raw)):
            return None
        try:
            data = json.loads(raw)
            claims = TokenClaims(str(data["r"]), str(data["o"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if claims.expires_at < now:
            return None
        return claims


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def keys_match(given: str | None, expected: str) -> bool:
    return given is not None and bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def require_admin(request: web.Request, admin_key: str) -> None:
    """Admin API key in ``Authorization: Bearer`` (or ``X-Api-Key``)."""
    given = bearer_token(request) or request.headers.get("X-Api-Key")
    if given is None:
        raise ApiError(401, "unauthorized", "admin API key required", headers={"WWW-Authenticate": "Bearer"})
    if not keys_match(given, admin_key):
        raise ApiError(403, "forbidden", "invalid admin API key")


def require_feed(request: web.Request, admin_key: str, feed_key: str) -> None:
    """Admin key or the stock-feed key (which can do nothing else)."""
    given = bearer_token(request) or request.headers.get("X-Api-Key")
    if given is None:
        raise ApiError(401, "unauthorized", "API key required", headers={"WWW-Authenticate": "Bearer"})
    if not (keys_match(given, admin_key) or keys_match(given, feed_key)):
        raise ApiError(403, "forbidden", "invalid API key")


def require_claims(request: web.Request, signer: TokenSigner, why: str) -> TokenClaims:
    """The claims of the request's Bearer room token; 401 (with ``why``) when missing or invalid."""
    return verify_token(bearer_token(request), signer, why)


def verify_token(token: str | None, signer: TokenSigner, why: str) -> TokenClaims:
    """Claims of a room token however it arrived (header, first WebSocket message); 401 otherwise."""
    if token is None:
        raise ApiError(401, "unauthorized", why, headers={"WWW-Authenticate": "Bearer"})
    claims = signer.verify(token, time.time())
    if claims is None:
        raise ApiError(401, "invalid_token", "the token is invalid or expired", headers={"WWW-Authenticate": "Bearer"})
    return claims
