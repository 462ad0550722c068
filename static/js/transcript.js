// The conversation on screen: one bubble per turn, answers taken back, and under each answer
// its latency strip (the first-word figure as soon as the first word shows, the rest at
// response.done).

const ms = (value) => `<b>${Math.round(value)} ms</b>`;

// How the turn ended, from response.done's timings (end_of_turn, silence_ms).
function endOfTurn(t) {
  const after = t.silence_ms == null ? "" : ` after ${ms(t.silence_ms)} of silence`;
  switch (t.end_of_turn) {
    case "silence":
      return t.silence_ms == null ? "ended by silence" : `ended by ${ms(t.silence_ms)} of silence`;
    case "semantic":
      return `ended by the semantic judge${after}`;
    case "limit":
      return `ended at the length limit${after}`;
    case "commit":
      return "ended by commit (push-to-talk)";
    default:
      return null;
  }
}

function serverLine(t) {
  const parts = [];
  const how = endOfTurn(t);
  if (how) parts.push(`<span data-metric="end_of_turn" data-value="${t.end_of_turn}">${how}</span>`);
  const after = [];
  if (t.first_word_ms != null) after.push(`${ms(t.first_word_ms)} after the end of turn`);
  if (t.speech_to_first_word_ms != null) after.push(`${ms(t.speech_to_first_word_ms)} after your speech`);
  if (after.length) parts.push(`first word ${after.join(", ")}`);
  if (t.speculative) parts.push("started during the pause");
  return parts.join(" · ");
}

function browserLine(t, seenMs, heardMs) {
  const part = (label, value) => (value == null ? "" : ` · ${label} ${ms(value)}`);
  return (
    `you saw the first word after <b data-metric="browser_first_word_ms">${seenMs == null ? "–" : Math.round(seenMs)} ms</b>` +
    part("model TTFT", t.model_ttft_ms) +
    part("queue", t.queue_wait_ms) +
    part("you heard it after", heardMs) +
    part("server first audio", t.ttfa_ms) +
    ` · ${t.transport}`
  );
}

export class Transcript {
  constructor(element) {
    this.element = element;
    this.users = new Map(); // item_id -> the user's turn (a revised turn is committed again)
  }

  add(role, text) {
    const turn = document.createElement("div");
    turn.className = `turn ${role}`;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    turn.append(bubble);
    this.element.append(turn);
    this.scroll();
    return turn;
  }

  scroll() {
    this.element.scrollTop = this.element.scrollHeight;
  }

  // input_audio_buffer.committed: a new user turn, or the same one committed again after a
  // revision (the speaker went on talking): then it stays one turn.
  user(itemId, text) {
    const known = itemId && this.users.get(itemId);
    if (known) {
      known.querySelector(".bubble").textContent = `${text} (went on after a pause)`;
      known.classList.remove("revising");
      return known;
    }
    const turn = this.add("user", text);
    if (itemId) {
      turn.dataset.item = itemId;
      this.users.set(itemId, turn);
    }
    return turn;
  }

  // The user's words written down (input transcription): they replace "You spoke".
  userWords(itemId, text, whole = false) {
    const turn = this.users.get(itemId);
    if (!turn) return;
    const bubble = turn.querySelector(".bubble");
    if (whole || !turn.dataset.heard) bubble.textContent = "";
    turn.dataset.heard = "1";
    bubble.textContent += text;
    this.scroll();
  }

  answer(itemId) {
    const turn = this.add("bot", "");
    if (itemId) turn.dataset.item = itemId;
    return turn;
  }

  // conversation.item.deleted: the answer to `itemId` is taken back (struck out, labelled);
  // the user's turn stays and will be committed again.
  retract(itemId) {
    for (const turn of this.element.querySelectorAll(".turn.bot")) {
      const ours = turn.dataset.item === itemId || turn.dataset.answer === itemId;
      if (!ours || turn.classList.contains("retracted")) continue;
      turn.classList.remove("cancelled");
      turn.classList.add("retracted");
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = "taken back: you went on speaking";
      turn.querySelector(".bubble").after(note);
    }
    const user = this.users.get(itemId);
    if (user) user.classList.add("revising");
  }

  // The browser's first-word figure, as soon as the first word is on screen.
  firstWord(turn, seenMs) {
    const live = document.createElement("div");
    live.className = "latency-live";
    live.innerHTML = `you saw the first word after <b>${Math.round(seenMs)} ms</b>`;
    turn.append(live);
  }

  // At response.done: how the turn ended and the server's figures, then the browser's.
  strip(turn, timings, seenMs, heardMs) {
    const live = turn.querySelector(".latency-live");
    if (live) live.remove();
    const strip = document.createElement("div");
    strip.className = "latency";
    const server = serverLine(timings);
    strip.innerHTML = (server ? `<div class="turn-end">${server}</div>` : "") + `<div>${browserLine(timings, seenMs, heardMs)}</div>`;
    turn.append(strip);
  }
}
