// Shared browser helpers: WHIP/WHEP negotiation and the room event stream. No build step.
"use strict";

const shelfcast = (() => {
  // No trickle: the offer goes out with the candidates gathered so far. Waiting for "complete" costs
  // ~200 ms (every interface, mDNS registration); one host candidate per media line is enough, and the
  // server learns anything else from our connectivity checks (peer-reflexive candidates).
  function waitFirstCandidates(pc, timeoutMs = 300) {
    const ready = () => pc.iceGatheringState === "complete" || (pc.localDescription && pc.localDescription.sdp.includes("a=candidate:"));
    if (ready()) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        pc.removeEventListener("icecandidate", check); pc.removeEventListener("icegatheringstatechange", check);
        clearTimeout(timer); resolve();
      };
      const check = () => { if (ready()) done(); };
      const timer = setTimeout(done, timeoutMs);
      pc.addEventListener("icecandidate", check);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  class HttpError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  // The nodes of this deployment (one, unless several share a Redis). When the node a page talks
  // to stops answering, the page carries on through the next one: negotiate() and the event
  // channel use whichever node answered last.
  const nodes = { list: [location.origin], current: 0 };
  const base = () => nodes.list[nodes.current] || location.origin;
  async function refreshNodes() {
    try {
      const resp = await fetch(base() + "/api/nodes");
      const urls = (await resp.json()).nodes.map((n) => n.url).filter(Boolean);
      const here = base();
      nodes.list = [here, ...urls.filter((u) => u !== here)];
      nodes.current = 0;
    } catch (_) { /* keep what we know */ }
  }
  refreshNodes();
  setInterval(refreshNodes, 30000);

  // Send a complete offer (no trickle) and apply the answer; returns the session URL.
  // ``url`` is a path ("/whep/room"): it goes to the current node, then the others if it is down.
  async function negotiate(pc, url, token) {
    performance.mark("shelfcast:negotiate");
    await pc.setLocalDescription(await pc.createOffer());
    performance.mark("shelfcast:offer");
    // Relay only: the first candidate is the TURN allocation, a round trip to the TURN server away.
    await waitFirstCandidates(pc, pc.getConfiguration().iceTransportPolicy === "relay" ? 3000 : 300);
    performance.mark("shelfcast:candidates");
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = "Bearer " + token;
    let resp;
    for (let tried = 0; ; tried++) {
      try {
        url = new URL(url, base() + "/").toString();
        resp = await fetch(url, { method: "POST", headers, body: pc.localDescription.sdp });
        // A node that is full (503) may not be the only one: try the next while there is one.
        if (resp.status !== 503 || tried + 1 >= nodes.list.length) break;
      } catch (e) {  // the node is unreachable: the next one
        if (tried + 1 >= nodes.list.length) throw e;
      }
      nodes.current = (nodes.current + 1) % nodes.list.length;
      url = new URL(url).pathname + new URL(url).search;
    }
    const text = await resp.text();
    if (resp.status !== 201) {
      let code = "http_" + resp.status, message = text;
      try { const e = JSON.parse(text).error; code = e.code; message = e.message; } catch (_) { /* not JSON */ }
      throw new HttpError(resp.status, code, message);
    }
    await pc.setRemoteDescription({ type: "answer", sdp: text });
    return new URL(resp.headers.get("Location"), new URL(url, location.href)).toString();
  }

  async function endSession(location) {
    if (!location) return;
    try { await fetch(location, { method: "DELETE" }); } catch (_) { /* server gone: nothing to end */ }
  }

  // Room events over a WebSocket that reconnects by itself.
  // A private room (a call, a token-only show) wants the page's token as the first message.
  function roomEvents(roomId, onEvent, onStatus, token) {
    let ws, closed = false, delay = 500, hello = null;
    const open = () => {
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      ws = new WebSocket(`${proto}//${new URL(base()).host}/api/rooms/${encodeURIComponent(roomId)}/events`);
      ws.onopen = () => {
        delay = 500;
        if (token) ws.send(JSON.stringify({ type: "auth", token }));
        if (hello) ws.send(hello);
        onStatus && onStatus(true);
      };
      ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { console.warn(e); } };
      ws.onclose = () => {
        onStatus && onStatus(false);
        if (delay >= 2000 && nodes.list.length > 1) nodes.current = (nodes.current + 1) % nodes.list.length;
        if (!closed) { setTimeout(open, delay); delay = Math.min(delay * 2, 8000); }
      };
    };
    open();
    // identify({type: "viewer", session}): this page's own events (its invitations) reach it, also after a reconnect.
    return {
      close() { closed = true; ws && ws.close(); },
      identify(msg) { hello = JSON.stringify(msg); if (ws && ws.readyState === WebSocket.OPEN) ws.send(hello); },
    };
  }

  // The server always sends something (RTCP reports, consent checks, media or the slate): when the
  // bytes coming in on a connection stop for ``ms``, the node behind it is gone. Browsers take ~5 s
  // to call that "disconnected"; this notices in ~2.5 s. Calls onSilent once; returns a stop function.
  function watchSilence(pc, onSilent, ms = 2500) {
    let last = -1, since = performance.now(), done = false;
    const timer = setInterval(async () => {
      if (done || pc.connectionState === "closed") { clearInterval(timer); return; }
      let received = 0;
      try {
        (await pc.getStats()).forEach((s) => { if (s.type === "transport") received += s.bytesReceived || 0; });
      } catch (_) { return; }
      if (received !== last) { last = received; since = performance.now(); return; }
      if (pc.connectionState === "connected" && performance.now() - since > ms) {
        done = true; clearInterval(timer); onSilent();
      }
    }, 500);
    return () => { done = true; clearInterval(timer); };
  }

  function roomIdFromPath() {
    return decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  }

  function tokenFromHash() {
    return new URLSearchParams(location.hash.slice(1)).get("token");
  }

  return { negotiate, endSession, roomEvents, roomIdFromPath, tokenFromHash, watchSilence, HttpError, nodes, base };
})();
