"""The ``mmgpt`` command line: parsing, dispatch, clean errors, and real runs of ``generate``
and ``eval --task lm`` on a tiny saved model."""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from mmgpt import cli
from mmgpt.config import GPTConfig
from mmgpt.model import GPT

COMMANDS = ("demo", "train", "generate", "eval", "data", "plugins", "plan", "export", "attention")
CORPUS = (
    "The red square sits left of the blue circle. A green triangle is above the square. "
    "Small shapes move slowly; large shapes move fast. The circle is blue and round. "
)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def exit_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """For argparse errors and --help, which exit through SystemExit."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


# -- parsing -------------------------------------------------------------------------------
def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = exit_code(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:  # a long name wraps its help onto the next line
        assert re.search(rf"\n    {command}\s", out), command
    assert "check" in exit_code(["data", "--help"], capsys)[1]
    assert "list" in exit_code(["plugins", "--help"], capsys)[1]
    code, out, _ = exit_code(["generate", "--help"], capsys)
    for option in ("--model", "--image", "--prompt", "--max-new-tokens", "--out-dir", "--seed"):
        assert option in out
    code, out, _ = exit_code(["--version"], capsys)
    assert code == 0 and out.startswith("mmgpt ")


def test_help_does_not_import_torch() -> None:
    code = "import sys\nfrom mmgpt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "--prompt", "hi"], "required: --model"),
        (
            ["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"],
            "positive integer",
        ),
        (["generate", "--model", "m", "--prompt", "x", "--temperature", "-1"], "number >= 0"),
        (["eval", "--model", "m", "--data", "d", "--task", "poetry"], "invalid choice: 'poetry'"),
        (["plan", "lm"], "required: --gpus"),
        (["plan", "lm", "--gpus", "two"], "positive integer, got 'two'"),
        (["data"], "required: COMMAND"),
        (["plugins", "list", "--verbose"], "unrecognized arguments: --verbose"),
        (["train", "lm", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = exit_code(argv, capsys)
    assert code == 2
    assert message in err and err.startswith("usage: mmgpt")
    assert out == ""


# -- dispatch and errors ---------------------------------------------------------------------
@pytest.fixture
def target_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a module on sys.path and point a subcommand at one of its functions."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(command: str, source: str, function: str = "target") -> str:
        name = f"_mmgpt_cli_target_{uuid.uuid4().hex}"  # unique: imported modules are cached
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        monkeypatch.setitem(cli.TARGETS, command, f"{name}:{function}")
        return name

    return make


def test_train_passes_recipe_options_and_overrides(
    target_module, capsys: pytest.CaptureFixture[str]
) -> None:
    target_module(
        "train",
        """
        def target(recipe, *, data, out, resume, overrides):
            return {"recipe": recipe, "data": data, "out": out, "resume": resume,
                    "overrides": list(overrides)}
        """,
    )
    # overrides both before and after options
    argv = ["train", "lm", "train.lr=1e-3", "--data", "corpus", "--out", "runs/x", "--resume"]
    code, out, err = run([*argv, "model.n_layer=2", "tokenizer.vocab_size=300"], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "recipe": "lm",
        "data": "corpus",
        "out": "runs/x",
        "resume": True,
        "overrides": ["train.lr=1e-3", "model.n_layer=2", "tokenizer.vocab_size=300"],
    }


def test_plan_and_demo_dispatch(target_module, capsys: pytest.CaptureFixture[str]) -> None:
    target_module(
        "plan",
        "def target(recipe, *, gpus, gpu_memory):\n    return f'{recipe} {gpus} {gpu_memory}'\n",
    )
    assert run(["plan", "lm", "--gpus", "8", "--gpu-memory", "80"], capsys)[1] == "lm 8 80.0\n"
    target_module(
        "demo",
        "def target(*, model_dir, port, share, app, data_dir):\n"
        "    print(model_dir, port, share, app, data_dir)\n",
    )
    assert run(["demo", "--port", "7861", "--share"], capsys)[1] == "None 7861 True chat None\n"


def test_data_check_reports_and_exits_by_strictness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")  # no metadata row: a warning
    rows = [
        {"file_name": "a.png", "text": "a black square"},
        {"file_name": "gone.png", "text": "x"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    code, out, err = run(["data", "check", str(tmp_path)], capsys)
    assert (code, err) == (1, "")  # problems (a missing image) fail; --strict adds warnings
    assert "format:   imagefolder" in out and "gone.png" in out and "stray.png" in out
    code, out, _ = run(["data", "check", str(tmp_path), "--strict", "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["num_samples"] == 1
    code, _, err = run(["data", "check", str(tmp_path / "nothing-here")], capsys)
    assert code == 2 and err.startswith("mmgpt: error: ") and "nothing-here" in err
    # warnings only (the stray image): fine unless --strict
    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert run(["data", "check", str(tmp_path)], capsys)[0] == 0
    assert run(["data", "check", str(tmp_path), "--strict"], capsys)[0] == 1


def test_missing_command_module_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, target_module, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.TARGETS, "plan", "mmgpt._not_written_yet:plan_training")
    code, out, err = run(["plan", "lm", "--gpus", "2"], capsys)
    assert code == 2 and out == ""
    assert err == (
        "mmgpt: error: 'mmgpt plan' is not available in this installation "
        "(module 'mmgpt._not_written_yet' is missing)\n"
    )
    target_module("plan", "x = 1\n", function="plan_training")
    code, _, err = run(["plan", "lm", "--gpus", "2"], capsys)
    assert code == 2 and "has no 'plan_training'" in err and err.count("\n") == 1


def test_missing_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, target_module, capsys: pytest.CaptureFixture[str]
) -> None:
    # the module exists but needs something not installed: not "command unavailable"
    target_module("demo", "import _mmgpt_absent_dependency\ndef target(**kw): pass\n")
    code, _, err = run(["demo"], capsys)
    assert code == 2 and err == "mmgpt: error: No module named '_mmgpt_absent_dependency'\n"
    monkeypatch.setitem(cli.EXTRAS, "_mmgpt_absent_dependency", "demo")
    code, _, err = run(["demo"], capsys)
    assert code == 2
    assert err == (
        "mmgpt: error: the optional dependency '_mmgpt_absent_dependency' is not installed; "
        'run: pip install "mmgpt[demo]"\n'
    )


@pytest.mark.parametrize(
    ("raise_", "message"),
    [
        ("raise ValueError('recipe x.yaml: train.lr must be > 0')", "recipe x.yaml: train.lr"),
        ("raise FileNotFoundError('corpus/: no .txt files')", "corpus/: no .txt files"),
        ("from mmgpt.registry import get; get('dataset', 'txet')", "did you mean 'text'?"),
        ("raise KeyboardInterrupt", "interrupted"),
    ],
)
def test_expected_errors_are_one_line_and_debug_shows_them(
    raise_: str, message: str, target_module, capsys: pytest.CaptureFixture[str]
) -> None:
    target_module("train", f"def target(*args, **kwargs):\n    {raise_}\n")
    code, out, err = run(["train", "lm"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("mmgpt: error: ") and message in err and err.count("\n") == 1
    for argv in (["--debug", "train", "lm"], ["train", "lm", "--debug"]):
        with pytest.raises((Exception, KeyboardInterrupt)):
            cli.main(argv)


def test_unexpected_errors_keep_their_traceback(target_module) -> None:
    target_module("train", "def target(*args, **kwargs):\n    raise ZeroDivisionError('bug')\n")
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "lm"])


def test_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and err == f"mmgpt: error: {tmp_path / 'nope'}: not a model directory\n"


def test_plugins_list_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mmgpt", "plugins", "list"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION"]
    rows = {tuple(line.split()) for line in lines[1:] if line and not line.startswith(" ")}
    assert {("model", "gpt-nano", "mmgpt"), ("tokenizer", "bpe", "mmgpt")} <= rows
    assert ("objective", "lm", "mmgpt") in rows


# -- real runs on a tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT, object]:
    from mmgpt_text import TextTokenizer

    root = tmp_path_factory.mktemp("cli-model")
    (root / "corpus.txt").write_text(CORPUS * 4, encoding="utf-8")
    tokenizer = TextTokenizer.train([root / "corpus.txt"], vocab_size=320)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32
    )
    model = GPT(config).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir, tokenizer=tokenizer)
    return model_dir, model, tokenizer


@torch.no_grad()
def greedy_by_hand(model: GPT, tokenizer, prompt: str, steps: int) -> str:
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    new = []
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_id:
            break
        ids.append(nxt)
        new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_streams_the_greedy_continuation(
    tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, model, tokenizer = tiny_model
    argv = ["generate", "--model", str(model_dir), "--prompt", "The red square"]
    argv += ["--max-new-tokens", "12", "--temperature", "0", "--out-dir", str(tmp_path / "out")]
    code, out, err = run(argv, capsys)
    assert (code, err) == (0, "")
    expected = greedy_by_hand(model, tokenizer, "The red square", 12)
    assert expected.strip()  # the check below compares real text
    assert out == expected + "\n"
    assert (tmp_path / "out" / "text.txt").read_text(encoding="utf-8") == expected


def test_generate_sampling_is_reproducible_by_seed(
    tiny_model, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = str(tiny_model[0])
    argv = ["generate", "--model", model_dir, "--prompt", "A green", "--max-new-tokens", "10"]
    argv += ["--top-k", "50", "--top-p", "0.95"]
    outs = {run([*argv, "--seed", "7"], capsys)[1] for _ in range(2)}
    assert len(outs) == 1
    # a text-only model has no use for images
    code, _, err = run([*argv, "--image", "cat.png"], capsys)
    assert code == 2 and "--image needs a multimodal model" in err


def nll_by_hand(model: GPT, tokens: list[int]) -> float:
    """Mean next-token NLL over windows of block_size + 1 tokens with stride block_size."""
    block = model.config.block_size
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):
            window = tokens[start : start + block + 1]
            logits = model(input_ids=torch.tensor([window[:-1]])).logits[0].double()
            logp = logits.log_softmax(-1)
            for t, target in enumerate(window[1:]):
                total -= float(logp[t, target])
                count += 1
    assert count == len(tokens) - 1
    return total / count


def test_eval_lm_perplexity_matches_a_hand_computation(
    tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, model, tokenizer = tiny_model
    data = tmp_path / "texts"
    data.mkdir()
    docs = {"a.txt": CORPUS * 2, "b.txt": "The blue circle is round. " * 5}
    for name, text in docs.items():
        (data / name).write_text(text, encoding="utf-8")
    # each document, in file order, is followed by eos
    tokens = [t for name in sorted(docs) for t in (*tokenizer.encode(docs[name]), tokenizer.eos_id)]
    assert len(tokens) > 3 * model.config.block_size  # several windows, the last one partial
    assert (len(tokens) - 1) % model.config.block_size != 0
    nll = nll_by_hand(model, tokens)

    code, out, err = run(
        ["eval", "--model", str(model_dir), "--data", str(data), "--task", "lm"], capsys
    )
    assert (code, err) == (0, "")
    metrics = json.loads(out)
    assert metrics["task"] == "lm" and metrics["tokens"] == len(tokens) - 1
    assert metrics["nll"] == pytest.approx(nll, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # a text model's default task is lm
    code, out, _ = run(["eval", "--model", str(model_dir), "--data", str(data)], capsys)
    assert json.loads(out) == metrics


def test_perplexity_is_a_metric_entry() -> None:
    from mmgpt.eval import perplexity as module
    from mmgpt.registry import REGISTRY

    assert REGISTRY.get("metric", "perplexity") is module.perplexity
    assert REGISTRY.distribution_of("metric", "perplexity") == "mmgpt"


def test_eval_lm_errors(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = str(tiny_model[0])
    code, _, err = run(["eval", "--model", model_dir, "--data", str(tmp_path)], capsys)
    assert code == 2 and "contains no .txt files" in err
    (tmp_path / "one.txt").write_text("", encoding="utf-8")
    code, _, err = run(["eval", "--model", model_dir, "--data", str(tmp_path)], capsys)
    assert code == 2 and "nothing to score" in err


class TinyImageEncoder(torch.nn.Module):
    """4 patch tokens of an 8×8 RGB image (keeps the multimodal model tiny)."""

    modality = "image"
    num_tokens = 4

    def __init__(self, output_dim: int = 6) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.patch = torch.nn.Conv2d(3, output_dim, kernel_size=4, stride=4)

    def preprocess(self, images: list) -> torch.Tensor:
        import numpy as np

        arrays = [np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # (N, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, output_dim)

    def config_dict(self) -> dict:
        return {"output_dim": self.output_dim}


def test_generate_with_images_on_a_multimodal_model(
    tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from mmgpt.data.images import load_image
    from mmgpt.generation import GenerationConfig
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.registry import REGISTRY

    tokenizer = tiny_model[2]
    REGISTRY.register("encoder", "_test-cli-tiny-image", TinyImageEncoder)
    try:
        gpt = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)
        model = MultimodalGPT.build(
            gpt, tokenizer, encoder="_test-cli-tiny-image", projector="linear"
        )
        model_dir = tmp_path / "mm"
        model.save_pretrained(model_dir)
        image_path = tmp_path / "red.png"
        Image.new("RGB", (20, 12), (200, 30, 30)).save(image_path)

        argv = ["generate", "--model", str(model_dir), "--image", str(image_path)]
        argv += ["--prompt", "What shape?", "--max-new-tokens", "8", "--temperature", "0"]
        code, out, err = run(argv, capsys)
        assert (code, err) == (0, "")
        # the image goes before the question, in a user turn
        expected = model.generate_text(
            [{"role": "user", "text": "<image>\nWhat shape?"}],
            [load_image(image_path)],
            GenerationConfig(max_new_tokens=8, temperature=0),
        )
        assert expected and out == expected + "\n"

        # placeholders and images must agree; the processor says so, in one line
        argv[argv.index("What shape?")] = "<image> and <image>?"
        code, _, err = run(argv, capsys)
        assert code == 2 and "2 '<image>' placeholder(s) but 1 image(s)" in err, err
        code, _, err = run([*argv[:3], "--image", str(tmp_path / "missing.png"), *argv[5:]], capsys)
        assert code == 2 and "missing.png: file not found" in err
    finally:
        REGISTRY.unregister("encoder", "_test-cli-tiny-image")
