"""``mmgpt eval --task choice``: parsing, prompts, scoring against hand-computed log-likelihoods."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmgpt import cli
from mmgpt.data.errors import DataError
from mmgpt.eval.choice import (
    ChoiceQuestion,
    QuestionScores,
    build_prompt,
    choice_metrics,
    load_choice_data,
    read_choice_csv,
    read_choice_jsonl,
    score_questions,
    write_shapes_choice,
)

CORPUS = (
    "The following are multiple choice questions (with answers) about physics.\n\n"
    "What falls? A. apple B. cloud C. moon D. sun Answer: A\n"
    "The red square is small. The blue circle is large. yes no red blue\n"
) * 10


# -- a hand-built model whose next-token probabilities are known ----------------------------
class CharTokenizer:
    """One token per character; id 0 is <bos>."""

    def __init__(self, text: str) -> None:
        self.chars = ["<bos>", *sorted(set(text))]
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.bos_id = 0

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class BigramModel:
    """Logits depend on the current token only: row ``table[token]`` holds log-probabilities."""

    def __init__(self, tokenizer: CharTokenizer, rows: dict[str, dict[str, float]]) -> None:
        size = len(tokenizer.chars)
        self.table = torch.full((size, size), 1.0 / size)
        for prev, probs in rows.items():
            row = torch.full((size,), (1.0 - sum(probs.values())) / (size - len(probs)))
            for nxt, p in probs.items():
                row[tokenizer.ids[nxt]] = p
            self.table[tokenizer.ids[prev]] = row
        self.table = self.table.log()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]  # (B, T, V)


def crafted() -> tuple[ChoiceQuestion, CharTokenizer, BigramModel]:
    question = ChoiceQuestion("q", ("ab", "c"), 0, "t", "x.jsonl:1")
    tokenizer = CharTokenizer(build_prompt(question) + " abcABCD")
    model = BigramModel(
        tokenizer,
        {":": {"B": 0.6, " ": 0.3}, " ": {"c": 0.4, "a": 0.3}, "a": {"b": 0.9}},
    )
    return question, tokenizer, model


def test_raw_and_normalised_log_likelihood_pick_different_choices() -> None:
    question, tokenizer, model = crafted()
    (scores,) = score_questions(model, tokenizer, [question])
    # " ab": P(' '|':') P('a'|' ') P('b'|'a');  " c": P(' '|':') P('c'|' ')
    ab, c = math.log(0.3 * 0.3 * 0.9), math.log(0.3 * 0.4)
    assert scores.loglik == pytest.approx([ab, c], abs=1e-5)
    assert scores.tokens == [3, 2] and scores.chars == [3, 2]
    assert scores.greedy == "B"
    # raw: c (-2.12 > -2.51); per token: ab (-0.84 > -1.06); the greedy token writes B
    assert scores.picks() == {
        "loglik": 1,
        "loglik_per_token": 0,
        "loglik_per_char": 0,
        "letter": 1,
    }
    metrics = choice_metrics([question], [scores])
    assert metrics["accuracy"] == {
        "loglik": 0.0,
        "loglik_per_token": 1.0,
        "loglik_per_char": 1.0,
        "letter": 0.0,
    }


def test_batching_does_not_change_the_scores() -> None:
    question, tokenizer, model = crafted()
    other = ChoiceQuestion("qq", ("c", "ab", "a"), 2, "t", "x.jsonl:2")
    one = score_questions(model, tokenizer, [question, other], batch_size=1)
    many = score_questions(model, tokenizer, [question, other], batch_size=4)
    for a, b in zip(one, many):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-6)
        assert (a.greedy, a.tokens) == (b.greedy, b.tokens)


def test_k_shot_prompt_text_is_exactly_as_documented() -> None:
    example = ChoiceQuestion("2 + 2?", ("3", "4"), 1, "high_school_math", "d.csv:1")
    question = ChoiceQuestion("1 + 1?", ("1", "2", "3"), 1, "high_school_math", "t.csv:1")
    assert build_prompt(question, [example, example]) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "2 + 2?\nA. 3\nB. 4\nAnswer: B\n\n"
        "2 + 2?\nA. 3\nB. 4\nAnswer: B\n\n"
        "1 + 1?\nA. 1\nB. 2\nC. 3\nAnswer:"
    )
    pictured = ChoiceQuestion("colour?", ("red", "blue"), 0, "s", "a.jsonl:1", Path("a.png"))
    assert build_prompt(pictured).endswith("\n\n<image>\ncolour?\nA. red\nB. blue\nAnswer:")


def test_csv_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "physics_test.csv"
    path.write_text('q1,a,b,c,d,A\n"multi\nline",a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"physics_test\.csv:2: answer 'E' is not one of A, B, C, D"
    ):
        read_choice_csv(path)
    path.write_text("q1,a,b,c,d,A\nq2,a,b,c,B\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"physics_test\.csv:2: 5 columns, the first row has 6"):
        read_choice_csv(path)
    path.write_text("q1,a,,c,d,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: choice B is empty"):
        read_choice_csv(path)
    # a quoted field over two lines: the next row starts on line 3
    path.write_text('"multi\nline",a,b,c,d,A\nq,a,b,c,d,D\n', encoding="utf-8")
    rows = read_choice_csv(path)
    assert [q.source for q in rows] == [f"{path}:1", f"{path}:3"]
    assert rows[1] == ChoiceQuestion("q", ("a", "b", "c", "d"), 3, "physics", f"{path}:3")


def test_jsonl_parsing_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "quiz.jsonl"
    lines = [
        {"question": "a?", "choices": ["x", "y"], "answer": 1},
        {
            "question": "b?",
            "choices": ["x", "y", "z"],
            "answer": "c",
            "subject": "s",
            "image": "img/1.png",
            "id": 7,
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    first, second = read_choice_jsonl(path)
    assert first == ChoiceQuestion("a?", ("x", "y"), 1, "quiz", f"{path}:1")
    assert (second.answer, second.subject, second.image) == (2, "s", tmp_path / "img/1.png")
    bad = {
        '{"question": "a?", "choices": ["x"], "answer": 0}': r":2: 'choices' must be a list",
        '{"question": "a?", "choices": ["x", "y"], "answer": 2}': r":2: answer 2 is out of range",
        '{"question": "a?", "choices": ["x", "y"], "answer": true}': r":2: answer must be",
        '{"question": "a?", "choices": ["x", "y"]}': r":2: 'answer' is missing",
        '{"question": "", "choices": ["x", "y"], "answer": 0}': r":2: 'question' must be",
        '{"question": "a?",': r"quiz\.jsonl:2: invalid JSON",
    }
    for line, message in bad.items():
        path.write_text(json.dumps(lines[0]) + "\n" + line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=message):
            read_choice_jsonl(path)


def test_k_shot_sources(tmp_path: Path) -> None:
    # MMLU's layout: data/test/X_test.csv with data/dev/X_dev.csv; or X_dev.csv beside it
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test" / "bio_test.csv").write_text("t1,a,b,A\nt2,a,b,B\n", encoding="utf-8")
    (tmp_path / "test" / "bio_dev.csv").write_text("d1,a,b,B\nd2,a,b,A\n", encoding="utf-8")
    (tmp_path / "test" / "chem_test.csv").write_text("t3,a,b,A\n", encoding="utf-8")
    (tmp_path / "dev" / "chem_dev.csv").write_text("d3,a,b,B\n", encoding="utf-8")
    questions, pool = load_choice_data(tmp_path / "test", shots=1)
    assert [q.question for q in questions] == ["t1", "t2", "t3"]
    assert {s: [q.question for q in e] for s, e in pool.items()} == {
        "bio": ["d1"],
        "chem": ["d3"],
    }
    with pytest.raises(ValueError, match=r"chem_dev\.csv: --shots 2 needs 2 rows, it has 1"):
        load_choice_data(tmp_path / "test", shots=2)
    (tmp_path / "dev" / "chem_dev.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"chem_test\.csv: --shots 1 needs chem_dev"):
        load_choice_data(tmp_path / "test", shots=1)
    assert len(load_choice_data(tmp_path / "test" / "chem_test.csv")[0]) == 1

    # JSONL: the first K questions of each subject are its examples and are not evaluated
    path = tmp_path / "q.jsonl"
    rows = [("s", "1"), ("t", "2"), ("s", "3"), ("s", "4"), ("t", "5")]
    path.write_text(
        "".join(
            json.dumps({"question": q, "choices": ["x", "y"], "answer": 0, "subject": s}) + "\n"
            for s, q in rows
        ),
        encoding="utf-8",
    )
    questions, pool = load_choice_data(path, shots=1)
    assert [q.question for q in questions] == ["3", "4", "5"]
    assert {s: [q.question for q in e] for s, e in pool.items()} == {"s": ["1"], "t": ["2"]}
    with pytest.raises(ValueError, match=r"--shots 3 needs 3 questions of subject 't'"):
        load_choice_data(path, shots=3)


def test_per_subject_accuracy_and_the_chance_baseline() -> None:
    questions = [
        ChoiceQuestion("q", ("a", "b"), 0, "s", "f:1"),
        ChoiceQuestion("q", ("a", "b", "c", "d"), 1, "s", "f:2"),
        ChoiceQuestion("q", ("a", "b", "c"), 2, "t", "f:3"),
    ]
    scores = [
        QuestionScores([-1.0, -2.0], [1, 4], [2, 8], " A"),  # raw A, per token B
        QuestionScores([-3.0, -1.0, -2.0, -9.0], [1, 1, 1, 1], [1, 1, 1, 1], "b"),
        QuestionScores([-1.0, -1.0, -3.0], [1, 1, 1], [1, 1, 1], "D"),  # a tie: the first
    ]
    metrics = choice_metrics(questions, scores)
    assert metrics["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 3) / 3)
    assert metrics["correct"] == {
        "loglik": 2,
        "loglik_per_token": 1,
        "loglik_per_char": 1,
        "letter": 2,
    }
    assert metrics["num_questions"] == 3 and metrics["num_subjects"] == 2
    s, t = metrics["per_subject"]["s"], metrics["per_subject"]["t"]
    assert s["accuracy"] == {
        "loglik": 1.0,
        "loglik_per_token": 0.5,
        "loglik_per_char": 0.5,
        "letter": 1.0,
    }
    assert s["chance"] == pytest.approx(3 / 8) and s["num_questions"] == 2
    assert t["accuracy"]["loglik"] == 0.0 and t["chance"] == pytest.approx(1 / 3)


# -- a real tiny GPT through the command line ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory: pytest.TempPathFactory):
    from mmgpt.config import GPTConfig
    from mmgpt.model import GPT
    from mmgpt_text import TextTokenizer

    root = tmp_path_factory.mktemp("choice-model")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tokenizer = TextTokenizer.train([root / "corpus.txt"], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=160, n_layer=2, n_head=2, n_embd=32
    )
    model = GPT(config).eval()
    model.save_pretrained(root / "model", tokenizer=tokenizer)
    return root / "model", model, tokenizer


@torch.no_grad()
def picks_by_hand(model, tokenizer, question: ChoiceQuestion, shots) -> dict[str, int | None]:
    prompt = [tokenizer.bos_id, *tokenizer.encode(build_prompt(question, shots))]
    sums, per_token, per_char = [], [], []
    for choice in question.choices:
        cont = tokenizer.encode(" " + choice)
        logits = model(input_ids=torch.tensor([prompt + cont])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        total = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
        sums.append(total)
        per_token.append(total / len(cont))
        per_char.append(total / (len(choice) + 1))
    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    written = tokenizer.decode([int(logits.argmax())]).strip().upper()
    letters = "ABCD"[: len(question.choices)]
    return {
        "loglik": sums.index(max(sums)),
        "loglik_per_token": per_token.index(max(per_token)),
        "loglik_per_char": per_char.index(max(per_char)),
        "letter": letters.index(written) if written and written in letters else None,
    }


def test_cli_choice_on_mmlu_csvs_matches_a_hand_computation(
    tiny_gpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, model, tokenizer = tiny_gpt
    data = tmp_path / "mmlu"
    data.mkdir()
    (data / "physics_test.csv").write_text(
        "What falls?,apple,cloud,moon,sun,A\n"
        "What is large?,the blue circle,the red square,a dot,nothing,A\n"
        "Which is red?,blue,red,yes,no,B\n",
        encoding="utf-8",
    )
    (data / "physics_dev.csv").write_text("What is blue?,red,blue,yes,no,B\n", encoding="utf-8")
    (data / "colour_test.csv").write_text(
        "Is the square red?,yes,no,blue,large,A\nIs the circle small?,yes,no,red,blue,B\n",
        encoding="utf-8",
    )
    (data / "colour_dev.csv").write_text("Is red blue?,yes,no,maybe,red,B\n", encoding="utf-8")

    code = cli.main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--task",
            "choice",
            "--shots",
            "1",
            "--batch-size",
            "3",
        ]
    )
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    metrics = json.loads(out)

    questions, pool = load_choice_data(data, shots=1)
    assert [q.subject for q in questions] == ["colour"] * 2 + ["physics"] * 3
    correct = {
        s: dict.fromkeys(("loglik", "loglik_per_token", "loglik_per_char", "letter"), 0)
        for s in ("colour", "physics", "all")
    }
    for q in questions:
        for name, pick in picks_by_hand(model, tokenizer, q, pool[q.subject]).items():
            correct[q.subject][name] += pick == q.answer
            correct["all"][name] += pick == q.answer
    assert metrics["task"] == "choice" and metrics["shots"] == 1
    assert metrics["num_questions"] == 5 and metrics["chance"] == pytest.approx(0.25)
    assert metrics["correct"] == correct["all"]
    for subject, n in (("colour", 2), ("physics", 3)):
        assert metrics["per_subject"][subject]["correct"] == correct[subject]
        assert metrics["per_subject"][subject]["num_questions"] == n
    assert metrics["examples"][0]["source"] == f"{data / 'colour_test.csv'}:1"

    # --limit, and --shots belongs to --task choice only
    code = cli.main(
        ["eval", "--model", str(model_dir), "--data", str(data), "--task", "choice", "--limit", "2"]
    )
    assert code == 0 and json.loads(capsys.readouterr().out)["num_questions"] == 2
    code = cli.main(["eval", "--model", str(model_dir), "--data", str(data), "--shots", "1"])
    _, err = capsys.readouterr()
    assert code == 2 and "--shots applies to --task choice, not lm" in err
    # a prompt longer than the model's context names the question
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"question": "red " * 200, "choices": ["x", "y"], "answer": 0}) + "\n",
        encoding="utf-8",
    )
    code = cli.main(["eval", "--model", str(model_dir), "--data", str(long), "--task", "choice"])
    _, err = capsys.readouterr()
    assert code == 2 and "long.jsonl:1: the prompt and choice 'x' take" in err
    # a text model cannot read a question's image
    jsonl = tmp_path / "pictured.jsonl"
    jsonl.write_text(
        json.dumps({"question": "a?", "choices": ["x", "y"], "answer": 0, "image": "i.png"}),
        encoding="utf-8",
    )
    code = cli.main(["eval", "--model", str(model_dir), "--data", str(jsonl), "--task", "choice"])
    _, err = capsys.readouterr()
    assert code == 2 and "pictured.jsonl:1: the question has an image" in err


# -- a multimodal question -------------------------------------------------------------------
def test_multimodal_question_with_an_image_matches_a_hand_computation(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    from mmgpt.data.images import load_image
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt_text import TextTokenizer

    path = write_shapes_choice(tmp_path / "set", 3, seed=0)
    assert len(list((tmp_path / "set" / "images").glob("*.png"))) == 3
    (tmp_path / "corpus.txt").write_text(
        CORPUS + path.read_text(encoding="utf-8") * 5, encoding="utf-8"
    )
    tokenizer = TextTokenizer.train([tmp_path / "corpus.txt"], vocab_size=300)
    torch.manual_seed(0)
    model = MultimodalGPT.build("gpt-nano", tokenizer, block_size=256).eval()
    questions, pool = load_choice_data(path, shots=1)
    assert [q.subject for q in questions] == ["color"]  # examples: the first of each subject
    (question,) = questions
    assert question.image == tmp_path / "set" / "images" / "0002.png"
    (scores,) = score_questions(model, tokenizer, questions, pool, batch_size=3)

    processor = model.processor()
    shots = pool["color"]
    images = [load_image(q.image) for q in (*shots, question)]
    text = build_prompt(question, shots)
    assert text.count("<image>") == 2
    prompt = processor.encode_prompt([{"role": "user", "text": text}], images)
    pixels = model.encoders["image"].preprocess(images)
    positions = torch.tensor([[0, start] for start, _ in prompt.image_spans])
    expected = []
    with torch.no_grad():
        for choice in question.choices:
            cont = tokenizer.encode(" " + choice)
            ids = torch.tensor([prompt.input_ids + cont])
            logits = model(input_ids=ids, images=pixels, image_positions=positions).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            n = len(prompt.input_ids)
            expected.append(sum(float(logprobs[n - 1 + i, t]) for i, t in enumerate(cont)))
        greedy = tokenizer.decode([int(logits[n - 1].argmax())])
    assert scores.loglik == pytest.approx(expected, abs=1e-4)
    assert scores.greedy == greedy
    # the image matters: another image gives other scores
    other = ChoiceQuestion(
        question.question,
        question.choices,
        question.answer,
        question.subject,
        question.source,
        tmp_path / "set" / "images" / "0001.png",
    )
    (moved,) = score_questions(model, tokenizer, [other], pool)
    assert moved.loglik != pytest.approx(scores.loglik, abs=1e-4)
