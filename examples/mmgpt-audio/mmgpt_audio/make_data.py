"""Write a tones dataset as files: ``.wav`` clips and a LLaVA-style ``tones.json``.

    mmgpt-audio-data --out runs/tones/train --size 2000 --seed 0
    python -m mmgpt_audio.make_data --out runs/tones/test --size 100 --seed 1

Each record names its clip under ``"audio"`` and asks about it with ``"<audio>"``::

    {"id": "0", "audio": "clips/0000.wav", "question_type": "pitch",
     "conversations": [{"from": "human", "value": "<audio>\\nwhat pitch is the tone?"},
                       {"from": "gpt", "value": "high"}]}

mmgpt reads it like any LLaVA file (``mmgpt data check``, ``mmgpt train``, ``mmgpt eval``):
the ``"audio"`` loader of this plugin reads the clips.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mmgpt_audio.encoder import save_wav
from mmgpt_audio.tones import QUESTION_TYPES, ToneDataset


def write_dataset(
    out: Path, *, size: int, seed: int, questions: Sequence[str], max_tones: int
) -> Path:
    """Write ``size`` samples of the tones dataset under ``out``; returns the JSON file."""
    data = ToneDataset(size=size, seed=seed, question_types=questions, max_tones=max_tones)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    width = len(str(size - 1))
    records = []
    for i in range(size):
        sample = data[i]
        clip = f"clips/{i:0{width}d}.wav"
        save_wav(out / clip, sample.inputs["audio"][0], data.sample_rate)
        user, answer = sample.conversation
        records.append(
            {
                "id": str(i),
                "audio": clip,
                "question_type": sample.meta["question_type"],
                "conversations": [
                    {"from": "human", "value": user.text},
                    {"from": "gpt", "value": answer.text},
                ],
            }
        )
    path = out / "tones.json"
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmgpt-audio-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--size", type=int, default=1000, help="number of clips")
    parser.add_argument("--seed", type=int, default=0, help="clip i is a function of (seed, i)")
    parser.add_argument(
        "--questions",
        default="pitch",
        help=f"comma-separated question types ({', '.join(QUESTION_TYPES)})",
    )
    parser.add_argument("--max-tones", type=int, default=1, help="tones per clip (1 or 2)")
    args = parser.parse_args(argv)
    path = write_dataset(
        args.out,
        size=args.size,
        seed=args.seed,
        questions=args.questions.split(","),
        max_tones=args.max_tones,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
