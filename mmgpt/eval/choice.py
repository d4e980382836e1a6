"""``mmgpt eval --task choice``: multiple-choice questions, scored three ways.

Data (``--data``):

- **MMLU's CSV layout**: no header, one question a row: ``question, A, B, C, D, answer`` (any
  number of choices from 2 up, the same in every row of a file; the answer is the choice's
  letter). The subject is the file name without ``_test.csv`` (``high_school_physics_test.csv``
  → ``high_school_physics``). A directory holds several such ``SUBJECT_test.csv`` files. The
  k-shot examples of a subject are the first ``K`` rows of ``SUBJECT_dev.csv``, looked for
  beside the test file and then in a sibling ``dev/`` directory (MMLU's own
  ``data/test`` + ``data/dev`` layout).
- **JSONL**: one object a line, ``{"question": str, "choices": [str, ...], "answer": index or
  letter, "subject": str (optional, default: the file's stem), "image": path (optional,
  relative to the file)}``; other fields are ignored. With ``--shots K`` the first ``K``
  questions of each subject, in file order, are the k-shot examples of that subject and are
  not evaluated; the others are.

The prompt of a question (``K`` = 0 leaves out the examples)::

    The following are multiple choice questions (with answers) about {subject}.

    {example question}
    A. {choice}
    B. {choice}
    Answer: {letter}

    {question}
    A. {choice}
    B. {choice}
    Answer:

(``{subject}`` with underscores as spaces; a question with an image starts with ``<image>``
and a newline, an example's too). A text model reads it after ``<bos>``; a multimodal model
reads it as one user turn of its chat template, followed by the generation prompt
(``Assistant:``).

Scorings, each an accuracy over the questions (ties go to the earlier choice):

- ``loglik``: the choice whose text has the highest log-likelihood after the prompt, the sum
  over the tokens of ``" " + choice`` (``choice`` alone after a tokenizer's own chat
  template), tokenized apart from the prompt;
- ``loglik_per_token``: the same sum divided by the number of those tokens;
- ``loglik_per_char``: the same sum divided by the number of characters of that text;
- ``letter``: the one token a greedy decoder writes after the prompt, stripped of spaces, equal
  (case-insensitive) to the answer's letter.

``chance`` is the mean over the questions of ``1 / number of choices``.

:func:`write_shapes_choice` writes a multiple-choice set about the shapes world (colour and
kind of a single shape, with the images).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmgpt.data.errors import DataError
from mmgpt.data.images import load_image
from mmgpt.data.sample import IMAGE_PLACEHOLDER
from mmgpt.processor import IGNORE_INDEX, EncodedSample

__all__ = [
    "SCORINGS",
    "ChoiceQuestion",
    "QuestionScores",
    "build_prompt",
    "choice_metrics",
    "load_choice_data",
    "read_choice_csv",
    "read_choice_jsonl",
    "run_choice_eval",
    "score_questions",
    "write_shapes_choice",
]

SCORINGS = ("loglik", "loglik_per_token", "loglik_per_char", "letter")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
NUM_EXAMPLES = 5


@dataclass(frozen=True)
class ChoiceQuestion:
    """One question; ``answer`` is an index into ``choices``; ``source`` is ``file:line``."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str
    source: str
    image: Path | None = None

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


# -- reading ---------------------------------------------------------------------------------
def _fail(path: Path, line: int, message: str) -> DataError:
    return DataError(f"{path}:{line}: {message}", file=str(path), line=line)


def _subject_of(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_choice_csv(path: str | os.PathLike) -> list[ChoiceQuestion]:
    """Questions of an MMLU-layout CSV (module docstring); errors name the file and line."""
    path = Path(path)
    subject = _subject_of(path)
    questions: list[ChoiceQuestion] = []
    width = None
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        line = 1
        for row in reader:
            start, line = line, reader.line_num + 1  # a quoted field may span lines
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < 4:
                raise _fail(
                    path,
                    start,
                    f"expected question, at least 2 choices and an answer letter, got "
                    f"{len(row)} column(s)",
                )
            if width is None:
                width = len(row)
            elif len(row) != width:
                raise _fail(path, start, f"{len(row)} columns, the first row has {width}")
            question, *choices, answer = (cell.strip() for cell in row)
            letters = LETTERS[: len(choices)]
            if not question:
                raise _fail(path, start, "empty question")
            for letter, choice in zip(letters, choices):
                if not choice:
                    raise _fail(path, start, f"choice {letter} is empty")
            if len(answer) != 1 or answer not in letters:
                raise _fail(path, start, f"answer {answer!r} is not one of {', '.join(letters)}")
            questions.append(
                ChoiceQuestion(
                    question, tuple(choices), letters.index(answer), subject, f"{path}:{start}"
                )
            )
    if not questions:
        raise DataError(f"{path}: no questions", file=str(path))
    return questions


def _answer_index(value: Any, n: int, path: Path, line: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise _fail(path, line, f"answer {value} is out of range for {n} choices")
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n] and value.strip():
        return LETTERS.index(value.strip().upper())
    raise _fail(
        path,
        line,
        f"answer must be a choice index (0-{n - 1}) or a letter ({', '.join(LETTERS[:n])}), "
        f"got {value!r}",
    )


def read_choice_jsonl(path: str | os.PathLike) -> list[ChoiceQuestion]:
    """Questions of a JSONL file (module docstring); errors name the file, line and field."""
    path = Path(path)
    questions: list[ChoiceQuestion] = []
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _fail(path, line, f"invalid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise _fail(path, line, f"expected an object, got {type(record).__name__}")
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                raise _fail(path, line, "'question' must be a non-empty string")
            choices = record.get("choices")
            if (
                not isinstance(choices, list)
                or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) and c.strip() for c in choices)
            ):
                raise _fail(
                    path,
                    line,
                    f"'choices' must be a list of 2 to {len(LETTERS)} non-empty strings, "
                    f"got {choices!r}",
                )
            if "answer" not in record:
                raise _fail(path, line, "'answer' is missing")
            answer = _answer_index(record["answer"], len(choices), path, line)
            subject = record.get("subject", path.stem)
            if not isinstance(subject, str) or not subject.strip():
                raise _fail(path, line, f"'subject' must be a non-empty string, got {subject!r}")
            image = record.get("image")
            if image is not None and (not isinstance(image, str) or not image.strip()):
                raise _fail(path, line, f"'image' must be a path string, got {image!r}")
            questions.append(
                ChoiceQuestion(
                    question.strip(),
                    tuple(c.strip() for c in choices),
                    answer,
                    subject.strip(),
                    f"{path}:{line}",
                    None if image is None else path.parent / image,
                )
            )
    if not questions:
        raise DataError(f"{path}: no questions", file=str(path))
    return questions


def _dev_file(test_file: Path, subject: str) -> Path | None:
    for candidate in (
        test_file.parent / f"{subject}_dev.csv",
        test_file.parent.parent / "dev" / f"{subject}_dev.csv",
    ):
        if candidate.is_file():
            return candidate
    return None


def load_choice_data(
    data: str | os.PathLike, shots: int = 0
) -> tuple[list[ChoiceQuestion], dict[str, list[ChoiceQuestion]]]:
    """The questions to evaluate and, by subject, their first ``shots`` k-shot examples."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix == ".jsonl":
        questions = read_choice_jsonl(path)
        pool: dict[str, list[ChoiceQuestion]] = {}
        evaluated = []
        for q in questions:
            examples = pool.setdefault(q.subject, [])
            if len(examples) < shots:
                examples.append(q)
            else:
                evaluated.append(q)
        for subject, examples in pool.items():
            if len(examples) < shots:
                raise ValueError(
                    f"{path}: --shots {shots} needs {shots} questions of subject {subject!r} "
                    f"as examples, the file has {len(examples)}"
                )
        if not evaluated:
            raise ValueError(f"{path}: every question is a k-shot example, none is left to score")
        return evaluated, pool
    if path.is_dir():
        files = sorted(path.glob("*_test.csv"))
        if not files:
            raise FileNotFoundError(f"{path}: no SUBJECT_test.csv files in this directory")
    elif path.suffix == ".csv":
        files = [path]
    else:
        raise ValueError(
            f"{path}: expected a .jsonl file, an MMLU-style .csv file or a directory of "
            "SUBJECT_test.csv files"
        )
    evaluated, pool = [], {}
    for file in files:
        questions = read_choice_csv(file)
        evaluated += questions
        subject = questions[0].subject
        if shots == 0:
            continue
        dev = _dev_file(file, subject)
        if dev is None:
            raise FileNotFoundError(
                f"{file}: --shots {shots} needs {subject}_dev.csv beside it or in ../dev/"
            )
        examples = read_choice_csv(dev)[:shots]
        if len(examples) < shots:
            raise ValueError(f"{dev}: --shots {shots} needs {shots} rows, it has {len(examples)}")
        pool[subject] = examples
    return evaluated, pool


# -- prompts ---------------------------------------------------------------------------------
def _block(question: ChoiceQuestion) -> str:
    lines = [f"{IMAGE_PLACEHOLDER}\n{question.question}" if question.image else question.question]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(question: ChoiceQuestion, examples: Sequence[ChoiceQuestion] = ()) -> str:
    """The prompt text of ``question`` after its k-shot ``examples`` (module docstring)."""
    parts = [HEADER.format(subject=question.subject.replace("_", " "))]
    parts += [f"{_block(example)} {example.letter}\n\n" for example in examples]
    parts.append(_block(question))
    return "".join(parts)


# -- scoring ---------------------------------------------------------------------------------
@dataclass
class QuestionScores:
    """A question's log-likelihood of each choice and the one greedy token after its prompt."""

    loglik: list[float]
    tokens: list[int]  # tokens of each scored choice text
    chars: list[int]  # characters of each scored choice text
    greedy: str  # the decoded greedy token

    def picks(self) -> dict[str, int | None]:
        """The choice each scoring picks (``letter``: ``None`` when no letter was written)."""
        n = len(self.loglik)

        def best(values: Sequence[float]) -> int:
            return max(range(n), key=values.__getitem__)  # the first of equal maxima

        written = self.greedy.strip().upper()
        return {
            "loglik": best(self.loglik),
            "loglik_per_token": best([s / t for s, t in zip(self.loglik, self.tokens)]),
            "loglik_per_char": best([s / c for s, c in zip(self.loglik, self.chars)]),
            "letter": LETTERS.index(written) if written in LETTERS[:n] and written else None,
        }


def _images(question: ChoiceQuestion, examples: Sequence[ChoiceQuestion]) -> list[Any]:
    images = []
    for q in (*examples, question):
        if q.image is None:
            continue
        try:
            images.append(load_image(q.image))
        except DataError as exc:
            raise DataError(f"{q.source}: 'image': {exc}", file=q.source) from exc
    return images


@torch.no_grad()
def score_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[ChoiceQuestion],
    examples: dict[str, list[ChoiceQuestion]] | None = None,
    *,
    batch_size: int = 16,
) -> list[QuestionScores]:
    """Score every choice of every question, ``batch_size`` (prompt, choice) sequences a pass.

    ``model`` is a text model called as ``model(input_ids=...)`` (returning logits or an
    object with ``.logits``), or a :class:`~mmgpt.multimodal.MultimodalGPT` (which has
    ``processor()``), whose prompts go through its chat template with their images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    examples = examples or {}
    multimodal = callable(getattr(model, "processor", None))
    processor = model.processor() if multimodal else None
    separator = getattr(getattr(processor, "template", None), "assistant_separator", " ")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = parameter.device if parameter is not None else torch.device("cpu")

    # one sequence per (question, choice): (question index, prompt, continuation ids)
    prompts = []
    sequences: list[tuple[int, Any, list[int]]] = []
    for qi, question in enumerate(questions):
        shots = examples.get(question.subject, [])
        text = build_prompt(question, shots)
        if multimodal:
            images = _images(question, shots)
            try:
                prompt = processor.encode_prompt([{"role": "user", "text": text}], images)
            except ValueError as exc:  # e.g. longer than the model's context
                raise ValueError(f"{question.source}: {exc}; use fewer --shots") from exc
        else:
            if question.image is not None:
                raise ValueError(
                    f"{question.source}: the question has an image, the model reads text only"
                )
            prompt = [tokenizer.bos_id, *tokenizer.encode(text)]
        prompts.append(prompt)
        length = len(prompt.input_ids) if multimodal else len(prompt)
        for choice in question.choices:
            continuation = tokenizer.encode(separator + choice)
            if not continuation:
                raise ValueError(f"{question.source}: choice {choice!r} encodes to no tokens")
            if block_size is not None and length + len(continuation) > block_size:
                raise ValueError(
                    f"{question.source}: the prompt and choice {choice!r} take "
                    f"{length + len(continuation)} tokens, more than the model's context "
                    f"(block_size={block_size}); use fewer --shots"
                )
            sequences.append((qi, prompt, continuation))

    loglik: list[list[float]] = [[] for _ in questions]
    greedy: list[str | None] = [None] * len(questions)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        if multimodal:
            encoded = [
                EncodedSample(
                    input_ids=[*p.input_ids, *c],
                    labels=[IGNORE_INDEX] * (len(p.input_ids) + len(c)),
                    image_spans=p.image_spans,
                    signal_spans=[],
                    images=p.images,
                    output_images=[],
                    meta={},
                    modality_spans=p.modality_spans,
                    modality_items=p.modality_items,
                )
                for _, p, c in chunk
            ]
            batch = processor.collate(encoded, padding_side="right").to(device)
            logits = model(batch).logits
            lengths = [len(p.input_ids) for _, p, _ in chunk]
        else:
            # right padding: a causal model's logits at real positions ignore what follows
            rows = [[*p, *c] for _, p, c in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            out = model(input_ids=ids.to(device))
            logits = getattr(out, "logits", out)
            lengths = [len(p) for _, p, _ in chunk]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        for row, ((qi, _, continuation), n) in enumerate(zip(chunk, lengths)):
            targets = torch.tensor(continuation, device=logprobs.device)
            positions = torch.arange(n - 1, n - 1 + len(continuation), device=logprobs.device)
            loglik[qi].append(float(logprobs[row, positions, targets].sum()))
            if greedy[qi] is None:
                greedy[qi] = tokenizer.decode([int(logprobs[row, n - 1].argmax())])
    return [
        QuestionScores(
            loglik[qi],
            [len(tokenizer.encode(separator + c)) for c in q.choices],
            [len(separator + c) for c in q.choices],
            greedy[qi] or "",
        )
        for qi, q in enumerate(questions)
    ]


def choice_metrics(
    questions: Sequence[ChoiceQuestion], scores: Sequence[QuestionScores]
) -> dict[str, Any]:
    """Accuracy of each scoring, the chance baseline and counts, overall and per subject."""
    if len(questions) != len(scores) or not questions:
        raise ValueError(f"got {len(questions)} questions and {len(scores)} scores")

    def summary(rows: list[int]) -> dict[str, Any]:
        correct = dict.fromkeys(SCORINGS, 0)
        for i in rows:
            for name, pick in scores[i].picks().items():
                correct[name] += pick == questions[i].answer
        return {
            "accuracy": {name: correct[name] / len(rows) for name in SCORINGS},
            "correct": correct,
            "chance": sum(1 / len(questions[i].choices) for i in rows) / len(rows),
            "num_questions": len(rows),
        }

    subjects = sorted({q.subject for q in questions})
    result = summary(list(range(len(questions))))
    result["per_subject"] = {
        s: summary([i for i, q in enumerate(questions) if q.subject == s]) for s in subjects
    }
    result["num_subjects"] = len(subjects)
    return result


def run_choice_eval(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    num_examples: int = NUM_EXAMPLES,
) -> dict[str, Any]:
    """Evaluate the model in ``model_dir`` (text or multimodal) on multiple-choice ``data``.

    Returns a JSON-ready dict: ``task``, ``data``, ``model``, ``shots``, the metrics of
    :func:`choice_metrics` and the first ``num_examples`` questions with each scoring's pick.
    """
    from mmgpt.pretrained import load_model, load_tokenizer

    questions, pool = load_choice_data(data, shots)
    if limit is not None:
        questions = questions[:limit]
    model = load_model(model_dir, map_location=device).eval()
    tokenizer = model.tokenizer if hasattr(model, "processor") else load_tokenizer(model_dir)
    scores = score_questions(model, tokenizer, questions, pool, batch_size=batch_size)
    result: dict[str, Any] = {
        "task": "choice",
        "data": str(data),
        "model": str(model_dir),
        "shots": shots,
        **choice_metrics(questions, scores),
    }
    result["examples"] = [
        {
            "source": q.source,
            "question": q.question,
            "answer": q.letter,
            "picks": {
                name: None if pick is None else LETTERS[pick] for name, pick in s.picks().items()
            },
            "greedy": s.greedy,
        }
        for q, s in list(zip(questions, scores))[:num_examples]
    ]
    return result


# -- a shipped set ---------------------------------------------------------------------------
def write_shapes_choice(
    directory: str | os.PathLike,
    size: int = 200,
    *,
    seed: int = 1,
    image_size: int = 32,
    num_choices: int = 4,
) -> Path:
    """Write ``directory/choice.jsonl`` and ``directory/images/*.png``: ``size`` questions
    about one-shape scenes of the shapes world, alternately "what colour is the shape
    {place}?" (subject ``color``) and "what shape is {place}?" (subject ``shape``), worded as
    the shapes world's VQA questions, each with the true
    answer and ``num_choices - 1`` other colours or kinds in a random order. Deterministic by
    ``seed``. Returns the JSONL path."""
    from mmgpt.data.shapes import COLORS, KINDS, POSITIONS, SIZES, Shape, place_phrase, render_scene

    if size < 1 or not 2 <= num_choices <= len(KINDS):
        raise ValueError(f"need size >= 1 and 2 <= num_choices <= {len(KINDS)}")
    rng = random.Random(seed)
    out = Path(directory)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(size):
        kind, color = rng.choice(KINDS), rng.choice(list(COLORS))
        shape = Shape(kind, color, rng.choice(SIZES), rng.choice(POSITIONS))
        name = f"images/{i:04d}.png"
        render_scene([shape], image_size).save(out / name)
        place = place_phrase(shape.position)
        if i % 2 == 0:
            subject, question, truth, pool = (
                "color",
                f"what colour is the shape {place}?",
                color,
                COLORS,
            )
        else:
            subject, question, truth, pool = "shape", f"what shape is {place}?", kind, KINDS
        choices = [truth, *rng.sample([x for x in pool if x != truth], num_choices - 1)]
        rng.shuffle(choices)
        record = {
            "question": question,
            "choices": choices,
            "answer": choices.index(truth),
            "subject": subject,
            "image": name,
        }
        lines.append(json.dumps(record))
    path = out / "choice.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
