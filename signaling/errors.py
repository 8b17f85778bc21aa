"""Typed API errors and the middleware that renders them as the JSON error contract.

Every caller mistake becomes ``{"error": {"code", "message", ...}}`` with a 4xx status; nothing a
client sends may surface as a 500 or a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from relay.errors import ShelfcastError

log = logging.getLogger("shelfcast.http")
ERROR_CODE = web.ResponseKey("error_code", str)


class ApiError(ShelfcastError):
    """A refusal decided by the HTTP layer itself (auth, limits, routing, body format)."""


def room_not_found(room_id: str) -> ApiError:
    return ApiError(404, "room_not_found", f"no live room {room_id!r}")


def error_response(err: ShelfcastError) -> web.Response:
    response = web.json_response(err.to_body(), status=err.status, headers=err.headers)
    response[ERROR_CODE] = err.code  # for the rejected-requests metric, without re-parsing the body
    return response


# aiohttp raises its own HTTPException for routing problems; map them onto the same contract.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ShelfcastError as err:  # every layer's refusals, rendered the same way
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(ApiError(exc.status, code, exc.reason, headers=_keep_headers(exc)))
    except Exception:  # our bug, not the caller's: log it, answer in the contract, never a traceback
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal", "internal server error"))


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}


async def read_json(request: web.Request, *, max_bytes: int = 1 << 20) -> Any:
    """Parse a JSON body or raise a 4xx ApiError (size, content type, syntax)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "payload_too_large", f"body larger than {max_bytes} bytes")
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(413, "payload_too_large", f"body larger than {max_bytes} bytes")
    if not raw.strip():
        raise ApiError(400, "bad_json", "request body is empty; expected JSON")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from None
