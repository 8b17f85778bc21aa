"""Receiver-feedback bookkeeping for a passthrough sender (pure logic: values and times in, values out).

Two gaps in what aiortc's RTCRtpSender does with a viewer's RTCP, both at their worst exactly when a
link is congested:

- **RTT**: aiortc computes it only from a receiver report that answers the *latest* sender report
  it sent. Under a queue longer than the SR interval (~1 s) every report answers an older SR, so the
  RTT stops updating, and the ABR policy never sees the queue it should react to. ``SenderReports``
  remembers the last few SRs, so any report that answers one of them gives the real RTT.
- **Lost retransmissions**: aiortc's receiver NACKs its whole missing set only when a *new* gap
  appears, and its jitter buffer waits on a hole until 512 packets have arrived behind it (tens of
  seconds at a low rung). If the single retransmission of a packet is itself dropped at the end of a
  congestion episode, nobody asks again and the viewer freezes. ``NackRepeats`` repeats each
  retransmission a few times, about an RTT apart, until a later NACK says what is still missing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SenderReports:
    """Send times of recent sender reports, by their compact NTP timestamp (the RR's ``lsr``)."""

    keep: int = 16
    _sent: OrderedDict[int, float] = field(default_factory=OrderedDict)

    def note(self, lsr: int, sent_at: float) -> None:
        """An SR with this compact NTP timestamp left at ``sent_at`` (seen again: no change)."""
        if lsr in self._sent:
            return
        self._sent[lsr] = sent_at
        while len(self._sent) > self.keep:
            self._sent.popitem(last=False)

    def rtt(self, lsr: int, dlsr: int, now: float) -> float | None:
        """RTT from a report block (``dlsr`` in 1/65536 s), or None if it answers no SR we know."""
        sent = self._sent.get(lsr) if lsr else None
        if sent is None or not dlsr:
            return None
        rtt = now - sent - dlsr / 65536
        return rtt if rtt >= 0 else 0.0


@dataclass
class NackRepeats:
    """Which retransmitted packets to send again, and when.

    ``on_nack`` after every NACK (whose packets the sender has just retransmitted): packets it lists
    are (re)scheduled; packets no longer listed are forgotten (aiortc re-lists everything still
    missing; libwebrtc re-asks by itself). ``due`` returns the packets to retransmit now.
    """

    repeats: int = 2  # extra copies per NACKed packet, at most
    min_interval_s: float = 0.05
    default_rtt_s: float = 0.1
    max_pending: int = 256
    _pending: dict[int, tuple[float, int]] = field(default_factory=dict)  # seq -> (due, copies left)

    def interval(self, rtt_s: float | None) -> float:
        return max(self.min_interval_s, 1.5 * (self.default_rtt_s if rtt_s is None else rtt_s))

    def on_nack(self, now: float, lost: Iterable[int], rtt_s: float | None) -> None:
        listed = dict.fromkeys(lost)
        for seq in [s for s in self._pending if s not in listed]:
            del self._pending[seq]
        due = now + self.interval(rtt_s)
        for seq in listed:
            self._pending.pop(seq, None)
            self._pending[seq] = (due, self.repeats)
        while len(self._pending) > self.max_pending:  # the oldest first (dicts keep insertion order)
            del self._pending[next(iter(self._pending))]

    def due(self, now: float, rtt_s: float | None) -> list[int]:
        out: list[int] = []
        for seq, (at, left) in list(self._pending.items()):
            if at > now:
                continue
            out.append(seq)
            if left <= 1:
                del self._pending[seq]
            else:  # spaced further each time: a queue that ate one copy may still be there
                self._pending[seq] = (now + 2 * self.interval(rtt_s), left - 1)
        return out

    def next_due(self) -> float | None:
        return min((at for at, _ in self._pending.values()), default=None)

    def __len__(self) -> int:
        return len(self._pending)
