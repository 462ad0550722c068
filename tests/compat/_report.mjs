// What the Node client programs share (the JavaScript twin of _report.py): JSON lines out,
// the test audio in, a live-microphone imitation, a deadline. Standard library only.
import { readFileSync } from 'node:fs';

export const SAMPLE_RATE = 24000;
export const CHUNK_BYTES = (SAMPLE_RATE / 10) * 2; // 100 ms of PCM16 mono

export function emit(kind, fields = {}) {
  process.stdout.write(JSON.stringify({ kind, ...fields }) + '\n');
}

export function readPcm(path) {
  return readFileSync(path);
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The speech, then silence, one 100 ms chunk every 100 ms (as a live mic), until until()
// is true or maxSilenceS of silence went out: the server's turn detection needs the silence.
export async function microphone(send, pcm, until, maxSilenceS = 60) {
  for (let i = 0; i < pcm.length && !until(); i += CHUNK_BYTES) {
    send(pcm.subarray(i, i + CHUNK_BYTES));
    await pause(100);
  }
  const silence = Buffer.alloc(CHUNK_BYTES);
  for (let sent = 0; !until() && sent < maxSilenceS * 10; sent += 1) {
    send(silence);
    await pause(100);
  }
}

// A promise for the next call of the returned `resolve` (for waiting on events); `reject`
// ends the wait at once (an error from the server: the answer is not coming).
export function signal() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

// Run main(argv); a thrown error or the deadline becomes a `crash` line; `end` is last.
export async function run(main) {
  const deadlineS = Number(process.env.VOXTRAL_CLIENT_DEADLINE_S ?? '120');
  const timer = setTimeout(() => {
    emit('crash', { error: `deadline of ${deadlineS} s passed` });
    emit('end');
    process.exit(3);
  }, deadlineS * 1000);
  try {
    await main(process.argv.slice(2));
  } catch (err) {
    emit('crash', { error: String(err), stack: err?.stack });
  } finally {
    clearTimeout(timer);
    emit('end');
  }
  process.exit(0); // the clients keep sockets and timers; the test is over
}
