// STUN/TURN servers for every page's RTCPeerConnection (watch, studio, call). No build step.
// Loaded after shelfcast.js: asks the node the page talks to now.
"use strict";

const shelfcastIce = (() => {
  // ?ice=relay: only TURN-relayed candidates (iceTransportPolicy "relay"): proves a TURN server
  // works, or keeps the viewer's own addresses from the media server.
  const relayOnly = new URLSearchParams(location.search).get("ice") === "relay";
  const FETCH_TIMEOUT_MS = 2000;

  // Asked before each connection, not once per page: TURN credentials minted for a session expire.
  // With no servers configured the answer is [] at once; if the request fails the page goes on
  // without servers (host candidates reach a server that nothing stands in front of).
  async function configuration(roomId, token) {
    let iceServers = [];
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    try {
      const headers = token ? { Authorization: "Bearer " + token } : {};
      const url = `${shelfcast.base()}/api/rooms/${encodeURIComponent(roomId)}/ice-servers`;
      const resp = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
      if (resp.ok) {
        const body = await resp.json();
        if (Array.isArray(body.iceServers)) iceServers = body.iceServers;
      }
    } catch (_) { /* unreachable or too slow: no servers */ }
    finally { clearTimeout(timer); }
    return { iceServers, iceTransportPolicy: relayOnly ? "relay" : "all" };
  }

  return { configuration, relayOnly };
})();
