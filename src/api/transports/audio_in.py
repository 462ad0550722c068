"""A call's incoming audio: from aiortc's RTP receiver straight to the session, on the loop.

What aiortc 1.16 does with each 20 ms Opus packet (`rtcrtpreceiver.py`): `_handle_rtp_packet`
puts it in a `JitterBuffer(capacity=16, prefetch=4)` (which holds ~60 ms of audio back),
then puts each frame the buffer releases on a `queue.Queue`; a decoder thread decodes it to
48 kHz stereo and hands it back to the event loop with `run_coroutine_threadsafe` (a task
per frame) into the track's `asyncio.Queue`, where `track.recv()` finds it and we resample
it. Two thread hops, a task and two queues per packet were most of what an open, silent
call cost the server.

`receive_audio(receiver, buffering, on_audio)` swaps two private attributes of an
`RTCRtpReceiver` before it starts (that is, before any packet can arrive):

- the jitter buffer, for aiortc's own class sized by `webrtc.jitter_capacity` and
  `webrtc.jitter_prefetch`;
- the decoder queue, for a `DirectDecoder`: `_handle_rtp_packet` calls its `put()` on the
  event loop, which decodes the frame there and then and hands 16 kHz mono float32 audio to
  `on_audio`. The receiver's decoder thread still starts; it waits in `get()` until the
  receiver stops, then ends the track as before. Nothing reads the track.

Checked against aiortc 1.16.0: `receive_audio` raises if those attributes are missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from ...models.audio import PCM16_SCALE, SAMPLE_RATE

logger = logging.getLogger(__name__)

# The receiver's private attributes (name-mangled `__jitter_buffer` etc. in aiortc 1.16).
_JITTER = "_RTCRtpReceiver__jitter_buffer"
_QUEUE = "_RTCRtpReceiver__decoder_queue"
_THREAD = "_RTCRtpReceiver__decoder_thread"

OnAudio = Callable[[np.ndarray, int], None]
"""(16 kHz mono float32 samples, the frame's RTP timestamp from the stream's start in the
codec's clock units: a jump larger than one frame is audio that never arrived)."""


@dataclass(frozen=True)
class Buffering:
    """aiortc's JitterBuffer: `capacity` packets (a power of two) of which it holds back
    `prefetch` frames before releasing the oldest."""

    capacity: int = 16
    prefetch: int = 4


class _Decoder:
    """One codec's frames -> 16 kHz mono float32. Opus is decoded to mono by libopus itself."""

    def __init__(self, codec: RTCRtpCodecParameters) -> None:
        self.name = codec.name
        self._context: Any = None
        self._aiortc: Any = None
        if codec.mimeType.lower() == "audio/opus":
            self._context = av.CodecContext.create("libopus", "r")
            self._context.format = "s16"
            self._context.layout = "mono"
            self._context.sample_rate = 48000
        else:  # G.711, G.722: whatever aiortc decodes them to
            self._aiortc = get_decoder(codec)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

    def decode(self, frame: JitterFrame) -> list[np.ndarray]:
        if self._context is not None:
            decoded = self._context.decode(av.Packet(frame.data))
        else:
            decoded = self._aiortc.decode(frame)
        out = []
        for piece in decoded:
            piece.pts = None  # the resampler rejects timestamps it did not expect
            for mono in self._resampler.resample(piece):
                pcm = np.frombuffer(mono.planes[0], dtype=np.int16, count=mono.samples)
                out.append(pcm.astype(np.float32) / PCM16_SCALE)
        return out


class DirectDecoder:
    """Takes the place of an RTCRtpReceiver's decoder queue (see the module docstring).

    `put()` runs on the event loop inside aiortc's packet handling: it never raises (an
    exception there would end the connection's receive loop), it logs instead and, for
    anything but a frame that does not decode, calls `on_error` once.
    """

    def __init__(self, on_audio: OnAudio, on_error: Callable[[BaseException], None]) -> None:
        self.on_audio = on_audio
        self.on_error = on_error
        self.frames = 0  # frames decoded (for tests)
        self._decoder: _Decoder | None = None
        self._stopped = threading.Event()
        self._failed = False

    def put(self, item: tuple[RTCRtpCodecParameters, JitterFrame] | None) -> None:
        if item is None:  # the receiver stops: let its decoder thread end the track
            self._stopped.set()
            return
        if self._failed:
            return
        codec, frame = item
        try:
            if self._decoder is None or self._decoder.name != codec.name:
                self._decoder = _Decoder(codec)
            pieces = self._decoder.decode(frame)
        except av.FFmpegError as exc:
            # As aiortc does: keep the decoder (resetting it would not help the next frame).
            logger.warning("cannot decode a %s frame: %s", codec.name, exc)
            return
        except Exception as exc:
            self._fail(exc)
            return
        self.frames += 1
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
    buffering: Buffering,
    on_audio: OnAudio,
    on_error: Callable[[BaseException], None],
) -> DirectDecoder:
    """Make `receiver` (not yet started) buffer as `buffering` says and deliver its audio to
    `on_audio` on the event loop. Raises RuntimeError when aiortc's internals differ."""
    missing = [name for name in (_JITTER, _QUEUE, _THREAD) if not hasattr(receiver, name)]
    if missing:
        raise RuntimeError(f"this aiortc's RTCRtpReceiver has no {missing}: see audio_in.py")
    if getattr(receiver, _THREAD) is not None:
        raise RuntimeError("the receiver has already started decoding")
    setattr(receiver, _JITTER, JitterBuffer(buffering.capacity, buffering.prefetch))
    sink = DirectDecoder(on_audio, on_error)
    setattr(receiver, _QUEUE, sink)
    return sink
