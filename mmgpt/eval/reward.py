"""``mmgpt eval --task reward``: how often a reward model agrees with a preference file.

The reward model (:class:`~mmgpt.rlhf.reward_model.RewardModel`) scores every answer of the
file (:mod:`mmgpt.data.preference`: pairs and ranked ``responses`` lists, with their images)
with :meth:`~mmgpt.rlhf.reward_model.RewardModel.score` (raw scores). Then:

- ``pair_accuracy``: the share of (better, worse) pairs, ranked lists expanded into every pair
  their ranking orders, where the better answer scores strictly higher; a tie counts as wrong
  and is counted in ``pair_ties``. Chance is 0.5.
- ``best_of_n`` (only when the file has ranked lists): over the ranked lines, the share where
  the highest-scored response (the first one on a tied score) is a best-ranked one. Its
  ``chance`` is the mean over those lines of (best-ranked responses) / n, 1/n without ties.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmgpt.data.images import load_image
from mmgpt.data.preference import read_preference
from mmgpt.data.records import RecordError, iter_jsonl
from mmgpt.data.sample import Turn
from mmgpt.rlhf.reward_model import RewardModel

__all__ = ["reward_report"]


def reward_report(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Pair and best-of-n accuracy of the reward model in ``model_dir`` on ``data``.

    Returns a JSON-ready dict: ``task``, ``data``, ``model``, ``pairs``, ``pair_accuracy``,
    ``pair_ties``, ``pair_chance`` (0.5) and, when ``data`` has ranked lists, ``best_of_n``
    (``prompts``, ``accuracy``, ``chance``). Raises ``ValueError`` naming the file and line of
    the first unreadable line.
    """
    path = Path(data)
    records, problems = read_preference(path)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{first.file}:{first.line}: {first.message}{more}")
    if not records:
        raise ValueError(f"{path}: no preference pairs")
    model = RewardModel.from_pretrained(model_dir, map_location=device).eval()

    # one prompt (with its images) per line; every distinct answer of a line scored once
    prompts: dict[int, tuple[str, list[Any]]] = {}
    answers: dict[tuple[int, str], int] = {}
    for record in records:
        if record.line not in prompts:
            images = [load_image(p) for p in record.image_paths]
            prompts[record.line] = (record.data[0], images)
        for text in record.data[1:]:
            answers.setdefault((record.line, text), len(answers))
    ranked: dict[int, tuple[list[str], list[float]]] = {}
    for line, obj in iter_jsonl(path):
        if line in prompts and not isinstance(obj, RecordError) and "responses" in obj:
            responses = obj["responses"]
            ranking = obj.get("ranking") or list(range(len(responses)))
            ranked[line] = (responses, [float(r) for r in ranking])
            for text in responses:
                answers.setdefault((line, text), len(answers))
    keys = list(answers)
    scores = model.score(
        [[Turn("user", prompts[line][0])] for line, _ in keys],
        [text for _, text in keys],
        [prompts[line][1] for line, _ in keys],
        batch_size=batch_size,
    ).tolist()

    right = ties = 0
    for record in records:
        better = scores[answers[(record.line, record.data[1])]]
        worse = scores[answers[(record.line, record.data[2])]]
        right += better > worse
        ties += better == worse
    result: dict[str, Any] = {
        "task": "reward",
        "data": str(data),
        "model": str(model_dir),
        "pairs": len(records),
        "pair_accuracy": right / len(records),
        "pair_ties": ties,
        "pair_chance": 0.5,
    }
    if ranked:
        hits = 0
        chance = 0.0
        for line, (responses, ranking) in ranked.items():
            scored = [scores[answers[(line, text)]] for text in responses]
            top = max(range(len(responses)), key=lambda i: (scored[i], -i))
            best = min(ranking)
            hits += ranking[top] == best
            chance += sum(r == best for r in ranking) / len(responses)
        result["best_of_n"] = {
            "prompts": len(ranked),
            "accuracy": hits / len(ranked),
            "chance": chance / len(ranked),
        }
    return result
