// werift (a WebRTC stack nobody here wrote) as a WHIP publisher or a WHEP player, default settings
// except no public STUN server (werift's default; this machine has no internet).
//
//   node peer.mjs publish URL TOKEN --seconds N   RTP written to the printed UDP ports goes out
//   node peer.mjs play URL --video-port P --audio-port Q --seconds N   received RTP is forwarded there
//
// werift encodes and decodes nothing: the test feeds it RTP and decodes what it forwards. One JSON
// line per event and a state line a second on stdout; exit 1 with {"error": ...} on a failure.
import dgram from "node:dgram";
import { MediaStreamTrack, RTCPeerConnection } from "werift";

const [mode, url, ...rest] = process.argv.slice(2);
const option = (name, fallback) => {
  const at = rest.indexOf(name);
  return at >= 0 ? rest[at + 1] : fallback;
};
const token = mode === "publish" ? rest[0] : undefined;
const seconds = Number(option("--seconds", "45"));
const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const fail = (error) => {
  say({ error: String(error) });
  process.exit(1);
};
if (mode !== "publish" && mode !== "play") fail("usage: peer.mjs publish URL TOKEN | play URL --video-port P --audio-port Q");

const pc = new RTCPeerConnection({ iceServers: [] });
const counts = { video: 0, audio: 0 };
const sockets = [];
const started = Date.now();

if (mode === "publish") {
  for (const kind of ["video", "audio"]) {
    const track = new MediaStreamTrack({ kind });
    pc.addTransceiver(track, { direction: "sendonly" });
    const socket = dgram.createSocket("udp4");
    socket.on("message", (data) => {
      counts[kind] += 1;
      track.writeRtp(data);
    });
    sockets.push([kind, socket]);
  }
} else {
  const ports = { video: Number(option("--video-port")), audio: Number(option("--audio-port")) };
  const out = dgram.createSocket("udp4");
  sockets.push(["out", out]);
  for (const kind of ["video", "audio"]) pc.addTransceiver(kind, { direction: "recvonly" });
  pc.onTrack.subscribe((track) => {
    track.onReceiveRtp.subscribe((rtp) => {
      counts[track.kind] += 1;
      out.send(rtp.serialize(), ports[track.kind], "127.0.0.1");
    });
  });
}
pc.connectionStateChange.subscribe((state) => say({ connection: state }));

async function main() {
  const inputs = sockets.filter(([kind]) => kind !== "out");
  await Promise.all(inputs.map(([, socket]) => new Promise((done) => socket.bind(0, "127.0.0.1", done))));
  if (inputs.length) say({ ports: Object.fromEntries(inputs.map(([kind, socket]) => [kind, socket.address().port])) });

  await pc.setLocalDescription(await pc.createOffer());
  while (pc.iceGatheringState !== "complete") await new Promise((r) => setTimeout(r, 20));
  const headers = { "Content-Type": "application/sdp" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(url, { method: "POST", headers, body: pc.localDescription.sdp });
  const body = await response.text();
  if (response.status !== 201) fail(`POST ${url}: ${response.status} ${body}`);
  const location = new URL(response.headers.get("location"), url).toString();
  say({ answered: response.status });
  await pc.setRemoteDescription({ type: "answer", sdp: body });

  const timer = setInterval(() => say({ t: (Date.now() - started) / 1000, connection: pc.connectionState, counts }), 1000);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  clearInterval(timer);
  const ended = await fetch(location, { method: "DELETE", headers: token ? { Authorization: `Bearer ${token}` } : {} });
  say({ deleted: ended.status, counts });
  await pc.close();
  for (const [, socket] of sockets) socket.close();
  say({ done: true });
  process.exit(ended.ok ? 0 : 1);
}

main().catch(fail);
