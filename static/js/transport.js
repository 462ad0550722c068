// Transports: WebRTC first (audio both ways on the track, events on the "oai-events" data
// channel), the WebSocket as the fallback (audio as PCM16 16 kHz from an AudioWorklet; speech
// back as response.output_audio.delta events). Both expose
// the same small interface: {kind, reason, send(event), close()}, events to onEvent.

const CHANNEL = "oai-events";

export class TransportError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function b64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function waitGathering(pc, limitMs) {
  // The server takes the offer in one piece (no trickle): wait for our candidates.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") finish();
    };
    const finish = () => {
      pc.removeEventListener("icegatheringstatechange", done);
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(finish, limitMs);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

export async function connectWebRTC({ config, stream, token, onEvent, onDrop, onAudio }) {
  const rtc = config.webrtc;
  const pc = new RTCPeerConnection({
    iceServers: rtc.ice_servers, // from the server's config: never a public STUN server
    iceTransportPolicy: rtc.ice_transport_policy,
  });
  for (const track of stream.getAudioTracks()) pc.addTrack(track, stream);
  // The answer's speech, when the server speaks (tts.engine), comes back on the same m-line.
  pc.ontrack = (e) => onAudio && onAudio(e.streams[0] || new MediaStream([e.track]));
  const channel = pc.createDataChannel(CHANNEL);
  const early = [];
  let deliver = (event) => early.push(event);
  channel.onmessage = (m) => deliver(JSON.parse(m.data));

  const opened = new Promise((resolve, reject) => {
    channel.onopen = resolve;
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed") reject(new TransportError("webrtc_failed", "WebRTC connection failed (ICE could not connect)"));
    });
    setTimeout(
      () => reject(new TransportError("webrtc_timeout", `WebRTC did not connect within ${rtc.client_timeout_ms} ms`)),
      rtc.client_timeout_ms,
    );
  });
  opened.catch(() => {}); // observed below; keeps an early timeout from being "unhandled"
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitGathering(pc, Math.min(1000, rtc.client_timeout_ms / 2));
    const headers = { "content-type": "application/sdp" };
    if (token) headers.authorization = `Bearer ${token}`;
    const reply = await fetch("/v1/realtime/calls", { method: "POST", body: pc.localDescription.sdp, headers });
    const body = await reply.text();
    if (!reply.ok) {
      const code = body.split(":")[0].trim() || `http_${reply.status}`;
      throw new TransportError(code, body.trim() || `HTTP ${reply.status}`);
    }
    await pc.setRemoteDescription({ type: "answer", sdp: body });
    await opened;
  } catch (err) {
    pc.close();
    throw err;
  }
  let closed = false;
  const drop = (why) => {
    if (!closed) {
      closed = true;
      pc.close();
      onDrop(why);
    }
  };
  pc.addEventListener("connectionstatechange", () => {
    if (["failed", "disconnected", "closed"].includes(pc.connectionState)) drop(`WebRTC ${pc.connectionState}`);
  });
  channel.onclose = () => drop("data channel closed");
  // Hand over what arrived during setup once the caller holds this transport.
  queueMicrotask(() => {
    deliver = onEvent;
    for (const event of early.splice(0)) onEvent(event);
  });
  return {
    kind: "webrtc",
    send: (event) => channel.readyState === "open" && channel.send(JSON.stringify(event)),
    setSending: () => {}, // the track always flows; the server keeps what a turn needs
    close: () => {
      closed = true;
      pc.close();
    },
  };
}

export async function connectWebSocket({ stream, token, onEvent, onDrop }) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"];
  if (token) protocols.push(`openai-insecure-api-key.${token}`);
  const ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`, protocols);
  // Handlers from the first moment: events that arrive while the audio is being set up
  // (session.created, or a refusal followed by a close) are kept, not lost.
  const early = [];
  let deliver = (event) => early.push(event);
  let refusal = null;
  let closedEarly = false;
  let dropped = () => {
    closedEarly = true;
  };
  ws.onmessage = (m) => {
    const event = JSON.parse(m.data);
    if (event.type === "error" && ["too_many_sessions", "too_many_sessions_from_client", "unauthorized", "forbidden_origin", "not_ready"].includes(event.error.code)) {
      refusal = event.error;
    }
    deliver(event);
  };
  ws.onclose = () => dropped();
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new TransportError("unreachable", "cannot reach the server's WebSocket"));
  });
  let ctx = null;
  let source = null;
  let sending = true;
  const stop = () => {
    if (source) source.disconnect();
    if (ctx) ctx.close();
    source = null;
    ctx = null;
  };
  try {
    // The device's own rate; the worklet resamples to 16 kHz.
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
    source = ctx.createMediaStreamSource(stream);
    const sender = new AudioWorkletNode(ctx, "pcm16-sender");
    sender.port.onmessage = (m) => {
      if (sending && ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: b64(m.data) }));
      }
    };
    source.connect(sender);
  } catch (err) {
    stop();
    ws.close();
    throw new TransportError("audio_setup", `cannot send microphone audio: ${err.message}`);
  }
  if (closedEarly || ws.readyState !== WebSocket.OPEN) {
    stop();
    throw new TransportError(refusal ? refusal.code : "closed", refusal ? refusal.message : "WebSocket closed");
  }
  let closed = false;
  dropped = () => {
    if (!closed) {
      closed = true;
      stop();
      onDrop(refusal ? refusal.message : "WebSocket closed", refusal && refusal.code);
    }
  };
  deliver = onEvent;
  for (const event of early.splice(0)) onEvent(event);
  return {
    kind: "websocket",
    send: (event) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(event)),
    setSending: (on) => {
      sending = on;
    },
    close: () => {
      closed = true;
      stop();
      ws.close();
    },
  };
}

// WebRTC unless disabled; on failure, the WebSocket, with the reason kept for the badge.
export async function connect(options) {
  const { config } = options;
  let reason = "WebRTC disabled on the server";
  if (config.webrtc.enabled) {
    try {
      const t = await connectWebRTC(options);
      t.reason = null;
      return t;
    } catch (err) {
      if (err instanceof TransportError && ["too_many_sessions", "too_many_sessions_from_client", "unauthorized", "not_ready"].includes(err.code)) throw err;
      reason = err.message;
    }
  }
  const t = await connectWebSocket(options);
  t.reason = reason;
  return t;
}
