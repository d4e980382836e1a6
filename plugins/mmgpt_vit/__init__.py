"""mmgpt_vit: the image-understanding modality of mmgpt — Vision Transformers.

Importing this package registers the encoders ``"vit"`` (:class:`ViTEncoder`, any timm ViT)
and ``"clip"`` / ``"siglip"`` (:class:`CLIPVisionTower`, :class:`SiglipVisionTower`: the
vision towers of Hugging Face CLIP and SigLIP checkpoints); timm is imported only when a
``vit`` encoder is built. The projectors that map their features to the decoder's width
(``"linear"``, ``"mlp2x_gelu"``, ``"pixel_shuffle"``) live in :mod:`mmgpt.projectors`.
"""

from __future__ import annotations

from mmgpt_vit.encoder import CUSTOM_VITS, ViTEncoder, to_rgb
from mmgpt_vit.hf_towers import KNOWN_TOWERS, CLIPVisionTower, HFVisionTower, SiglipVisionTower

__all__ = [
    "CUSTOM_VITS",
    "KNOWN_TOWERS",
    "CLIPVisionTower",
    "HFVisionTower",
    "SiglipVisionTower",
    "ViTEncoder",
    "to_rgb",
]
