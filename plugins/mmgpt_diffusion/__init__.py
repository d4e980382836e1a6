"""mmgpt_diffusion: the diffusion image decoder and the output projectors feeding it.

Importing the package registers decoder ``diffusion`` and projectors ``signal_mlp`` and
``signal_resampler``; it needs only torch. diffusers (the ``diffusion`` extra) is imported
when a decoder is built.
"""

from mmgpt_diffusion.decoder import TINY_UNET_CONFIG, DiffusionDecoder
from mmgpt_diffusion.projectors import SignalMLP, SignalResampler

__all__ = ["TINY_UNET_CONFIG", "DiffusionDecoder", "SignalMLP", "SignalResampler"]
