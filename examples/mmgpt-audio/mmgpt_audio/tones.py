"""The tones dataset: pure sine tones with questions and answers about them.

A clip holds one tone (or two in sequence, with ``max_tones=2``); each tone has a pitch
(``low`` ≈ 220 Hz, ``mid`` ≈ 440 Hz, ``high`` ≈ 880 Hz, each detuned by up to ±1 semitone),
a volume (``quiet``/``loud``) and a length (``short``/``long``). Questions:

- ``"what pitch is the tone?"`` → ``"high"`` (two tones: ``"… the first tone?"``)
- ``"is the tone loud or quiet?"`` → ``"loud"``
- ``"is the tone short or long?"`` → ``"short"``
- ``"how many tones are there?"`` → ``"two"``

Sample ``i`` of seed ``s`` is a pure function of ``(s, i)``, like mmgpt's shapes world: any
sample can be regenerated alone, in any order, in any process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmgpt.data.sample import Sample, Turn
from mmgpt.registry import register
from torch.utils.data import Dataset

PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}  # Hz, before detuning
VOLUMES = {"quiet": 0.15, "loud": 0.7}  # peak amplitude
LENGTHS = {"short": 0.2, "long": 0.4}  # seconds
QUESTION_TYPES = ("pitch", "volume", "length", "count")
ORDINALS = ("first", "second")
COUNTS = ("one", "two")
FADE = 0.01  # seconds of fade in/out: no clicks at the edges


def _question(qtype: str, which: str) -> str:
    tone = f"the {which} tone" if which else "the tone"
    return {
        "pitch": f"what pitch is {tone}?",
        "volume": f"is {tone} loud or quiet?",
        "length": f"is {tone} short or long?",
        "count": "how many tones are there?",
    }[qtype]


@register("dataset", "tones")
class ToneDataset(Dataset):
    """``size`` tone clips with one question each (a map-style dataset of ``Sample``).

    Args:
        size: number of samples.
        seed: sample ``i`` is a pure function of ``(seed, i)``.
        sample_rate, duration: of every clip (Hz, seconds); tones start within the clip.
        min_tones, max_tones: tones per clip (1 or 2).
        question_types: subset of ``QUESTION_TYPES`` to ask.
        noise: standard deviation of added white noise.
    """

    def __init__(
        self,
        *,
        size: int = 1000,
        seed: int = 0,
        sample_rate: int = 8000,
        duration: float = 1.0,
        min_tones: int = 1,
        max_tones: int = 1,
        question_types: Sequence[str] = QUESTION_TYPES,
        noise: float = 0.005,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tones: size must be a positive int, got {size!r}")
        if not 1 <= min_tones <= max_tones <= 2:
            raise ValueError(
                f"tones: need 1 <= min_tones <= max_tones <= 2, got {min_tones}, {max_tones}"
            )
        unknown = sorted(set(question_types) - set(QUESTION_TYPES))
        if unknown or not question_types:
            raise ValueError(
                f"tones: question_types must be a non-empty subset of {QUESTION_TYPES}, "
                f"got {list(question_types)}"
            )
        longest = max_tones * max(LENGTHS.values()) + (max_tones + 1) * 0.05
        if duration < longest:
            raise ValueError(
                f"tones: duration={duration}s is too short for {max_tones} long tone(s); "
                f"use at least {longest:.2f}s"
            )
        self.size, self.seed = size, int(seed)
        self.sample_rate, self.duration = int(sample_rate), float(duration)
        self.min_tones, self.max_tones = min_tones, max_tones
        self.question_types = tuple(question_types)
        self.noise = float(noise)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} tone samples")
        return self.sample(index % self.size)

    def sample(self, index: int) -> Sample:
        """Sample ``index``: its generator is ``random.Random(seed * 1_000_003 + index)``."""
        rng = random.Random(self.seed * 1_000_003 + index)
        tones = self._tones(rng)
        qtype = rng.choice(self.question_types)
        which = rng.randrange(len(tones))
        label = ORDINALS[which] if len(tones) > 1 and qtype != "count" else ""
        answer = COUNTS[len(tones) - 1] if qtype == "count" else tones[which][qtype]
        question = _question(qtype, label)
        meta = {
            "tones": tones,
            "question_type": qtype,
            "question": question,
            "answer": answer,
            "target": None if qtype == "count" else which,  # the tone asked about
            "seed": self.seed,
            "index": index,
            "source": f"tones(seed={self.seed})[{index}]",
        }
        waveform = self.render(tones, noise_seed=rng.getrandbits(63))
        turns = [Turn("user", f"<audio>\n{question}"), Turn("assistant", answer)]
        return Sample(turns, inputs={"audio": [waveform]}, meta=meta)

    def _tones(self, rng: random.Random) -> list[dict[str, Any]]:
        count = rng.randint(self.min_tones, self.max_tones)
        tones, start = [], rng.uniform(0.0, 0.05)
        for _ in range(count):
            pitch, volume, length = (rng.choice(list(d)) for d in (PITCHES, VOLUMES, LENGTHS))
            frequency = PITCHES[pitch] * 2 ** rng.uniform(-1 / 12, 1 / 12)  # ±1 semitone
            tones.append(
                {
                    "pitch": pitch,
                    "volume": volume,
                    "length": length,
                    "frequency": frequency,
                    "start": start,
                    "phase": rng.uniform(0, 2 * math.pi),
                }
            )
            start += LENGTHS[length] + rng.uniform(0.05, 0.1)  # a gap between tones
        return tones

    def render(self, tones: Sequence[dict[str, Any]], *, noise_seed: int = 0) -> torch.Tensor:
        """The clip of ``tones`` as a float32 waveform of ``duration * sample_rate`` samples."""
        sr = self.sample_rate
        clip = np.zeros(round(self.duration * sr))
        for tone in tones:
            begin, n = round(tone["start"] * sr), round(LENGTHS[tone["length"]] * sr)
            t = np.arange(n) / sr
            wave = VOLUMES[tone["volume"]] * np.sin(
                2 * np.pi * tone["frequency"] * t + tone["phase"]
            )
            ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / FADE)  # linear fade in and out
            clip[begin : begin + n] += (wave * ramp)[: len(clip) - begin]
        clip += np.random.default_rng(noise_seed).normal(0.0, self.noise, len(clip))
        return torch.from_numpy(clip.astype(np.float32))

    def corpus(self) -> str:
        """Every question and answer this dataset can produce, in chat form (to train a
        tokenizer on)."""
        questions = {
            _question(qtype, w): None for qtype in self.question_types for w in ("", *ORDINALS)
        }
        lines = [f"User: \n{question}\n" for question in questions]  # dict: no repeats
        answers = [*PITCHES, *VOLUMES, *LENGTHS, *COUNTS]
        lines += [f"Assistant: {answer}\n" for answer in answers]
        return "".join(lines)
