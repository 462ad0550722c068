// The end-of-turn choice in the settings: server_vad (a silence timer), or semantic_vad with
// an eagerness. The server's default shows until the user picks one; a choice the server
// refuses (semantic_vad_unavailable) goes back to the one it still uses.

const value = (td) => (td.type === "semantic_vad" ? `semantic_vad:${td.eagerness}` : "server_vad");

export class EndOfTurnChoice {
  constructor(select, onChange) {
    this.select = select;
    this.confirmed = null; // the select value of what the server last said it uses
    this.chosen = false; // the user picked one: the server's default no longer applies
    select.addEventListener("change", () => {
      this.chosen = true;
      onChange();
    });
  }

  // session.update's turn_detection for hands-free.
  detection() {
    const [type, eagerness] = this.select.value.split(":");
    return type === "semantic_vad" ? { type, eagerness } : { type };
  }

  set enabled(on) {
    this.select.disabled = !on;
  }

  // The session's turn_detection from session.created (`created`) or session.updated.
  confirm(td, created) {
    if (!td) return; // push-to-talk: the choice stays for when hands-free comes back
    this.confirmed = value(td);
    const known = [...this.select.options].some((o) => o.value === this.confirmed);
    if (known && (!created || !this.chosen)) this.select.value = this.confirmed;
  }

  // The server refused the choice: the whole session.update was refused, so the caller
  // sends the settings again with this.
  refused() {
    const previous = this.confirmed;
    this.select.value = previous && !previous.startsWith("semantic_vad") ? previous : "server_vad";
  }
}
