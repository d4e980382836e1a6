"""The ``"audio"`` loader: mmgpt reads ``.wav`` files of datasets, ``mmgpt generate --input``
and the chat demo's uploads through it, and writes audio outputs with ``save``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mmgpt.registry import register

from mmgpt_audio.encoder import load_wav, save_wav


@register("loader", "audio")
class WavLoader:
    """``.wav`` files → ``(waveform, sample_rate)``, the pair ``SpectrogramEncoder.preprocess``
    takes (it refuses a rate other than its own, naming the file's)."""

    modality = "audio"
    placeholder = "<audio>"  # the same as the encoder's
    extensions = (".wav",)
    max_bytes = 16 << 20  # about 8 minutes of 16-bit mono at 16 kHz

    def load(self, path: Path) -> tuple[torch.Tensor, int]:
        return load_wav(path)  # a file that is not PCM WAV: ValueError naming it

    def example_items(self, n: int) -> list[tuple[torch.Tensor, int]]:
        """``n`` short tones (for ``mmgpt.testing.check_loader``)."""
        rate = 16000
        t = torch.arange(rate // 4) / rate
        return [(0.5 * torch.sin(2 * torch.pi * (220 * (i + 1)) * t), rate) for i in range(n)]

    def save(self, item: Any, path: Path) -> Path:
        """Write ``(waveform, sample_rate)`` as a 16-bit PCM ``.wav`` file."""
        waveform, rate = item
        path = Path(path).with_suffix(".wav")
        save_wav(path, waveform, rate)
        return path
