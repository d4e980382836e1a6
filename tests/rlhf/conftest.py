"""Tiny multimodal models and colour-square data for the RLHF tests."""

from __future__ import annotations

import random
from typing import Any

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("timm")
mmgpt_text = pytest.importorskip("mmgpt_text")

from mmgpt.data.preference import PreferencePair  # noqa: E402
from mmgpt.data.sample import Sample, Turn  # noqa: E402
from mmgpt.multimodal import MultimodalGPT  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
QUESTION = "<image>\nWhat colour is the square?"
CORPUS = (
    "User: What colour is the square?\nAssistant: red\nAssistant: blue\n"
    "User: draw a red square\nUser: draw a blue square\nAssistant: it is red, not blue\n"
) * 30


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("rlhf_corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=300, num_signal_tokens=0)


def build(tok: Any, **overrides: Any) -> MultimodalGPT:
    """gpt-nano + the 32×32 two-block ViT (16 image tokens)."""
    overrides.setdefault("block_size", 64)
    overrides.setdefault("dropout", 0.0)
    return MultimodalGPT.build("gpt-nano", tok, **overrides)


def square(colour: str, rng: random.Random) -> Image.Image:
    """A red or blue square at a random place on a random grey."""
    grey = rng.randint(90, 160)
    image = Image.new("RGB", (32, 32), (grey, grey, grey))
    x, y, size = rng.randint(0, 18), rng.randint(0, 18), rng.randint(10, 14)
    ImageDraw.Draw(image).rectangle([x, y, x + size, y + size], fill=COLOURS[colour])
    return image


def colour_pairs(n: int, seed: int) -> list[PreferencePair]:
    """ "What colour is the square?" with the right colour chosen and the other rejected."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        other = "blue" if colour == "red" else "red"
        pairs.append(PreferencePair(QUESTION, [square(colour, rng)], colour, other, {"id": i}))
    return pairs


def colour_prompts(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    return [
        Sample([Turn("user", QUESTION)], [square(rng.choice(sorted(COLOURS)), rng)])
        for _ in range(n)
    ]


def quiet(**config: Any) -> dict[str, Any]:
    """A TrainConfig dict for short, silent test runs."""
    base = dict(
        warmup_steps=0,
        progress=False,
        tensorboard=False,
        log_every=1,
        save_every=0,
        eval_every=0,
        eval_batches=0,
        seed=0,
    )
    return {**base, **config}


@pytest.fixture(scope="session")
def rl():
    """The helpers above, for test modules (conftest modules are not importable by name)."""
    import types

    return types.SimpleNamespace(
        build=build,
        square=square,
        colour_pairs=colour_pairs,
        colour_prompts=colour_prompts,
        quiet=quiet,
        QUESTION=QUESTION,
    )


@pytest.fixture(scope="session")
def red_or_blue_policy(tok, tmp_path_factory):
    """A policy SFT-trained to answer "red" or "blue" (at random) to the colour question."""
    import torch

    from mmgpt.trainer import Trainer

    rng = random.Random(0)
    samples = [
        Sample(
            [Turn("user", QUESTION), Turn("assistant", rng.choice(["red", "blue"]))],
            [square(rng.choice(sorted(COLOURS)), rng)],
        )
        for _ in range(64)
    ]
    torch.manual_seed(0)
    model = build(tok)
    Trainer(
        model,
        "sft",
        samples,
        quiet(max_steps=30, batch_size=16, lr=3e-3),
        collate_fn=model.processor(),
        out_dir=tmp_path_factory.mktemp("sft_red_or_blue"),
    ).fit()
    return model
