"""ICE set-up for server-side peer connections.

aiortc adds a public STUN server when no ``iceServers`` are given, which costs join time on a closed
network; we always pass an explicit list. aioice gathers host candidates from every non-loopback
interface and has no per-connection setting for that, so the announced host addresses are applied
per connection by replacing its gathering step (no process-wide patching).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

import ifaddr
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

from .aiortc_private import gather_only, ice_connection


def default_host_addresses(ipv6: bool = False) -> tuple[str, ...]:
    """Non-loopback IPv4 addresses of this machine, else loopback. ``ipv6``: its IPv6 addresses
    other hosts can reach instead (not loopback, not link-local, which needs a zone to be used)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ipv6 and isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
            elif ipv6 and isinstance(ip.ip, tuple):
                address = ipaddress.ip_address(ip.ip[0])
                if not (address.is_loopback or address.is_link_local):
                    found.append(str(address))
    return tuple(dict.fromkeys(found)) or (("::1",) if ipv6 else ("127.0.0.1",))


def rtc_configuration(ice_servers: Iterable[str] = ()) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers])


def announce_host_addresses(pc: RTCPeerConnection, addresses: tuple[str, ...]) -> None:
    """Make every ICE transport of ``pc`` gather exactly ``addresses``.

    Call after setRemoteDescription (which creates the transports) and before
    setLocalDescription (which gathers).
    """
    transports = [t.sender.transport for t in pc.getTransceivers() if t.sender.transport]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        ice = getattr(dtls, "transport", None)  # absent on a rejected or half-built m-line
        if ice is not None:
            gather_only(ice_connection(ice), addresses)
