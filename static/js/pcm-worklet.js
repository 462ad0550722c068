// AudioWorklet: microphone samples at the context's rate -> 16 kHz PCM16 little-endian,
// posted to the page in 40 ms blocks for input_audio_buffer.append. Resampling here (linear
// interpolation) lets the context run at the device's own rate: some browsers refuse to
// connect a microphone to a context at another rate.
const TARGET_RATE = 16000;
const BLOCK = 640; // 40 ms at 16 kHz

class Pcm16Sender extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    this.position = 0; // fractional read position into the current input
    this.previous = 0; // last input sample of the previous call, for interpolation
    this.block = new Int16Array(BLOCK);
    this.filled = 0;
  }

  emit(value) {
    const s = Math.max(-1, Math.min(1, value));
    this.block[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.filled === BLOCK) {
      this.port.postMessage(this.block.buffer, [this.block.buffer]);
      this.block = new Int16Array(BLOCK);
      this.filled = 0;
    }
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    // position is relative to input[0]; -1 means "the previous call's last sample".
    while (this.position < input.length - 1) {
      const i = Math.floor(this.position);
      const frac = this.position - i;
      const a = i < 0 ? this.previous : input[i];
      const b = input[i + 1];
      this.emit(a + (b - a) * frac);
      this.position += this.step;
    }
    this.position -= input.length;
    this.previous = input[input.length - 1];
    return true;
  }
}

registerProcessor("pcm16-sender", Pcm16Sender);
