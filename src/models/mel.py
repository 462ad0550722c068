"""Voxtral's log-mel, computed only over the samples that exist, on the model's device.

The Hugging Face processor pads every utterance with zeros to a multiple of 30 s and runs a
centred STFT over all of it. Every frame that sees only padding has power 0, so its value is
the known constant `(max(-10, gmax - 8) + 4) / 4`. We therefore run the STFT over the real
samples (plus the 200-sample reflection on the left and the 400 zeros the last real frames
see on the right) and fill the rest with that constant: bit-exact, and the cost follows the
utterance length instead of 30 s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .audio import SAMPLE_RATE

N_FFT = 400  # samples, 25 ms window
HOP_LENGTH = 160  # samples, 10 ms
N_MELS = 128
CHUNK_LENGTH_S = 30
N_SAMPLES = CHUNK_LENGTH_S * SAMPLE_RATE  # 480000 samples per encoder window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
ENCODER_STRIDE = 2  # mel frames per audio-encoder position (its second conv has stride 2)
PROJECTOR_STACK = 4  # encoder positions stacked into one audio token by the projector
AUDIO_TOKENS_PER_WINDOW = N_FRAMES // ENCODER_STRIDE // PROJECTOR_STACK  # 375 (12.5 Hz)
_HALF = N_FFT // 2  # reflection padding of a centred STFT


class LogMel:
    """Reduced log-mel for one device; holds the window and filter bank there."""

    def __init__(self, mel_filters: np.ndarray, device: torch.device) -> None:
        if mel_filters.shape != (N_FFT // 2 + 1, N_MELS):
            raise ValueError(f"expected a ({N_FFT // 2 + 1}, {N_MELS}) mel filter bank")
        self.device = device
        self._window = torch.hann_window(N_FFT, device=device)
        # Same float32 conversion the processor makes, transposed once for the matmul.
        self._filters_t = torch.from_numpy(mel_filters).to(device, torch.float32).T.contiguous()

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """(n_windows, 128, 3000) float32 features of one 16 kHz mono float32 utterance."""
        n = int(audio.shape[0])
        if n == 0:
            raise ValueError("empty audio")
        n_windows = -(-n // N_SAMPLES)
        total_frames = n_windows * N_FRAMES
        padded_len = n_windows * N_SAMPLES
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(self.device)
        if n + 2 * N_FFT <= padded_len:
            # The right edge of the padded signal is zeros: STFT only where real samples are.
            core = torch.nn.functional.pad(x, (0, N_FFT))
        else:
            # The last real samples sit within a window of the end of the padded signal,
            # where the centred STFT reflects them back: take the padded signal as is.
            core = torch.nn.functional.pad(x, (0, padded_len - n))
            core = torch.cat([core, core[-_HALF - 1 : -1].flip(0)])
        signal = torch.cat([core[1 : _HALF + 1].flip(0), core])
        stft = torch.stft(
            signal, N_FFT, HOP_LENGTH, window=self._window, center=False, return_complex=True
        )
        power = (stft[:, :total_frames].abs() ** 2).contiguous()
        log_spec = torch.clamp(self._filters_t @ power, min=1e-10).log10()
        frames = log_spec.shape[1]
        gmax = log_spec.max()
        out = log_spec.new_empty((N_MELS, total_frames))
        out[:, :frames] = log_spec
        if frames < total_frames:
            # A padding frame's value, computed as the processor does (float32 log10 of 1e-10).
            floor = torch.clamp(log_spec.new_zeros(()), min=1e-10).log10()
            out[:, frames:] = floor
            gmax = torch.maximum(gmax, floor)  # the padding frames take part in the max
        out = (torch.maximum(out, gmax - 8.0) + 4.0) / 4.0
        return out.reshape(N_MELS, n_windows, N_FRAMES).transpose(0, 1)


def processor_features(feature_extractor: Any, audio: np.ndarray) -> torch.Tensor:
    """The Hugging Face processor's features for one utterance (`model.mel: processor`).

    Pads with zeros to a multiple of 30 s, as mistral_common does before the processor's
    feature extractor runs over every window; the result is on the CPU.
    """
    n_windows = -(-audio.shape[0] // N_SAMPLES)
    padded = np.pad(audio, (0, n_windows * N_SAMPLES - audio.shape[0]))
    features = feature_extractor(
        padded,
        sampling_rate=SAMPLE_RATE,
        padding=True,
        truncation=False,
        pad_to_multiple_of=N_SAMPLES,
        return_tensors="pt",
    )["input_features"]
    result: torch.Tensor = features.reshape(N_MELS, n_windows, N_FRAMES).transpose(0, 1)
    return result
