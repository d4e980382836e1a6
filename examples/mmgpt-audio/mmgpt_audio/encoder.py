"""A waveform encoder: log-magnitude (mel) spectrogram → small conv + transformer → tokens.

``SpectrogramEncoder`` satisfies mmgpt's ``ModalityEncoder`` contract for the modality
``"audio"``: the processor expands each ``"<audio>"`` in a conversation into ``num_tokens``
slots, and the model fills them with ``projector(encoder(waveform))``.

    waveform (N, num_samples)
      → |STFT| (N, n_fft/2+1, frames)     torch.stft, Hann window
      → mel filterbank (N, n_mels, frames) triangular filters (skipped when n_mels=0)
      → log1p                              loudness stays visible: no per-item normalisation
      → 2 strided convs (N, dim, frames/4) → + position → transformer blocks
      → average pooling to num_tokens → LayerNorm → (N, num_tokens, dim)
"""

from __future__ import annotations

import math
import os
import wave
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmgpt.registry import register
from torch import Tensor, nn


# -- audio files --------------------------------------------------------------------------
def load_wav(path: str | os.PathLike[str]) -> tuple[Tensor, int]:
    """A PCM ``.wav`` file → (mono float32 waveform in [-1, 1], sample rate)."""
    try:
        with wave.open(os.fspath(path), "rb") as f:
            rate, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
            frames = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from exc
    if width == 1:  # 8-bit WAV is unsigned
        data = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.dtype(f"<i{width}")
        data = np.frombuffer(frames, dtype).astype(np.float32) / -np.iinfo(dtype).min
    elif width == 3:  # 24-bit: widen each little-endian sample to 32 bits
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        padded = np.concatenate([np.zeros((len(raw), 1), np.uint8), raw], axis=1)
        data = padded.copy().view("<i4").reshape(-1).astype(np.float32) / 2**31
    else:
        raise ValueError(f"{path}: unsupported sample width of {width} bytes")
    mono = data.reshape(-1, channels).mean(axis=1)  # average the channels
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), rate


def save_wav(path: str | os.PathLike[str], waveform: Any, sample_rate: int) -> None:
    """Write a mono waveform in [-1, 1] as a 16-bit PCM ``.wav`` file."""
    data = np.asarray(waveform, dtype=np.float64).reshape(-1)
    pcm = np.round(np.clip(data, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())


# -- mel filterbank ---------------------------------------------------------------------------
def hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)  # the HTK mel scale


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular filters ``(n_mels, n_freqs)`` over the STFT bins ``0 .. sample_rate / 2``.

    Filter ``m`` rises linearly from mel point ``m`` to 1 at point ``m + 1`` and falls back to
    0 at point ``m + 2``; the ``n_mels + 2`` points are evenly spaced in mel between ``f_min``
    and ``f_max``. Between two centres the neighbouring filters sum to 1.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"mel_filterbank: need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2}, "
            f"got f_min={f_min}, f_max={f_max}"
        )
    f64 = dict(dtype=torch.float64)  # float32 would shift the edges by ~1e-6
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, **f64)  # (F,)
    lowest, highest = hz_to_mel(torch.tensor([f_min, f_max], **f64)).tolist()
    points = mel_to_hz(torch.linspace(lowest, highest, n_mels + 2, **f64))  # (M + 2,)
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]  # (M, 1)
    rising = (freqs - lower) / (centre - lower)  # (M, F)
    falling = (upper - freqs) / (upper - centre)  # (M, F)
    bank = torch.clamp(torch.minimum(rising, falling), min=0.0)
    empty = (bank.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"mel_filterbank: {n_mels} mel bands are too many for {n_freqs} frequency bins "
            f"(bands {empty[:5]} cover no bin); use fewer n_mels or a larger n_fft"
        )
    return bank.float()


# -- the encoder ------------------------------------------------------------------------------
def _conv_length(length: int) -> int:
    return (length + 2 * 1 - 3) // 2 + 1  # Conv1d(kernel_size=3, stride=2, padding=1)


@register("encoder", "spectrogram")
class SpectrogramEncoder(nn.Module):
    """Waveforms → ``(N, num_tokens, dim)`` audio tokens; see the module docstring.

    Args:
        sample_rate: the rate every input must have, in Hz (no resampling here).
        duration: seconds per item; ``preprocess`` pads with silence or crops the end.
        n_fft, hop_length: STFT size and hop (default ``n_fft // 2``).
        n_mels: mel bands; ``0`` keeps the linear-frequency log-magnitude spectrogram.
        f_min, f_max: frequency range of the mel bands (default 0 .. sample_rate / 2).
        dim: width of the convs and transformer, and of the output tokens.
        depth, num_heads: transformer blocks and attention heads.
        num_tokens: tokens per item (time is average-pooled down to this many).
        dropout: dropout inside the transformer blocks.
    """

    modality = "audio"
    placeholder = "<audio>"

    def __init__(
        self,
        *,
        sample_rate: int = 8000,
        duration: float = 1.0,
        n_fft: int = 256,
        hop_length: int | None = None,
        n_mels: int = 32,
        f_min: float = 0.0,
        f_max: float | None = None,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        num_tokens: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hop_length = n_fft // 2 if hop_length is None else hop_length
        sizes = dict(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, dim=dim)
        sizes.update(depth=depth, num_heads=num_heads, num_tokens=num_tokens)
        for name, value in sizes.items():
            _check_positive_int(name, value)
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 0:
            raise ValueError(f"SpectrogramEncoder: n_mels must be an int >= 0, got {n_mels!r}")
        if dim % num_heads:
            raise ValueError(
                f"SpectrogramEncoder: dim={dim} is not divisible by num_heads={num_heads}"
            )
        num_samples = round(sample_rate * duration)
        if num_samples < n_fft:
            raise ValueError(
                f"SpectrogramEncoder: duration={duration}s at {sample_rate} Hz gives "
                f"{num_samples} samples, fewer than n_fft={n_fft}"
            )
        self.sample_rate, self.duration = sample_rate, float(duration)
        self.num_samples = num_samples
        self.n_fft, self.hop_length, self.n_mels = n_fft, hop_length, n_mels
        self.f_min, self.f_max = float(f_min), f_max
        self.dim, self.depth, self.num_heads, self.dropout = dim, depth, num_heads, dropout
        self.num_tokens = num_tokens
        self.output_dim = dim

        n_freqs = n_fft // 2 + 1
        # Persistent buffers: a saved model carries them, and they follow .to(device).
        self.register_buffer("window", torch.hann_window(n_fft))
        bank = mel_filterbank(n_freqs, n_mels, sample_rate, f_min, f_max) if n_mels else None
        self.register_buffer("mel_bank", bank)  # (n_mels, n_freqs), or None: linear bins
        frames = 1 + num_samples // hop_length  # torch.stft(center=True)
        self.num_frames = _conv_length(_conv_length(frames))  # after the two strided convs
        if num_tokens > self.num_frames:
            raise ValueError(
                f"SpectrogramEncoder: num_tokens={num_tokens} exceeds the {self.num_frames} "
                "time steps left after the convs; lower num_tokens or hop_length, or raise duration"
            )
        bins = n_mels or n_freqs
        self.stem = nn.Sequential(  # (N, bins, frames) → (N, dim, frames / 4)
            nn.Conv1d(bins, dim, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        self.position = nn.Parameter(torch.randn(1, self.num_frames, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    # -- inputs ---------------------------------------------------------------------------
    def preprocess(self, items: Sequence[Any]) -> Tensor:
        """Waveforms → ``(N, num_samples)`` float32, padded with silence or cropped at the end.

        An item is a 1-D float tensor or numpy array at ``sample_rate`` (integer arrays are
        PCM and get scaled to [-1, 1]), a ``(waveform, sample_rate)`` pair, or a ``.wav``
        path. A sample rate other than the encoder's is an error.
        """
        if isinstance(items, (str, os.PathLike, Tensor, np.ndarray)):
            items = [items]
        waves = [self._waveform(item, i) for i, item in enumerate(items)]
        if not waves:
            return torch.empty(0, self.num_samples)
        return torch.stack([_fit(w, self.num_samples) for w in waves])  # (N, num_samples)

    def _waveform(self, item: Any, index: int) -> Tensor:
        rate, source = self.sample_rate, f"audio {index}"
        if isinstance(item, (str, os.PathLike)):
            source = f"{source} ({os.fspath(item)})"
            item, rate = load_wav(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int):
            item, rate = item
        if rate != self.sample_rate:
            raise ValueError(
                f"SpectrogramEncoder: {source} has a sample rate of {rate} Hz, but this "
                f"encoder expects {self.sample_rate} Hz; resample it first"
            )
        if isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.integer):
            item = item.astype(np.float32) / -np.iinfo(item.dtype).min  # PCM → [-1, 1]
        if isinstance(item, (np.ndarray, list)):
            item = torch.as_tensor(np.asarray(item, dtype=np.float32))
        if not isinstance(item, Tensor) or not item.is_floating_point():
            what = item.dtype if isinstance(item, Tensor) else type(item).__name__
            raise TypeError(
                f"SpectrogramEncoder: {source} must be a float waveform (tensor or numpy "
                f"array), a (waveform, sample_rate) pair or a .wav path, got {what}"
            )
        if item.dim() != 1 or item.numel() == 0:
            raise ValueError(
                f"SpectrogramEncoder: {source} must be a non-empty 1-D (mono) waveform, got "
                f"shape {tuple(item.shape)}; mix channels down first (e.g. x.mean(0))"
            )
        if not bool(torch.isfinite(item).all()):
            raise ValueError(f"SpectrogramEncoder: {source} has NaN or infinite samples")
        return item.detach().float().cpu()

    # -- forward ---------------------------------------------------------------------------
    def spectrogram(self, waveforms: Tensor) -> Tensor:
        """``(N, num_samples)`` → log-magnitude (mel) spectrogram ``(N, bins, frames)``."""
        stft = torch.stft(
            waveforms.float(),
            self.n_fft,
            self.hop_length,
            window=self.window.float(),  # the STFT runs in float32 whatever the model's dtype
            center=True,
            return_complex=True,
        )  # (N, n_fft / 2 + 1, frames)
        magnitude = stft.abs()
        if self.mel_bank is not None:
            bank = self.mel_bank.float()  # (n_mels, n_freqs)
            magnitude = torch.einsum("mf,nft->nmt", bank, magnitude)  # (N, n_mels, frames)
        return torch.log1p(magnitude)

    def forward(self, waveforms: Tensor) -> Tensor:
        """``(N, num_samples)`` preprocessed waveforms → ``(N, num_tokens, dim)``."""
        if waveforms.dim() != 2 or waveforms.size(1) != self.num_samples:
            raise ValueError(
                f"SpectrogramEncoder: expected waveforms of shape (N, {self.num_samples}), got "
                f"{tuple(waveforms.shape)}; run preprocess() first"
            )
        x = self.spectrogram(waveforms).to(self.position.dtype)  # (N, bins, T)
        x = self.stem(x).transpose(1, 2) + self.position  # (N, T', dim)
        x = self.blocks(x)  # (N, T', dim)
        x = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_tokens).transpose(1, 2)
        return self.norm(x)  # (N, num_tokens, dim)

    # -- persistence and conformance ----------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this encoder (random weights) with ``create``."""
        return {
            "sample_rate": self.sample_rate,
            "duration": self.duration,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "f_min": self.f_min,
            "f_max": self.f_max,
            "dim": self.dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "num_tokens": self.num_tokens,
            "dropout": self.dropout,
        }

    @classmethod
    def conformance_example(cls) -> SpectrogramEncoder:
        """A small instance for ``mmgpt.testing.check_entry``."""
        return cls(duration=0.25, n_mels=16, dim=16, depth=1, num_heads=2, num_tokens=2)

    def example_items(self, n: int) -> list[Tensor]:
        """``n`` sine waves of different pitches and lengths (some padded, some cropped)."""
        items = []
        for i in range(n):
            length = int(self.num_samples * (0.5 + 0.4 * i))
            t = torch.arange(length) / self.sample_rate
            items.append(0.5 * torch.sin(2 * math.pi * (200.0 * (i + 1)) * t))
        return items

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, duration={self.duration}, n_mels={self.n_mels}, "
            f"num_tokens={self.num_tokens}, dim={self.dim}"
        )


def _fit(waveform: Tensor, length: int) -> Tensor:
    """Crop the end, or pad it with silence, to ``length`` samples."""
    if waveform.numel() >= length:
        return waveform[:length]
    return F.pad(waveform, (0, length - waveform.numel()))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"SpectrogramEncoder: {name} must be a positive int, got {value!r}")
