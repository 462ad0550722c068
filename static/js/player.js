// Speech out: plays the server's answer audio and measures when it is heard.
// WebSocket: PCM16 deltas scheduled back to back on one AudioContext clock (no gaps, no
// clicks between chunks). WebRTC: the call's audio track, played by an <audio> element.
// Both go through one AnalyserNode, which tells when sound is actually coming out.

export class Player {
  constructor() {
    this.ctx = new AudioContext();
    // The analyser is pulled by the audio graph on its own (it need not reach the speakers).
    this.analyser = this.ctx.createAnalyser();
    this.analyser.fftSize = 512;
    this.out = this.ctx.createGain(); // WebSocket audio -> speakers, and -> analyser
    this.out.connect(this.ctx.destination);
    this.out.connect(this.analyser);
    this.nextTime = 0;
    this.sources = new Set();
    this.waiting = []; // drained() promises to resolve once nothing is scheduled
    this.element = null;
    this.trackSource = null;
    this.samples = new Float32Array(this.analyser.fftSize);
  }

  resume() {
    if (this.ctx.state === "suspended") this.ctx.resume();
  }

  // One response.output_audio.delta: base64 little-endian PCM16 mono at `rate` Hz.
  // Returns the performance.now() time at which this chunk starts to play.
  playPcm16(base64, rate) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    if (!pcm.length) return null;
    const buffer = this.ctx.createBuffer(1, pcm.length, rate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.out);
    // Back to back; after a gap (the first chunk, or the TTS fell behind) a short lead.
    const start = Math.max(this.nextTime, this.ctx.currentTime + 0.02);
    source.start(start);
    this.nextTime = start + buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      this.sources.delete(source);
      if (!this.sources.size) this.settle();
    };
    return performance.now() + (start - this.ctx.currentTime) * 1000;
  }

  // WebRTC: the remote stream plays through an <audio> element (Chrome plays remote WebRTC
  // audio only through a media element) and is also fed to the analyser for the meter.
  attachStream(stream) {
    if (!this.element) {
      this.element = new Audio();
      this.element.autoplay = true;
    }
    this.element.srcObject = stream;
    this.element.play().catch(() => {}); // resumed by the next user gesture if blocked
    if (this.trackSource) this.trackSource.disconnect();
    this.trackSource = this.ctx.createMediaStreamSource(stream); // measured, not played twice
    this.trackSource.connect(this.analyser);
  }

  // Barge-in: drop everything scheduled.
  flush() {
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        // already stopped
      }
    }
    this.sources.clear();
    this.nextTime = 0;
    this.settle();
  }

  // Resolves once the answer's audio has played out. WebSocket: when every scheduled chunk
  // has ended. WebRTC: response.done leaves the server with the last frame, which the
  // browser's jitter buffer still holds: when the track has been quiet for QUIET_MS (at
  // most TAIL_MS after the call).
  drained() {
    if (this.sources.size) return new Promise((resolve) => this.waiting.push(resolve));
    if (!this.trackSource) return Promise.resolve();
    const QUIET_MS = 100;
    const TAIL_MS = 1000;
    const called = performance.now();
    let quietSince = called;
    return new Promise((resolve) => {
      const timer = setInterval(() => {
        const now = performance.now();
        if (this.level() > 0.01) quietSince = now;
        if (now - quietSince >= QUIET_MS || now - called >= TAIL_MS) {
          clearInterval(timer);
          resolve();
        }
      }, 20);
    });
  }

  settle() {
    for (const resolve of this.waiting.splice(0)) resolve();
  }

  get playing() {
    return this.sources.size > 0 || this.nextTime > this.ctx.currentTime;
  }

  // RMS of what is coming out now (0..1).
  level() {
    this.analyser.getFloatTimeDomainData(this.samples);
    let sum = 0;
    for (const v of this.samples) sum += v * v;
    return Math.sqrt(sum / this.samples.length);
  }
}
