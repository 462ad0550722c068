// @openai/agents-realtime (npm) against the server: a RealtimeSession over the WebSocket
// transport, `connect({ url })`. argv: WS_URL PCM24K_FILE. One voice turn (the speech from
// the file, then silence, as a mic), then `sendMessage`. Reports session errors, each
// turn's end, and the history as the session holds it.
import { RealtimeAgent, RealtimeSession } from '@openai/agents-realtime';
import { emit, microphone, readPcm, run, signal } from './_report.mjs';

const TEXT_MESSAGE = 'What is the capital of France?';

function summary(history) {
  return history.map((item) => ({
    itemId: item.itemId,
    type: item.type,
    role: item.role,
    status: item.status,
    content: (item.content ?? []).map((c) => ({ type: c.type, text: c.text ?? c.transcript ?? null })),
  }));
}

await run(async ([url, pcmPath]) => {
  const agent = new RealtimeAgent({ name: 'Assistant', instructions: 'You are a helpful assistant.' });
  const session = new RealtimeSession(agent, { transport: 'websocket', model: 'gpt-realtime' });
  let turn = signal();
  let audioBytes = 0;
  session.on('error', (event) => {
    const error = event.error?.error?.message ?? event.error?.message ?? JSON.stringify(event.error);
    emit('error', { error: String(error) });
    turn.reject(new Error('the session reported an error'));
  });
  session.on('agent_end', (_ctx, _agent, text) => {
    emit('agent_end', { text, audio_bytes: audioBytes });
    turn.resolve(text);
  });
  session.on('audio', (event) => (audioBytes += event.data.byteLength));
  session.transport.on('*', (event) => emit('server_event', { type: event.type }));

  await session.connect({ apiKey: 'not-needed', url });
  let answered = false;
  const mic = microphone(
    (chunk) => session.sendAudio(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength)),
    readPcm(pcmPath),
    () => answered,
  );
  await turn.promise;
  answered = true;
  await mic;
  emit('turn', { what: 'voice', history: summary(session.history) });

  turn = signal();
  audioBytes = 0;
  session.sendMessage(TEXT_MESSAGE);
  await turn.promise;
  emit('turn', { what: 'text', history: summary(session.history) });
  session.close();
});
