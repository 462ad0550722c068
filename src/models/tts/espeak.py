"""espeak-ng run as a separate program (GPL-3: never linked or imported), one process per
phrase. 22.05 kHz, robotic but instant: first chunk ~10 ms after the call."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .base import CHUNK_MS, TtsError, TtsLoadError, to_chunks

logger = logging.getLogger(__name__)

ESPEAK_PROGRAM = "espeak-ng"
ESPEAK_DEFAULT_VOICE = "en-us"
ESPEAK_BASE_WPM = 175  # espeak-ng's own default rate; tts.speed scales it
# Text goes to espeak-ng as one argv element, and Linux caps one at 128 KiB; phrases are far
# shorter, so a longer text is a caller bug, refused rather than cut.
ESPEAK_MAX_TEXT_BYTES = 100_000
ESPEAK_PROBE_TIMEOUT_S = 10.0  # the load-time check normally takes ~10 ms
_PIPE_READ_BYTES = 65_536  # while parsing the WAV header; PCM is read in CHUNK_MS slices


@dataclass(frozen=True)
class WavFormat:
    sample_rate: int
    channels: int
    bits: int


def parse_wav_header(data: bytes) -> tuple[WavFormat, int] | None:
    """The format of a streamed WAV and the offset where its samples start, or None when `data`
    does not hold the whole header yet.

    The data chunk's size is ignored: a program writing WAV to a pipe cannot know it and
    writes a placeholder (espeak-ng: 0x7ffff000), so the samples run to the end of the stream.
    Raises TtsError when the bytes are not a PCM WAV.
    """
    if len(data) < 12:
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TtsError(f"expected a WAV stream, got {data[:12]!r}")
    offset = 12
    fmt: WavFormat | None = None
    while len(data) >= offset + 8:
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if chunk_id == b"data":
            if fmt is None:
                raise TtsError("WAV stream has no fmt chunk before its data")
            return fmt, body
        if len(data) < body + size:
            return None
        if chunk_id == b"fmt ":
            if size < 16:
                raise TtsError(f"WAV fmt chunk too short ({size} bytes)")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag != 1:  # WAVE_FORMAT_PCM
                raise TtsError(f"WAV stream is not PCM (format tag {tag})")
            fmt = WavFormat(sample_rate=rate, channels=channels, bits=bits)
        offset = body + size + (size & 1)  # chunks are padded to an even length
    return None


class EspeakTts:
    """espeak-ng run as a separate program, one process per phrase (thread-safe).

    Construction checks that the program exists and knows the voice (one ~10 ms run), and
    learns its output rate. `tts.voice` is any espeak-ng voice (`espeak-ng --voices`), with an
    optional variant, e.g. "en-us", "en-gb+f3"; `speed` scales espeak-ng's 175 words/minute.
    """

    name = "espeak"

    def __init__(self, voice: str = ESPEAK_DEFAULT_VOICE, speed: float = 1.0) -> None:
        program = shutil.which(ESPEAK_PROGRAM)
        if program is None:
            raise TtsLoadError(
                "tts.engine espeak needs the espeak-ng program, which is not installed: "
                "install the Debian/Ubuntu package with `apt install espeak-ng`"
            )
        if not voice or voice.startswith("-"):
            raise TtsLoadError(f"invalid espeak-ng voice {voice!r}")
        self.voice = voice
        self.speed = speed
        self.words_per_minute = round(ESPEAK_BASE_WPM * speed)
        self._program = program
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()
        self._closed = False
        self.sample_rate = self._probe()
        self._chunk_samples = self.sample_rate * CHUNK_MS // 1000
        logger.info(
            "TTS espeak-ng ready: voice %s, %d words/min, %d Hz",
            voice,
            self.words_per_minute,
            self.sample_rate,
        )

    def _command(self, text: str) -> list[str]:
        # `-b 1`: the text is UTF-8; `--` ends the options, so a phrase starting with "-" is
        # spoken rather than parsed as one.
        return [
            self._program,
            "--stdout",
            "-b",
            "1",
            "-v",
            self.voice,
            "-s",
            str(self.words_per_minute),
            "--",
            text,
        ]

    def _probe(self) -> int:
        """Speak nothing once: checks the voice and reads the rate from the WAV header."""
        try:
            done = subprocess.run(
                self._command(""),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=ESPEAK_PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TtsLoadError(f"cannot run {self._program}: {exc}") from None
        error = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0:
            if "voice" in error.lower():
                raise TtsLoadError(
                    f"espeak-ng has no voice {self.voice!r} ({error}); "
                    "list the installed ones with `espeak-ng --voices`"
                )
            raise TtsLoadError(f"espeak-ng failed (exit code {done.returncode}): {error}")
        header = parse_wav_header(done.stdout)
        if header is None:
            raise TtsLoadError(f"espeak-ng wrote no WAV header ({error or 'no message'})")
        fmt, _ = header
        if fmt.channels != 1 or fmt.bits != 16:
            raise TtsLoadError(f"espeak-ng writes {fmt}, expected mono 16-bit PCM")
        return fmt.sample_rate

    def stream(self, text: str) -> Iterator[np.ndarray]:
        """See `TtsEngine.stream`. Each phrase is a new espeak-ng process, killed (and reaped)
        when the iterator is closed early."""
        text = text.replace("\x00", " ")  # argv cannot carry NUL
        if not text.strip():
            return
        if len(text.encode()) > ESPEAK_MAX_TEXT_BYTES:
            raise TtsError(
                f"phrase too long for espeak-ng ({len(text.encode())} bytes, at most "
                f"{ESPEAK_MAX_TEXT_BYTES}): split the text into phrases"
            )
        with self._lock:
            if self._closed:
                raise TtsError("the espeak engine is closed")
            try:
                process = subprocess.Popen(
                    self._command(text),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            except OSError as exc:
                raise TtsError(f"cannot run {self._program}: {exc}") from None
            self._processes.add(process)
        try:
            yield from self._read(process)
        finally:
            # Runs on normal end, on error and on close(): never leave a process or a zombie.
            if process.poll() is None:
                process.kill()
            process.wait()
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            process.stderr.close()
            with self._lock:
                self._processes.discard(process)

    def _read(self, process: subprocess.Popen[bytes]) -> Iterator[np.ndarray]:
        assert process.stdout is not None and process.stderr is not None
        fd = process.stdout.fileno()
        buffer = bytearray()
        header: tuple[WavFormat, int] | None = None
        while header is None:
            # os.read returns what the pipe holds now instead of waiting to fill a buffer.
            data = os.read(fd, _PIPE_READ_BYTES)
            if not data:
                break
            buffer += data
            header = parse_wav_header(bytes(buffer))
        if header is None:
            self._check_exit(process, "espeak-ng ended before writing a WAV header")
            return
        fmt, start = header
        if fmt.sample_rate != self.sample_rate or fmt.channels != 1 or fmt.bits != 16:
            raise TtsError(f"espeak-ng wrote {fmt}, expected mono 16-bit at {self.sample_rate} Hz")
        del buffer[:start]
        chunk_bytes = 2 * self._chunk_samples
        while True:
            whole = len(buffer) & ~1
            if whole:
                pcm = np.frombuffer(bytes(buffer[:whole]), dtype="<i2").astype(np.int16)
                del buffer[:whole]
                yield from to_chunks(pcm, self._chunk_samples)
            data = os.read(fd, chunk_bytes)
            if not data:
                break
            buffer += data
        self._check_exit(process, None)

    def _check_exit(self, process: subprocess.Popen[bytes], reason: str | None) -> None:
        """Raise TtsError if espeak-ng failed (or `reason` is given), unless the engine was
        closed meanwhile (close() kills running processes: their streams just end)."""
        assert process.stderr is not None
        returncode = process.wait()
        if self._closed:
            return
        if returncode != 0 or reason is not None:
            error = process.stderr.read().decode(errors="replace").strip()
            raise TtsError(
                f"{reason or 'espeak-ng failed'} (exit code {returncode}): {error or 'no message'}"
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            running = list(self._processes)
        for process in running:
            if process.poll() is None:
                process.kill()
