"""Every command the documentation shows is run, checked, or exercised by a named test.

The fenced code blocks of ``README.md`` and ``docs/**/*.md`` are scanned, and the commands the
comments of the shipped recipes (``mmgpt/recipes/*.yaml``) show:

- **Shell commands** that run mmgpt (``mmgpt …``, ``python -m mmgpt…``, ``torchrun … -m
  mmgpt.cli …`` or ``torchrun … "$(which mmgpt)" …``) go through the real command line,
  ``mmgpt.cli.main``, with the work of each subcommand replaced:

  - an unknown option or a bad value fails, naming the file and line;
  - ``mmgpt train RECIPE … key=value`` loads the recipe (a shipped name, or a YAML file the
    docs create with a titled block, ```` ```yaml title="my_recipe.yaml" ````) and validates
    every override and the ``train`` section, without training;
  - ``mmgpt plan``, ``mmgpt plugins list`` and ``--help`` run for real; a ``$``-prompted
    command followed by its output must print exactly that output;
  - what needs a trained model or a browser (``demo``, ``generate``, ``eval``, ``data check``,
    ``train`` itself, ``python -m mmgpt.distributed``) must match a rule of ``EXERCISED_BY``,
    which names the tests that run that path end to end; those tests must exist.
- **Synopsis lines** (``mmgpt demo [--model DIR] …``) may only name options the parser has,
  with its choices.
- **Python blocks** compile, the names they import from mmgpt exist, and a block whose
  preceding line is ``<!-- run -->`` runs (all such blocks of a page in order, in one fresh
  process in a temporary directory; tracebacks point into the page).
- **docs/cli.md** documents every option of every subcommand, and only those.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mmgpt import cli

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUN_MARKER = "<!-- run -->"
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "console"}
PLAIN_LANGS = {"text", "", "none"}  # only `$ ` lines and `mmgpt …` synopses count here
PYTHON_LANGS = {"python", "py", "pycon"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
# packages whose imports in the docs are checked (others may be hypothetical plugins)
CHECKED_PACKAGES = ("mmgpt", "mmgpt_text", "mmgpt_vit", "mmgpt_diffusion")


# ================================================================================================
# Reading the docs
# ================================================================================================
@dataclass(frozen=True)
class Block:
    """A fenced code block: ``line`` is the 1-based line of its first body line."""

    doc: str  # path relative to the repository root
    lang: str
    title: str | None
    line: int
    body: tuple[str, ...]
    run: bool  # preceded by <!-- run -->

    @property
    def code(self) -> str:
        return "\n".join(self.body) + "\n"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (also indented ones, e.g. inside admonitions)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    opening = re.compile(
        r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<attrs>.*)$"
    )
    blocks, i = [], 0
    while i < len(lines):
        match = opening.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])
        ):
            j += 1
        body = tuple(
            x[len(indent) :] if x.startswith(indent) else x.lstrip() for x in lines[i + 1 : j]
        )
        title = re.search(r'title="([^"]+)"', match["attrs"])
        previous = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        blocks.append(
            Block(
                rel(path),
                match["lang"].lower(),
                title.group(1) if title else None,
                i + 2,
                body,
                previous == RUN_MARKER,
            )
        )
        i = j + 1
    return blocks


def recipe_comment_blocks(path: Path) -> list[Block]:
    """The commands a shipped recipe's comments show (``#   mmgpt train …``), as blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        text = lines[i].lstrip("#").strip() if lines[i].startswith("#") else ""
        if not re.match(r"(mmgpt|python -m mmgpt|torchrun) ", text):
            i += 1
            continue
        body = [text]
        while body[-1].endswith("\\") and i + len(body) < len(lines):
            body.append(lines[i + len(body)].lstrip("#").strip())
        # a note after a wide gap, "mmgpt eval ...   (vqa, t2i)", is not part of the command
        body[-1] = re.sub(r"\s{2,}\(.*\)$", "", body[-1])
        blocks.append(Block(rel(path), "bash", None, i + 1, tuple(body), False))
        i += len(body)
    return blocks


RECIPE_FILES = sorted((ROOT / "mmgpt" / "recipes").glob("*.yaml"))
ALL_BLOCKS = [block for path in DOC_FILES for block in read_blocks(path)]
ALL_BLOCKS += [block for path in RECIPE_FILES for block in recipe_comment_blocks(path)]


@dataclass(frozen=True)
class Command:
    """A shell command of the docs that runs mmgpt."""

    where: str  # "docs/guide.md:12"
    text: str  # as written (continuation lines joined)
    argv: tuple[str, ...]  # the arguments after `mmgpt` (or after the module)
    module: str | None = None  # "mmgpt.distributed" for `python -m mmgpt.distributed …`
    launcher: str | None = None  # "torchrun"
    output: tuple[str, ...] | None = None  # what a `$`-prompted command is shown to print
    error: str | None = None  # the line could not even be split into a command

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


@dataclass(frozen=True)
class Synopsis:
    """A usage line such as ``mmgpt demo [--model DIR] [--port N]``."""

    where: str
    text: str


def logical_lines(block: Block) -> Iterator[tuple[int, str, bool, list[str]]]:
    """``(line, text, prompted, output)``: continuation lines joined; ``$ `` prompts removed.

    In a prompted block (``console``, or any block whose commands start with ``$ ``) only the
    prompted lines are commands, and the lines after one are its output.
    """
    prompted = block.lang == "console" or any(x.startswith("$ ") for x in block.body)
    index = 0
    body = block.body
    while index < len(body):
        raw, start = body[index], block.line + index
        index += 1
        if prompted and not raw.startswith("$ "):
            continue
        text = raw[2:] if prompted else raw
        while text.rstrip().endswith("\\") and index < len(body):
            text = text.rstrip()[:-1] + " " + body[index].strip()
            index += 1
        output: list[str] = []
        if prompted:
            while index < len(body) and not body[index].startswith("$ "):
                output.append(body[index])
                index += 1
            while output and not output[-1].strip():
                output.pop()
        yield start, text.strip(), prompted, output


def is_synopsis(text: str) -> bool:
    return bool(re.search(r"(^|\s)\[", text)) or " ..." in text or "…" in text


def split_shell(text: str) -> list[list[str]]:
    """Simple commands of a shell line: words split like a shell, at ``&&``, ``;``, ``|``…"""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def mmgpt_command(words: list[str]) -> tuple[tuple[str, ...], str | None, str | None] | None:
    """``(argv, module, launcher)`` when ``words`` run mmgpt, else None."""
    while words and (
        re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]) or words[0] in ("env", "time")
    ):
        words = words[1:]  # VAR=value or a simple wrapper before the program
    if not words:
        return None
    program, rest = Path(words[0]).name, words[1:]
    if program == "mmgpt":
        return tuple(rest), None, None
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and rest[:1] == ["-m"] and len(rest) > 1:
        return module_command(rest[1], rest[2:], None)
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        stderr = io.StringIO()
        try:  # torchrun's own options are checked too
            with contextlib.redirect_stderr(stderr):
                args = get_args_parser().parse_args(rest)
        except SystemExit:
            raise ValueError(f"torchrun rejects its options: {stderr.getvalue().strip()}") from None
        script, script_args = args.training_script, args.training_script_args
        if args.module:
            return module_command(script, script_args, "torchrun")
        if Path(script).name == "mmgpt" or re.search(r"\bwhich mmgpt\b", script):
            return tuple(script_args), None, "torchrun"
    return None


def module_command(
    module: str, argv: list[str], launcher: str | None
) -> tuple[tuple[str, ...], str | None, str | None] | None:
    if module in ("mmgpt", "mmgpt.cli", "mmgpt.__main__"):
        return tuple(argv), None, launcher
    if module.startswith("mmgpt."):
        return tuple(argv), module, launcher
    return None


def scan(blocks: list[Block]) -> tuple[list[Command], list[Synopsis]]:
    """The mmgpt commands and the synopsis lines of ``blocks``."""
    commands: list[Command] = []
    synopses: list[Synopsis] = []
    for block in blocks:
        if block.lang not in SHELL_LANGS | PLAIN_LANGS:
            continue
        plain = block.lang in PLAIN_LANGS
        after_synopsis = False
        for line, text, prompted, output in logical_lines(block):
            where = f"{block.doc}:{line}"
            if plain and after_synopsis and text.startswith("["):
                # a synopsis continued on the next line, aligned under the first
                synopses[-1] = Synopsis(synopses[-1].where, f"{synopses[-1].text} {text}")
                continue
            after_synopsis = False
            if plain and not prompted and not text.startswith("mmgpt "):
                continue
            if text.startswith("mmgpt ") and is_synopsis(text):
                synopses.append(Synopsis(where, text))
                after_synopsis = True
                continue
            try:
                found = [mmgpt_command(words) for words in split_shell(text)]
            except ValueError as exc:  # unbalanced quotes, torchrun's options
                if "mmgpt" in text:
                    commands.append(Command(where, text, (), error=str(exc)))
                continue
            shown = tuple(output) if prompted and output else None
            for argv, module, launcher in filter(None, found):
                commands.append(Command(where, text, argv, module, launcher, shown))
    return commands, synopses


COMMANDS, SYNOPSES = scan(ALL_BLOCKS)


# ================================================================================================
# Running a command through mmgpt.cli.main with the work of each subcommand replaced
# ================================================================================================
@dataclass
class Invocation:
    """What one subcommand was called with: its parsed arguments (and a train recipe)."""

    command: str  # "train", "data check", "plugins list", …
    args: argparse.Namespace
    recipe: dict[str, Any] | None = None
    launcher: str | None = None
    module: str | None = None


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    invocations: list[Invocation] = field(default_factory=list)


REAL = {"plan", "plugins list"}  # cheap: they run for real
RECORDED = {
    "demo",
    "generate",
    "attention",
    "eval",
    "data check",
    "data convert",
    "export",
    "quantize",
}


def validate_train(recipe: Any, data: Any, out: Any, resume: bool, overrides: list[str]) -> dict:
    """What ``mmgpt train`` checks before training: the recipe, every override, ``train``."""
    from mmgpt.recipe import apply_overrides, load_recipe, trainable_parts
    from mmgpt.recipe import validate_recipe as validate
    from mmgpt.recipe.spec import STAGE_KEYS
    from mmgpt.trainer import TrainConfig

    spec = apply_overrides(load_recipe(recipe), overrides)
    validate(spec)
    train = {k: v for k, v in spec["train"].items() if k not in STAGE_KEYS}
    TrainConfig.from_dict(train)  # values: strategy, precision, device, …
    trainable_parts(spec["train"].get("stage"), spec["train"].get("train_encoder"))
    return spec


def run_cli(argv: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> Result:
    """``mmgpt.cli.main(argv)``: parsing and dispatch are real; train only validates; the
    subcommands in RECORDED are recorded, not run."""
    result = Result(0, "", "")
    original_target = cli._target

    def target(name: str) -> Callable[..., Any]:
        if name != "train":
            return original_target(name)

        def train(recipe: Any, **kwargs: Any) -> None:
            result.invocations[-1].recipe = validate_train(recipe, **kwargs)

        return train

    def recorder(name: str, real: Callable[[argparse.Namespace], int] | None):
        def command(args: argparse.Namespace) -> int:
            result.invocations.append(Invocation(name, args))
            return 0 if real is None else real(args)

        return command

    monkeypatch.setattr(cli, "_target", target)
    for name, attr in [
        ("demo", "cmd_demo"),
        ("train", "cmd_train"),
        ("generate", "cmd_generate"),
        ("attention", "cmd_attention"),
        ("eval", "cmd_eval"),
        ("data check", "cmd_data_check"),
        ("data convert", "cmd_data_convert"),
        ("plugins list", "cmd_plugins_list"),
        ("plan", "cmd_plan"),
        ("export", "cmd_export"),
        ("quantize", "cmd_quantize"),
    ]:
        real = None if name in RECORDED else getattr(cli, attr)
        monkeypatch.setattr(cli, attr, recorder(name, real))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result.code = cli.main(list(argv))
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            result.code = exc.code if isinstance(exc.code, int) else 1
    result.stdout, result.stderr = out.getvalue(), err.getvalue()
    return result


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def run_module_parser(module: str, argv: tuple[str, ...]) -> Result:
    """Parse ``python -m MODULE argv`` with the module's own argparse parser and stop there."""
    depth = 0
    originals = {
        name: getattr(argparse.ArgumentParser, name)
        for name in ("parse_args", "parse_known_args", "parse_intermixed_args")
    }

    def stop_after(name: str):
        def parse(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            depth += 1
            try:
                parsed = originals[name](self, *args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:  # the outermost call: parsing is complete
                raise _Parsed(parsed[0] if isinstance(parsed, tuple) else parsed)
            return parsed

        return parse

    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        missing = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        if isinstance(missing, ModuleNotFoundError) and not (missing.name or "").startswith(
            "mmgpt"
        ):  # a module behind an extra that is not installed here (mmgpt.eval.harness)
            pytest.skip(f"{module} needs {missing.name}, not installed: {exc}")
        raise
    main = getattr(imported, "main", None)
    assert callable(main), f"{module} has no main(argv) to parse the command with"
    out, err = io.StringIO(), io.StringIO()
    result = Result(1, "", "")
    with (
        pytest.MonkeyPatch.context() as patch,  # argparse is itself again right after
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        for name in originals:
            patch.setattr(argparse.ArgumentParser, name, stop_after(name))
        try:
            main(list(argv))
            result.code = 1  # main ran past parsing: the parser was not argparse's
        except _Parsed as parsed:
            result.code = 0
            result.invocations.append(Invocation(module, parsed.namespace, module=module))
        except SystemExit as exc:
            result.code = exc.code if isinstance(exc.code, int) else 1
    result.stdout, result.stderr = out.getvalue(), err.getvalue()
    return result


# ================================================================================================
# Which test runs what the docs can only parse
# ================================================================================================
@dataclass(frozen=True)
class Rule:
    """Commands matching ``when`` are run end to end by the tests ``tests``."""

    what: str
    when: Callable[[Invocation], bool]
    tests: tuple[str, ...]


def _objective(inv: Invocation) -> str | None:
    return (inv.recipe or {}).get("objective", {}).get("name")


def _adapter(inv: Invocation) -> str | None:
    section = (inv.recipe or {}).get("adapter")
    method = section.get("method") if isinstance(section, dict) else section
    return None if method in (None, "none", "full") else method


def _train(objective: str, *, adapter: bool = False) -> Callable[[Invocation], bool]:
    def when(inv: Invocation) -> bool:
        return (
            inv.command == "train"
            and _objective(inv) == objective
            and (_adapter(inv) is not None) == adapter
        )

    return when


def _image_decoder(inv: Invocation) -> dict:
    return ((inv.recipe or {}).get("model") or {}).get("image_decoder") or {}


def _draws(inv: Invocation) -> bool:
    options = ("out_dir", "steps", "guidance_scale", "sampler")
    return any(getattr(inv.args, name, None) is not None for name in options)


def _stage(inv: Invocation) -> bool:
    return inv.command == "train" and (inv.recipe or {})["train"].get("stage") in (
        "align",
        "finetune",
    )


def _hf_start(inv: Invocation) -> bool:
    """A run that starts from a model directory the docs call a Hugging Face one."""
    source = str(((inv.recipe or {}).get("model") or {}).get("from") or "")
    return any(word in source.lower() for word in ("llama", "smollm", "qwen", "gpt2", "hf"))


def _encoder_from_another_run(inv: Invocation) -> bool:
    recipe = inv.recipe or {}
    encoder = (recipe.get("model") or {}).get("encoder") or {}
    return bool(recipe.get("encoder_pretraining")) or bool(encoder.get("from"))


PRETRAINED = "tests/test_pretrained_start.py"
CLI_TESTS = "tests/test_cli.py"
MM_RECIPES = "tests/test_recipes_multimodal.py"
EXERCISED_BY: tuple[Rule, ...] = (
    Rule(
        "mmgpt demo (the chat)",
        lambda i: i.command == "demo" and i.args.app == "chat",
        (
            f"{CLI_TESTS}::test_plan_and_demo_dispatch",
            "tests/demos/test_chat_app.py::test_chat_in_the_browser",
            "tests/demos/test_chat_app.py::test_api_streams_the_reply_token_by_token",
        ),
    ),
    Rule(
        "mmgpt demo --app text_to_image",
        lambda i: i.command == "demo" and i.args.app == "text_to_image",
        ("tests/demos/test_text_to_image_app.py::test_gallery_in_the_browser",),
    ),
    Rule(
        "mmgpt demo --app preferences",
        lambda i: i.command == "demo" and i.args.app == "preferences",
        (
            "tests/demos/test_preferences_app.py::"
            "test_judging_in_the_browser_survives_reload_and_restart",
        ),
    ),
    Rule(
        "mmgpt generate (text)",
        lambda i: i.command == "generate" and not i.args.image,
        (
            f"{CLI_TESTS}::test_generate_streams_the_greedy_continuation",
            f"{CLI_TESTS}::test_generate_sampling_is_reproducible_by_seed",
        ),
    ),
    Rule(
        "mmgpt generate --image",
        lambda i: i.command == "generate" and bool(i.args.image),
        (f"{CLI_TESTS}::test_generate_with_images_on_a_multimodal_model",),
    ),
    Rule(
        "mmgpt generate --input MODALITY=PATH (any modality with a loader)",
        lambda i: i.command == "generate" and bool(getattr(i.args, "input", None)),
        (
            "tests/test_modality_plugins.py::test_a_recipe_with_model_encoders_learns_from_the_files",
            "tests/examples/test_audio_plugin.py::"
            "test_the_plugin_goes_through_train_eval_generate_and_the_demo",
        ),
    ),
    Rule(
        "mmgpt generate --out-dir / drawing options (a model that draws writes PNGs)",
        lambda i: i.command == "generate" and _draws(i),
        ("tests/test_imagegen.py::test_cli_generate_writes_pngs_and_prints_their_paths",),
    ),
    Rule(
        "mmgpt generate --draft-model / --compile (speculative, compiled decoding)",
        lambda i: (
            i.command == "generate"
            and (
                getattr(i.args, "draft_model", None) is not None
                or getattr(i.args, "compile", False)
            )
        ),
        (
            "tests/test_speculative.py::test_generate_command_with_a_draft_model",
            "tests/test_speculative.py::test_generate_command_compile_flag",
        ),
    ),
    Rule(
        "mmgpt attention",
        lambda i: i.command == "attention",
        (
            "tests/test_attention.py::test_attention_command_on_a_text_model",
            "tests/test_attention.py::test_attention_command_on_a_multimodal_model_with_an_image",
        ),
    ),
    Rule(
        "mmgpt eval --task lm",
        lambda i: i.command == "eval" and i.args.task == "lm",
        (f"{CLI_TESTS}::test_eval_lm_perplexity_matches_a_hand_computation",),
    ),
    Rule(
        "mmgpt eval --task caption|vqa (caption: the default for multimodal models)",
        lambda i: i.command == "eval" and i.args.task in (None, "caption", "vqa"),
        (
            f"{MM_RECIPES}::test_data_check_and_eval_through_the_cli",
            f"{MM_RECIPES}::test_caption_training_lowers_held_out_loss_and_the_model_evaluates",
        ),
    ),
    Rule(
        "mmgpt eval --task t2i",
        lambda i: i.command == "eval" and i.args.task == "t2i",
        ("tests/eval/test_t2i.py::test_evaluate_end_to_end_on_a_tiny_model",),
    ),
    Rule(
        "mmgpt eval --task t2i on an imagefolder (--judge, --clip, --prompt-template)",
        lambda i: (
            i.command == "eval"
            and i.args.task == "t2i"
            and any(getattr(i.args, k, None) for k in ("judge", "clip", "prompt_template"))
        ),
        ("tests/eval/test_t2i_folder.py::test_train_judge_then_t2i_then_eval_with_judge_and_clip",),
    ),
    Rule(
        "mmgpt eval --task choice (--shots K)",
        lambda i: i.command == "eval" and i.args.task == "choice",
        (
            "tests/eval/test_choice.py::test_cli_choice_on_mmlu_csvs_matches_a_hand_computation",
            "tests/eval/test_choice.py::"
            "test_multimodal_question_with_an_image_matches_a_hand_computation",
        ),
    ),
    Rule(
        "mmgpt eval --task preferences (no --model)",
        lambda i: i.command == "eval" and i.args.task == "preferences",
        ("tests/eval/test_preference_reports.py::test_cli_preferences_needs_no_model",),
    ),
    Rule(
        "mmgpt eval --task reward",
        lambda i: i.command == "eval" and i.args.task == "reward",
        (
            "tests/eval/test_preference_reports.py::test_cli_reward_and_its_errors",
            "tests/eval/test_preference_reports.py::test_reward_report_hand_checkable_accuracy",
        ),
    ),
    Rule(
        "mmgpt data check",
        lambda i: i.command == "data check",
        (
            f"{CLI_TESTS}::test_data_check_reports_and_exits_by_strictness",
            f"{MM_RECIPES}::test_data_check_and_eval_through_the_cli",
        ),
    ),
    Rule(
        "mmgpt data convert",
        lambda i: i.command == "data convert",
        (
            "tests/data/test_convert.py::test_coco_captions_to_imagefolder_through_the_cli",
            "tests/data/test_convert.py::test_imagefolder_to_parquet_and_back_round_trips",
            "tests/data/test_convert.py::test_imagefolder_to_shards_gives_the_same_samples",
        ),
    ),
    Rule(
        "mmgpt train, objective lm",
        _train("lm"),
        ("tests/test_recipe.py::test_lm_recipe_end_to_end_on_the_example_corpus",),
    ),
    Rule(
        "mmgpt train, objective lm, with an adapter",
        _train("lm", adapter=True),
        (
            "tests/adapters/test_training.py::test_cli_trains_an_adapter_that_peft_loads_onto_the_base",
        ),
    ),
    Rule(
        "mmgpt train, objective sft (caption, vqa, your own image-text recipe)",
        _train("sft"),
        (f"{MM_RECIPES}::test_caption_training_lowers_held_out_loss_and_the_model_evaluates",),
    ),
    Rule(
        "mmgpt train, objective sft, with an adapter",
        _train("sft", adapter=True),
        ("tests/adapters/test_training.py::test_multimodal_recipe_with_an_adapter",),
    ),
    Rule(
        "mmgpt train with train.stage=align|finetune (LLaVA's stages), and --resume",
        _stage,
        (f"{MM_RECIPES}::test_align_then_finetune_on_an_imagefolder_with_resume",),
    ),
    Rule(
        "mmgpt train, objective diffusion (t2i)",
        _train("diffusion"),
        (
            "tests/objectives/test_diffusion_objective.py::test_short_training_lowers_the_diffusion_loss",
            "tests/test_t2i_user_data.py::test_an_imagefolder_trains_drawings_with_the_t2i_recipe",
        ),
    ),
    Rule(
        "mmgpt train t2i in the latent space of an autoencoder (model.image_decoder.vae)",
        lambda i: _train("diffusion")(i) and "vae" in _image_decoder(i),
        ("tests/plugins/test_autoencoder.py::test_t2i_in_the_latent_space_of_the_trained_vae",),
    ),
    Rule(
        "mmgpt train t2i on a Stable Diffusion folder (model.image_decoder.pipeline_dir)",
        lambda i: _train("diffusion")(i) and "pipeline_dir" in _image_decoder(i),
        (
            "tests/plugins/test_diffusion_pipeline.py::test_t2i_recipe_fine_tunes_a_pipeline_directory",
        ),
    ),
    Rule(
        "mmgpt train, objective autoencoder",
        _train("autoencoder"),
        (
            "tests/plugins/test_autoencoder.py::test_recipe_trains_an_autoencoder_in_diffusers_format",
        ),
    ),
    Rule(
        "mmgpt train judge (an image judge on labelled images)",
        _train("judge"),
        (
            "tests/eval/test_t2i_folder.py::test_a_judge_trained_on_class_subfolders_tells_red_from_blue",
            "tests/eval/test_t2i_folder.py::test_label_fields_several_attributes_and_clear_errors",
        ),
    ),
    Rule(
        "mmgpt train with model.encoder.from or an encoder_pretraining section",
        lambda i: i.command == "train" and _encoder_from_another_run(i),
        (
            f"{MM_RECIPES}::test_an_encoder_starts_from_another_model_directory",
            f"{MM_RECIPES}::test_encoder_pretraining_runs_first_and_its_encoder_starts_the_run",
        ),
    ),
    Rule(
        "mmgpt train, objective contrastive (clip)",
        _train("contrastive"),
        (
            "tests/objectives/test_contrastive.py::"
            "test_clip_recipe_trains_the_encoder_and_hands_it_to_caption",
        ),
    ),
    Rule(
        "mmgpt train, objective tagging",
        _train("tagging"),
        (
            "tests/objectives/test_tagging.py::"
            "test_tagging_recipe_learns_named_labels_and_hands_the_encoder_on",
            "tests/objectives/test_tagging.py::"
            "test_cells_labels_train_from_an_exported_shapes_folder",
        ),
    ),
    Rule(
        "mmgpt train, objective reward",
        _train("reward"),
        ("tests/rlhf/test_reward.py::test_reward_model_learns_a_preference_and_round_trips",),
    ),
    Rule(
        "mmgpt train, objective dpo",
        lambda i: _train("dpo")(i) or _train("dpo", adapter=True)(i),
        ("tests/rlhf/test_dpo.py::test_dpo_run_raises_the_implicit_reward_margin",),
    ),
    Rule(
        "mmgpt train, objective ppo",
        lambda i: _train("ppo")(i) or _train("ppo", adapter=True)(i),
        ("tests/rlhf/test_ppo.py::test_ppo_raises_a_toy_reward",),
    ),
    Rule(
        "mmgpt train, objective grpo or rloo",
        lambda i: _train("grpo")(i) or _train("rloo")(i),
        ("tests/rlhf/test_group.py::test_group_objective_raises_a_toy_reward",),
    ),
    Rule(
        "mmgpt train --model DIR of a Hugging Face model (lm, full or LoRA; caption)",
        lambda i: i.command == "train" and _hf_start(i),
        (
            f"{PRETRAINED}::test_fine_tune_export_and_transformers_continue_the_same",
            f"{PRETRAINED}::test_caption_model_on_a_hugging_face_llama_reads_the_images",
            f"{PRETRAINED}::test_training_from_a_pretrained_model_resumes_exactly",
        ),
    ),
    Rule(
        "mmgpt export",
        lambda i: i.command == "export",
        (
            f"{PRETRAINED}::test_fine_tune_export_and_transformers_continue_the_same",
            f"{PRETRAINED}::test_caption_model_on_a_hugging_face_llama_reads_the_images",
            "tests/interop/test_llava.py::test_command_line_generate_lora_training_and_export",
        ),
    ),
    Rule(
        "mmgpt quantize",
        lambda i: i.command == "quantize",
        (
            "tests/test_quantization.py::test_cli_quantize_then_generate_and_eval",
            "tests/test_quantization.py::test_multimodal_model_quantises_its_gpt_only",
        ),
    ),
    Rule(
        "mmgpt train --resume",
        lambda i: i.command == "train" and i.args.resume,
        (
            "tests/test_resume.py::test_sigkill_then_resume_is_bit_identical",
            "tests/test_resume.py::test_corrupt_newest_checkpoint_falls_back_and_stays_identical",
        ),
    ),
    Rule(
        "mmgpt train under torchrun",
        lambda i: i.command == "train" and i.launcher == "torchrun",
        (
            "tests/distributed/test_distributed.py::"
            "test_mmgpt_train_under_torchrun_trains_one_tokenizer_and_one_model",
            "tests/distributed/test_distributed.py::"
            "test_ddp_and_fsdp_give_the_single_process_loss_curve",
        ),
    ),
    Rule(
        "mmgpt train with train.tensor_parallel (2-D: FSDP x TP)",
        lambda i: (
            i.command == "train"
            and any(o.startswith("train.tensor_parallel=") for o in i.args.overrides)
        ),
        (
            "tests/distributed/test_tensor_parallel.py::"
            "test_trainer_with_tensor_parallel_matches_one_process",
        ),
    ),
    Rule(
        "python -m mmgpt.distributed consolidate",
        lambda i: i.module == "mmgpt.distributed",
        (
            "tests/distributed/test_distributed.py::"
            "test_consolidated_checkpoint_is_a_model_directory_with_the_trained_logits",
        ),
    ),
    Rule(
        "python -m mmgpt.recipe",
        lambda i: i.module == "mmgpt.recipe",
        ("tests/test_recipe.py::test_lm_recipe_end_to_end_on_the_example_corpus",),
    ),
    Rule(
        "python -m mmgpt.eval.harness (lm-evaluation-harness's command line)",
        lambda i: i.module == "mmgpt.eval.harness",
        ("tests/eval/test_harness.py::test_the_module_runs_lm_evals_command_line",),
    ),
)


def defined_tests(path: Path) -> set[str]:
    """``name`` and ``Class::name`` of the test functions a file defines (read with ast)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
    return {n for n in names if n.rpartition("::")[2].startswith("test_")}


def missing_tests(rule: Rule) -> list[str]:
    missing = []
    for node_id in rule.tests:
        file, _, name = node_id.partition("::")
        path = ROOT / file
        if not path.is_file() or name.partition("[")[0] not in defined_tests(path):
            missing.append(node_id)
    return missing


# ================================================================================================
# The tests
# ================================================================================================
@pytest.fixture(scope="module")
def doc_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding every file the docs create with a titled YAML block."""
    root = tmp_path_factory.mktemp("docs-files")
    written: dict[str, Block] = {}
    for block in ALL_BLOCKS:
        if (
            block.title
            and block.lang in ("yaml", "yml")
            and block.title.endswith((".yaml", ".yml"))
        ):
            first = written.setdefault(block.title, block)
            where = f"{block.doc}:{block.line}"
            assert first.code == block.code, (
                f"{where}: {block.title} differs from the one at {first.doc}:{first.line}"
            )
            target = root / block.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf-8")
    return root


def check_command(command: Command, monkeypatch: pytest.MonkeyPatch, cwd: Path) -> Result:
    """Run or check one documented command; fails with the file and line."""
    if command.error is not None:
        pytest.fail(f"{command}\ncannot be read as a shell command: {command.error}")
    monkeypatch.chdir(cwd)  # recipe files the docs create; outputs of real runs land here
    if command.module is not None:
        result = run_module_parser(command.module, command.argv)
    else:
        result = run_cli(command.argv, monkeypatch)
    for inv in result.invocations:
        inv.launcher, inv.module = command.launcher, command.module or inv.module
    if result.code != 0:
        pytest.fail(
            f"{command}\nfails with exit status {result.code}:\n{result.stderr or result.stdout}"
        )
    if command.output is not None and not any(i.command in RECORDED for i in result.invocations):
        shown = [line.rstrip() for line in command.output]
        if "..." not in shown and "…" not in shown:
            printed = [line.rstrip() for line in result.stdout.rstrip("\n").splitlines()]
            if printed != shown:
                diff = "\n".join(difflib.unified_diff(shown, printed, "docs", "mmgpt", lineterm=""))
                pytest.fail(f"{command}\nprints something else than the docs show:\n{diff}")
    return result


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where} {' '.join(c.argv[:3])}")
def test_documented_command(command: Command, monkeypatch, doc_files: Path) -> None:
    result = check_command(command, monkeypatch, doc_files)
    if not result.invocations:
        return  # --help, --version
    [inv] = result.invocations
    if inv.command in REAL:
        return
    rules = [rule for rule in EXERCISED_BY if rule.when(inv)]
    assert rules, (
        f"{command}\nneeds a trained model or a browser, and no rule of EXERCISED_BY in "
        f"{rel(Path(__file__))} says which test runs it end to end; add one"
    )
    for rule in rules:
        missing = missing_tests(rule)
        assert not missing, (
            f"{command}\nis exercised by {missing} (rule {rule.what!r}), which do not exist; "
            "update EXERCISED_BY"
        )


def test_every_rule_names_existing_tests() -> None:
    for rule in EXERCISED_BY:
        assert not missing_tests(rule), f"EXERCISED_BY rule {rule.what!r}: {missing_tests(rule)}"


def test_the_scan_finds_the_commands_of_every_kind() -> None:
    """The scanner itself: a regression here would silently check nothing."""
    found = {(c.where.partition(":")[0], c.argv[:1]) for c in COMMANDS}
    assert ("README.md", ("demo",)) in found  # inside `python -m venv … && mmgpt demo`
    assert any(c.launcher == "torchrun" for c in COMMANDS)
    assert any(c.module == "mmgpt.distributed" for c in COMMANDS)
    assert any(c.output for c in COMMANDS if c.argv[:1] == ("plan",))
    subcommands = {c.argv[0] for c in COMMANDS if c.module is None and c.argv}
    assert {"demo", "train", "generate", "eval", "data", "plugins", "plan"} <= subcommands
    assert any(s.text.startswith("mmgpt generate") for s in SYNOPSES)
    assert sum(block.run for block in ALL_BLOCKS) >= 1


def test_a_wrong_command_in_the_docs_fails(monkeypatch, doc_files: Path) -> None:
    """The checks can fail: unknown options, bad override keys and values, unreadable lines."""
    cases = {
        "mmgpt generate --model DIR --prompt hi --bogus 1": "unrecognized arguments: --bogus",
        "mmgpt train caption train.lr=1e-3 train.max_stepz=3": "did you mean train.max_steps",
        "mmgpt train lm train.strategy=ddpp": "strategy",
        "mmgpt plan lm --gpus 0": "--gpus",
        "python -m mmgpt.distributed consolidate ONLY_ONE": "required: out",
        "torchrun --bogus-option 2 -m mmgpt.cli train lm": "torchrun rejects its options",
        "mmgpt generate --prompt 'unbalanced": "cannot be read as a shell command",
    }
    for text, message in cases.items():
        block = Block("fake.md", "bash", None, 1, (text,), False)
        [command] = scan([block])[0]
        with pytest.raises(pytest.fail.Exception, match=re.escape(message)):
            check_command(command, monkeypatch, doc_files)
    inv = Invocation("generate", argparse.Namespace(image=["x.png"]))
    assert [r.what for r in EXERCISED_BY if r.when(inv)] == ["mmgpt generate --image"]
    assert missing_tests(Rule("x", bool, ("tests/test_cli.py::test_does_not_exist",)))


# -- synopses -------------------------------------------------------------------------------------
def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"demo": …, "data check": …, "plugins list": …}``: every runnable subcommand."""
    leaves: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        children = subparsers(parser)
        if not children:
            leaves[prefix.strip()] = parser
        for name, child in children.items():
            walk(f"{prefix} {name}", child)

    walk("", cli.build_parser())
    return leaves


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("synopsis", SYNOPSES, ids=lambda s: s.where)
def test_documented_synopsis(synopsis: Synopsis) -> None:
    words = synopsis.text.split()[1:]
    parser, path = cli.build_parser(), []
    while words and words[0] in subparsers(parser):
        parser = subparsers(parser)[words[0]]
        path.append(words.pop(0))
    assert not subparsers(parser), (
        f"{synopsis.where}: {synopsis.text!r} names no subcommand of "
        f"'mmgpt {' '.join(path)}' ({', '.join(subparsers(parser))})"
    )
    options = options_of(parser)
    text = synopsis.text
    for match in re.finditer(
        r"(?<![\w-])(--?[A-Za-z][\w-]*)(?:[ =]+\{?([\w-]+(?:[|,][\w-]+)+))?", text
    ):
        flag, choices = match.group(1), match.group(2)
        assert flag in options, (
            f"{synopsis.where}: 'mmgpt {' '.join(path)}' has no option {flag} "
            f"(it has {', '.join(sorted(options))})"
        )
        action = options[flag]
        if choices and action.choices is not None:
            assert set(re.split(r"[|,]", choices)) == set(action.choices), (
                f"{synopsis.where}: {flag} takes {'|'.join(action.choices)}, the docs say {choices}"
            )


# -- python blocks --------------------------------------------------------------------------------
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in PYTHON_LANGS and b.title is None]


def compiled(block: Block) -> ast.Module:
    source = "\n" * (block.line - 1) + block.code  # line numbers of the page
    try:
        return ast.parse(source, filename=block.doc)
    except SyntaxError as exc:
        pytest.fail(f"{block.doc}:{exc.lineno}: python block does not parse: {exc.msg}")


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"{b.doc}:{b.line}")
def test_python_block_imports_exist(block: Block) -> None:
    for node in ast.walk(compiled(block)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules = [(node.module, [a.name for a in node.names if a.name != "*"])]
        elif isinstance(node, ast.Import):
            modules = [(a.name, []) for a in node.names]
        else:
            continue
        for module, names in modules:
            top = module.partition(".")[0]
            if top not in CHECKED_PACKAGES or importlib.util.find_spec(top) is None:
                continue
            where = f"{block.doc}:{node.lineno}"
            try:
                imported = importlib.import_module(module)
            except ImportError as exc:
                pytest.fail(f"{where}: `import {module}` fails: {exc}")
            for name in names:
                if not hasattr(imported, name):
                    try:  # a submodule: `from mmgpt import registry`
                        importlib.import_module(f"{module}.{name}")
                    except ImportError:
                        pytest.fail(f"{where}: {module} has no {name!r}")


RUN_PAGES = sorted({b.doc for b in PYTHON_BLOCKS if b.run})


@pytest.mark.parametrize("doc", RUN_PAGES)
def test_runnable_python_blocks(doc: str, tmp_path: Path) -> None:
    """The blocks marked ``<!-- run -->`` of a page, in order, in one fresh interpreter."""
    blocks = [(b.doc, b.line, b.code) for b in PYTHON_BLOCKS if b.doc == doc and b.run]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    driver = (
        "import json, sys\n"
        "namespace = {'__name__': '__main__'}\n"
        "for doc, line, code in json.load(open('blocks.json', encoding='utf-8')):\n"
        "    exec(compile('\\n' * (line - 1) + code, doc, 'exec'), namespace)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", driver],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"a runnable python block of {doc} fails (the traceback names its line):\n"
        f"{result.stderr[-4000:]}"
    )


# -- docs/cli.md ----------------------------------------------------------------------------------
CLI_DOC = ROOT / "docs" / "cli.md"
GLOBAL = {"-h", "--help", "--debug", "--version"}


def sections(text: str) -> dict[str, str]:
    """``{heading text: body}`` of the ``##``/``###`` sections of a page."""
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.MULTILINE)
    return {parts[i].lstrip("#").strip().strip("`"): parts[i + 1] for i in range(1, len(parts), 2)}


def documented_names(body: str) -> dict[str, str]:
    """``{option or positional: its table row}`` from the first cell of each table row."""
    rows: dict[str, str] = {}
    for line in body.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cell = line.split("|")[1]
        for code in re.findall(r"`([^`]+)`", cell):
            rows[code.split()[0]] = line
    return rows


def test_cli_page_documents_every_option_of_every_subcommand() -> None:
    pages = sections(CLI_DOC.read_text(encoding="utf-8"))
    global_rows = documented_names(pages.get("Global options", ""))
    assert set(global_rows) >= GLOBAL, f"docs/cli.md, Global options: {GLOBAL - set(global_rows)}"
    for path, parser in leaf_parsers().items():
        heading = f"mmgpt {path}"
        assert heading in pages, f"docs/cli.md has no section '## {heading}'"
        rows = documented_names(pages[heading])
        actions = [a for a in parser._actions if not set(a.option_strings) & GLOBAL]
        expected: dict[str, argparse.Action] = {}
        for action in actions:
            names = action.option_strings or [action.metavar or action.dest]
            expected.update({name: action for name in names})
        table = {name for name in rows if name.startswith("-") or name in expected}
        assert set(expected) == table, (
            f"docs/cli.md, section {heading!r}: documents {sorted(table)}, the parser has "
            f"{sorted(expected)}"
        )
        for name, action in expected.items():
            for choice in action.choices or ():
                assert f"`{choice}`" in rows[name], (
                    f"docs/cli.md, {heading} {name}: choice {choice!r} is not documented"
                )
            default = action.default
            if action.option_strings and default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in rows[name] and f"`{default}`" in rows[name], (
                    f"docs/cli.md, {heading} {name}: say its default, `{default}`"
                )
        assert f"```text\n{heading}" in pages[heading], (
            f"docs/cli.md, {heading}: start the section with a synopsis (a text block)"
        )


def test_train_keys_named_in_prose_exist() -> None:
    """``train.KEY`` in the prose of a page (outside code blocks) is a TrainConfig field or a
    stage key."""
    from mmgpt.recipe.spec import STAGE_KEYS
    from mmgpt.trainer import TrainConfig

    valid = {f.name for f in dataclasses.fields(TrainConfig)} | set(STAGE_KEYS)
    # code blocks are checked by the tests above (commands parse, python runs)
    in_code = {(b.doc, b.line + i) for b in ALL_BLOCKS for i in range(-1, len(b.body) + 1)}
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if (rel(path), number) in in_code:
                continue
            # `train.KEY` in inline code, or train.KEY=VALUE in a command
            for match in re.finditer(r"(?<![\w.])train\.([a-z_]+)(?=`|=)", line):
                assert match.group(1) in valid, (
                    f"{rel(path)}:{number}: train.{match.group(1)} is not a recipe key "
                    f"(train.* keys: {', '.join(sorted(valid))})"
                )


def test_pages_name_every_shipped_recipe() -> None:
    """The lists of shipped recipes in the reference and the concepts page stay complete."""
    from mmgpt.recipe import recipe_names

    cli_rows = documented_names(sections(CLI_DOC.read_text(encoding="utf-8"))["mmgpt train"])
    concepts = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    for name in recipe_names():
        assert f"`{name}`" in cli_rows["RECIPE"], f"docs/cli.md, mmgpt train RECIPE: add {name}"
        assert f"`{name}`" in concepts, f"docs/concepts.md, recipes: add {name}"
