"""``mmgpt eval --task preferences`` (win rates, Wilson intervals, Bradley–Terry) and
``--task reward`` (a reward model's pair and best-of-n accuracy), against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmgpt import cli
from mmgpt.eval.preferences import bradley_terry, preference_report, wilson_interval
from mmgpt.eval.run import run_eval


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pair(winner: str, loser: str) -> dict:
    return {
        "prompt": "q",
        "chosen": "x",
        "rejected": "y",
        "chosen_by": winner,
        "rejected_by": loser,
    }


# A beats B 3–1, B beats C 3–1, A beats C 4–0; one skipped A–B judgement.
CRAFTED = (
    [pair("A", "B")] * 3
    + [pair("B", "A")]
    + [pair("B", "C")] * 3
    + [pair("C", "B")]
    + [pair("A", "C")] * 4
    + [{"prompt": "q", "judgement": "skip", "players": ["B", "A"]}]
)


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 7/8: centre (0.875 + 1.9208/8) / (1 + 3.8415/8) = 0.75334, half-width 0.22424
    low, high = wilson_interval(7, 8)
    assert (low, high) == pytest.approx((0.52910, 0.97758), abs=1e-4)
    # 4/8: centre 0.5, half-width 1.32413 * sqrt(1/32 + 3.8415/256) = 0.28478
    assert wilson_interval(4, 8) == pytest.approx((0.21522, 0.78478), abs=1e-4)
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_bradley_terry_two_players_tend_to_the_win_ratio() -> None:
    # without a prior the MLE strength ratio is wins_A / wins_B = 3 / 1
    strength, _ = bradley_terry(["A", "B"], {("A", "B"): 3, ("B", "A"): 1}, prior=1e-7)
    assert strength["A"] / strength["B"] == pytest.approx(3.0, rel=1e-4)
    with pytest.raises(ValueError, match="prior must be positive"):
        bradley_terry(["A"], {}, prior=0)


def test_preference_report_on_a_crafted_file(tmp_path: Path) -> None:
    report = preference_report(write_jsonl(tmp_path / "prefs.jsonl", CRAFTED))
    assert report["judgements"] == 12 and report["skipped"] == 1 and report["same_player"] == 0
    players = report["players"]
    assert {n: (p["wins"], p["losses"], p["skipped"]) for n, p in players.items()} == {
        "A": (7, 1, 1),
        "B": (4, 4, 1),
        "C": (1, 7, 0),
    }
    assert players["A"]["win_rate"] == 0.875 and players["B"]["win_rate"] == 0.5
    assert players["A"]["ci95"] == pytest.approx([0.52910, 0.97758], abs=1e-4)
    assert players["B"]["ci95"] == pytest.approx([0.21522, 0.78478], abs=1e-4)
    # C's interval mirrors A's (1/8 vs 7/8)
    assert players["C"]["ci95"] == pytest.approx([1 - 0.97758, 1 - 0.52910], abs=1e-4)
    assert report["ranking"] == ["A", "B", "C"]
    ab = report["matchups"][0]
    assert ab["players"] == ["A", "B"] and ab["wins"] == [3, 1] and ab["skipped"] == 1
    assert ab["win_rate"] == 0.75
    ac = report["matchups"][1]
    assert ac["players"] == ["A", "C"] and ac["wins"] == [4, 0] and ac["skipped"] == 0

    # a hand-rolled MM iteration (Hunter 2004) with the prior as games vs a strength-1 player
    prior = report["bradley_terry"]["prior"]
    wins = {"A": 7, "B": 4, "C": 1}
    games = {("A", "B"): 4, ("B", "C"): 4, ("A", "C"): 4}
    p = {"A": 1.0, "B": 1.0, "C": 1.0}
    for _ in range(5000):
        new = {}
        for i in p:
            d = 2 * prior / (p[i] + 1)
            d += sum(n / (p[a] + p[b]) for (a, b), n in games.items() if i in (a, b))
            new[i] = (wins[i] + prior) / d
        p = new
    for name in p:
        assert players[name]["bt_score"] == pytest.approx(math.log(p[name]), abs=1e-8)
    # the fixed point: wins + prior = expected wins (real and virtual games)
    for i in p:
        expected = sum(
            n * p[i] / (p[a] + p[b]) for (a, b), n in games.items() if i in (a, b)
        ) + 2 * prior * p[i] / (p[i] + 1)
        assert expected == pytest.approx(wins[i] + prior, rel=1e-9)


def test_players_from_the_demo_fields_and_ranked_lists(tmp_path: Path) -> None:
    demo = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "seeds": {"chosen": 1, "rejected": 2}},
        {"prompt": "q", "chosen": "a", "rejected": "b", "seeds": {"chosen": 2, "rejected": 1}},
        {"prompt": "q", "chosen": "a", "rejected": "b", "seeds": {"chosen": 1, "rejected": 2}},
        {"prompt": "q", "chosen": "a", "rejected": "b", "seeds": {"chosen": 1, "rejected": 1}},
    ]
    report = preference_report(write_jsonl(tmp_path / "demo.jsonl", demo))
    assert report["same_player"] == 1 and report["judgements"] == 3
    assert report["players"]["seed=1"]["wins"] == 2 and report["players"]["seed=2"]["wins"] == 1

    with_model = [{**row, "model": "tiny"} for row in demo[:1]]
    report = preference_report(write_jsonl(tmp_path / "model.jsonl", with_model))
    assert set(report["players"]) == {"model=tiny seed=1", "model=tiny seed=2"}

    ranked = [{"prompt": "q", "responses": ["a", "b", "c"], "responses_by": ["X", "Y", "Z"]}]
    report = preference_report(write_jsonl(tmp_path / "ranked.jsonl", ranked))
    wins = {n: (p["wins"], p["losses"]) for n, p in report["players"].items()}
    assert wins == {"X": (2, 0), "Y": (1, 1), "Z": (0, 2)}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}], r"prefs\.jsonl: no line names"),
        ([pair("A", "B"), {"prompt": "q", "chosen": "a", "rejected": "b"}], r"prefs\.jsonl:2: "),
        ([pair("A", "B"), {"prompt": "q", "judgement": "skip"}], r":2: a skipped judgement"),
        ([{"prompt": "q", "chosen_by": "A", "rejected_by": "B"}], r":1: needs 'chosen'"),
        ([{**pair("A", "B"), "chosen_by": None}], r":1: 'chosen_by' must name a player"),
        ([{**pair("A", "B"), "judgement": "A"}], r":1: 'judgement' can only be"),
        ([pair("A", "A")], "no decided judgement between two different players"),
    ],
)
def test_preference_errors_name_the_file_and_line(tmp_path: Path, rows, message) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        preference_report(path)


def test_cli_preferences_needs_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", CRAFTED)
    code = cli.main(["eval", "--task", "preferences", "--data", str(path)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert json.loads(out) == json.loads(json.dumps(preference_report(path)))

    assert cli.main(["eval", "--task", "preferences", "--data", str(path), "--limit", "2"]) != 0
    assert "--limit does not apply to --task preferences" in capsys.readouterr().err
    code = cli.main(["eval", "--task", "preferences", "--data", str(path), "--model", "m"])
    assert code != 0 and "leave out --model" in capsys.readouterr().err
    for task in ("choice", "reward"):
        assert cli.main(["eval", "--task", task, "--data", str(path)]) != 0
        assert f"--model is required for --task {task}" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(path)]) != 0
    assert "--model is required" in capsys.readouterr().err


# -- reward -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    pytest.importorskip("timm")
    mmgpt_text = pytest.importorskip("mmgpt_text")
    import torch

    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.rlhf.reward_model import RewardModel

    root = tmp_path_factory.mktemp("reward")
    corpus = root / "corpus.txt"
    corpus.write_text("User: What colour is the square?\nAssistant: red blue green\n" * 30)
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300, num_signal_tokens=0)
    torch.manual_seed(0)
    backbone = MultimodalGPT.build("gpt-nano", tok, block_size=64, dropout=0.0)
    model = RewardModel(backbone)
    with torch.no_grad():
        model.head.weight.normal_()
    model.save_pretrained(root / "rm")
    return root / "rm"


def test_reward_report_hand_checkable_accuracy(reward_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from mmgpt.data.sample import Turn
    from mmgpt.rlhf.reward_model import RewardModel

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    question = "What colour is the square?"
    rows = [
        # the same two answers both ways round: exactly one of the two pairs is right
        {"prompt": question, "image": "red.png", "chosen": "red", "rejected": "blue"},
        {"prompt": question, "image": "red.png", "chosen": "blue", "rejected": "red"},
        {"prompt": question, "responses": ["red", "green", "blue"]},
        {"prompt": question, "responses": ["blue", "red"], "ranking": [2, 1]},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    report = run_eval(reward_dir, path, "reward", batch_size=2, device="cpu")

    model = RewardModel.from_pretrained(reward_dir).eval()
    image = Image.open(tmp_path / "red.png").convert("RGB")

    def score(answer: str, images: list) -> float:
        prompt = "<image>\n" + question if images else question
        return float(model.score([[Turn("user", prompt)]], [answer], [images])[0])

    with_image = {a: score(a, [image]) for a in ("red", "blue")}
    plain = {a: score(a, []) for a in ("red", "green", "blue")}
    assert with_image["red"] != with_image["blue"]
    # pairs: 2 from the image lines (one right), 3 from the first list, 1 from the second
    list_pairs = [("red", "green"), ("red", "blue"), ("green", "blue"), ("red", "blue")]
    right = 1 + sum(plain[a] > plain[b] for a, b in list_pairs)
    assert report["pairs"] == 6 and report["pair_ties"] == 0 and report["pair_chance"] == 0.5
    assert report["pair_accuracy"] == pytest.approx(right / 6)
    top3 = max(("red", "green", "blue"), key=plain.get)
    top2 = max(("blue", "red"), key=plain.get)
    hits = (top3 == "red") + (top2 == "red")
    assert report["best_of_n"] == {
        "prompts": 2,
        "accuracy": pytest.approx(hits / 2),
        "chance": pytest.approx((1 / 3 + 1 / 2) / 2),
    }


def test_cli_reward_and_its_errors(
    reward_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"prompt": "q", "chosen": "red", "rejected": "blue"},
        {"prompt": "q", "chosen": "blue", "rejected": "red"},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    code = cli.main(["eval", "--model", str(reward_dir), "--data", str(path), "--task", "reward"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    metrics = json.loads(out)
    assert metrics["pair_accuracy"] == 0.5 and metrics["pairs"] == 2
    assert "best_of_n" not in metrics

    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "q", "chosen": "red"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'rejected'"):
        run_eval(reward_dir, bad, "reward")
    with pytest.raises(ValueError, match="--max-new-tokens does not apply"):
        run_eval(reward_dir, path, "reward", max_new_tokens=3)
