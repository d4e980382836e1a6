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
import logging
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
        "compile": True if args.compile else None,
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
    inputs = _named_inputs(args.image, args.input)
    if args.draft_tokens is not None and args.draft_model is None:
        raise CommandError("--draft-tokens: goes with --draft-model DIR (the draft model)")
    if args.draft_model is not None and arch != "gpt":
        raise CommandError(
            f"--draft-model: speculative decoding needs a text-only model; {model_dir} is a "
            f"{arch!r} model"
        )
    stats = None
    if arch == "multimodal":
        chunks = _stream_multimodal(
            model_dir,
            args.prompt,
            inputs,
            gen_config,
            _adapter_choice(args.adapter),
            out_dir=args.out_dir,
            image_options=_image_options(args),
        )
    elif inputs:
        flag = "--image" if args.image else "--input"
        raise ValueError(
            f"{model_dir}: {flag} needs a multimodal model; this one is a text-only {arch!r} model"
        )
    else:
        from mmgpt.generation import stream_text
        from mmgpt.pretrained import load_model

        model = load_model(model_dir, adapter=_adapter_choice(args.adapter))
        tokenizer = load_tokenizer(model_dir, config)
        speculative: dict[str, Any] = {}
        if args.draft_model is not None:
            from mmgpt.speculative import SpeculativeStats

            stats = SpeculativeStats()
            speculative = {
                "draft_model": load_model(_model_dir(args.draft_model)),
                "num_draft_tokens": args.draft_tokens or 4,
                "speculative_stats": stats,
            }
        chunks = stream_text(model, tokenizer, args.prompt, gen_config, **speculative)
    pieces = []
    for chunk in chunks:
        pieces.append(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats is not None:
        print(
            f"draft tokens accepted: {stats.accepted}/{stats.proposed} "
            f"({100 * stats.acceptance_rate:.1f}%), {stats.tokens_per_round:.2f} tokens per "
            "target forward",
            file=sys.stderr,
        )
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


def _named_inputs(images: Sequence[str], inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(modality, path)`` of ``--image PATH`` and ``--input MODALITY=PATH`` (or ``--input
    PATH``, the modality told by the extension from the loaders), in the order given."""
    from mmgpt.data.loaders import loader_modalities, modality_of_file

    named = [("image", p) for p in images]
    for spec in inputs:
        modality, sep, path = spec.partition("=")
        if sep and modality in loader_modalities():
            named.append((modality, path))
        elif sep and not Path(spec).exists():
            raise CommandError(
                f"--input {spec}: no loader reads {modality!r} files (modalities: "
                f"{', '.join(loader_modalities())}); install the plugin of that modality"
            )
        else:
            named.append((modality_of_file(spec), spec))
    return named


def _stream_multimodal(
    model_dir: Path,
    prompt: str,
    inputs: Sequence[tuple[str, str]],
    gen_config: Any,
    adapter: str | None = "auto",
    *,
    out_dir: str | None = None,
    image_options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """The reply of a multimodal model to one user turn with its inputs (``(modality, path)``
    pairs, each read by its modality's loader), as text chunks.

    A model with an image decoder may draw: each image is written to ``out_dir`` as
    ``image_N.png`` and its path printed on a line of its own as soon as it is decoded. Items
    of its other output modalities are written the same way by their loader's ``save``, as
    ``{modality}_N`` with the loader's suffix (``audio_0.wav``).
    """
    from mmgpt.data.loaders import load_input
    from mmgpt.multimodal import MultimodalGPT

    model = MultimodalGPT.from_pretrained(model_dir, adapter=adapter)
    missing = sorted({m for m, _ in inputs} - set(model.encoders))
    if missing:
        reads = ", ".join(sorted(model.encoders)) or "no modality but text"
        raise CommandError(
            f"{model_dir}: the model has no encoder for {', '.join(missing)} inputs (it reads "
            f"{reads})"
        )
    items: dict[str, list[Any]] = {}
    for modality, path in inputs:
        # the modality is named (or told by the extension): the loader judges the content,
        # as --image always read images by their content whatever their name
        item = load_input(modality, path, check_extension=False)
        items.setdefault(modality, []).append(item)
    images = items.pop("image", [])
    counts = {"image": len(images), **{m: len(v) for m, v in items.items()}}
    conversation = _user_turn(prompt, counts, model.processor())
    if not model.output_modalities():
        yield from model.stream_text(conversation, images, gen_config, inputs=items)
        return
    from mmgpt.data.loaders import save_output
    from mmgpt.imagegen import ImageEvent, ImageGenerationConfig, OutputEvent

    image_config = ImageGenerationConfig(
        **{k: v for k, v in (image_options or {}).items() if v is not None}
    )
    for event in model.stream(conversation, images, gen_config, image_config, inputs=items):
        if not isinstance(event, (ImageEvent, OutputEvent)):
            yield event.text
            continue
        modality = event.modality if isinstance(event, OutputEvent) else "image"
        if out_dir is None:
            print(f"\n[{modality} {event.index} not saved: pass --out-dir DIR]", flush=True)
            continue
        path = Path(out_dir) / f"{modality}_{event.index}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(event, ImageEvent):
            path = path.with_suffix(".png")
            event.image.save(path)
        else:  # the modality's loader writes it (and chooses the suffix)
            path = save_output(modality, event.item, path)
        print(f"\n{path}", flush=True)


def _user_turn(
    prompt: str, counts: int | dict[str, int], processor: Any = None
) -> list[dict[str, str]]:
    """A one-turn conversation; a modality whose placeholder the prompt lacks gets its items
    before the question, one placeholder each (``<image>``, ``<audio>``…, as the model's
    processor names them), images first."""
    if isinstance(counts, int):
        counts = {"image": counts}
    marks = {"image": "<image>"}
    if processor is not None:
        marks.update({m: spec.placeholder for m, spec in processor.modalities.items()})
    prefix = "".join(f"{marks[m]}\n" * n for m, n in counts.items() if n and marks[m] not in prompt)
    return [{"role": "user", "text": prefix + prompt}]


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
    t2i_options = {
        "judge_dir": args.judge,
        "clip_dir": args.clip,
        "prompt_template": args.prompt_template,
    }
    flags = {"judge_dir": "--judge", "clip_dir": "--clip", "prompt_template": "--prompt-template"}
    named = [flags[k] for k, v in t2i_options.items() if v is not None]
    if named and task != "t2i":
        raise CommandError(f"{', '.join(named)} applies to --task t2i, not {task}")
    if task == "lm":
        metrics = _eval_lm(model_dir, config, Path(args.data))
    elif task == "t2i":
        from mmgpt.eval.t2i import run_t2i_eval

        if args.max_new_tokens is not None:
            raise CommandError("--max-new-tokens applies to --task caption and vqa, not t2i")
        options = {"batch_size": args.batch_size, "limit": args.limit, **t2i_options}
        options = {k: v for k, v in options.items() if v is not None}
        metrics = run_t2i_eval(model_dir, args.data, **options)
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


def cmd_quantize(args: argparse.Namespace) -> int:
    from mmgpt.pretrained import quantize_directory

    report = quantize_directory(_model_dir(args.model), args.out, args.method, args.group_size)
    print(json.dumps(report, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _target("plan")
    extra: dict[str, Any] = {"flops": args.flops} if args.flops is not None else {}
    if args.overrides:
        extra["overrides"] = args.overrides
    _print_result(plan(args.recipe, gpus=args.gpus, gpu_memory=args.gpu_memory, **extra))
    return 0


# -- parser --------------------------------------------------------------------------------
def _checked(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str, unparsed: str
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, refused unless ``ok`` (nan fails every
    comparison, so the float checks also refuse it)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsed}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v > 0, "a positive integer", "a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0", "an integer >= 0")
_nonnegative_float = _checked(float, lambda v: v >= 0, "a number >= 0", "a number")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a finite number > 0", "a number")
_finite_float = _checked(float, lambda v: abs(v) < float("inf"), "a finite number", "a number")


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
    p.add_argument(
        "--input",
        metavar="MODALITY=PATH",
        action="append",
        default=[],
        help="input of any modality with a loader, e.g. audio=tone.wav (repeatable; a bare "
        "PATH: the modality from its extension)",
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
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a static KV cache and a torch.compile'd step (first call compiles)",
    )
    p.add_argument(
        "--draft-model",
        metavar="DIR",
        help="speculative decoding with this smaller model (same tokenizer; text models)",
    )
    p.add_argument(
        "--draft-tokens",
        metavar="K",
        type=_positive_int,
        help="tokens the draft model proposes per round (default 4)",
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
    p.add_argument(
        "--judge",
        metavar="DIR",
        help="t2i on an imagefolder: a judge from `mmgpt train judge` scores the drawings",
    )
    p.add_argument(
        "--clip",
        metavar="DIR",
        help="t2i on an imagefolder: a local CLIPModel + CLIPProcessor directory (CLIP score)",
    )
    p.add_argument(
        "--prompt-template",
        metavar="TEXT",
        help="t2i on an imagefolder: the drawing prompt around {text} (default: the one the "
        "model's training run used)",
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

    p = sub.add_parser(
        "quantize",
        parents=[debug],
        help="write a weight-only int8/int4 copy of a model (faster decoding, less memory)",
    )
    p.add_argument("--model", metavar="DIR", required=True, help="model directory (float)")
    p.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    p.add_argument(
        "--method",
        choices=("int8", "int4"),
        required=True,
        help="int8: one scale per output row; int4: a scale and minimum per group",
    )
    p.add_argument(
        "--group-size",
        type=_positive_int,
        metavar="N",
        help="int4 only: input features per group, 32, 64, 128 or 256 (default 128)",
    )
    p.set_defaults(func=cmd_quantize)

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
    if not debug:
        # peft and diffusers import bitsandbytes whenever it is installed, and on import it
        # tries to fetch a CPU kernel from the Hub that mmgpt never uses: offline, that is a
        # warning on every command. The command line keeps it quiet; --debug shows it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except _expected_errors() as exc:
        if debug:
            raise
        print(f"mmgpt: error: {_error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
