// The page: microphone, connection (WebRTC, else WebSocket), turns, words, latency.
import { Player } from "./player.js";
import { ConversationState } from "./state.js";
import { Transcript } from "./transcript.js";
import { connect, TransportError } from "./transport.js";
import { EndOfTurnChoice } from "./turns.js";

const $ = (id) => document.getElementById(id);
const ui = {
  badge: $("badge"), notice: $("notice"), transcript: $("transcript"), connect: $("connect"),
  mode: $("mode"), language: $("language"), talk: $("talk"), cancel: $("cancel"),
  level: $("level"), state: $("state"), tokenField: $("token-field"), token: $("token"),
};
const conversation = new ConversationState(ui.state);
const transcript = new Transcript(ui.transcript);
const endOfTurn = new EndOfTurnChoice($("end-of-turn"), () => sendSettings());
conversation.transcribing = ui.mode.value === "transcribe"; // a form value kept over a reload

const state = {
  config: null,
  stream: null,
  transport: null,
  turnMode: "vad", // "vad" | "ptt"
  wanted: false, // the user pressed Start: keep reconnecting after drops
  retries: 0,
  responding: null, // {id, turn, turnEndedAt, stoppedAt, firstWordAt, firstAudioAt, text, spokenLength, retracted}
  player: null, // speech out (when the server speaks)
  lastTurnEnd: null, // browser clock: end of speech (estimated) or push-to-talk release
  lastStop: null, // browser clock: speech_stopped arrived (semantic_vad: silence known at the end)
  lastItem: null, // the user item last committed: the one the next response answers
  outputRate: 24000, // Hz of the WebSocket's speech (audio/pcm; the session reports it)
  held: false,
  commitTimer: 0,
};

// ------------------------------------------------------------------ messages

function notice(text, kind = "info") {
  ui.notice.textContent = text;
  ui.notice.className = `notice ${kind === "error" ? "error" : ""}`;
  ui.notice.hidden = !text;
}

function badge(text, kind) {
  ui.badge.textContent = text;
  ui.badge.className = `badge ${kind || ""}`;
}

function micError(err) {
  if (err.name === "NotAllowedError" || err.name === "SecurityError") {
    return "Microphone permission was denied. Allow the microphone for this page (address bar) and press Start again.";
  }
  if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
    return "No microphone was found. Connect one and press Start again.";
  }
  if (err.name === "NotReadableError") {
    return "The microphone is in use by another application.";
  }
  return `The microphone could not be opened: ${err.message}`;
}

// ------------------------------------------------------------------ server events

function onEvent(event) {
  switch (event.type) {
    case "session.created":
      state.retries = 0;
      conversation.connected(resting()); // the server's first event: before any speech event
      state.sessionTurnDetection = event.session.audio.input.turn_detection;
      state.outputRate = outputRate(event.session);
      endOfTurn.confirm(state.sessionTurnDetection, true);
      sendSettings();
      break;
    case "session.updated":
      state.sessionTurnDetection = event.session.audio.input.turn_detection;
      state.outputRate = outputRate(event.session);
      endOfTurn.confirm(state.sessionTurnDetection, false);
      break;
    case "input_audio_buffer.speech_started":
      conversation.speechStarted();
      if (state.player) state.player.flush(); // barge-in: stop talking over the user
      break;
    case "input_audio_buffer.speech_stopped": {
      // The server says how long ago the last speech sample reached it (the silence waited
      // and the judging); an older server: silence_duration_ms (server_vad), or
      // response.done's timings.silence_ms.
      const td = state.sessionTurnDetection;
      state.lastStop = performance.now();
      if (event.since_speech_end_ms != null) state.lastTurnEnd = state.lastStop - event.since_speech_end_ms;
      else state.lastTurnEnd = td && td.type === "server_vad" ? state.lastStop - td.silence_duration_ms : null;
      break;
    }
    case "input_audio_buffer.committed":
      state.lastItem = event.item_id;
      transcript.user(event.item_id, ui.mode.value === "transcribe" ? "You spoke (transcribing)" : "You spoke");
      conversation.committed();
      break;
    case "input_audio_buffer.cleared":
      conversation.abandoned();
      break;
    case "response.created":
      answerStarted(event.response.id, state.lastItem);
      break;
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta": {
      // The answer's words, each as soon as it is complete (an audio answer's transcript
      // comes ahead of its audio).
      const r = state.responding;
      if (!r || r.id !== event.response_id) break;
      r.turn.dataset.answer = event.item_id; // the answer's own item (data-item: the turn's)
      addWords(r, event.delta);
      break;
    }
    case "conversation.item.input_audio_transcription.delta": {
      // The user's words written down: in transcribe mode they are the answer; in chat mode
      // they fill the "You spoke" bubble.
      if (ui.mode.value !== "transcribe") {
        transcript.userWords(event.item_id, event.delta);
        break;
      }
      let r = state.responding;
      if (!r || r.id !== `transcription:${event.item_id}`) {
        r = answerStarted(`transcription:${event.item_id}`, event.item_id);
        r.reportId = event.item_id; // the server logs a transcription under its item
      }
      addWords(r, event.delta);
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const r = state.responding;
      if (r && r.id === `transcription:${event.item_id}`) answerDone(r, "completed", event.timings);
      else transcript.userWords(event.item_id, event.transcript, true);
      break;
    }
    case "response.output_audio.delta": {
      const r = state.responding;
      if (!r || r.id !== event.response_id || !state.player || r.retracted) break;
      state.player.playPcm16(event.delta, state.outputRate);
      conversation.answerArriving();
      break;
    }
    case "voxtral.output_audio.spoken": {
      // A phrase has started to sound: mark its words as spoken.
      const r = state.responding;
      if (!r || r.id !== event.response_id) break;
      r.spokenLength += event.delta.length;
      renderAnswer(r);
      conversation.answerArriving();
      break;
    }
    case "conversation.item.deleted": {
      // The speaker went on after an early end of turn: its answer is taken back (before or
      // after its response.done), and the same user item will be committed again.
      const r = state.responding;
      if (r && (r.turn.dataset.item === event.item_id || r.turn.dataset.answer === event.item_id)) {
        r.retracted = true;
        if (state.player) state.player.flush();
      }
      transcript.retract(event.item_id);
      break;
    }
    case "response.done": {
      const r = state.responding;
      if (r && r.id === event.response.id) answerDone(r, event.response.status, event.timings);
      break;
    }
    case "error":
      handleServerError(event.error);
      if (!state.responding) conversation.abandoned();
      break;
    default:
      break;
  }
}

// An answer (or, in transcribe mode, the written-down turn) begins: its bubble.
function answerStarted(id, itemId) {
  const turn = transcript.answer(itemId);
  state.responding = {
    id, turn, turnEndedAt: state.lastTurnEnd, stoppedAt: state.lastStop,
    firstWordAt: null, firstAudioAt: null, text: "", spokenLength: 0, retracted: false, reportId: id,
  };
  state.lastTurnEnd = state.lastStop = null; // one turn's estimate serves one answer
  watchFirstAudio(state.responding);
  ui.cancel.disabled = false;
  conversation.responseCreated();
  return state.responding;
}

function addWords(r, delta) {
  if (r.firstWordAt == null) {
    r.firstWordAt = performance.now();
    if (r.turnEndedAt != null) transcript.firstWord(r.turn, Math.max(0, r.firstWordAt - r.turnEndedAt));
  }
  r.text += delta;
  renderAnswer(r);
  transcript.scroll();
  conversation.answerArriving();
}

// response.done (or the transcription completed): the latency strip, the browser's report.
function answerDone(r, status, t) {
  if (status !== "completed" && !r.retracted && !r.turn.classList.contains("retracted")) r.turn.classList.add(status);
  if (status === "cancelled" && state.player) state.player.flush();
  if (r.turnEndedAt == null && r.stoppedAt != null && t.silence_ms != null) r.turnEndedAt = r.stoppedAt - t.silence_ms;
  const since = (at) => (at != null && r.turnEndedAt != null ? Math.max(0, at - r.turnEndedAt) : null);
  const seen = since(r.firstWordAt);
  const heard = since(r.firstAudioAt);
  transcript.strip(r.turn, t, seen, heard);
  if ((seen != null || heard != null) && state.transport) {
    // Lands in the server's per-turn log line and metrics, beside its own figures.
    const report = { type: "voxtral.client_timing", response_id: r.reportId };
    if (seen != null) report.first_word_ms = seen;
    if (heard != null) report.first_audio_ms = heard;
    state.transport.send(report);
  }
  state.responding = null;
  ui.cancel.disabled = true;
  conversation.responseDone(state.player ? state.player.drained() : Promise.resolve());
}

function renderAnswer(r) {
  const bubble = r.turn.querySelector(".bubble");
  if (!r.spokenLength) {
    bubble.textContent = r.text;
    return;
  }
  const spoken = document.createElement("span");
  spoken.className = "spoken";
  spoken.textContent = r.text.slice(0, r.spokenLength);
  bubble.replaceChildren(spoken, r.text.slice(r.spokenLength));
}

// When the answer is first heard: the playback analyser shows sound while it is on screen.
function watchFirstAudio(r) {
  if (!state.player) return;
  const timer = setInterval(() => {
    if (state.responding !== r && r.firstAudioAt == null && !state.player.playing) {
      clearInterval(timer);
      return;
    }
    if (state.player.level() > 0.01) {
      r.firstAudioAt = performance.now();
      clearInterval(timer);
    }
  }, 5);
}

function handleServerError(error) {
  if (error.code === "too_many_sessions_from_client") {
    notice(`The server is busy: ${error.message}. Retrying shortly…`, "error");
  } else if (error.code === "too_many_sessions") {
    notice("The server is busy (too many conversations). Retrying shortly…", "error");
  } else if (error.code === "unauthorized") {
    ui.tokenField.hidden = false;
    notice("The server needs an access token: enter it and press Start.", "error");
  } else if (error.code === "semantic_vad_unavailable") {
    notice(`Semantic end of turn is not available on this server: ${error.message}. Kept the silence timer.`, "error");
    endOfTurn.refused();
    sendSettings(); // the whole update was refused: mode and language again, with that
  } else if (error.code !== "response_cancel_not_active") {
    notice(`Server: ${error.message}`, "error");
  }
}

// The rate of audio/pcm speech out as the session reports it (OpenAI's 24 kHz by default).
function outputRate(session) {
  const format = session.audio.output && session.audio.output.format;
  return (format && format.rate) || 24000;
}

function sendSettings() {
  const t = state.transport;
  endOfTurn.enabled = state.turnMode === "vad";
  if (!t) return;
  const input = {
    // The user's words are written down too (the "You spoke" bubble).
    transcription: { model: "voxtral", language: ui.language.value },
    turn_detection: state.turnMode === "vad" ? endOfTurn.detection() : null,
  };
  // The worklet sends 16 kHz PCM16 (Voxtral's rate: this server's extension to audio/pcm,
  // nothing to resample). WebRTC audio is Opus on the track.
  if (t.kind === "websocket") input.format = { type: "audio/pcm", rate: 16000 };
  t.send({
    type: "session.update",
    session: {
      type: ui.mode.value === "transcribe" ? "transcription" : "realtime",
      audio: { input },
      voxtral: { spoken_events: true }, // which phrase is sounding: its words are marked
    },
  });
  t.setSending(state.turnMode === "vad" || state.held);
  ui.talk.disabled = state.turnMode !== "ptt";
}

// ------------------------------------------------------------------ push-to-talk, cancel

function press() {
  const t = state.transport;
  if (!t || state.turnMode !== "ptt" || state.held) return;
  clearTimeout(state.commitTimer); // a quick re-press must not commit the new buffer
  state.held = true;
  ui.talk.classList.add("held");
  conversation.talking();
  if (state.responding) t.send({ type: "response.cancel" });
  t.send({ type: "input_audio_buffer.clear" });
  t.setSending(true);
}

function release() {
  const t = state.transport;
  if (!t || !state.held) return;
  state.held = false;
  ui.talk.classList.remove("held");
  conversation.released();
  // Let the last audio reach the server before the commit: one 40 ms block on the
  // WebSocket; on WebRTC also the server's jitter buffer (~80 ms).
  const released = performance.now();
  state.commitTimer = setTimeout(
    () => {
      t.setSending(false);
      state.lastTurnEnd = released;
      t.send({ type: "input_audio_buffer.commit" });
      // A transcription session writes the turn down by itself; a chat is asked to answer.
      if (ui.mode.value !== "transcribe") t.send({ type: "response.create" });
    },
    t.kind === "webrtc" ? 150 : 60,
  );
}

function cancelAnswer() {
  if (state.transport && state.responding) state.transport.send({ type: "response.cancel" });
}

// ------------------------------------------------------------------ microphone level

function meter(stream) {
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  const draw = () => {
    analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    const rms = Math.sqrt(sum / data.length);
    ui.level.style.width = `${Math.min(100, rms * 400)}%`;
    requestAnimationFrame(draw);
  };
  draw();
}

// ------------------------------------------------------------------ connection

async function start() {
  state.wanted = true;
  ui.connect.disabled = true;
  notice("");
  try {
    state.config = await fetchConfig();
  } catch (err) {
    badge("Server unreachable", "down");
    notice(`The server cannot be reached (${err.message}). Is it running, and is the SSH tunnel up?`, "error");
    ui.connect.disabled = false;
    return;
  }
  if (!state.config) {
    // With a token configured, the config (it holds TURN credentials) needs the token too.
    ui.tokenField.hidden = false;
    notice(ui.token.value ? "Wrong access token: check it and press Start." : "This server needs an access token: enter it and press Start.", "error");
    ui.connect.disabled = false;
    return;
  }
  if (!state.stream) {
    const speaks = Boolean(state.config.speech);
    if (speaks && !state.player) state.player = new Player(); // created on the Start click
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({
        // Faithful audio for the model: no browser processing, except echo cancellation when
        // the server speaks, so its own voice from the speakers does not barge in.
        audio: { echoCancellation: speaks, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
      });
    } catch (err) {
      notice(micError(err), "error");
      badge("No microphone", "down");
      ui.connect.disabled = false;
      return;
    }
    meter(state.stream);
  }
  await open();
}

// The connection settings, or null when the server wants a (different) access token.
async function fetchConfig() {
  const headers = ui.token.value ? { authorization: `Bearer ${ui.token.value}` } : {};
  const reply = await fetch("/v1/client-config", { headers, cache: "no-store" });
  if (reply.status === 401) return null;
  if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
  return reply.json();
}

async function open() {
  badge("Connecting…");
  try {
    // Fresh for every attempt: minted TURN credentials expire (webrtc.turn_ttl_s).
    state.config = (await fetchConfig()) || state.config;
  } catch (err) {
    // Unreachable now: the connection attempt below says so and retries.
  }
  try {
    state.transport = await connect({
      config: state.config,
      stream: state.stream,
      token: ui.token.value || null,
      onEvent,
      onDrop: dropped,
      onAudio: (stream) => state.player && state.player.attachStream(stream),
    });
  } catch (err) {
    const busy = err instanceof TransportError && ["too_many_sessions", "too_many_sessions_from_client"].includes(err.code);
    badge(busy ? "Server busy" : "Disconnected", "down");
    notice(busy ? "The server is busy (too many conversations). Retrying shortly…" : `Cannot connect: ${err.message}`, "error");
    retry();
    return;
  }
  const t = state.transport;
  sendSettings(); // the user's choices, whether or not session.created came first
  conversation.connected(resting());
  if (t.kind === "webrtc") badge("WebRTC", "webrtc");
  else {
    badge(`WebSocket (fallback: ${t.reason})`, "websocket");
    t.send({ type: "voxtral.fallback", reason: t.reason }); // one FALLBACK line in the server log
  }
  ui.connect.textContent = "Connected";
}

function dropped(reason, code) {
  state.transport = null;
  state.responding = null;
  conversation.dropped();
  ui.cancel.disabled = true;
  if (code === "unauthorized" || code === "forbidden_origin") {
    state.wanted = false;
    badge("Refused", "down");
    ui.connect.disabled = false;
    ui.connect.textContent = "Start";
    return;
  }
  badge(`Reconnecting… (${reason})`, "down");
  retry();
}

// Between turns: listening hands-free, waiting for the talk key in push-to-talk.
function resting() {
  return state.turnMode === "vad" ? "listening" : "idle";
}

function retry() {
  if (!state.wanted) return;
  const delay = Math.min(10000, 1000 * 2 ** state.retries++);
  setTimeout(open, delay);
}

// ------------------------------------------------------------------ wiring

ui.connect.addEventListener("click", start);
ui.mode.addEventListener("change", () => {
  conversation.transcribing = ui.mode.value === "transcribe";
  sendSettings();
});
ui.language.addEventListener("change", sendSettings);
for (const radio of document.querySelectorAll('input[name="turns"]')) {
  radio.addEventListener("change", () => {
    state.turnMode = radio.value;
    sendSettings();
    conversation.rest(resting());
  });
}
ui.talk.addEventListener("pointerdown", press);
ui.talk.addEventListener("pointerup", release);
ui.talk.addEventListener("pointerleave", release);
ui.talk.addEventListener("pointercancel", release);
window.addEventListener("blur", release); // Alt-Tab while holding must not leave it stuck
ui.cancel.addEventListener("click", cancelAnswer);
// Space types in text fields and opens selects; on buttons and radios it is push-to-talk.
const typing = (e) =>
  e.target.tagName === "SELECT" || e.target.tagName === "TEXTAREA" ||
  (e.target.tagName === "INPUT" && !["radio", "checkbox"].includes(e.target.type));
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && !e.repeat && !typing(e) && state.turnMode === "ptt") {
    e.preventDefault();
    press();
  } else if (e.code === "Escape") {
    cancelAnswer();
  }
});
document.addEventListener("keyup", (e) => {
  if (e.code === "Space" && !typing(e) && state.turnMode === "ptt") {
    e.preventDefault();
    release();
  }
});
// For tests and curious users: the page's state, its conversation state (with its log of
// changes), and the server event handler (tests feed it synthetic events).
window.__voxtral = state;
window.__voxtralPage = { conversation, onEvent };
