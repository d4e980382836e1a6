"""mmgpt_vit: the image-understanding modality of mmgpt — timm Vision Transformers.

Importing this package registers the encoder ``"vit"`` (:class:`ViTEncoder`); timm itself is
imported only when an encoder is built. The projectors that map its features to the decoder's
width (``"linear"``, ``"mlp2x_gelu"``) live in :mod:`mmgpt.projectors`.
"""

from __future__ import annotations

from mmgpt_vit.encoder import CUSTOM_VITS, ViTEncoder, to_rgb

__all__ = ["CUSTOM_VITS", "ViTEncoder", "to_rgb"]
