"""A timm Vision Transformer as an mmgpt image encoder.

``ViTEncoder`` wraps any timm ViT (``timm.create_model(name, num_classes=0)``) or a small
custom :class:`timm.models.vision_transformer.VisionTransformer`, and turns PIL images into
``(N, num_tokens, output_dim)`` features for the projector:

* **Features.** ``feature_layer=-1`` gives the tokens after the model's final norm, exactly what
  timm's ``forward_features`` returns; any other block index (``-2``: the penultimate block, as
  LLaVA uses) gives that block's raw output (the residual stream, no final norm), like
  Hugging Face's ``hidden_states[i]``. ``feature_norm=True`` applies the final norm there too.
* **Tokens.** Patch tokens by default; ``include_prefix_tokens=True`` keeps the class (and
  register) tokens in front. ``pool="avg"`` averages 2×2 patch neighbourhoods and
  ``pool="pixel_shuffle"`` folds them into channels (4× ``output_dim``), each cutting the
  number of patch tokens by 4 (``pool_size`` sets the factor).
* **Weights.** ``pretrained_path`` loads a local ``.safetensors``/``.bin``/``.pth`` file
  (never unpickling objects), ``pretrained=True`` downloads timm's default weights when a
  network is there; custom configurations take a local file only.
* **Preprocessing.** timm's own eval transform for the model's data config
  (``resolve_data_config`` + ``create_transform``: resize, centre crop, normalise), so pretrained
  weights see exactly the inputs they were trained on. It runs on PIL images, one at a time; for
  the small images these models take it costs far less than the forward pass, and a tensor
  reimplementation would drift from PIL's antialiased resize. Any PIL mode is accepted:
  transparent images are composited over white, everything else converted to RGB.
* ``frozen=True`` turns gradients off and keeps the ViT in eval mode even when a parent module
  calls ``.train()`` (dropout/drop-path stay off), and runs it under ``torch.no_grad``.

``config_dict()`` describes the architecture and preprocessing, not where weights came from: a
saved model carries the encoder's weights in its own checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgpt.data.images import load_image
from mmgpt.files import load_tensors, load_torch_file
from mmgpt.registry import register
from mmgpt.weights import load_model_state

# Small configurations built directly as timm ``VisionTransformer``s (no timm model name).
CUSTOM_VITS: dict[str, dict[str, Any]] = {
    # 32×32 images, 8×8 patches → 16 patch tokens of width 64; trains on a laptop CPU.
    "vit_tiny_custom": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    # plain VisionTransformer defaults (ViT-B/16 at 224), shaped entirely by keyword arguments
    "vit_custom": {},
}
# Preprocessing for custom models, which have no pretrained data config: no centre crop
# (crop_pct=1 keeps objects at the image border) and a symmetric [-1, 1] normalisation.
CUSTOM_DATA_CONFIG: dict[str, Any] = dict(
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    crop_pct=1.0,
    crop_mode="center",
)
POOLS = (None, "avg", "pixel_shuffle")
INSTALL_HINT = 'the "vit" encoder needs timm: pip install "mmgpt[vision]"'


def _import_timm() -> Any:
    try:
        import timm
        import timm.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from exc
    return timm


@register("encoder", "vit")
class ViTEncoder(nn.Module):
    """Image → ``(N, num_tokens, output_dim)`` features from a timm ViT; see the module docstring.

    Args:
        name: a timm model name (``"vit_base_patch16_clip_224"``…) or one of
            :data:`CUSTOM_VITS` (``"vit_tiny_custom"``, ``"vit_custom"``).
        pretrained: download timm's weights for ``name`` (needs a network).
        pretrained_path: a local weights file (safetensors, or a torch file loaded with
            ``weights_only=True``) saved from the same architecture.
        feature_layer: which block's output to use; ``-1`` = final (normed) features.
        feature_norm: apply the final norm to the chosen block (default: only for ``-1``).
        include_prefix_tokens: keep class/register tokens in front of the patch tokens.
        pool: ``None``, ``"avg"`` or ``"pixel_shuffle"`` over ``pool_size``² patch neighbourhoods.
        frozen: no gradients and always eval mode.
        data_config: overrides of the preprocessing config (``mean``, ``std``, ``crop_pct``,
            ``interpolation``, ``crop_mode``); ``input_size`` always follows the model.
        **model_kwargs: passed to timm (``img_size``, ``patch_size``, ``embed_dim``, ``depth``,
            ``num_heads``, ``drop_path_rate``, ``class_token``, ``reg_tokens``…).
    """

    modality = "image"

    def __init__(
        self,
        name: str = "vit_tiny_custom",
        *,
        pretrained: bool = False,
        pretrained_path: str | os.PathLike[str] | None = None,
        feature_layer: int = -1,
        feature_norm: bool | None = None,
        include_prefix_tokens: bool = False,
        pool: str | None = None,
        pool_size: int = 2,
        frozen: bool = False,
        data_config: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"ViTEncoder: pool must be one of {POOLS}, got {pool!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"ViTEncoder: pool_size must be an integer >= 1, got {pool_size!r}")
        if pool == "pixel_shuffle" and include_prefix_tokens:
            raise ValueError(
                "ViTEncoder: pool='pixel_shuffle' widens patch tokens, so it cannot be combined "
                "with include_prefix_tokens=True"
            )
        if pretrained and pretrained_path is not None:
            raise ValueError("ViTEncoder: pass pretrained=True (hub) or pretrained_path, not both")
        timm = _import_timm()
        self.name = name
        self.model_kwargs = dict(model_kwargs)
        self.model = self._create(timm, name, pretrained, pretrained_path, model_kwargs)
        for attr in ("patch_embed", "blocks", "forward_features", "forward_intermediates"):
            if not hasattr(self.model, attr):
                raise ValueError(
                    f"ViTEncoder: timm model {name!r} is not a ViT-style model (no {attr!r}); "
                    "use a vision-transformer family model"
                )

        depth = len(self.model.blocks)
        if not -depth <= feature_layer < depth:
            raise ValueError(
                f"ViTEncoder: feature_layer={feature_layer} is out of range for a {depth}-block "
                f"model (use {-depth}..{depth - 1})"
            )
        self.feature_layer = feature_layer
        self._block_index = feature_layer % depth
        last = self._block_index == depth - 1
        self.feature_norm = (feature_layer == -1) if feature_norm is None else bool(feature_norm)
        # The final-norm output of the last block is exactly forward_features.
        self._use_forward_features = last and self.feature_norm
        self.include_prefix_tokens = bool(include_prefix_tokens)
        self.pool = pool
        self.pool_size = pool_size

        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        grid = tuple(int(g) for g in self.model.patch_embed.grid_size)  # (H_p, W_p)
        self.grid_size: tuple[int, int] = grid  # type: ignore[assignment]
        f = pool_size if pool is not None else 1
        if grid[0] % f or grid[1] % f:
            raise ValueError(
                f"ViTEncoder: pool={pool!r} with pool_size={pool_size} needs a patch grid "
                f"divisible by {f}, the model has {grid[0]}x{grid[1]} patches"
            )
        width = int(getattr(self.model, "embed_dim", self.model.num_features))
        self.output_dim = width * f * f if pool == "pixel_shuffle" else width
        self.num_tokens = (grid[0] // f) * (grid[1] // f) + (
            self.num_prefix_tokens if self.include_prefix_tokens else 0
        )

        self.data_config = self._resolve_data_config(timm, name, data_config)
        self._transform = timm.data.create_transform(**self.data_config, is_training=False)
        self._frozen = False
        self.frozen = frozen

    # -- construction ------------------------------------------------------------------
    @staticmethod
    def _create(
        timm: Any,
        name: str,
        pretrained: bool,
        pretrained_path: str | os.PathLike[str] | None,
        model_kwargs: dict[str, Any],
    ) -> nn.Module:
        if "num_classes" in model_kwargs:
            raise ValueError("ViTEncoder: num_classes is fixed to 0 (features, no classifier)")
        if name in CUSTOM_VITS:
            from timm.models.vision_transformer import VisionTransformer

            if pretrained:
                raise ValueError(
                    f"ViTEncoder: {name!r} is a custom configuration with no hub weights; "
                    "pass pretrained_path= to load a local file"
                )
            model = VisionTransformer(**{**CUSTOM_VITS[name], **model_kwargs}, num_classes=0)
            if pretrained_path is not None:
                _load_custom_weights(model, Path(pretrained_path))
            return model
        if not timm.is_model(name):
            import difflib

            close = difflib.get_close_matches(name, timm.list_models("vit*") + list(CUSTOM_VITS))
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"ViTEncoder: unknown model {name!r}: not a timm model nor one of "
                f"{sorted(CUSTOM_VITS)}{hint}"
            )
        kwargs: dict[str, Any] = dict(model_kwargs, num_classes=0)
        if pretrained_path is not None:
            path = Path(pretrained_path)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: ViT weights file not found")
            # timm's own loader: applies the model's checkpoint filter (e.g. resampling the
            # position embedding to img_size) and drops the classifier. .npz files are
            # Google's JAX checkpoints, which timm reads with the model's custom loader.
            kwargs["pretrained_cfg_overlay"] = dict(
                file=str(path), custom_load=path.suffix == ".npz"
            )
            pretrained = True
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            source = pretrained_path if pretrained_path is not None else "the hub"
            raise RuntimeError(
                f"ViTEncoder: loading {name!r} weights from {source}: {exc}"
            ) from exc

    def _resolve_data_config(
        self, timm: Any, name: str, overrides: dict[str, Any] | None
    ) -> dict[str, Any]:
        if name in CUSTOM_VITS:
            config = dict(CUSTOM_DATA_CONFIG)
        else:
            config = dict(timm.data.resolve_data_config({}, model=self.model))
        known = {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"ViTEncoder: unknown data_config key(s) {unknown}; expected some of {sorted(known)}"
            )
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        # The model was built for a fixed input size, which may differ from its pretrained
        # config (e.g. img_size=32 on a 224 model); num_tokens depends on it.
        height, width = (int(s) for s in self.model.patch_embed.img_size)
        config["input_size"] = (3, height, width)
        return config

    # -- freezing ----------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        self.model.requires_grad_(not self._frozen)
        if self._frozen:
            self.model.eval()
        else:
            self.model.train(self.training)

    def train(self, mode: bool = True) -> ViTEncoder:
        super().train(mode)
        if self._frozen:
            self.model.eval()  # a frozen encoder never runs dropout / drop-path
        return self

    # -- preprocessing -------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])  # type: ignore[return-value]

    def preprocess(self, items: Sequence[Any]) -> Tensor:
        """PIL images (any mode), numpy arrays or image paths → ``(N, 3, H, W)`` float32.

        A ``(3, H, W)`` tensor at the model's input size is taken as already preprocessed.
        """
        return preprocess_images(items, self.input_size, self._transform, "ViTEncoder")

    # -- forward ---------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` preprocessed images → ``(N, num_tokens, output_dim)``."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_size:
            raise ValueError(
                f"ViTEncoder: expected images of shape (N, {', '.join(map(str, self.input_size))}), "
                f"got {tuple(images.shape)}"
            )
        dtype = self.model.patch_embed.proj.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            tokens = self._features(images.to(dtype))  # (N, P + L, D)
        prefix = tokens[:, : self.num_prefix_tokens]  # (N, P, D)
        patches = tokens[:, self.num_prefix_tokens :]  # (N, L, D)
        patches = self._pool(patches)  # (N, L / f², D or D·f²)
        if self.include_prefix_tokens and self.num_prefix_tokens:
            patches = torch.cat([prefix, patches], dim=1)
        return patches  # (N, num_tokens, output_dim)

    def _features(self, images: Tensor) -> Tensor:
        """All tokens (prefix first) of the chosen layer: ``(N, P + L, D)``."""
        if self._use_forward_features:
            return self.model.forward_features(images)
        spatial, prefix = self.model.forward_intermediates(
            images,
            indices=[self._block_index],
            return_prefix_tokens=True,
            norm=self.feature_norm,
            stop_early=True,  # blocks after the feature layer are not run
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        return spatial if prefix is None else torch.cat([prefix, spatial], dim=1)

    def _pool(self, x: Tensor) -> Tensor:  # (N, L, D)
        if self.pool is None:
            return x
        N, _, D = x.shape
        H, W = self.grid_size
        f = self.pool_size
        grid = x.reshape(N, H, W, D)
        if self.pool == "avg":
            pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), kernel_size=f)  # (N, D, H/f, W/f)
            return pooled.flatten(2).transpose(1, 2)  # (N, HW/f², D)
        # pixel shuffle (space-to-depth): each f×f neighbourhood becomes one token of width f²D
        grid = grid.reshape(N, H // f, f, W // f, f, D).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(N, (H // f) * (W // f), f * f * D)

    # -- persistence -------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this encoder (random weights) with ``create``."""
        return {
            "name": self.name,
            **self.model_kwargs,
            "feature_layer": self.feature_layer,
            "feature_norm": self.feature_norm,
            "include_prefix_tokens": self.include_prefix_tokens,
            "pool": self.pool,
            "pool_size": self.pool_size,
            "frozen": self.frozen,
            "data_config": {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in self.data_config.items()
                if k != "input_size"
            },
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_tokens={self.num_tokens}, output_dim={self.output_dim}, "
            f"feature_layer={self.feature_layer}, pool={self.pool!r}, frozen={self.frozen}"
        )


def preprocess_images(
    items: Sequence[Any] | Any,
    input_size: tuple[int, int, int],
    transform: Any,
    owner: str,
) -> Tensor:
    """``items`` (PIL images of any mode, numpy arrays, paths, or tensors already at
    ``input_size``) → ``(N, 3, H, W)`` float32, each image through ``transform`` (one RGB PIL
    image → ``(3, H, W)``); shared by every image encoder of this plugin."""
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        items = [items]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            if tuple(item.shape) != input_size:
                raise ValueError(
                    f"{owner}.preprocess: image {i} is a tensor of shape {tuple(item.shape)}; "
                    f"tensors must be preprocessed already, of shape {input_size}"
                )
            out.append(item.float())
            continue
        out.append(transform(to_rgb(item, index=i)))
    if not out:
        return torch.empty(0, *input_size)
    return torch.stack(out)  # (N, 3, H, W)


def to_rgb(item: Any, *, index: int = 0) -> Any:
    """A PIL RGB image from a PIL image of any mode, a numpy array or a path."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        # The safe loader: raster formats only (no Ghostscript for a disguised EPS), pixel and
        # memory budgets.
        return load_image(item)
    elif not isinstance(item, Image.Image):
        try:
            import numpy as np

            if isinstance(item, np.ndarray):
                item = Image.fromarray(item)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"image {index}: cannot convert array to an image ({exc})") from exc
    if not isinstance(item, Image.Image):
        raise TypeError(
            f"image {index}: expected a PIL image, numpy array, path or preprocessed tensor, "
            f"got {type(item).__name__}"
        )
    if item.mode == "RGB":
        return item
    if item.mode == "P":  # palette: its transparency (if any) becomes an alpha channel
        item = item.convert("RGBA")
    if item.mode in ("RGBA", "LA", "La", "RGBa"):
        # Transparent pixels have arbitrary colour values; composite over white.
        rgba = item.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if item.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit grayscale would saturate at 255 in convert(): 16-bit data (how PIL opens
        # 16-bit PNGs, as "I;16" or "I") is scaled down to 8 bits, float data clipped.
        import numpy as np

        arr = np.asarray(item, dtype=np.float64)
        if item.mode != "F" and arr.max(initial=0.0) > 255:
            arr = arr / 256.0
        item = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return item.convert("RGB")


def _load_custom_weights(model: nn.Module, path: Path) -> None:
    """Load a timm-format state dict into a custom VisionTransformer (strict, head dropped)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not path.is_file():
        raise FileNotFoundError(f"{path}: ViT weights file not found")
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        state = load_torch_file(path)
        for key in ("state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # timm's filter converts other layouts and resamples the position embedding
    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_model_state(model, state, path)  # strict; names missing/unexpected/mis-shaped tensors
