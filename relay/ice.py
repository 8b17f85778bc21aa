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


def default_host_addresses() -> tuple[str, ...]:
    """Non-loopback IPv4 addresses of this machine, else loopback."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return tuple(dict.fromkeys(found)) or ("127.0.0.1",)


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
