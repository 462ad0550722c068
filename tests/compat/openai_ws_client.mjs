// The npm `openai` SDK's OpenAIRealtimeWS against the server. The SDK always connects with
// wss:// (built from the client's baseURL), so the server runs with TLS; the test's
// self-signed certificate is trusted through NODE_EXTRA_CA_CERTS, the client code is as
// the SDK's documentation shows. argv: HTTPS_BASE_URL (…/v1) PCM24K_FILE.
// A voice turn with 24 kHz PCM and text output, then a typed message
// (conversation.item.create + response.create). Reports every server event type, each
// answer's text and every error.
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';
import { emit, microphone, readPcm, run, signal } from './_report.mjs';

await run(async ([baseURL, pcmPath]) => {
  const client = new OpenAI({ apiKey: 'not-needed', baseURL });
  const rt = new OpenAIRealtimeWS({ model: 'gpt-realtime' }, client);
  let done = signal();
  let text = '';
  rt.on('error', (err) => {
    emit('error', { error: String(err.error?.message ?? err.message), code: err.error?.code ?? null });
    done.reject(new Error('the server sent an error'));
  });
  rt.on('event', (event) => emit('server_event', { type: event.type }));
  rt.on('response.output_text.delta', (event) => (text += event.delta));
  rt.on('response.done', (event) => {
    emit('response', { text, status: event.response.status, output: event.response.output ?? null });
    done.resolve();
  });
  const opened = signal();
  rt.socket.on('open', () => opened.resolve());
  const created = signal();
  rt.on('session.created', (event) => created.resolve(event.session));
  await opened.promise;
  emit('session', { session: await created.promise });

  rt.send({
    type: 'session.update',
    session: {
      type: 'realtime',
      output_modalities: ['text'],
      audio: { input: { format: { type: 'audio/pcm', rate: 24000 } } },
    },
  });
  let answered = false;
  const mic = microphone(
    (chunk) => rt.send({ type: 'input_audio_buffer.append', audio: chunk.toString('base64') }),
    readPcm(pcmPath),
    () => answered,
  );
  await done.promise;
  answered = true;
  await mic;
  emit('turn', { what: 'voice', text });

  done = signal();
  text = '';
  rt.send({
    type: 'conversation.item.create',
    item: { type: 'message', role: 'user', content: [{ type: 'input_text', text: 'What is the capital of France?' }] },
  });
  rt.send({ type: 'response.create' });
  await done.promise;
  emit('turn', { what: 'text', text });
  rt.close();
});
