"""A judge for generated shapes-world images: a small CNN trained on REAL rendered scenes.

The judge predicts the four attributes of a one-shape scene (``shape``, ``color``, ``size``,
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
from collections.abc import Sequence
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
    "JudgeConfig",
    "ShapeJudge",
    "images_to_tensor",
    "judge_dir",
    "load_or_train_judge",
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


class ShapeJudge(nn.Module):
    """Three conv layers (S → S/4 spatially) and one linear head per attribute.

    The features are flattened, not pooled, so the heads see *where* the shape is. Small on
    purpose (~0.6M multiply-adds per image at 32 px): it trains in seconds on a CPU.
    """

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                nn.GroupNorm(4, cout),
                nn.SiLU(),
            )

        self.features = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2))
        side = config.image_size // 4
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, 128), nn.SiLU(), nn.Dropout(0.1)
        )
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(config.labels(a))) for a in ATTRIBUTES})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``(N, 3, S, S)`` in [0, 1] → logits per attribute."""
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"the judge takes images of shape (N, 3, {size}, {size}) in [0, 1], got "
                f"{tuple(images.shape)}"
            )
        h = self.trunk(self.features(images * 2 - 1))  # (N, 128)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(
        self, images: Tensor | Sequence[Any], batch_size: int = 256
    ) -> list[dict[str, str]]:
        """The judged attributes of each image (PIL images or an ``(N, 3, S, S)`` tensor)."""
        if not isinstance(images, Tensor):
            images = images_to_tensor(images, self.config.image_size)
        was_training = self.training
        self.eval()
        try:
            out: list[dict[str, str]] = []
            for chunk in images.split(batch_size):
                logits = self(chunk.to(next(self.parameters()).device))
                idx = {a: v.argmax(-1).tolist() for a, v in logits.items()}
                for i in range(chunk.size(0)):
                    out.append({a: self.config.labels(a)[idx[a][i]] for a in ATTRIBUTES})
            return out
        finally:
            self.train(was_training)


def images_to_tensor(images: Sequence[Any], image_size: int) -> Tensor:
    """PIL images → ``(N, 3, S, S)`` float in [0, 1] (resized when needed)."""
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is {type(image).__name__}, expected a PIL image")
        image = image.convert("RGB")
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


def _augment(images: Tensor, config: JudgeConfig, generator: torch.Generator) -> Tensor:
    n = images.size(0)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * config.jitter
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * config.noise
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (images * gain + noise).clamp(0, 1)


def _accuracy(judge: ShapeJudge, scenes: _Scenes) -> dict[str, float]:
    judge.eval()
    with torch.no_grad():
        logits = judge(scenes.images)
    correct_all = torch.ones(scenes.images.size(0), dtype=torch.bool)
    out = {}
    for a in ATTRIBUTES:
        hit = logits[a].argmax(-1) == scenes.labels[a]
        correct_all &= hit
        out[a] = float(hit.float().mean())
    out["all"] = float(correct_all.float().mean())
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
        logits = judge(_augment(pool.images[idx], config, generator))
        loss = sum(F.cross_entropy(logits[a], pool.labels[a][idx]) for a in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if verbose and (step + 1) % 250 == 0:
            print(f"judge step {step + 1}/{config.steps}: loss {loss.item():.4f}", flush=True)
    accuracy = _accuracy(judge, heldout)
    judge.eval()
    return judge, accuracy


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
