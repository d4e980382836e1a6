"""mmgpt_diffusion: the diffusion image decoder, the output projectors feeding it, and the
autoencoder whose latent space it can work in.

Importing the package registers decoder ``diffusion``, projectors ``signal_mlp`` and
``signal_resampler``, model preset ``autoencoder-kl`` and objective ``autoencoder``; it needs
only torch. diffusers (the ``diffusion`` extra) is imported when a decoder or autoencoder is
built.
"""

from mmgpt_diffusion.autoencoder import autoencoder_kl, load_autoencoder
from mmgpt_diffusion.autoencoder_objective import AutoencoderObjective
from mmgpt_diffusion.decoder import TINY_UNET_CONFIG, DiffusionDecoder
from mmgpt_diffusion.projectors import SignalMLP, SignalResampler

__all__ = [
    "TINY_UNET_CONFIG",
    "AutoencoderObjective",
    "DiffusionDecoder",
    "SignalMLP",
    "SignalResampler",
    "autoencoder_kl",
    "load_autoencoder",
]
