"""The vision towers of Hugging Face CLIP and SigLIP models as mmgpt image encoders.

Registered as the encoders ``"clip"`` (:class:`CLIPVisionTower`) and ``"siglip"``
(:class:`SiglipVisionTower`): the image halves of ``CLIPModel`` / ``CLIPVisionModel`` and
``SiglipModel`` / ``SiglipVisionModel``, which LLaVA-style models put in front of a language
model. The transformer is written here in plain torch, with transformers' parameter names
(``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.{i}.self_attn.q_proj``…), so
``transformers`` is not needed to run it; the tests compare it with transformers.

* **Weights.** ``path=DIR`` reads a local Hugging Face directory: ``config.json`` (a vision
  model's, or a dual encoder's ``vision_config``; its text tower is left out),
  ``preprocessor_config.json`` and the weights (:func:`mmgpt.interop.llava.read_vision_tower`).
  ``name=`` builds a known architecture (:data:`KNOWN_TOWERS`) with random weights and
  ``vision_config=`` any other one, both without files: for ``mmgpt plan`` and for towers
  whose weights come from an mmgpt model directory.
* **Features.** ``select_layer`` indexes the hidden states as transformers'
  ``output_hidden_states=True`` does (``0``: the embeddings, ``-1``: the last layer's output
  without the final norm; default ``-2``, LLaVA's). ``select_feature="patch"`` gives the patch
  tokens (CLIP drops its class token), ``"cls_patch"`` keeps CLIP's class token in front
  (SigLIP has none). Layers after ``select_layer`` are never run; they, the final norm and
  SigLIP's pooling head are kept (so a LLaVA export writes the whole tower) and never train.
* **Preprocessing.** transformers' image processor of the checkpoint (the default, torchvision
  one), reimplemented in torch: RGB (transparency over white), resize (the shortest edge, or to
  height × width; antialiased bicubic/bilinear on uint8 pixels), centre crop, then rescale and
  normalise in float32 — the same ``pixel_values`` on the same PIL image.
* ``trainable=False`` (the default, as LLaVA keeps its tower frozen) turns gradients off and
  keeps the tower in eval mode; :meth:`MultimodalGPT.trainable` switches it through
  :attr:`frozen`.

``config_dict()`` holds the vision config, the image preprocessing and the feature selection,
and records the directory the weights came from as ``source`` (for reference only): a saved
mmgpt model carries the tower's weights in its own ``model.safetensors``, so its directory is
complete without the original one.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgpt.interop.llava import (
    IMAGE_PROCESSOR_DEFAULTS,
    RESAMPLE,
    image_processor_from_hf,
    image_processor_output_size,
    read_vision_tower,
    vision_config_from_hf,
)
from mmgpt.registry import register
from mmgpt.weights import load_model_state
from mmgpt_vit.encoder import preprocess_images

SELECT_FEATURES = ("patch", "cls_patch")
# Published architectures by their Hugging Face Hub names, for building without files
# (random weights): the shapes are what `mmgpt plan` needs before anything is downloaded.
KNOWN_TOWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai/clip-vit-base-patch16": (
        "clip",
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512),
    ),
    "openai/clip-vit-large-patch14": (
        "clip",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
    ),
    "openai/clip-vit-large-patch14-336": (
        "clip",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    ),
    "google/siglip-base-patch16-224": (
        "siglip",
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, image_size=224, patch_size=16),
    ),
    "google/siglip-so400m-patch14-384": (
        "siglip",
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
             num_attention_heads=16, image_size=384, patch_size=14),
    ),
}  # fmt: skip


# -- the transformer (transformers' module names) ------------------------------------------
class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _NewGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return _QuickGELU()
    if name == "gelu_new":
        return _NewGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


class _Embeddings(nn.Module):
    """Patches (+ CLIP's class token) + learned positions: ``(N, 3, H, W) → (N, L, D)``."""

    def __init__(self, config: dict[str, Any], class_token: bool) -> None:
        super().__init__()
        width, patch = config["hidden_size"], config["patch_size"]
        positions = (config["image_size"] // patch) ** 2 + int(class_token)
        if class_token:
            self.class_embedding = nn.Parameter(torch.randn(width))
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch, bias=not class_token)
        self.position_embedding = nn.Embedding(positions, width)
        self.class_token = class_token

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (N, P, D)
        if self.class_token:
            cls = self.class_embedding.expand(x.size(0), 1, -1)  # (N, 1, D)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + P, D)
        return x + self.position_embedding.weight  # (N, L, D)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.heads, self.dropout = heads, dropout

    def forward(self, x: Tensor) -> Tensor:  # (N, L, D)
        N, L, D = x.shape
        q, k, v = (
            proj(x).view(N, L, self.heads, D // self.heads).transpose(1, 2)  # (N, H, L, D/H)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # scale 1/sqrt(D/H), no mask
        return self.out_proj(y.transpose(1, 2).reshape(N, L, D))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = _Attention(
            width, config["num_attention_heads"], config["attention_dropout"]
        )
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = _MLP(width, config["intermediate_size"], config["hidden_act"])

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config["num_hidden_layers"]))


class _PoolingHead(nn.Module):
    """SigLIP's attention-pooling head: its weights are kept for export, it is never run."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width = config["hidden_size"]
        self.probe = nn.Parameter(torch.randn(1, 1, width))
        self.attention = nn.MultiheadAttention(
            width, config["num_attention_heads"], batch_first=True
        )
        self.layernorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])
        self.mlp = _MLP(width, config["intermediate_size"], config["hidden_act"])


def _on_meta_device() -> bool:
    """Whether modules are being built on the meta device (``mmgpt plan``: shapes only)."""
    return torch.empty(0).device.type == "meta"


def default_image_processor(family: str, image_size: int) -> dict[str, Any]:
    """The family's standard preprocessing for ``image_size`` (CLIP: shortest edge + centre
    crop, OpenAI's mean/std; SigLIP: a square resize, mean/std 0.5)."""
    processor = dict(IMAGE_PROCESSOR_DEFAULTS[family])
    if family == "clip":
        processor["size"] = {"shortest_edge": image_size}
        processor["crop_size"] = {"height": image_size, "width": image_size}
    else:
        processor["size"] = {"height": image_size, "width": image_size}
    return processor


# -- the encoder ---------------------------------------------------------------------------------
class HFVisionTower(nn.Module):
    """A CLIP or SigLIP vision tower as an image encoder; see the module docstring. Build it as
    ``"clip"`` or ``"siglip"`` (:class:`CLIPVisionTower`, :class:`SiglipVisionTower`).

    Args:
        path: a local Hugging Face directory of the family (weights, ``config.json``,
            ``preprocessor_config.json``).
        name: a known architecture (:data:`KNOWN_TOWERS`), random weights.
        vision_config: a Hugging Face vision config dict (transformers' defaults fill the
            rest), random weights.
        image_processor: the preprocessing, in ``preprocessor_config.json``'s terms (with
            ``name``/``vision_config``; default: the family's standard one at its image size).
        select_layer: which hidden state: ``0`` the embeddings … ``num_hidden_layers`` the last.
        select_feature: ``"patch"`` or ``"cls_patch"`` (CLIP only: its class token in front).
        trainable: gradients on (the layers that are run); default frozen.
        source: where the weights came from, recorded in ``config_dict()``; not read.
    """

    modality = "image"
    family: ClassVar[str] = ""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        vision_config: dict[str, Any] | None = None,
        image_processor: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        trainable: bool = False,
        source: str | None = None,
    ) -> None:
        super().__init__()
        family, what = self.family, f"encoder {self.family!r}"
        sources = {"path": path, "name": name, "vision_config": vision_config}
        given = [k for k, v in sources.items() if v is not None]
        if len(given) != 1:
            known = ", ".join(n for n, (f, _) in KNOWN_TOWERS.items() if f == family)
            raise ValueError(
                f"{what}: give exactly one of path= (a local Hugging Face directory), name= (a "
                f"known architecture, random weights: {known}) or vision_config=; got "
                f"{', '.join(given) or 'none'}"
            )
        state, weights_file = None, None
        if path is not None:
            if image_processor is not None:
                raise ValueError(
                    f"{what}: path= brings the directory's preprocessor_config.json; "
                    "image_processor= applies to name= and vision_config="
                )
            path = os.path.expanduser(path)  # recipe files write ~/models/...
            tower = read_vision_tower(path, family, weights=not _on_meta_device())
            vision_config, image_processor = tower.vision_config, tower.image_processor
            state, weights_file = tower.state, tower.source
            source = str(path)
            where = os.path.join(path, "preprocessor_config.json")
        elif name is not None:
            if name not in KNOWN_TOWERS or KNOWN_TOWERS[name][0] != family:
                known = ", ".join(n for n, (f, _) in KNOWN_TOWERS.items() if f == family)
                raise ValueError(
                    f"{what}: name {name!r} is not a known {family} architecture ({known}); "
                    "for a downloaded model give path=DIR"
                )
            vision_config = dict(KNOWN_TOWERS[name][1])
            where = f"{what} {name!r}"
        else:
            where = f"{what} vision_config"
        if not isinstance(vision_config, dict):
            raise ValueError(f"{what}: vision_config must be a dict, got {vision_config!r}")
        self.vision_config = vision_config_from_hf(vision_config, family, where)
        config = self.vision_config
        image_size, patch = config["image_size"], config["patch_size"]
        if image_processor is None:
            image_processor = default_image_processor(family, image_size)
        self.image_processor = image_processor_from_hf(
            image_processor, family, f"{what} image_processor"
        )
        out_size = image_processor_output_size(self.image_processor)
        if out_size != (image_size, image_size):
            gives = (
                "images of varying size"
                if out_size is None
                else f"{out_size[0]}x{out_size[1]} images"
            )
            raise ValueError(
                f"{where}: the image preprocessing gives {gives}, the tower takes "
                f"{image_size}x{image_size}"
            )
        depth = config["num_hidden_layers"]
        if isinstance(select_layer, bool) or not isinstance(select_layer, int):
            raise ValueError(f"{what}: select_layer must be an integer, got {select_layer!r}")
        if not -(depth + 1) <= select_layer <= depth:
            raise ValueError(
                f"{what}: select_layer={select_layer} is out of range for a {depth}-layer tower "
                f"(hidden states {-(depth + 1)}..{depth}: 0 = the embeddings)"
            )
        if select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"{what}: select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}"
            )
        if select_feature == "cls_patch" and family != "clip":
            raise ValueError(
                f"{what}: select_feature='cls_patch' needs a class token; {family} has none "
                "(use 'patch')"
            )
        if not isinstance(trainable, bool):
            raise ValueError(f"{what}: trainable must be true or false, got {trainable!r}")
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.source = None if source is None else str(source)
        self._run_layers = select_layer % (depth + 1)  # layers run before the chosen state

        class_token = family == "clip"
        width = config["hidden_size"]
        self.embeddings = _Embeddings(config, class_token)
        if class_token:
            self.pre_layrnorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])
        self.encoder = _Encoder(config)
        self.post_layernorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])
        if family == "siglip" and config["vision_use_head"]:
            self.head = _PoolingHead(config)

        grid = image_size // patch
        self.num_tokens = grid * grid + int(select_feature == "cls_patch")
        self.output_dim = width
        if state is not None:
            load_model_state(self, state, weights_file)  # strict: names what is missing
        self._trainable = False
        self.trainable = trainable

    # -- freezing -----------------------------------------------------------------------------
    def _used_modules(self) -> list[nn.Module]:
        """The modules the features depend on (the rest are kept, never run)."""
        used: list[nn.Module] = [self.embeddings]
        if hasattr(self, "pre_layrnorm"):
            used.append(self.pre_layrnorm)
        return used + list(self.encoder.layers[: self._run_layers])

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        self.requires_grad_(False)
        for module in self._used_modules():
            module.requires_grad_(self._trainable)
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        """``not trainable``: the switch :meth:`MultimodalGPT.freeze`/``trainable`` use."""
        return not self._trainable

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self.trainable = not value

    def train(self, mode: bool = True) -> HFVisionTower:
        super().train(mode)
        if not self._trainable:  # a frozen tower never runs attention dropout
            for child in self.children():
                child.train(False)
        return self

    # -- preprocessing -------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int, int]:
        size = self.vision_config["image_size"]
        return (3, size, size)

    def preprocess(self, items: Sequence[Any]) -> Tensor:
        """PIL images (any mode), numpy arrays or image paths → ``(N, 3, H, W)`` float32, as
        the checkpoint's transformers image processor gives them.

        A ``(3, H, W)`` tensor at the tower's input size is taken as already preprocessed.
        """
        return preprocess_images(items, self.input_size, self.pixel_values, type(self).__name__)

    def pixel_values(self, image: Any) -> Tensor:
        """One RGB PIL image → ``(3, H, W)``: resize, centre crop, rescale, normalise."""
        p = self.image_processor
        pixels = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        if p["do_resize"]:
            x = _resize(x, _resized_size(tuple(x.shape[-2:]), p["size"]), p["resample"])
        if p["do_center_crop"]:
            x = _center_crop(x, p["crop_size"]["height"], p["crop_size"]["width"])
        mean = torch.tensor(p["image_mean"]).view(3, 1, 1)
        std = torch.tensor(p["image_std"]).view(3, 1, 1)
        if p["do_rescale"] and p["do_normalize"]:
            # transformers folds the rescale into the mean and std (one float32 pass)
            scale = 1.0 / p["rescale_factor"]
            return (x.float() - mean * scale) / (std * scale)
        if p["do_rescale"]:
            return x * p["rescale_factor"]
        if p["do_normalize"]:
            return (x.float() - mean) / std
        return x.float()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` preprocessed images → ``(N, num_tokens, output_dim)``."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: expected images of shape "
                f"(N, {', '.join(map(str, self.input_size))}), got {tuple(images.shape)}"
            )
        dtype = self.embeddings.patch_embedding.weight.dtype
        # a frozen tower runs without autograd, unless something in it trains (an adapter)
        grad = self._trainable or any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad):
            x = self.embeddings(images.to(dtype))  # (N, L, D): hidden state 0 …
            if hasattr(self, "pre_layrnorm"):
                x = self.pre_layrnorm(x)
            for layer in self.encoder.layers[: self._run_layers]:
                x = layer(x)  # … hidden state i after layer i
        if self.family == "clip" and self.select_feature == "patch":
            x = x[:, 1:]  # the class token goes
        return x  # (N, num_tokens, output_dim)

    # -- persistence ---------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this tower (random weights) with ``create``."""
        return {
            "vision_config": dict(self.vision_config),
            "image_processor": dict(self.image_processor),
            "select_layer": self.select_layer,
            "select_feature": self.select_feature,
            "trainable": self.trainable,
            "source": self.source,
        }

    @classmethod
    def conformance_example(cls) -> HFVisionTower:
        """A tiny random tower for :mod:`mmgpt.testing` (4 patches of width 16, trainable)."""
        config = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
        return cls(vision_config=config, trainable=True)

    def extra_repr(self) -> str:
        c = self.vision_config
        return (
            f"layers={c['num_hidden_layers']}, width={c['hidden_size']}, "
            f"image_size={c['image_size']}, patch_size={c['patch_size']}, "
            f"select_layer={self.select_layer}, select_feature={self.select_feature!r}, "
            f"num_tokens={self.num_tokens}, trainable={self.trainable}"
        )


@register("encoder", "clip")
class CLIPVisionTower(HFVisionTower):
    """The vision tower of a CLIP model (class token, pre-norm, quick-GELU by default)."""

    family: ClassVar[str] = "clip"


@register("encoder", "siglip")
class SiglipVisionTower(HFVisionTower):
    """The vision tower of a SigLIP model (no class token)."""

    family: ClassVar[str] = "siglip"


# -- preprocessing helpers (transformers' torchvision image processor, step by step) ----------
def _resized_size(size: tuple[int, int], target: dict[str, int]) -> tuple[int, int]:
    """transformers' output size: ``height``×``width``, or the shortest edge to
    ``shortest_edge`` keeping the aspect ratio (the long edge rounded down)."""
    if "height" in target:
        return target["height"], target["width"]
    height, width = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target["shortest_edge"], int(target["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _resize(x: Tensor, size: tuple[int, int], resample: int) -> Tensor:
    """Resize ``(3, H, W)`` uint8 pixels as torchvision does on the CPU (antialiased; uint8
    kernels where torchvision uses them, else float then rounded)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = RESAMPLE[resample]
    kwargs: dict[str, Any] = {"size": list(size), "mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs.update(antialias=True, align_corners=False)
    native = mode != "bilinear" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    native = native or platform.machine() in ("aarch64", "arm64")
    batch = x.unsqueeze(0)  # (1, 3, H, W)
    if native:
        return F.interpolate(batch, **kwargs)[0]
    out = F.interpolate(batch.float(), **kwargs)[0]
    return out.round_().to(torch.uint8)


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """Centre crop of ``(3, H, W)``, zero-padded first where the image is smaller."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        left, top = max(width - w, 0) // 2, max(height - h, 0) // 2
        right, bottom = (max(width - w, 0) + 1) // 2, (max(height - h, 0) + 1) // 2
        x = F.pad(x, (left, right, top, bottom), value=0)
        h, w = x.shape[-2:]
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return x[..., top : top + height, left : left + width]


__all__ = [
    "KNOWN_TOWERS",
    "SELECT_FEATURES",
    "CLIPVisionTower",
    "HFVisionTower",
    "SiglipVisionTower",
    "default_image_processor",
]
