"""Judges of generated images: a small CNN classifier trained on REAL images only.

:class:`ImageJudge` has one head per attribute, each over its own labels. Two kinds exist:

- the shapes judge (:class:`ShapeJudge`, below), trained on rendered scenes and cached;
- a judge of the user's own labelled images, trained by ``mmgpt train judge``
  (:mod:`mmgpt.eval.judge_training`) and saved as a directory (:func:`save_judge`,
  :func:`load_judge`): ``judge.safetensors`` + ``judge.json`` (labels, architecture, where
  the labels came from, held-out accuracy).

The shapes judge predicts the four attributes of a one-shape scene (``shape``, ``color``, ``size``,
``position``) from a ``(3, S, S)`` image. It is trained only on images the shapes world
renders (with light pixel noise and colour jitter, so that the slightly noisy output of a
diffusion decoder is in its range), never on generated ones, and reports its accuracy on
held-out rendered scenes: figures computed with a judge below ~95% mean little.

Training takes a minute or less on a CPU, so a trained judge is cached: ``judge_dir(config)``
is ``<cache>/<config hash>/`` with ``judge.safetensors`` (weights) and ``judge.json`` (config +
held-out accuracy); :func:`load_or_train_judge` trains only when that directory is missing.
The cache root is ``cache_dir``, else ``$MMGPT_JUDGE_CACHE``, else ``~/.cache/mmgpt/judge``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mmgpt.config import from_dict as config_from_dict
from mmgpt.data.shapes import COLORS, KINDS, POSITIONS, SIZES, Shape, render_scene
from mmgpt.files import atomic_write_bytes, load_tensors, save_tensors

__all__ = [
    "ATTRIBUTES",
    "ImageJudge",
    "JudgeConfig",
    "ShapeJudge",
    "augment",
    "center_crop",
    "images_to_tensor",
    "judge_accuracy",
    "judge_dir",
    "judge_loss",
    "load_judge",
    "load_or_train_judge",
    "save_judge",
    "train_judge",
]

ATTRIBUTES = ("shape", "color", "size", "position")
WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge.json"
JUDGE_FORMAT = 1  # bump when the architecture or the training changes


@dataclass(frozen=True)
class JudgeConfig:
    """The world the judge knows (subsets of the shapes world) and how it is trained."""

    image_size: int = 32
    kinds: tuple[str, ...] = KINDS
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    width: int = 16  # channels of the first conv layer
    steps: int = 600  # optimizer steps
    batch_size: int = 64
    lr: float = 3e-3
    noise: float = 0.08  # max std of the Gaussian pixel noise (images in [0, 1])
    jitter: float = 0.06  # max per-channel gain change
    heldout: int = 1000  # held-out scenes for the reported accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        for name, known in (
            ("kinds", KINDS),
            ("colors", tuple(COLORS)),
            ("sizes", SIZES),
            ("positions", POSITIONS),
        ):
            value = tuple(getattr(self, name))
            if not value or any(v not in known for v in value) or len(set(value)) != len(value):
                raise ValueError(
                    f"JudgeConfig.{name} must be distinct values of {known}, got {list(value)}"
                )
            object.__setattr__(self, name, value)
        for name in ("image_size", "width", "steps", "batch_size", "heldout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"JudgeConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(
                f"JudgeConfig.image_size must be a multiple of 4 and >= 8, got {self.image_size}"
            )

    def labels(self, attribute: str) -> tuple[str, ...]:
        return {"shape": self.kinds, "color": self.colors, "size": self.sizes}.get(
            attribute, self.positions
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JudgeConfig:
        return config_from_dict(
            cls, {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        )

    def hash(self) -> str:
        """Identifies the trained judge: every field plus the judge format version."""
        payload = json.dumps({"format": JUDGE_FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ImageJudge(nn.Module):
    """An image classifier with one head per attribute: three conv layers (S → S/4 spatially),
    a linear trunk and one linear head per attribute.

    The features are flattened, not pooled, so the heads see *where* things are. Small on
    purpose (~0.6M multiply-adds per image at 32 px): it trains in seconds on a CPU.
    ``labels`` maps each attribute to the names of its classes, in head order.
    """

    def __init__(
        self,
        labels: Mapping[str, Sequence[str]],
        *,
        image_size: int = 32,
        width: int = 16,
        hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not labels or any(len(v) < 1 for v in labels.values()):
            raise ValueError(
                "a judge needs at least one attribute, each with its labels, got "
                f"{ {a: list(v) for a, v in labels.items()} }"
            )
        if image_size < 8 or image_size % 4:
            raise ValueError(f"judge image_size must be a multiple of 4 and >= 8, got {image_size}")
        self.labels = {str(a): tuple(str(x) for x in v) for a, v in labels.items()}
        self.image_size = image_size
        self.arch = {"image_size": image_size, "width": width, "hidden": hidden, "dropout": dropout}
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                nn.GroupNorm(4, cout),
                nn.SiLU(),
            )

        self.features = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2))
        side = image_size // 4
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, hidden), nn.SiLU(), nn.Dropout(dropout)
        )
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(v)) for a, v in self.labels.items()})

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def _check(self, images: Tensor) -> None:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"the judge takes images of shape (N, 3, {size}, {size}) in [0, 1], got "
                f"{tuple(images.shape)}"
            )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``(N, 3, S, S)`` in [0, 1] → logits per attribute."""
        self._check(images)
        h = self.trunk(self.features(images * 2 - 1))  # (N, hidden)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def embed(self, images: Tensor | Sequence[Any], batch_size: int = 256) -> Tensor:
        """The trunk's features ``(N, hidden)`` (eval mode): the space the heads separate
        classes in, used for Fréchet distances."""
        if not isinstance(images, Tensor):
            images = images_to_tensor(images, self.image_size)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            chunks = [
                self.trunk(self.features(c.to(device) * 2 - 1)).cpu()
                for c in images.split(batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.arch["hidden"])

    @torch.no_grad()
    def predict(
        self, images: Tensor | Sequence[Any], batch_size: int = 256
    ) -> list[dict[str, str]]:
        """The judged attributes of each image (PIL images or an ``(N, 3, S, S)`` tensor)."""
        if not isinstance(images, Tensor):
            images = images_to_tensor(images, self.image_size)
        was_training = self.training
        self.eval()
        try:
            out: list[dict[str, str]] = []
            for chunk in images.split(batch_size):
                logits = self(chunk.to(next(self.parameters()).device))
                idx = {a: v.argmax(-1).tolist() for a, v in logits.items()}
                for i in range(chunk.size(0)):
                    out.append({a: self.labels[a][idx[a][i]] for a in self.labels})
            return out
        finally:
            self.train(was_training)


class ShapeJudge(ImageJudge):
    """The judge of one-shape scenes of the shapes world: heads ``shape``, ``color``,
    ``size``, ``position`` over the subsets ``config`` names."""

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__(
            {a: config.labels(a) for a in ATTRIBUTES},
            image_size=config.image_size,
            width=config.width,
        )
        self.config = config


def center_crop(image: Image.Image) -> Image.Image:
    """The largest centred square of ``image`` (what the diffusion decoder trains on)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def images_to_tensor(images: Sequence[Any], image_size: int, *, crop: bool = False) -> Tensor:
    """PIL images → ``(N, 3, S, S)`` float in [0, 1] (resized when needed; ``crop``: centre
    square first, as the diffusion decoder's ``preprocess`` does, rather than squashing)."""
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is {type(image).__name__}, expected a PIL image")
        image = image.convert("RGB")
        if crop:
            image = center_crop(image)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    if not arrays:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


# --------------------------------------------------------------------------------------
# Training data: rendered one-shape scenes
# --------------------------------------------------------------------------------------


@dataclass
class _Scenes:
    images: Tensor  # (N, 3, S, S) in [0, 1]
    labels: dict[str, Tensor] = field(default_factory=dict)  # attribute → (N,) class index


def _render(config: JudgeConfig, n: int, rng: random.Random) -> _Scenes:
    rows: list[Shape] = [
        Shape(
            rng.choice(config.kinds),
            rng.choice(config.colors),
            rng.choice(config.sizes),
            rng.choice(config.positions),
        )
        for _ in range(n)
    ]
    images = images_to_tensor(
        [render_scene([s], config.image_size) for s in rows], config.image_size
    )
    labels = {
        a: torch.tensor([config.labels(a).index(getattr(s, a)) for s in rows]) for a in ATTRIBUTES
    }
    return _Scenes(images, labels)


def augment(
    images: Tensor,
    *,
    noise: float,
    jitter: float,
    shift: int = 0,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Light Gaussian pixel noise (std up to ``noise``) and per-channel gain (up to
    ±``jitter``), so that the slightly noisy output of a diffusion decoder is in range; with
    ``shift``, a random translation by up to that many pixels (edges repeated), with
    ``flip``, a random horizontal flip (only for labels that do not say left or right)."""
    n = images.size(0)
    if shift:
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
        padded = F.pad(images, (shift,) * 4, mode="replicate")
        h, w = images.shape[-2:]
        images = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
        )
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mirrored.view(n, 1, 1, 1).to(images.device), images.flip(-1), images)
    # drawn on the CPU (where a seeded generator lives), then moved to the images' device
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * jitter
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * noise
    noise_ = torch.randn(images.shape, generator=generator) * sigma
    return (images * gain.to(images.device) + noise_.to(images.device)).clamp(0, 1)


def judge_loss(logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
    """The sum over attributes of the cross-entropy of each head."""
    return sum(F.cross_entropy(logits[a], labels[a]) for a in logits)  # type: ignore[return-value]


@torch.no_grad()
def judge_accuracy(
    judge: ImageJudge, images: Tensor, labels: Mapping[str, Tensor], batch_size: int = 256
) -> dict[str, float]:
    """Accuracy of each head on ``images`` against ``labels`` (class indices), and ``all``:
    every head right."""
    was_training = judge.training
    judge.eval()
    try:
        device = next(judge.parameters()).device
        parts = [judge(c.to(device)) for c in images.split(batch_size)]
    finally:
        judge.train(was_training)
    correct_all = torch.ones(images.size(0), dtype=torch.bool)
    out = {}
    for a in judge.attributes:
        predicted = torch.cat([p[a].argmax(-1).cpu() for p in parts]) if parts else labels[a]
        hit = predicted == labels[a]
        correct_all &= hit
        out[a] = float(hit.float().mean()) if len(hit) else float("nan")
    out["all"] = float(correct_all.float().mean()) if len(correct_all) else float("nan")
    return out


def train_judge(
    config: JudgeConfig, *, verbose: bool = False
) -> tuple[ShapeJudge, dict[str, float]]:
    """Train a judge on freshly rendered scenes; return it and its held-out accuracy
    (``{"shape", "color", "size", "position", "all"}`` on ``config.heldout`` scenes)."""
    with torch.random.fork_rng():  # dropout draws from the global generator: seed it here
        torch.manual_seed(config.seed)
        return _train(config, verbose)


def _train(config: JudgeConfig, verbose: bool) -> tuple[ShapeJudge, dict[str, float]]:
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    judge = ShapeJudge(config)
    heldout = _render(config, config.heldout, random.Random(config.seed + 1_000_003))
    # a pool re-rendered in chunks: rendering is cheap, and fresh scenes avoid overfitting
    pool_size = min(4096, config.steps * config.batch_size)
    pool = _render(config, pool_size, rng)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    judge.train()
    for step in range(config.steps):
        if step and step % 200 == 0:  # refresh a quarter of the pool
            fresh = _render(config, pool_size // 4, rng)
            at = (step // 200 % 4) * (pool_size // 4)
            pool.images[at : at + pool_size // 4] = fresh.images
            for a in ATTRIBUTES:
                pool.labels[a][at : at + pool_size // 4] = fresh.labels[a]
        idx = torch.randint(0, pool_size, (config.batch_size,), generator=generator)
        x = augment(pool.images[idx], noise=config.noise, jitter=config.jitter, generator=generator)
        loss = judge_loss(judge(x), {a: pool.labels[a][idx] for a in ATTRIBUTES})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if verbose and (step + 1) % 250 == 0:
            print(f"judge step {step + 1}/{config.steps}: loss {loss.item():.4f}", flush=True)
    accuracy = judge_accuracy(judge, heldout.images, heldout.labels)
    judge.eval()
    return judge, accuracy


# --------------------------------------------------------------------------------------
# Judge directories (``mmgpt train judge``): judge.safetensors + judge.json
# --------------------------------------------------------------------------------------

JUDGE_DIR_FORMAT = "mmgpt-image-judge"


def save_judge(judge: ImageJudge, directory: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``judge.safetensors`` (weights) and ``judge.json`` (labels, architecture and
    ``info``: label sources, held-out accuracy, …) into ``directory``, each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(
        {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()},
        directory / WEIGHTS_NAME,
        metadata={"format": "pt"},
    )
    payload = {
        "format": JUDGE_DIR_FORMAT,
        "version": JUDGE_FORMAT,
        "labels": {a: list(v) for a, v in judge.labels.items()},
        "architecture": dict(judge.arch),
        **info,
    }
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(payload, indent=2) + "\n").encode())
    return directory


def load_judge(path: str | os.PathLike) -> tuple[ImageJudge, dict[str, Any]]:
    """The judge in ``path`` and its ``judge.json``: a directory written by ``mmgpt train
    judge`` (the run folder or its ``model/``), or a cached shapes judge."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"judge {path}: no such directory (train one: mmgpt train judge)")
    if not (path / CONFIG_NAME).is_file() and (path / "model" / CONFIG_NAME).is_file():
        path = path / "model"
    meta_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    for required in (meta_file, weights):
        if not required.is_file():
            raise FileNotFoundError(
                f"judge {path}: {required.name} is missing (a judge directory holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by mmgpt train judge)"
            )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{meta_file}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: expected a JSON object")
    try:
        if "config" in meta:  # a cached shapes judge
            judge: ImageJudge = ShapeJudge(JudgeConfig.from_dict(meta["config"]))
            meta = {**meta, "labels": {a: list(v) for a, v in judge.labels.items()}}
        else:
            if meta.get("format") != JUDGE_DIR_FORMAT:
                raise ValueError(f"'format' is {meta.get('format')!r}, not {JUDGE_DIR_FORMAT!r}")
            if meta.get("version") != JUDGE_FORMAT:
                raise ValueError(
                    f"'version' is {meta.get('version')!r}; this mmgpt reads version "
                    f"{JUDGE_FORMAT} (train the judge again)"
                )
            judge = ImageJudge(meta["labels"], **meta["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_file}: not a judge description ({exc})") from exc
    try:
        judge.load_state_dict(load_tensors(weights))
    except RuntimeError as exc:
        raise ValueError(
            f"{weights}: the weights do not match {meta_file} ({str(exc).splitlines()[0]})"
        ) from exc
    return judge.eval(), meta


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("MMGPT_JUDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mmgpt" / "judge"


def judge_dir(config: JudgeConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the judge of ``config`` is cached: ``<cache root>/<config hash>``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / config.hash()


def load_or_train_judge(
    config: JudgeConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> tuple[ShapeJudge, dict[str, float]]:
    """The cached judge of ``config`` (trained and saved on first use) and its held-out accuracy."""
    config = config if config is not None else JudgeConfig()
    directory = judge_dir(config, cache_dir)
    weights, meta = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if weights.is_file() and meta.is_file():
        try:
            saved = json.loads(meta.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(
                f"{meta}: unreadable judge metadata ({exc}); delete {directory}"
            ) from exc
        if JudgeConfig.from_dict(saved["config"]) != config:
            raise ValueError(f"{meta}: the cached judge was trained with another config")
        judge = ShapeJudge(config)
        judge.load_state_dict(load_tensors(weights))
        return judge.eval(), dict(saved["heldout_accuracy"])
    if verbose:
        print(f"training the shapes judge (cached in {directory})", flush=True)
    judge, accuracy = train_judge(config, verbose=verbose)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(
        {k: v.contiguous() for k, v in judge.state_dict().items()},
        weights,
        metadata={"format": "pt"},
    )
    payload = {"config": config.to_dict(), "hash": config.hash(), "heldout_accuracy": accuracy}
    atomic_write_bytes(meta, (json.dumps(payload, indent=2) + "\n").encode())
    return judge, accuracy
