"""Structured logs: every record about a room or session carries ``room`` and ``session`` fields,
as ``key=value`` text or one JSON object per line, and nothing that looks like a secret gets out.

Code logs with ``extra=ids(room_id, session_id)``; the formatters add the fields when present.
Tokens never travel in URLs (fragments and headers only), so they should never reach a log in the
first place; :class:`RedactSecrets` is the second line of defence for the message text.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

FIELDS = ("room", "session", "role", "client")  # client: the real address behind a trusted proxy
# A room token (base64url payload '.' base64url HMAC) or a Bearer credential; a TURN credential as
# a Link header, JSON or the URL shorthand carry it (group 1 is what stays).
_SECRET = re.compile(
    r"(Bearer\s+)\S+|\b[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{20,}\b"
    r"|(credential\"?\s*[=:]\s*\"?)[^\"\s;,}]+|(turns?:[^:@\s/]+:)[^@\s]+(?=@)",
    re.IGNORECASE,
)


def ids(room: str | None = None, session: str | None = None, **more: Any) -> dict[str, Any]:
    """The ``extra`` of a log call about a room and a session."""
    return {k: v for k, v in {"room": room, "session": session, **more}.items() if v is not None}


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or m.group(3) or "") + "[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        text = super().format(record)
        return f"{text} {fields}" if fields else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure(*, verbose: bool, json_lines: bool) -> None:
    """Root logging for ``shelfcast serve``: one handler, secrets filtered, libraries quieted."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for noisy in ("aioice", "aiortc", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
