"""Structured logs: room and session ids on every record about them; no token or key in any log."""

from __future__ import annotations

import json
import logging

import pytest

from relay.client import WhipError, whep_play, whip_publish
from relay.synthetic import PatternTrack
from signaling.logs import JsonFormatter, KeyValueFormatter, RedactSecrets, ids, redact

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, until
from .test_private_rooms import first_event

TOKEN = "eyJyIjoicm9vbSIsInJvbGUiOiJob3N0In0.c2lnbmF0dXJlLWJ5dGVzLWhlcmUtYWJj"


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"token {TOKEN} seen", "token [redacted] seen"),
        ("Authorization: Bearer s3cret-key", "Authorization: Bearer [redacted]"),
        ("viewer joined room abc.def", "viewer joined room abc.def"),  # short dotted ids stay
        ("rung 720p -> 360p (loss 0.12)", "rung 720p -> 360p (loss 0.12)"),
        ('Link: <turn:h:3478>; rel="ice-server"; username="1:x"; credential="ab+c/d="; credential-type="password"',
         'Link: <turn:h:3478>; rel="ice-server"; username="1:x"; credential="[redacted]"; credential-type="password"'),
        ('{"urls": ["turn:h"], "credential": "ab+c/d="}', '{"urls": ["turn:h"], "credential": "[redacted]"}'),
        ("bad entry turn:alice:pa:ss@h:3478", "bad entry turn:alice:[redacted]@h:3478"),
        ("stun:h:3478 and turn:h:3478?transport=udp", "stun:h:3478 and turn:h:3478?transport=udp"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("shelfcast.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_formatters_carry_room_and_session() -> None:
    record = _record("viewer joined", **ids("r1", "s1", role="viewer"))
    assert KeyValueFormatter().format(record).endswith("shelfcast.test: viewer joined room=r1 session=s1 role=viewer")
    entry = json.loads(JsonFormatter().format(record))
    assert {k: entry[k] for k in ("level", "logger", "msg", "room", "session", "role")} == {
        "level": "info", "logger": "shelfcast.test", "msg": "viewer joined", "room": "r1", "session": "s1", "role": "viewer",
    }
    leaky = _record("got %s", TOKEN)
    RedactSecrets().filter(leaky)
    assert json.loads(JsonFormatter().format(leaky))["msg"] == "got [redacted]"


async def test_no_secret_reaches_any_log_record(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything: ours, aiohttp's access log, aiortc, aioice
    show = await server.create_room(access="token")
    call = await server.create_room(mode="call")
    pub = await whip_publish(server.http, show["links"]["whip"], show["tokens"]["host"], [PatternTrack(160, 90)])
    collector = FrameCollector()
    viewer = await whep_play(server.http, show["links"]["whep"], token=show["tokens"]["viewer"], on_track=collector.on_track, kinds=("video",))
    try:
        await collector.wait_for("video", 3)
        with pytest.raises(WhipError):
            await whep_play(server.http, call["links"]["whep"], token=show["tokens"]["viewer"])
        await first_event(server, call["id"], {"type": "auth", "token": call["tokens"]["buyer"]})
        async with server.http.get(f"{server.base}/api/rooms", headers={"Authorization": "Bearer wrong-admin-key-attempt"}) as resp:
            assert resp.status == 403
        await viewer.close()
        await until(lambda: not server.rooms.get(show["id"]).viewers, 5)
    finally:
        await collector.stop()
        await pub.close()

    secrets = [ADMIN_KEY, "wrong-admin-key-attempt", *show["tokens"].values(), *call["tokens"].values()]
    for record in caplog.records:
        text = record.getMessage() + json.dumps({k: str(v) for k, v in record.__dict__.items()})
        assert not [s for s in secrets if s in text], f"secret in log record {record.name}: {record.getMessage()[:200]}"
    joined = [r for r in caplog.records if r.getMessage() == "viewer joined"]
    assert [(r.room, r.session) for r in joined] == [(show["id"], viewer.location.rsplit("/", 1)[-1])]  # type: ignore[attr-defined]
    left = [r for r in caplog.records if r.getMessage() == "viewer left"]
    assert [r.room for r in left] == [show["id"]]  # type: ignore[attr-defined]
