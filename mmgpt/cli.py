"""The ``mmgpt`` command line.

Every subcommand dispatches lazily to the module that implements it (the imports inside the
command functions are deliberate), so ``mmgpt --help`` answers without importing torch. Expected failures (a missing file, a bad
value, an unknown registry name, a command whose module is not installed, Ctrl-C) print one
line ``mmgpt: error: ...`` and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmgpt.registry import RegistryError

# Where each subcommand's work lives (``module:function``); imported only when run.
TARGETS = {
    "demo": "mmgpt.demo:launch_demo",
    "train": "mmgpt.recipe:run_training",
    "eval": "mmgpt.eval:run_eval",
    "data check": "mmgpt.data.check:check_dataset",
    "data convert": "mmgpt.data.convert:convert_dataset",
    "plan": "mmgpt.plan:plan_training",
}
# Optional dependencies and the extra that installs each: a missing one names its extra.
EXTRAS = {
    "gradio": "demo",
    "timm": "vision",
    "torchvision": "vision",
    "diffusers": "diffusion",
    "peft": "adapters",
    "transformers": "interop",
    "sacrebleu": "eval",
    "pyarrow": "data",
}
EVAL_TASKS = ("caption", "vqa", "lm", "t2i", "choice", "preferences", "reward")


class CommandError(Exception):
    """An expected failure of a command, reported as one line."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    from mmgpt.files import CorruptCheckpointError

    return (
        CommandError,
        OSError,  # FileNotFoundError, PermissionError, ...
        ValueError,
        RegistryError,
        ImportError,
        CorruptCheckpointError,
        KeyboardInterrupt,
    )


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    package = (getattr(exc, "name", None) or "").partition(".")[0]
    if isinstance(exc, ModuleNotFoundError) and package in EXTRAS:
        return (
            f"the optional dependency {package!r} is not installed; "
            f'run: pip install "mmgpt[{EXTRAS[package]}]"'
        )
    return str(exc) or type(exc).__name__


def _target(command: str) -> Callable[..., Any]:
    """Import the function behind ``command``; a missing module is a clean error."""
    module_name, _, attr = TARGETS[command].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the target module (or a package above it) missing means "not available";
        # a dependency missing inside it is reported as such by the caller.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise CommandError(
            f"'mmgpt {command}' is not available in this installation "
            f"(module {module_name!r} is missing)"
        ) from exc
    function = getattr(module, attr, None)
    if function is None:
        raise CommandError(
            f"'mmgpt {command}' is not available in this installation "
            f"({module_name} has no {attr!r})"
        )
    return function


def _print_result(result: Any) -> None:
    """Print what a command function returned: mappings as JSON, anything else as text."""
    if result is None:
        return
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(result)


# -- commands ------------------------------------------------------------------------------
def _model_dir(name: str | None) -> Path | None:
    """``--model``: a local directory, or a Hugging Face Hub id (downloaded when named)."""
    from mmgpt.pretrained import resolve_model_dir

    return None if name is None else resolve_model_dir(name)


def cmd_demo(args: argparse.Namespace) -> int:
    _target("demo")(
        model_dir=_model_dir(args.model),
        port=args.port,
        share=args.share,
        app=args.app,
        data_dir=args.data,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.adapter is not None:  # first, so that an explicit adapter.method=... wins
        overrides.insert(0, f"adapter.method={args.adapter}")
    # --model / --reward-model are the recipe keys model.from / objective.reward_model
    if args.reward_model is not None:
        overrides.insert(0, f"objective.reward_model={args.reward_model}")
    if args.model is not None:
        overrides.insert(0, f"model.from={args.model}")  # a Hub id resolves when it loads
    result = _target("train")(
        args.recipe, data=args.data, out=args.out, resume=args.resume, overrides=overrides
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one summary, from rank 0
        _print_result(result)
    return 0


def load_tokenizer(model_dir: str | Path, config: dict[str, Any] | None = None) -> Any:
    """The tokenizer of a model directory (:func:`mmgpt.pretrained.load_tokenizer`)."""
    from mmgpt.pretrained import load_tokenizer as load

    return load(model_dir, config)


def _generation_config(args: argparse.Namespace) -> Any:
    from mmgpt.generation import GenerationConfig

    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop_strings": args.stop,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
    }
    # Unset options keep GenerationConfig's defaults, so they are defined in one place.
    # Generation stops at the tokenizer's eos (stream_text's default).
    return GenerationConfig(**{k: v for k, v in options.items() if v is not None})


def cmd_generate(args: argparse.Namespace) -> int:
    from mmgpt.config import CONFIG_NAME, read_model_config
    from mmgpt.pretrained import architecture

    model_dir = _model_dir(args.model)
    config = read_model_config(model_dir)
    arch = architecture(config, model_dir / CONFIG_NAME)
    gen_config = _generation_config(args)
    if arch == "multimodal":
        chunks = _stream_multimodal(
            model_dir,
            args.prompt,
            args.image,
            gen_config,
            _adapter_choice(args.adapter),
            out_dir=args.out_dir,
            image_options=_image_options(args),
        )
    elif args.image:
        raise ValueError(
            f"{model_dir}: --image needs a multimodal model; this one is a text-only {arch!r} model"
        )
    else:
        from mmgpt.generation import stream_text
        from mmgpt.pretrained import load_model

        model = load_model(model_dir, adapter=_adapter_choice(args.adapter))
        tokenizer = load_tokenizer(model_dir, config)
        chunks = stream_text(model, tokenizer, args.prompt, gen_config)
    pieces = []
    for chunk in chunks:
        pieces.append(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.out_dir is not None:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "text.txt").write_text("".join(pieces), encoding="utf-8")
    return 0


def _adapter_choice(name: str | None) -> str | None:
    """``--adapter``: unset → the adapters saved with the model; ``none`` → the base."""
    if name is None:
        return "auto"
    return None if name == "none" else name


def _stream_multimodal(
    model_dir: Path,
    prompt: str,
    image_paths: Sequence[str],
    gen_config: Any,
    adapter: str | None = "auto",
    *,
    out_dir: str | None = None,
    image_options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """The reply of a multimodal model to one user turn with its images, as text chunks.

    A model with an image decoder may draw: each image is written to ``out_dir`` as
    ``image_N.png`` and its path printed on a line of its own as soon as it is decoded.
    """
    from mmgpt.data.images import load_image
    from mmgpt.multimodal import MultimodalGPT

    model = MultimodalGPT.from_pretrained(model_dir, adapter=adapter)
    images = [load_image(p) for p in image_paths]
    conversation = _user_turn(prompt, len(images))
    if model.image_decoder is None:
        yield from model.stream_text(conversation, images, gen_config)
        return
    from mmgpt.imagegen import ImageEvent, ImageGenerationConfig

    image_config = ImageGenerationConfig(
        **{k: v for k, v in (image_options or {}).items() if v is not None}
    )
    for event in model.stream(conversation, images, gen_config, image_config):
        if not isinstance(event, ImageEvent):
            yield event.text
        elif out_dir is None:
            print(f"\n[image {event.index} not saved: pass --out-dir DIR]", flush=True)
        else:
            path = Path(out_dir) / f"image_{event.index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            event.image.save(path)
            print(f"\n{path}", flush=True)


def _user_turn(prompt: str, n_images: int) -> list[dict[str, str]]:
    """A one-turn conversation; without placeholders the images go before the question,
    one ``<image>`` each."""
    if n_images and "<image>" not in prompt:
        prompt = "<image>\n" * n_images + prompt
    return [{"role": "user", "text": prompt}]


def cmd_attention(args: argparse.Namespace) -> int:
    from mmgpt.config import CONFIG_NAME, read_model_config
    from mmgpt.eval.attention import prompt_attentions, write_attention_maps
    from mmgpt.pretrained import architecture

    model_dir = _model_dir(args.model)
    config = read_model_config(model_dir)
    arch = architecture(config, model_dir / CONFIG_NAME)
    adapter = _adapter_choice(args.adapter)
    if arch == "multimodal":
        from mmgpt.data.images import load_image
        from mmgpt.multimodal import MultimodalGPT

        model = MultimodalGPT.from_pretrained(model_dir, adapter=adapter)
        images = [load_image(p) for p in args.image]
        result = prompt_attentions(
            model, model.tokenizer, _user_turn(args.prompt, len(images)), images
        )
    elif args.image:
        raise ValueError(
            f"{model_dir}: --image needs a multimodal model; this one is a text-only {arch!r} model"
        )
    else:
        from mmgpt.pretrained import load_model

        model = load_model(model_dir, adapter=adapter)
        result = prompt_attentions(model, load_tokenizer(model_dir, config), args.prompt)
    _print_result(write_attention_maps(result, args.out_dir, args.layers))
    return 0


def _image_options(args: argparse.Namespace) -> dict[str, Any]:
    """ImageGenerationConfig fields from ``--steps``/``--guidance-scale``/``--sampler``/``--seed``."""
    return {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
        "seed": args.seed,
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from mmgpt.config import CONFIG_NAME, read_model_config
    from mmgpt.pretrained import architecture

    if args.task == "preferences":  # a preference file only: no model
        if args.model is not None:
            raise CommandError("--task preferences reads only --data; leave out --model")
        model_dir, arch = None, None
    elif args.model is None:
        raise CommandError(f"--model is required for --task {args.task or 'caption|vqa|lm'}")
    else:
        model_dir = _model_dir(args.model)
        config = read_model_config(model_dir)
        arch = architecture(config, model_dir / CONFIG_NAME)
    task = args.task or ("caption" if arch == "multimodal" else "lm")
    if args.shots is not None and task != "choice":
        raise CommandError(f"--shots applies to --task choice, not {task}")
    if task == "lm":
        metrics = _eval_lm(model_dir, config, Path(args.data))
    else:
        options = {
            "batch_size": args.batch_size,
            "limit": args.limit,
            "max_new_tokens": args.max_new_tokens,
            "shots": args.shots,
        }
        options = {k: v for k, v in options.items() if v is not None}
        metrics = _target("eval")(model_dir, args.data, task, **options)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _eval_lm(model_dir: Path, config: dict[str, Any], data: Path) -> dict[str, Any]:
    from mmgpt.eval.perplexity import perplexity
    from mmgpt.pretrained import load_model, require_architecture

    require_architecture(model_dir, "gpt", "--task lm")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir, config)
    return {"task": "lm", **perplexity(model, tokenizer, data)}


def cmd_data_check(args: argparse.Namespace) -> int:
    # with a model, text lengths are counted in that model's tokens
    tokenizer = load_tokenizer(args.model) if args.model is not None else None
    report = _target("data check")(args.path, tokenizer=tokenizer, strict=args.strict)
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code


def cmd_data_convert(args: argparse.Namespace) -> int:
    report = _target("data convert")(
        args.src,
        args.dst,
        args.to,
        source_format=args.source_format,
        image_root=args.images,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        allow_outside_root=args.allow_outside_root,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return report.exit_code


def cmd_plugins_list(args: argparse.Namespace) -> int:
    from mmgpt.registry import REGISTRY

    with warnings.catch_warnings():
        # failed plugins are listed below the table; the warning would say it twice
        warnings.simplefilter("ignore", RuntimeWarning)
        entries = REGISTRY.entries()
    rows = [("KIND", "NAME", "DISTRIBUTION")]
    rows += [(e.kind, e.name, e.distribution) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for kind, name, dist in rows:
        print(f"{kind:<{widths[0]}}  {name:<{widths[1]}}  {dist}")
    errors = REGISTRY.plugin_errors
    if errors:
        print("\nplugins that failed to load:")
        for e in errors:
            print(f"  {e.distribution} (entry point {e.entry_point!r}): {e.error}")
    if REGISTRY.skipped_plugins:
        print(f"\nplugins skipped (MMGPT_SKIP_PLUGINS): {', '.join(REGISTRY.skipped_plugins)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmgpt.pretrained import export_hf

    report = export_hf(
        _model_dir(args.model), args.out, family=args.family, adapter=_adapter_choice(args.adapter)
    )
    print(json.dumps(report, indent=2))
    if report["not_exported"]:
        print(
            f"note: {', '.join(report['not_exported'])} of {args.model} have no place in a "
            "causal language model and were not exported; they stay in the mmgpt directory",
            file=sys.stderr,
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _target("plan")
    extra: dict[str, Any] = {"flops": args.flops} if args.flops is not None else {}
    if args.overrides:
        extra["overrides"] = args.overrides
    _print_result(plan(args.recipe, gpus=args.gpus, gpu_memory=args.gpu_memory, **extra))
    return 0


# -- parser --------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not abs(value) < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subparser's
    # default from overwriting a value given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )

    parser = argparse.ArgumentParser(
        prog="mmgpt",
        description="Multimodal GPT models with plugin modalities.",
        parents=[debug],
    )
    from mmgpt import __version__

    parser.add_argument("--version", action="version", version=f"mmgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo",
        parents=[debug],
        help="open a Gradio demo (multimodal or text chat, drawing, preferences)",
    )
    p.add_argument("--model", metavar="DIR", help="model directory (default: the shipped model)")
    p.add_argument("--port", type=_positive_int, help="port to serve on")
    p.add_argument("--share", action="store_true", help="create a public Gradio link")
    p.add_argument(
        "--app",
        choices=("chat", "text_to_image", "preferences"),
        default="chat",
        help="which demo (default: chat)",
    )
    p.add_argument(
        "--data", metavar="DIR", help="preferences app: where pairs are written (./preferences)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", parents=[debug], help="train from a recipe")
    p.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name or a YAML file")
    p.add_argument("--data", metavar="PATH", help="training data (file or directory)")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    p.add_argument("--model", metavar="DIR", help="start from this model (model.from=DIR)")
    p.add_argument(
        "--reward-model",
        metavar="DIR",
        help="reward model for PPO (objective.reward_model=DIR; from `mmgpt train reward`)",
    )
    p.add_argument(
        "--adapter",
        choices=("lora", "dora"),
        help="train a LoRA/DoRA adapter on the frozen model (adapter.method=...; options "
        "adapter.r, adapter.alpha, adapter.targets, ...; see docs/adapters.md)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=3e-4"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", parents=[debug], help="generate text (and images)")
    p.add_argument("--model", metavar="DIR", required=True, help="model directory")
    p.add_argument(
        "--image", metavar="PATH", action="append", default=[], help="input image (repeatable)"
    )
    p.add_argument("--prompt", metavar="TEXT", required=True, help="the prompt")
    p.add_argument("--max-new-tokens", metavar="N", type=_positive_int)
    p.add_argument("--temperature", type=_nonnegative_float, help="0 = greedy")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--top-p", type=_nonnegative_float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--repetition-penalty",
        metavar="R",
        type=_positive_float,
        help="> 1 discourages tokens already seen (1 = off)",
    )
    p.add_argument(
        "--stop",
        metavar="TEXT",
        action="append",
        help="end the reply before this text (repeatable)",
    )
    p.add_argument(
        "--num-beams",
        metavar="N",
        type=_positive_int,
        help="beam search with N beams (deterministic; no --top-k/--top-p)",
    )
    p.add_argument(
        "--length-penalty",
        metavar="X",
        type=_finite_float,
        help="beam search: score = log-prob / length**X (default 1.0)",
    )
    p.add_argument("--out-dir", metavar="DIR", help="also write outputs (text, images) here")
    p.add_argument("--steps", type=_positive_int, help="diffusion steps per generated image")
    p.add_argument(
        "--guidance-scale", type=_nonnegative_float, help="classifier-free guidance (1 = off)"
    )
    p.add_argument("--sampler", help="diffusion sampler: dpm (default), ddim or ddpm")
    p.add_argument(
        "--adapter",
        metavar="NAME",
        help="adapter under DIR/adapters/ to use; 'none': the base model (default: the "
        "adapters saved with the model)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "attention", parents=[debug], help="draw a prompt's attention maps as PNG heatmaps"
    )
    p.add_argument("--model", metavar="DIR", required=True, help="model directory")
    p.add_argument("--prompt", metavar="TEXT", required=True, help="the prompt")
    p.add_argument(
        "--image", metavar="PATH", action="append", default=[], help="input image (repeatable)"
    )
    p.add_argument("--out-dir", metavar="DIR", required=True, help="where the PNGs and JSON go")
    p.add_argument(
        "--layers",
        metavar="L",
        type=int,
        nargs="+",
        help="layers to draw, counted from 0 (default: all)",
    )
    p.add_argument(
        "--adapter",
        metavar="NAME",
        help="adapter under DIR/adapters/ to use; 'none': the base model (default: the "
        "adapters saved with the model)",
    )
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("eval", parents=[debug], help="evaluate a model; prints JSON metrics")
    p.add_argument(
        "--model",
        metavar="DIR",
        help="model directory (every task but preferences); a reward model for --task reward",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        required=True,
        help="evaluation data: text files (lm); an imagefolder dir, a LLaVA JSON, or "
        "'shapes[:seed=1,size=200,...]' for the synthetic shapes world (caption, vqa); "
        "multiple-choice JSONL or MMLU-style CSVs (choice); a preference JSONL "
        "(preferences, reward)",
    )
    p.add_argument(
        "--task",
        choices=EVAL_TASKS,
        help="lm: perplexity on text files (default for text models); "
        "caption (default for multimodal models), vqa, t2i; choice: multiple-choice accuracy; "
        "preferences: win rates and Bradley-Terry scores of the players of a preference file "
        "(no --model); reward: a reward model's pair and best-of-n accuracy",
    )
    p.add_argument(
        "--batch-size", metavar="N", type=_positive_int, help="caption/vqa/t2i/choice/reward: batch"
    )
    p.add_argument(
        "--limit", metavar="N", type=_positive_int, help="caption/vqa/t2i/choice: first N samples"
    )
    p.add_argument(
        "--shots",
        metavar="K",
        type=_nonnegative_int,
        help="choice: k-shot examples before each question (default 0)",
    )
    p.add_argument(
        "--max-new-tokens", metavar="N", type=_positive_int, help="caption/vqa: longest reply"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", parents=[debug], help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    q = data_sub.add_parser("check", parents=[debug], help="validate a dataset")
    q.add_argument(
        "path", metavar="PATH", help="imagefolder dir, LLaVA json, preference jsonl, text"
    )
    q.add_argument("--strict", action="store_true", help="count warnings as problems (exit 1)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument(
        "--model", metavar="DIR", help="measure lengths in this model's tokens (default: chars)"
    )
    q.set_defaults(func=cmd_data_check)
    q = data_sub.add_parser(
        "convert", parents=[debug], help="write a dataset as an imagefolder, parquet or tar shards"
    )
    q.add_argument(
        "src",
        metavar="SRC",
        help="COCO captions JSON, imagefolder dir, LLaVA json, parquet, datasets dir, tar shards",
    )
    q.add_argument("dst", metavar="DST", help="the directory to write (must not exist)")
    q.add_argument(
        "--to", required=True, choices=("imagefolder", "parquet", "shards"), help="target format"
    )
    q.add_argument(
        "--from",
        dest="source_format",
        choices=("coco", "imagefolder", "llava", "parquet", "hf_dataset", "shards"),
        help="the source format (default: detected)",
    )
    q.add_argument(
        "--images", metavar="DIR", help="folder the source's image paths are relative to"
    )
    q.add_argument(
        "--shard-size",
        metavar="N",
        type=_positive_int,
        default=10_000,
        help="rows per parquet file / samples per tar shard (default 10000)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    q.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="copy images whose paths leave the source's image folder",
    )
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=cmd_data_convert)

    p = sub.add_parser("plugins", parents=[debug], help="registry entries and plugins")
    plugins_sub = p.add_subparsers(dest="plugins_command", metavar="COMMAND", required=True)
    q = plugins_sub.add_parser(
        "list", parents=[debug], help="every entry: kind, name, distribution"
    )
    q.set_defaults(func=cmd_plugins_list)

    p = sub.add_parser(
        "export",
        parents=[debug],
        help="write a model in the Hugging Face layout (its language model, or LLaVA)",
    )
    p.add_argument("--model", metavar="DIR", required=True, help="model directory")
    p.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    p.add_argument(
        "--family",
        choices=("gpt2", "llama", "mistral", "qwen2"),
        help="Hugging Face family (default: the one the model's features call for)",
    )
    p.add_argument(
        "--adapter",
        metavar="NAME",
        help="the adapter to merge before exporting (default: the saved ones; none: the base)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", parents=[debug], help="plan a training run over GPUs")
    p.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name or a YAML file")
    p.add_argument("--gpus", type=_positive_int, required=True, metavar="N")
    p.add_argument("--gpu-memory", type=_nonnegative_float, metavar="GB", help="memory per GPU")
    p.add_argument(
        "--flops", type=_nonnegative_float, metavar="TFLOPS", help="peak bf16 TFLOPS per GPU"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. model.n_layer=24"
    )
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `mmgpt train RECIPE --out x lr=1` leaves overrides after options unparsed.
        if args.command in ("train", "plan") and all(
            "=" in a and not a.startswith("-") for a in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except _expected_errors() as exc:
        if debug:
            raise
        print(f"mmgpt: error: {_error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
