"""A packet the host never manages to deliver (its retransmission lost too) does not freeze the room:
the ingest skips the hole after a short wait, asks the host for a keyframe and goes on from there."""

from __future__ import annotations

from typing import Any

from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket

from relay.client import whip_publish
from relay.synthetic import PatternTrack

from .conftest import RunningServer, until


async def test_a_hole_never_filled_costs_half_a_second_not_512_packets(server: RunningServer) -> None:
    room = await server.create_room(title="lossy host")
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    await pub.wait_connected()
    sender = next(t.sender for t in pub.pc.getTransceivers() if t.kind == "video")
    transport = sender.transport
    send_rtp = transport._send_rtp
    state: dict[str, Any] = {"drop": False, "dropped": None, "sent_after": 0}

    async def lossy_send(data: bytes) -> None:
        is_video = int.from_bytes(data[8:12], "big") == sender._ssrc
        if is_video and state["dropped"] is not None:
            state["sent_after"] += 1
        if is_video and state["drop"] and state["dropped"] is None:
            state["dropped"] = int.from_bytes(data[2:4], "big")  # gone for good
            return
        await send_rtp(data)

    async def never_retransmit(sequence_number: int) -> None:
        pass

    handle_rtcp = sender._handle_rtcp_packet
    plis = []

    async def count_plis(packet: object) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
            plis.append(state["dropped"])
        await handle_rtcp(packet)

    sender._handle_rtcp_packet = count_plis  # type: ignore[method-assign]
    transport._send_rtp = lossy_send  # type: ignore[method-assign]
    sender._retransmit = never_retransmit  # type: ignore[method-assign]
    try:
        live = server.rooms.get(room["id"])
        await until(lambda: live.publisher is not None and live.publisher.frames_received >= 20)
        host = live.publisher
        assert host is not None and host.jitter is not None and host.jitter.gaps_skipped == 0
        state["drop"] = True
        await until(lambda: state["dropped"] is not None)
        await until(lambda: host.jitter.gaps_skipped == 1, timeout=10)
        received = host.frames_received
        await until(lambda: host.frames_received >= received + 15, timeout=10)
        # Going on took the give-up wait plus a keyframe, not the 512 packets aiortc's buffer would
        # wait for (about 10 s of this stream): ~30 packets a second here, so well under 200.
        assert state["sent_after"] < 200, state
        assert host.jitter.gaps_skipped == 1
        assert any(seq is not None for seq in plis)  # the server asked the host for a keyframe
    finally:
        await pub.close()
