"""``mmgpt eval --task preferences``: who wins the judged pairs of a preference file.

Each line of a preference JSONL (:mod:`mmgpt.data.preference`) is a judgement between two
*players*, whatever produced the two answers. A line names them with, in this order:

- ``"chosen_by"`` and ``"rejected_by"``: the players of the chosen and the rejected answer
  (strings or numbers);
- the per-answer fields the preferences demo writes, ``"models"``, ``"samplers"``, ``"seeds"``
  (each ``{"chosen": x, "rejected": y}``), with the line's ``"model"`` when ``"models"`` is
  absent: the player is their combination, e.g. ``"model=tiny seed=3"``;
- for a ranked ``"responses"`` list, ``"responses_by"`` (one player per response): every pair
  the ranking orders is one judgement (:func:`~mmgpt.data.preference.ranked_pairs`).

A skipped judgement is a line ``{"judgement": "skip", "players": [a, b], ...}`` (its other
fields are ignored); skips are counted per player and per match-up, never as wins or losses.
A pair whose two answers come from the same player is counted in ``same_player`` and left out.

The report (:func:`preference_report`) gives, for each player, the win rate over its decided
judgements with a Wilson 95% interval, and a Bradley–Terry score fitted by the MM algorithm
(Hunter 2004, "MM algorithms for generalized Bradley–Terry models") with a small prior: each
player gets ``prior`` virtual wins and ``prior`` virtual losses against a reference player of
strength 1, which keeps the scores finite for a player that never lost (or never won) and
fixes their scale. ``bt_score`` is the log strength: player ``a`` beats ``b`` with
probability ``1 / (1 + exp(bt_score[b] - bt_score[a]))``, and the reference player scores 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmgpt.data.preference import ranked_pairs
from mmgpt.data.records import RecordError, iter_jsonl

__all__ = [
    "BT_PRIOR",
    "Z_95",
    "bradley_terry",
    "preference_report",
    "read_judgements",
    "wilson_interval",
]

Z_95 = 1.959963984540054  # the 97.5th percentile of the standard normal
BT_PRIOR = 0.1
_PER_ANSWER = (("models", "model"), ("samplers", "sampler"), ("seeds", "seed"))


def wilson_interval(wins: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``wins / n`` (``None`` when ``n == 0``)."""
    if n == 0:
        return None
    p = wins / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bradley_terry(
    players: Sequence[str],
    wins: Mapping[tuple[str, str], int],
    *,
    prior: float = BT_PRIOR,
    tol: float = 1e-12,
    max_iter: int = 100_000,
) -> tuple[dict[str, float], int]:
    """Bradley–Terry strengths by Hunter's MM iteration; ``(strengths, iterations)``.

    ``wins[(a, b)]`` is how often ``a`` beat ``b``. Each player also plays ``prior`` virtual
    wins and ``prior`` virtual losses against a reference of strength 1, so the update is
    ``p_i ← (W_i + prior) / (Σ_j n_ij / (p_i + p_j) + 2 prior / (p_i + 1))``, run (all players
    at once) until no strength moves by more than ``tol`` relatively.
    """
    if prior <= 0:
        raise ValueError(f"bradley_terry: prior must be positive, got {prior}")
    index = {name: i for i, name in enumerate(players)}
    won = [0.0] * len(players)
    games: dict[tuple[int, int], int] = {}
    for (a, b), count in wins.items():
        i, j = index[a], index[b]
        won[i] += count
        key = (min(i, j), max(i, j))
        games[key] = games.get(key, 0) + count
    strength = [1.0] * len(players)
    for iteration in range(1, max_iter + 1):
        denominators = [2 * prior / (p + 1) for p in strength]
        for (i, j), n in games.items():
            share = n / (strength[i] + strength[j])
            denominators[i] += share
            denominators[j] += share
        new = [(w + prior) / d for w, d in zip(won, denominators)]
        change = max((abs(x - y) / y for x, y in zip(new, strength)), default=0.0)
        strength = new
        if change < tol:
            return dict(zip(players, strength)), iteration
    return dict(zip(players, strength)), max_iter


def _name(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
        raise ValueError(f"{where}: {field!r} must name a player (a string or a number)")
    return str(value)


def _sides(obj: dict[str, Any], where: str) -> tuple[str, str] | None:
    """The (chosen, rejected) players a pair line names, or ``None`` when it names none."""
    if "chosen_by" in obj or "rejected_by" in obj:
        return (
            _name(obj.get("chosen_by"), where, "chosen_by"),
            _name(obj.get("rejected_by"), where, "rejected_by"),
        )
    parts: list[tuple[str, str]] = [("", "")]
    found = False
    for field, label in _PER_ANSWER:
        if field not in obj:
            if field == "models" and "model" in obj:
                model = _name(obj["model"], where, "model")
                parts.append((f"model={model}", f"model={model}"))
            continue
        value = obj[field]
        if not isinstance(value, dict) or not {"chosen", "rejected"} <= set(value):
            raise ValueError(f'{where}: {field!r} must be {{"chosen": ..., "rejected": ...}}')
        chosen = _name(value["chosen"], where, f"{field}.chosen")
        rejected = _name(value["rejected"], where, f"{field}.rejected")
        parts.append((f"{label}={chosen}", f"{label}={rejected}"))
        found = True
    if not found:
        return None
    return (
        " ".join(c for c, _ in parts if c),
        " ".join(r for _, r in parts if r),
    )


def read_judgements(path: str | os.PathLike) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """``(decided, skipped)``: (winner, loser) pairs and the two players of each skip.

    Raises ``ValueError`` naming the file and line of anything it cannot read, and naming the
    file when no line names its players.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preference file not found")
    decided: list[tuple[str, str]] = []
    skipped: list[list[str]] = []
    unnamed: int | None = None  # first line without players
    for line, obj in iter_jsonl(path):
        where = f"{path}:{line}"
        if isinstance(obj, RecordError):
            raise ValueError(f"{where}: {obj}")
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: a line must be a JSON object, got {type(obj).__name__}")
        if obj.get("judgement") == "skip":
            players = obj.get("players")
            if not isinstance(players, list) or len(players) != 2:
                raise ValueError(f"{where}: a skipped judgement needs 'players': [a, b]")
            skipped.append([_name(p, where, "players") for p in players])
            continue
        if "judgement" in obj:
            raise ValueError(f"{where}: 'judgement' can only be \"skip\", got {obj['judgement']!r}")
        if "responses" in obj:
            responses, by = obj["responses"], obj.get("responses_by")
            if by is None:
                unnamed = unnamed or line
                continue
            if not isinstance(responses, list) or not isinstance(by, list):
                raise ValueError(f"{where}: 'responses' and 'responses_by' must be lists")
            if len(by) != len(responses):
                raise ValueError(
                    f"{where}: 'responses_by' has {len(by)} entries but 'responses' has "
                    f"{len(responses)}"
                )
            names = [_name(p, where, "responses_by") for p in by]
            ranking = obj.get("ranking")
            if ranking is not None and (
                not isinstance(ranking, list)
                or len(ranking) != len(names)
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranking)
            ):
                raise ValueError(f"{where}: 'ranking' must be one number per response")
            decided += ranked_pairs(names, ranking)
            continue
        if "chosen" not in obj or "rejected" not in obj:
            raise ValueError(
                f"{where}: needs 'chosen' and 'rejected', a ranked 'responses' list, or "
                '"judgement": "skip"'
            )
        sides = _sides(obj, where)
        if sides is None:
            unnamed = unnamed or line
            continue
        decided.append(sides)
    if unnamed is not None:
        if not decided and not skipped:
            raise ValueError(
                f"{path}: no line names its players; give each line 'chosen_by' and "
                "'rejected_by' (or 'responses_by' for a ranked list), or the per-answer "
                "'seeds'/'samplers'/'models' the preferences demo writes"
            )
        raise ValueError(
            f"{path}:{unnamed}: this line names no players ('chosen_by'/'rejected_by', "
            "'responses_by', or 'seeds'/'samplers'/'models') while others do"
        )
    return decided, skipped


def preference_report(
    data: str | os.PathLike, *, prior: float = BT_PRIOR, z: float = Z_95
) -> dict[str, Any]:
    """Win rates (Wilson intervals) and Bradley–Terry scores of the players of ``data``.

    Returns a JSON-ready dict: ``task``, ``data``, ``judgements`` (decided pairs counted),
    ``skipped``, ``same_player``, ``players`` (per player: ``wins``, ``losses``, ``skipped``,
    ``win_rate``, ``ci95``, ``bt_score``), ``ranking`` (players by ``bt_score``, best
    first), ``matchups`` (per pair of players that met: ``players`` [a, b] in name order,
    ``wins`` [of a, of b], ``skipped``, ``win_rate`` of a, ``ci95``) and ``bradley_terry``
    (``prior``, ``iterations``).
    """
    decided, skipped = read_judgements(data)
    same = [pair for pair in decided if pair[0] == pair[1]]
    decided = [pair for pair in decided if pair[0] != pair[1]]
    names = sorted({p for pair in decided for p in pair} | {p for pair in skipped for p in pair})
    if not decided:
        raise ValueError(f"{data}: no decided judgement between two different players")
    wins: dict[tuple[str, str], int] = {}
    for pair in decided:
        wins[pair] = wins.get(pair, 0) + 1
    skips: dict[tuple[str, str], int] = {}
    for a, b in skipped:
        key = (min(a, b), max(a, b))
        skips[key] = skips.get(key, 0) + 1
    strength, iterations = bradley_terry(names, wins, prior=prior)

    players: dict[str, Any] = {}
    for name in names:
        won = sum(n for (a, _), n in wins.items() if a == name)
        lost = sum(n for (_, b), n in wins.items() if b == name)
        games = won + lost
        interval = wilson_interval(won, games, z)
        players[name] = {
            "wins": won,
            "losses": lost,
            "skipped": sum(n for key, n in skips.items() if name in key),
            "win_rate": won / games if games else None,
            "ci95": list(interval) if interval else None,
            "bt_score": math.log(strength[name]),
        }
    matchups = []
    for key in sorted({(min(a, b), max(a, b)) for a, b in wins} | set(skips)):
        a, b = key
        a_wins, b_wins = wins.get((a, b), 0), wins.get((b, a), 0)
        interval = wilson_interval(a_wins, a_wins + b_wins, z)
        matchups.append(
            {
                "players": [a, b],
                "wins": [a_wins, b_wins],
                "skipped": skips.get(key, 0),
                "win_rate": a_wins / (a_wins + b_wins) if a_wins + b_wins else None,
                "ci95": list(interval) if interval else None,
            }
        )
    return {
        "task": "preferences",
        "data": str(data),
        "judgements": len(decided),
        "skipped": len(skipped),
        "same_player": len(same),
        "players": players,
        "ranking": sorted(names, key=lambda n: (-players[n]["bt_score"], n)),
        "matchups": matchups,
        "bradley_terry": {"prior": prior, "iterations": iterations},
    }
