"""The plugin honours mmgpt's contracts: mmgpt.testing runs the same checks as on mmgpt's own
encoders (shapes, batch independence, gradients, save/load of the weights)."""

import pytest
from mmgpt import registry
from mmgpt.testing import check_encoder, check_entry

from mmgpt_audio import SpectrogramEncoder


def test_the_installed_plugin_is_registered() -> None:
    suppliers = {(e.kind, e.name): e.distribution for e in registry.entries()}
    assert suppliers["encoder", "spectrogram"] == suppliers["dataset", "tones"] == "mmgpt-audio"


def test_the_registered_loader_conforms() -> None:
    check_entry("loader", "audio")  # tones written by save, read back, a corrupt file refused


def test_the_registered_encoder_conforms() -> None:
    check_entry("encoder", "spectrogram")  # built with SpectrogramEncoder.conformance_example()


@pytest.mark.parametrize("n_mels", [0, 16])  # linear and mel spectrograms
def test_conforms_on_every_kind_of_input(n_mels: int, tmp_path) -> None:
    import numpy as np

    from mmgpt_audio import save_wav

    encoder = SpectrogramEncoder(duration=0.25, n_mels=n_mels, dim=16, depth=1, num_heads=2)
    a, b = encoder.example_items(2)
    save_wav(tmp_path / "b.wav", b, encoder.sample_rate)
    pcm = (a.numpy() * 32767).astype(np.int16)  # integer PCM is scaled to [-1, 1]
    check_encoder(encoder, [a, tmp_path / "b.wav", pcm, (b, encoder.sample_rate)])
