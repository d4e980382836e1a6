"""An audio modality for mmgpt: the ``"spectrogram"`` encoder and the ``"tones"`` dataset.

Importing the package registers both; mmgpt imports it through the ``mmgpt.plugins`` entry
point declared in ``pyproject.toml``.
"""

from mmgpt_audio.encoder import SpectrogramEncoder, load_wav, mel_filterbank, save_wav
from mmgpt_audio.tones import ToneDataset

__all__ = ["SpectrogramEncoder", "ToneDataset", "load_wav", "mel_filterbank", "save_wav"]
