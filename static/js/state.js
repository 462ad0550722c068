// What the conversation is doing, shown at all times in words (colour only repeats them):
// listening -> hearing you (speech_started) -> thinking (the turn committed, the answer
// created, no word yet) -> speaking (the answer's words or audio arriving, until
// response.done and the audio has played out) -> listening. Push-to-talk rests in "idle"
// while the key is up. Every change is kept in `log` (the page's tests read it).

export const LABELS = {
  off: "Not connected",
  idle: "Hold to talk",
  listening: "Listening",
  hearing: "Hearing you",
  thinking: "Thinking…",
  speaking: "Speaking",
};
// Transcribe mode: the answer is the transcript, written rather than spoken.
const TRANSCRIBING = { ...LABELS, thinking: "Transcribing…", speaking: "Writing" };

export class ConversationState {
  constructor(element) {
    this.element = element;
    this.name = null;
    this.log = []; // {state, at: performance.now()} for every change, in order
    this.resting = "listening"; // between turns: "listening", or "idle" in push-to-talk
    this.answering = false; // response.created seen, response.done not yet
    this.waiting = false; // a turn committed, its answer not created yet
    this.labels = LABELS;
    this.set("off");
  }

  set(name) {
    if (name === this.name) return;
    this.name = name;
    this.log.push({ state: name, at: performance.now() });
    this.element.dataset.state = name;
    this.element.textContent = this.labels[name];
  }

  // Chat or transcribe mode: the same states, in the words that fit.
  set transcribing(on) {
    this.labels = on ? TRANSCRIBING : LABELS;
    this.element.textContent = this.labels[this.name];
  }

  // ---------------------------------------------------------------- the page

  // The transport is up. Events it delivered while connecting have already moved the state
  // on (a speech start, say): those stand.
  connected(resting) {
    this.resting = resting;
    if (this.name === "off") this.set(resting);
  }

  dropped() {
    this.answering = this.waiting = false;
    this.set("off");
  }

  // Hands-free ("listening") or push-to-talk ("idle") chosen.
  rest(resting) {
    this.resting = resting;
    if (this.name === "listening" || this.name === "idle") this.set(resting);
  }

  // Push-to-talk held: the user is talking (an answer was cancelled by the press).
  talking() {
    this.resting = "listening";
    this.set("listening");
  }

  // Push-to-talk released: the display waits for the commit that follows.
  released() {
    this.resting = "idle";
  }

  // ---------------------------------------------------------------- the server

  speechStarted() {
    this.set("hearing");
  }

  committed() {
    this.waiting = true;
    this.set("thinking");
  }

  responseCreated() {
    this.answering = true;
    this.waiting = false;
    if (this.name !== "hearing") this.set("thinking");
  }

  // A word, a phrase or audio of the running answer arrived.
  answerArriving() {
    if (this.answering && this.name !== "hearing") this.set("speaking");
  }

  // response.done; `played` resolves once its audio has finished playing.
  responseDone(played) {
    this.answering = false;
    if (this.name !== "speaking") {
      this.settle();
      return;
    }
    played.then(() => {
      if (!this.answering && this.name === "speaking") this.settle();
    });
  }

  // Nothing more is coming for now (an answer ended, an error, the buffer cleared).
  settle() {
    if (this.name === "hearing" || this.name === "off" || this.answering || this.waiting) return;
    this.set(this.resting);
  }

  // The turn will not be answered (an error, or the input buffer cleared).
  abandoned() {
    this.waiting = false;
    this.settle();
  }
}
