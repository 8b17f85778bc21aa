"""Who the client is, behind a reverse proxy (nginx with TLS in front of shelfcast).

The proxy's TCP connection is all the server sees, so rate limits and logs would key every
person on the proxy's address. ``X-Forwarded-For`` (and ``-Proto``, ``-Host``) say who it was
for, but anybody can send those headers: they are believed only from a TCP peer listed in
``--trusted-proxy``, and in ``X-Forwarded-For`` only as far as a chain of trusted proxies vouches
for them. This module is the one place that decides; the middleware hands every handler a request
whose ``remote``, ``scheme`` and ``host`` are the client's.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from multidict import CIMultiDictProxy

from .config import ProxyNetwork
from .keys import CONFIG

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# On the request the connection made (the one aiohttp's access log gets), not only on its clone.
CLIENT = web.RequestKey("client", str)
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")


@dataclass(frozen=True)
class Origin:
    """Whom a request is for: client address, scheme and Host as that client used them."""

    remote: str
    scheme: str
    host: str


def _address(text: str) -> IpAddress | None:
    """One X-Forwarded-For entry: ``1.2.3.4``, ``1.2.3.4:5678``, ``::1``, ``[::1]:80``; else None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port (IPv6 has at least two colons)
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's ::ffff:10.0.0.1 is the proxy's 10.0.0.1
    return address


def _trusted(address: IpAddress, trusted: Sequence[ProxyNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_of(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[ProxyNetwork]) -> str | None:
    """The client's address: ``peer`` (the TCP peer) unless it is a trusted proxy; then, walking
    ``X-Forwarded-For`` from the right (each hop appends the address it was connected from), the
    first address that is not a trusted proxy. What is left of that was written by the client
    itself and proves nothing. An entry that is not an address ends the walk at the last hop that
    was vouched for (a trusted proxy does not write garbage; a client might)."""
    address = _address(peer) if peer else None
    if address is None or not _trusted(address, trusted):
        return peer
    hops = [h for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            break
        address = found
        if not _trusted(found, trusted):
            break
    return str(address)


def _last(values: Sequence[str]) -> str | None:
    """The nearest proxy's value of a header each proxy sets (right-most, across repeats)."""
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return items[-1] if items else None


def origin_of(peer: str | None, scheme: str, host: str, headers: CIMultiDictProxy[str],
              trusted: Sequence[ProxyNetwork]) -> Origin:
    """Everything a request says about its client, believing the X-Forwarded-* headers only from a
    trusted proxy. Malformed values are ignored (the connection's own value stays)."""
    address = _address(peer) if peer else None
    if address is None or not _trusted(address, trusted):
        return Origin(peer or "unknown", scheme, host)
    remote = client_of(peer, headers.getall("X-Forwarded-For", []), trusted) or "unknown"
    proto = (_last(headers.getall("X-Forwarded-Proto", [])) or "").lower()
    forwarded_host = _last(headers.getall("X-Forwarded-Host", []))
    return Origin(
        remote,
        proto if proto in ("http", "https") else scheme,
        forwarded_host if forwarded_host and _HOST.match(forwarded_host) else host,
    )


@web.middleware
async def forwarded_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """First middleware: later ones and every handler see the client's address, scheme and host."""
    trusted = request.app[CONFIG].trusted_proxies
    origin = origin_of(request.remote, request.scheme, request.host, request.headers, trusted)
    request[CLIENT] = origin.remote
    if not trusted or origin == Origin(request.remote or "unknown", request.scheme, request.host):
        return await handler(request)
    return await handler(request.clone(remote=origin.remote, scheme=origin.scheme, host=origin.host))


def client_address(request: web.BaseRequest) -> str:
    """The client of ``request`` (after the middleware: its real address behind a trusted proxy)."""
    return request.get(CLIENT) or request.remote or "unknown"


class ClientAccessLogger(AbstractAccessLogger):
    """aiohttp's access log, naming the client rather than the proxy (aiohttp logs the request the
    connection made, which the middleware cannot replace)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %d %s %.3fs', client_address(request), request.method, request.path,
                         response.status, response.body_length, time)
