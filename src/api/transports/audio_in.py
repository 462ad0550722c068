"""A call's incoming audio: from aiortc's RTP receiver straight to the session, on the loop.

What aiortc 1.16 does with each 20 ms Opus packet (`rtcrtpreceiver.py`): `_handle_rtp_packet`
puts it in a `JitterBuffer(capacity=16, prefetch=4)` (which holds ~80 ms of audio back, and
stalls on a lost packet), then puts each frame the buffer releases on a `queue.Queue`; a
decoder thread decodes it to 48 kHz stereo and hands it back to the event loop with
`run_coroutine_threadsafe` (a task per frame) into the track's `asyncio.Queue`, where
`track.recv()` finds it and we resample it. Two thread hops, a task and two queues per
packet were most of what an open, silent call cost the server.

`receive_audio(receiver, window, on_audio, on_error)` swaps two private attributes of an
`RTCRtpReceiver` before it starts (that is, before any packet can arrive):

- the jitter buffer, for a `reorder.ReorderBuffer` that waits behind a missing packet for at
  most `window` (`webrtc.jitter_window`) later ones;
- the decoder queue, for a `DirectDecoder`: `_handle_rtp_packet` calls its `put()` on the
  event loop, which decodes the frame there and then (with any more the buffer released
  at the same time) and hands 16 kHz mono float32 audio to `on_audio`: Opus through
  libopus at 16 kHz (`opus.py`, no resampler), concealing short gaps; other codecs, or Opus
  when libopus cannot be loaded, through aiortc's decoder and PyAV's resampler. The
  receiver's decoder thread still starts; it waits in `get()` until the receiver stops,
  then ends the track as before. Nothing reads the track.

Checked against aiortc 1.16.0: `receive_audio` raises if those attributes are missing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc import RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from ...models.audio import PCM16_SCALE, SAMPLE_RATE
from . import opus
from .reorder import ReorderBuffer

logger = logging.getLogger(__name__)

# The receiver's private attributes (name-mangled `__jitter_buffer` etc. in aiortc 1.16).
_JITTER = "_RTCRtpReceiver__jitter_buffer"
_QUEUE = "_RTCRtpReceiver__decoder_queue"
_THREAD = "_RTCRtpReceiver__decoder_thread"

_RTP_TICKS_PER_SAMPLE = 48000 // SAMPLE_RATE  # Opus's RTP clock is 48 kHz whatever it carries
_CONCEAL_STEP = SAMPLE_RATE // 400  # libopus conceals multiples of 2.5 ms
MAX_CONCEAL_MS = 120  # longer gaps (the sender paused) are not filled
_MAX_CONCEAL = SAMPLE_RATE * MAX_CONCEAL_MS // 1000

OnAudio = Callable[[np.ndarray, int], None]
"""(16 kHz mono float32 samples, the frame's RTP timestamp from the stream's start in the
codec's clock units). Audio concealed for a gap comes as its own piece just before the
frame after the gap, with that frame's timestamp; a gap left unfilled (longer than
MAX_CONCEAL_MS) shows as a jump in timestamps."""


class _OpusDecoder:
    """Opus through libopus at 16 kHz. A frame whose RTP timestamp shows up to MAX_CONCEAL_MS
    of audio missing before it (lost, or dropped late by the jitter buffer) first gets that
    much of libopus's concealment, so the session's clock stays the sender's."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._opus = opus.OpusDecoder(lib)
        self._next: int | None = None  # the RTP timestamp the next frame should have
        self.concealed = 0  # samples (for tests and benchmarks)

    def decode(self, frame: JitterFrame) -> list[np.ndarray]:
        out = []
        if self._next is not None:
            missing = (frame.timestamp - self._next) // _RTP_TICKS_PER_SAMPLE
            missing -= missing % _CONCEAL_STEP
            if 0 < missing <= _MAX_CONCEAL:
                out.append(self._opus.decode(None, missing))
                self.concealed += missing
        pcm = self._opus.decode(frame.data)
        out.append(pcm)
        self._next = frame.timestamp + pcm.size * _RTP_TICKS_PER_SAMPLE
        return out


class _PyAVDecoder:
    """Any codec aiortc decodes (Opus too, when libopus cannot be loaded), resampled."""

    def __init__(self, codec: RTCRtpCodecParameters) -> None:
        self._decoder = get_decoder(codec)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self.concealed = 0

    def decode(self, frame: JitterFrame) -> list[np.ndarray]:
        out = []
        for piece in self._decoder.decode(frame):
            piece.pts = None  # the resampler rejects timestamps it did not expect
            for mono in self._resampler.resample(piece):
                pcm = np.frombuffer(mono.planes[0], dtype=np.int16, count=mono.samples)
                out.append(pcm.astype(np.float32) / PCM16_SCALE)
        return out


def _decoder_for(codec: RTCRtpCodecParameters) -> _OpusDecoder | _PyAVDecoder:
    lib = opus.load_libopus()
    if codec.mimeType.lower() == "audio/opus" and lib is not None:
        return _OpusDecoder(lib)
    return _PyAVDecoder(codec)


class DirectDecoder:
    """Takes the place of an RTCRtpReceiver's decoder queue (see the module docstring).

    `put()` runs on the event loop inside aiortc's packet handling: it never raises (an
    exception there would end the connection's receive loop), it logs instead and, for
    anything but a frame that does not decode, calls `on_error` once.
    """

    def __init__(
        self,
        on_audio: OnAudio,
        on_error: Callable[[BaseException], None],
        ready: deque[JitterFrame] | None = None,
    ) -> None:
        self.on_audio = on_audio
        self._ready = ready if ready is not None else deque()  # released with the one put
        self.on_error = on_error
        self.frames = 0  # frames decoded (for tests and benchmarks)
        self.concealed = 0  # samples of lost audio filled in by the decoder
        self._decoder: _OpusDecoder | _PyAVDecoder | None = None
        self._codec: str | None = None
        self._stopped = threading.Event()
        self._failed = False

    def put(self, item: tuple[RTCRtpCodecParameters, JitterFrame] | None) -> None:
        if item is None:  # the receiver stops: let its decoder thread end the track
            self._stopped.set()
            return
        codec, frame = item
        self._decode(codec, frame)
        while self._ready:
            self._decode(codec, self._ready.popleft())

    def _decode(self, codec: RTCRtpCodecParameters, frame: JitterFrame) -> None:
        if self._failed:
            return
        try:
            if self._decoder is None or self._codec != codec.name:
                self._decoder, self._codec = _decoder_for(codec), codec.name
            pieces = self._decoder.decode(frame)
        except (av.FFmpegError, opus.OpusError) as exc:
            # As aiortc does: keep the decoder (resetting it would not help the next frame).
            logger.warning("cannot decode a %s frame: %s", codec.name, exc)
            return
        except Exception as exc:
            self._fail(exc)
            return
        self.frames += 1
        self.concealed = self._decoder.concealed
        for pcm in pieces:
            try:
                self.on_audio(pcm, frame.timestamp)
            except Exception as exc:
                self._fail(exc)
                return

    def get(self, block: bool = True, timeout: float | None = None) -> None:
        """What the receiver's decoder thread waits in: None (end) once the receiver stops."""
        self._stopped.wait(timeout if block else 0)

    def _fail(self, exc: BaseException) -> None:
        self._failed = True
        self.on_error(exc)


def receive_audio(
    receiver: RTCRtpReceiver,
    window: int,
    on_audio: OnAudio,
    on_error: Callable[[BaseException], None],
) -> DirectDecoder:
    """Make `receiver` (not yet started) reorder its packets waiting for at most `window`
    behind a missing one, and deliver its audio to `on_audio` on the event loop. Raises
    RuntimeError when aiortc's internals differ."""
    missing = [name for name in (_JITTER, _QUEUE, _THREAD) if not hasattr(receiver, name)]
    if missing:
        raise RuntimeError(f"this aiortc's RTCRtpReceiver has no {missing}: see audio_in.py")
    if getattr(receiver, _THREAD) is not None:
        raise RuntimeError("the receiver has already started decoding")
    buffer = ReorderBuffer(window)
    setattr(receiver, _JITTER, buffer)
    sink = DirectDecoder(on_audio, on_error, buffer.ready)
    setattr(receiver, _QUEUE, sink)
    return sink
