"""Speech or silence for every session's audio: one Silero model, one worker thread, batched.

Each conversation opens a `VadStream` and feeds it 16 kHz audio from the event loop; `feed`
only queues the samples (O(1), never runs the model). The `VadWorker` thread takes one 32 ms
frame from every stream that has one and runs them through Silero as one batch, each stream
with its own recurrent state and context, then applies the stream's hysteresis and hands
its events (speech started, speech stopped, as sample offsets in the stream) to the stream's
callback: the session hops them to its event loop. One model serves the whole server, so an
idle conversation costs a few hundred bytes of state instead of a model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioChunks

# `import silero_vad` sets torch's thread count to 1 for the whole process; undo that.
_threads = torch.get_num_threads()
import silero_vad  # noqa: E402

torch.set_num_threads(_threads)

logger = logging.getLogger(__name__)

FRAME_MS = 32  # what Silero takes at 16 kHz
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 512
CONTEXT_SAMPLES = 64  # the end of the previous frame Silero sees before each frame (16 kHz)
STATE_SHAPE = (2, 1, 128)  # Silero's recurrent state for one stream
MAX_BATCH = 256  # streams per forward pass (more wait for the next pass)
# A frame whose every sample is within one PCM16 step of zero carries no signal at all (a
# muted microphone, a track sending silence). After a second of such frames the stream is
# idle: its frames are judged silent without the model and, when a signal comes back, the
# stream starts afresh, as at its start. Shorter runs (pauses, the silence that leads an
# utterance) go through the model like any other audio.
DIGITAL_SILENCE = 1.5 / 32768
IDLE_AFTER_FRAMES = 1000 // FRAME_MS  # ~1 s of digital silence
QUIET_DB = 40  # a frame this far below the utterance's loudest is not speech, whatever Silero says
QUIET = 10 ** (-QUIET_DB / 20)
# Silence after speech before it counts as a pause (not a stop consonant or a breath).
PAUSE_MS = 64
PAUSE_SAMPLES = SAMPLE_RATE * PAUSE_MS // 1000


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # offset in the stream where speech began


@dataclass(frozen=True)
class SpeechPaused:
    """The first clearly silent frame after speech: the speaker may be done (or pausing)."""

    sample: int  # where the speech before the pause ended (end of its last speech frame)


@dataclass(frozen=True)
class SpeechResumed:
    """Speech again after a `SpeechPaused`, before the silence ended the turn."""

    sample: int  # start of the frame heard as speech


@dataclass(frozen=True)
class SilenceGrew:
    """During a pause, every frame (only for streams opened with `report_silence`)."""

    sample: int  # where the speech ended (as in the `SpeechPaused` before it)
    silence_ms: int  # silence heard since then


@dataclass(frozen=True)
class SpeechStopped:
    sample: int  # offset in the stream where speech ended (before the silence)


VadEvent = SpeechStarted | SpeechPaused | SpeechResumed | SilenceGrew | SpeechStopped
OnEvents = Callable[[int, list[VadEvent]], None]  # (epoch, events), on the worker thread


class Hysteresis:
    """Frame probabilities and levels -> speech started / paused / resumed / stopped (pure).

    Speech starts at a frame over `threshold`. After speech, a frame under `threshold - 0.15`
    (as Silero's own VADIterator) or one `QUIET_DB` below the loudest frame of the utterance
    is a pause, and the pause becomes the end of the turn once `min_silence_ms` have passed
    since the end of the last frame that was speech: over `threshold` *and* audible. Silero's
    probability decays over the 2-3 frames after the last word even when they are digital
    silence (its "hangover", ~60-100 ms); counting from the last audible speech frame leaves
    that out, so the turn ends `min_silence_ms` after the speech did, to within one frame.
    """

    def __init__(self, threshold: float, min_silence_ms: int, report_silence: bool = False) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.threshold = threshold
        self.release = max(threshold - 0.15, 0.01)
        self.min_silence = int(min_silence_ms * SAMPLE_RATE / 1000)
        self.report_silence = report_silence
        self.speaking = False
        self.paused = False
        self._speech_end = 0  # end of the last frame heard as speech
        self._loudest = 0.0  # peak level of the utterance so far

    def reset(self) -> None:
        self.speaking = False
        self.paused = False

    def judge(self, start: int, prob: float, level: float = 1.0) -> list[VadEvent]:
        """The frame starting at stream offset `start` had speech probability `prob` and
        peak level `level` (|sample| max, full scale 1)."""
        end = start + FRAME_SAMPLES
        if not self.speaking:
            if prob < self.threshold:
                return []
            self.speaking = True
            self.paused = False
            self._speech_end = end
            self._loudest = level
            return [SpeechStarted(start)]
        audible = level >= max(self._loudest * QUIET, DIGITAL_SILENCE)
        if prob >= self.threshold and audible:
            self._speech_end = end
            self._loudest = max(self._loudest, level)
            if self.paused:
                self.paused = False
                return [SpeechResumed(start)]
            return []
        events: list[VadEvent] = []
        quiet = prob < self.release or not audible
        if not self.paused and quiet and end - self._speech_end >= PAUSE_SAMPLES:
            self.paused = True
            events.append(SpeechPaused(self._speech_end))
        if self.paused:
            silence = end - self._speech_end
            if silence >= self.min_silence:
                self.speaking = False
                self.paused = False
                events.append(SpeechStopped(self._speech_end))
            elif self.report_silence:
                events.append(SilenceGrew(self._speech_end, silence * 1000 // SAMPLE_RATE))
        return events


class SileroBatch:
    """Silero's network run over a batch of frames, each stream with its own state."""

    def __init__(self) -> None:
        # The packaged TorchScript module keeps one batch's state inside itself; its `_model`
        # is the bare network, which takes the state explicitly.
        self._net: Any = silero_vad.load_silero_vad()._model

    def __call__(
        self, frames: np.ndarray, contexts: np.ndarray, states: torch.Tensor
    ) -> tuple[np.ndarray, torch.Tensor]:
        """frames (B, 512), contexts (B, 64), states (2, B, 128) -> probs (B,), states."""
        x = torch.from_numpy(np.concatenate([contexts, frames], axis=1))
        with torch.inference_mode():
            out, new_states = self._net(x, states)
        return out.reshape(-1).numpy(), new_states


class VadStream:
    """One conversation's audio as the worker sees it. Create with `VadWorker.open`."""

    def __init__(
        self, worker: VadWorker, hysteresis: Hysteresis, start: int, on_events: OnEvents
    ) -> None:
        self._worker = worker
        self.hysteresis = hysteresis
        self.on_events = on_events
        self.epoch = 0  # bumped by reset(): events of an older epoch are stale
        # Worker-owned, under the worker's lock:
        self.offset = start  # stream offset of the next sample to judge
        self.audio = AudioChunks()  # fed, not yet judged
        self.context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self.state = torch.zeros(STATE_SHAPE)
        self.silent_frames = 0  # consecutive frames of digital silence
        self.closed = False

    def feed(self, audio: np.ndarray) -> None:
        """Queue 16 kHz mono float32 audio (any length); never blocks on the model."""
        self._worker.feed(self, audio)

    def reset(self, offset: int) -> None:
        """Forget what was heard: the next audio fed starts at stream offset `offset`."""
        self._worker.reset(self, offset)

    def end_turn(self) -> None:
        """The session ended the turn itself (before the silence did): speech heard from
        now on starts a new one. Verdicts still on their way are stale (a new epoch)."""
        self._worker.end_turn(self)

    def close(self) -> None:
        self._worker.discard(self)

    @property
    def pending(self) -> int:
        return self.audio.size

    def take_frame(self) -> np.ndarray:
        """The next 512 samples (there are at least that many pending)."""
        return self.audio.take_until(self.audio.start + FRAME_SAMPLES)


class VadWorker:
    """The thread that judges every stream's frames, batched (thread-safe; `close()` stops it)."""

    def __init__(self) -> None:
        self._model = SileroBatch()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._streams: set[VadStream] = set()
        self._ready: set[VadStream] = set()  # streams with a whole frame pending
        self._closed = False
        self.frames = 0  # frames judged since start (for tests and metrics)
        self.batches = 0  # forward passes of the model
        self._warm()
        threads = torch.get_num_threads()
        self._single_threaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vad-worker", daemon=True)
        self._thread.start()
        self._single_threaded.wait(10)  # set at once by the thread, before any work
        # torch.set_num_threads in the worker is also the count a thread that first uses torch
        # later starts with (the engine's): give those the process's count back.
        torch.set_num_threads(threads)

    def _warm(self) -> None:
        """TorchScript profiles and re-optimises a graph over its first calls: pay that at
        start-up, for a few batch sizes, not during somebody's first utterance."""
        noise = np.random.default_rng(0).standard_normal((4, FRAME_SAMPLES)).astype(np.float32)
        for batch in (1, 2, 4, 1, 2, 4):
            self._model(
                noise[:batch] * 0.1,
                np.zeros((batch, CONTEXT_SAMPLES), np.float32),
                torch.zeros(STATE_SHAPE[0], batch, STATE_SHAPE[2]),
            )

    def open(
        self,
        threshold: float,
        min_silence_ms: int,
        start: int,
        on_events: OnEvents,
        report_silence: bool = False,
    ) -> VadStream:
        """A stream whose first sample fed is stream offset `start`."""
        hysteresis = Hysteresis(threshold, min_silence_ms, report_silence)
        stream = VadStream(self, hysteresis, start, on_events)
        with self._lock:
            if self._closed:
                raise RuntimeError("the VAD worker is closed")
            self._streams.add(stream)
        return stream

    @property
    def streams(self) -> int:
        return len(self._streams)

    def feed(self, stream: VadStream, audio: np.ndarray) -> None:
        if audio.size == 0:
            return
        with self._lock:
            if stream.closed:
                return
            if (
                stream.silent_frames > IDLE_AFTER_FRAMES
                and not stream.hysteresis.speaking
                and np.abs(audio).max() < DIGITAL_SILENCE
                and stream.audio.peak() < DIGITAL_SILENCE
            ):
                # Idle and still silent: nothing to judge, no thread to wake. Silence can
                # neither start speech nor, as nobody speaks, stop it. What was pending (less
                # than a frame, silent too) goes with it: chunks that are no multiple of a
                # frame (20 ms from WebRTC) would otherwise never leave the buffer empty.
                stream.offset += stream.pending + audio.size
                stream.audio = AudioChunks()
                self._ready.discard(stream)
                return
            stream.audio.append(audio.astype(np.float32, copy=False))
            if stream.pending >= FRAME_SAMPLES:
                self._ready.add(stream)
                self._work.notify()

    def reset(self, stream: VadStream, offset: int) -> None:
        with self._lock:
            stream.epoch += 1
            stream.audio = AudioChunks()
            stream.offset = offset
            stream.context = np.zeros(CONTEXT_SAMPLES, np.float32)
            stream.state = torch.zeros(STATE_SHAPE)
            stream.silent_frames = 0
            stream.hysteresis.reset()
            self._ready.discard(stream)

    def end_turn(self, stream: VadStream) -> None:
        with self._lock:
            stream.epoch += 1
            stream.hysteresis.reset()

    def discard(self, stream: VadStream) -> None:
        with self._lock:
            stream.closed = True
            stream.audio = AudioChunks()
            self._streams.discard(stream)
            self._ready.discard(stream)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (idempotent); streams get no more events."""
        with self._lock:
            self._closed = True
            self._work.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        # One 32 ms frame (or a batch of a few) is far too small to split across cores: with
        # torch's usual team of one OpenMP thread per core, a frame cost ~4x the CPU time and
        # kept every core busy, the event loop's included (a flooding client's audio took
        # CPU from every other session and /healthz).
        torch.set_num_threads(1)
        self._single_threaded.set()
        # One batch per call: what it judged (streams, and through their callbacks their
        # sessions) is let go when it returns, not held while the worker waits for more.
        while self._judge_batch():
            pass

    def _judge_batch(self) -> bool:
        """Wait for frames and judge one batch of them; False once closed."""
        with self._lock:
            while not self._ready and not self._closed:
                self._work.wait()
            if self._closed:
                return False
            batch = list(self._ready)[:MAX_BATCH]
            frames = np.stack([s.take_frame() for s in batch])
            starts = [s.offset for s in batch]
            epochs = [s.epoch for s in batch]
            contexts = np.stack([s.context for s in batch])
            states = torch.cat([s.state for s in batch], dim=1)
            idle = np.zeros(len(batch), bool)
            levels = np.abs(frames).max(axis=1)
            for i, (s, frame) in enumerate(zip(batch, frames, strict=True)):
                s.offset += FRAME_SAMPLES
                s.context = frame[-CONTEXT_SAMPLES:]
                silent = bool(levels[i] < DIGITAL_SILENCE)
                s.silent_frames = s.silent_frames + 1 if silent else 0
                idle[i] = s.silent_frames > IDLE_AFTER_FRAMES
                if s.pending < FRAME_SAMPLES:
                    self._ready.discard(s)
        probs = np.zeros(len(batch), np.float32)
        new_states = torch.zeros(STATE_SHAPE[0], len(batch), STATE_SHAPE[2])
        heard = np.flatnonzero(~idle)
        if heard.size:
            index = torch.from_numpy(heard)
            try:
                probs[heard], new_states[:, index] = self._model(
                    frames[heard], contexts[heard], states[:, index]
                )
            except Exception:  # the model must never take the worker down with it
                logger.exception("VAD forward pass failed: %d frames skipped", heard.size)
                return True
            self.batches += 1
        self.frames += len(batch)
        for i, stream in enumerate(batch):
            with self._lock:
                if stream.closed or stream.epoch != epochs[i]:
                    continue  # closed or reset meanwhile: this frame is stale
                stream.state = new_states[:, i : i + 1].clone()
                events = stream.hysteresis.judge(starts[i], float(probs[i]), float(levels[i]))
            if events:
                try:
                    stream.on_events(epochs[i], events)
                except Exception:
                    logger.exception("VAD event callback failed")
        return True
