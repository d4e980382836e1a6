"""An audio modality for mmgpt: the ``"spectrogram"`` encoder, the ``"audio"`` loader of
``.wav`` files and the ``"tones"`` dataset.

Importing the package registers them; mmgpt imports it through the ``mmgpt.plugins`` entry
point declared in ``pyproject.toml``.
"""

from mmgpt_audio.encoder import SpectrogramEncoder, load_wav, mel_filterbank, save_wav
from mmgpt_audio.loader import WavLoader
from mmgpt_audio.tones import ToneDataset

__all__ = [
    "SpectrogramEncoder",
    "ToneDataset",
    "WavLoader",
    "load_wav",
    "mel_filterbank",
    "save_wav",
]
