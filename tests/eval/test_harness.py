"""lm-evaluation-harness on an mmgpt model: the ``mmgpt`` model class against direct
computations with the model, and local tasks run through lm_eval's own API (offline)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mmgpt.config import GPTConfig  # noqa: E402
from mmgpt.eval.harness import MMGPTLM  # noqa: E402
from mmgpt.eval.perplexity import token_nll  # noqa: E402
from mmgpt.model import GPT  # noqa: E402

CORPUS = (
    "The red square sits left of the blue circle. A green triangle is above the square. "
    "Question: what colour is the circle? Answer: blue. Question: what shape is green? "
    "Answer: triangle.\n"
) * 8
BLOCK = 24

QUESTIONS = [
    ("what colour is the circle?", ["red", "blue", "green"], 1),
    ("what shape is green?", ["square", "circle", "triangle"], 2),
    ("where is the triangle?", ["above the square", "left", "below"], 0),
    ("what sits left of the circle?", ["the red square", "a triangle"], 0),
    ("is the circle blue?", ["yes", "no"], 0),
    ("what colour is the square?", ["green", "red", "blue"], 1),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mmgpt_text = pytest.importorskip("mmgpt_text")
    root = tmp_path_factory.mktemp("harness")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tokenizer = mmgpt_text.TextTokenizer.train([root / "corpus.txt"], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32
    )
    model = GPT(config)
    # a few steps on the corpus, so that generation writes varied text and choices differ
    tokens = torch.tensor(tokenizer.encode(CORPUS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(0, len(tokens) - BLOCK - 1, (16,))
        batch = torch.stack([tokens[i : i + BLOCK + 1] for i in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(root / "model", tokenizer=tokenizer)
    return root / "model"


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> MMGPTLM:
    return MMGPTLM(pretrained=str(model_dir), batch_size=3)


def direct_loglikelihood(lm: MMGPTLM, context: str, continuation: str) -> tuple[float, bool]:
    """Move the context's trailing spaces to the continuation, encode context + continuation
    with a bos, split after the context's tokens, keep the last block_size + 1 tokens, and sum
    the log-softmax of the continuation's tokens (one row, no padding)."""
    tok = lm.tokenizer
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = tok.encode(context + continuation, add_bos=True)
    n_context = len(tok.encode(context, add_bos=True))
    continuation_ids = whole[n_context:]
    kept = whole[-(BLOCK + 1) :]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([kept[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits, -1)[-len(continuation_ids) :]
    target = torch.tensor(continuation_ids)
    return (
        float(logprobs[torch.arange(len(target)), target].sum()),
        bool((logprobs.argmax(-1) == target).all()),
    )


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_sum_of_the_continuations_log_softmax(lm: MMGPTLM) -> None:
    long_context = "The red square sits left of the blue circle. " * 4  # > block_size tokens
    assert len(lm.tok_encode(long_context)) > BLOCK
    pairs = [
        ("Question: what colour is the circle? Answer:", " blue"),
        ("Question: what colour is the circle? Answer: ", "blue."),  # the space moves over
        ("A green", " triangle is above the square."),
        (long_context, " A green triangle"),
        ("", "The red square"),  # empty context: the bos is the context
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ref, ref_greedy = direct_loglikelihood(lm, context, continuation)
        assert logprob == pytest.approx(ref, abs=1e-4), (context, continuation)
        assert greedy == ref_greedy
        assert logprob < 0
    # one request at a time (no padding) gives the same numbers as batches of 3
    alone = MMGPTLM(pretrained=lm.pretrained, batch_size=1)
    for (logprob, _), (single, _) in zip(got, alone.loglikelihood(requests("ll", pairs))):
        assert single == pytest.approx(logprob, abs=1e-4)


def test_is_greedy_is_true_exactly_for_the_argmax_continuation(lm: MMGPTLM) -> None:
    context = lm.tok_encode("The red square sits")
    greedy, ids = [], list(context)
    with torch.no_grad():
        for _ in range(3):
            nxt = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(nxt)
            ids.append(nxt)
    other = [*greedy[:2], (greedy[2] + 1) % lm.tokenizer.vocab_size]
    (lp_greedy, is_greedy), (lp_other, is_other) = lm._loglikelihood_tokens(
        [(None, context, greedy), (None, context, other)]
    )
    assert is_greedy and not is_other
    assert lp_greedy > lp_other


def test_a_continuation_longer_than_the_context_is_an_error(lm: MMGPTLM) -> None:
    with pytest.raises(ValueError, match=r"does not fit the model's context \(max_length=24\)"):
        lm._loglikelihood_tokens([(("c", "x"), [1], list(range(5, 5 + BLOCK + 1)))])


def test_loglikelihood_rolling_scores_every_token_once(lm: MMGPTLM) -> None:
    tok = lm.tokenizer
    text = CORPUS[:400]
    ids = tok.encode(text)
    # a text of exactly 3 windows: the disjoint windows are the packed windows token_nll scores
    exact = tok.decode(ids[: 3 * BLOCK])
    assert tok.encode(exact) == ids[: 3 * BLOCK]
    short = "A green triangle is above the square."
    rolled = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(exact,), (short,)]))
    nll, count = token_nll(lm.model, [tok.bos_id, *tok.encode(exact)])
    assert count == 3 * BLOCK
    assert rolled[0] == pytest.approx(-nll, abs=1e-3)
    # shorter than the context: one forward pass over bos + text
    short_ids = [tok.bos_id, *tok.encode(short)]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=torch.tensor([short_ids])).logits[0], -1)
    expected = sum(float(logprobs[i, t]) for i, t in enumerate(short_ids[1:]))
    assert rolled[1] == pytest.approx(expected, abs=1e-4)


def greedy_text(lm: MMGPTLM, ids: list[int], n: int) -> str:
    """``n`` argmax tokens after ``ids``, one full forward pass each, cut at eos, decoded."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[-n:]
    if lm.tokenizer.eos_id in new:
        new = new[: new.index(lm.tokenizer.eos_id)]
    return lm.tok_decode(new)


def test_generate_until_is_greedy_and_stops_before_the_until_string(lm: MMGPTLM) -> None:
    context = "The red square sits"
    ids = lm.tok_encode(context)
    assert len(ids) + 8 <= BLOCK  # fits: no truncation
    (free,) = lm.generate_until(
        requests("generate_until", [(context, {"until": [], "max_gen_toks": 8})])
    )
    assert free == greedy_text(lm, ids, 8)
    assert len(set(free)) >= 4, f"the trained model should write varied text, got {free!r}"
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    cut = free[: free.index(stop)]
    assert cut, "the stop string should not be at the start"
    long_context = "The red square sits left of the blue circle. " * 5
    args = [
        (context, {"until": [stop], "max_gen_toks": 8}),
        (context, {"until": stop, "max_gen_toks": 8}),  # a string, as some tasks write it
        (context, {"until": ["\n\n", stop], "max_gen_toks": 3}),
        (long_context, {"until": [], "max_gen_toks": 4}),  # left-truncated, not an error
        (long_context, {"until": [], "max_gen_toks": 20}),  # capped at half the window
    ]
    got = lm.generate_until(requests("generate_until", args))
    assert got[0] == got[1] == cut
    assert got[2] == greedy_text(lm, ids, 3).split(stop)[0]
    # a long context keeps its last max_length - new tokens
    long_ids = lm.tok_encode(long_context)
    assert got[3] == greedy_text(lm, long_ids[-(BLOCK - 4) :], 4)
    assert got[4] == greedy_text(lm, long_ids[-(BLOCK // 2) :], BLOCK // 2)
    with pytest.raises(ValueError, match=r"unsupported generation argument\(s\) \['num_beams'\]"):
        lm.generate_until(requests("generate_until", [(context, {"num_beams": 2})]))


def test_bad_model_args_name_the_argument(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 'auto'"):
        MMGPTLM(pretrained=str(model_dir), batch_size="auto")
    with pytest.raises(ValueError, match=r"max_length: expected 2\.\.24"):
        MMGPTLM(pretrained=str(model_dir), max_length=100)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['dtype'\]"):
        MMGPTLM(pretrained=str(model_dir), dtype="bfloat16")


# -- local tasks through lm_eval's API ----------------------------------------------------------
def write_tasks(root: Path) -> Path:
    """A multiple-choice task and a perplexity task over local JSONL files."""
    tasks = root / "tasks"
    tasks.mkdir()
    with open(root / "choice.jsonl", "w", encoding="utf-8") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    docs = [CORPUS[:150], CORPUS[40:400], "A green triangle."]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    common = f"test_split: test\ndataset_kwargs:\n  cache_dir: {root / 'hf-cache'}\n"
    (tasks / "choice.yaml").write_text(
        "task: mmgpt_tiny_choice\ndataset_path: json\n" + common
        + f"  data_files:\n    test: {root / 'choice.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )  # fmt: skip
    (tasks / "rolling.yaml").write_text(
        "task: mmgpt_tiny_rolling\ndataset_path: json\n" + common
        + f"  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        encoding="utf-8",
    )  # fmt: skip
    return tasks


def direct_accuracy(lm: MMGPTLM) -> tuple[float, float]:
    """The share of questions whose answer has the largest direct log-likelihood (acc), and
    the largest per character of the choice, without the space before it (acc_norm)."""
    correct = correct_norm = 0
    for question, choices, answer in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        scores = [direct_loglikelihood(lm, context, " " + c)[0] for c in choices]
        normed = [s / len(c) for s, c in zip(scores, choices)]
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
        correct_norm += max(range(len(choices)), key=normed.__getitem__) == answer
    return correct / len(QUESTIONS), correct_norm / len(QUESTIONS)


def test_local_tasks_through_simple_evaluate(lm: MMGPTLM, model_dir: Path, tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="mmgpt",  # the registered name
        model_args={"pretrained": str(model_dir)},
        tasks=["mmgpt_tiny_choice", "mmgpt_tiny_rolling"],
        batch_size=4,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
    )
    acc, acc_norm = direct_accuracy(lm)
    choice = results["results"]["mmgpt_tiny_choice"]
    assert choice["acc,none"] == pytest.approx(acc)
    assert choice["acc_norm,none"] == pytest.approx(acc_norm)
    # the logged log-likelihoods are the direct ones, choice by choice
    samples = results["samples"]["mmgpt_tiny_choice"]
    for sample in samples:
        question, choices, _ = QUESTIONS[sample["doc_id"]]
        context = f"Question: {question}\nAnswer:"
        for (logprob, _), c in zip([r[0] for r in sample["resps"]], choices):
            assert float(logprob) == pytest.approx(
                direct_loglikelihood(lm, context, " " + c)[0], abs=1e-4
            )
    # perplexity: exp(-sum of log-likelihoods / words) with the model's own rolling scores
    docs = [json.loads(line)["text"] for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    total = sum(lm.loglikelihood_rolling(requests("r", [(d,) for d in docs])))
    words = sum(len(d.split()) for d in docs)
    rolling = results["results"]["mmgpt_tiny_rolling"]
    assert rolling["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert rolling["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)


@pytest.mark.slow  # lm_eval's command line indexes its thousands of built-in tasks first
def test_the_module_runs_lm_evals_command_line(
    lm: MMGPTLM, model_dir: Path, tmp_path: Path
) -> None:
    tasks = write_tasks(tmp_path)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "mmgpt.eval.harness", "--model", "mmgpt",
        "--model_args", f"pretrained={model_dir}", "--tasks", "mmgpt_tiny_choice",
        "--include_path", str(tasks), "--batch_size", "2", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mmgpt_tiny_choice" in done.stdout and "acc" in done.stdout
    (written,) = out.rglob("results_*.json")
    acc = json.loads(written.read_text())["results"]["mmgpt_tiny_choice"]["acc,none"]
    assert acc == pytest.approx(direct_accuracy(lm)[0])


def test_same_numbers_as_lm_evals_hugging_face_model(tmp_path: Path) -> None:
    """Ours vs theirs: on a Hugging Face Llama directory, which mmgpt loads with matching
    logits, the mmgpt model class and lm_eval's own ``hf`` class give the same answers."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from mmgpt.hf_fixtures import build_hf_model_dir

    directory = str(build_hf_model_dir(tmp_path / "llama", "llama"))
    ours = MMGPTLM(pretrained=directory, batch_size=2)
    theirs = HFLM(pretrained=directory, device="cpu", batch_size=2)
    assert (ours.max_length, ours.prefix_token_id) == (theirs.max_length, theirs.prefix_token_id)
    pairs = [("The cat sat", " on the mat"), ("Hello ", "world"), ("", "An empty context")]
    for (a, greedy_a), (b, greedy_b) in zip(
        ours.loglikelihood(requests("loglikelihood", pairs)),
        theirs.loglikelihood(requests("loglikelihood", pairs)),
        strict=True,
    ):
        assert a == pytest.approx(b, abs=1e-3) and greedy_a == greedy_b
    prompts = [
        ("The cat sat", {"until": ["."], "max_gen_toks": 10}),
        ("Hello", {"until": ["\n"], "max_gen_toks": 6}),
    ]
    assert ours.generate_until(requests("generate_until", prompts)) == theirs.generate_until(
        requests("generate_until", prompts)
    )
    # lm_eval's hf class frames a rolling text as its contexts (here with <bos>), so it also
    # scores p(<bos> | <bos>); without that framing it scores the text alone, as ours does
    texts = [("The quick brown fox jumps over the lazy dog. " * 30,), ("short one",)]
    bare = HFLM(pretrained=directory, device="cpu", batch_size=2, add_bos_token=False)
    for a, b in zip(
        ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts)),
        bare.loglikelihood_rolling(requests("loglikelihood_rolling", texts)),
        strict=True,
    ):
        assert a == pytest.approx(b, rel=1e-5)


def test_a_multimodal_model_is_scored_on_its_decoder(lm: MMGPTLM, tmp_path: Path) -> None:
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.pretrained import load_model

    torch.manual_seed(1)
    gpt = dict(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    MultimodalGPT.build(gpt, lm.tokenizer, encoder=None).save_pretrained(tmp_path / "mm")
    mm = MMGPTLM(pretrained=str(tmp_path / "mm"), batch_size=2)
    loaded = load_model(tmp_path / "mm")
    assert isinstance(loaded, MultimodalGPT) and mm.tokenizer.vocab_size == lm.tokenizer.vocab_size
    context, continuation = "Question: what shape is green? Answer:", " triangle"
    ids = mm.tok_encode(context + continuation)
    n = len(ids) - len(mm.tok_encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.gpt(input_ids=torch.tensor([ids[:-1]])).logits[0], -1)
    expected = float(logprobs[-n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum())
    ((logprob, _),) = mm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert logprob != pytest.approx(direct_loglikelihood(lm, context, continuation)[0], abs=1e-2)
