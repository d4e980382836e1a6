"""Running a recipe: one small runner per flavour over one trainer set-up.

- :func:`run_text`: a text GPT (``lm`` and text fine-tuning);
- :func:`run_multimodal`: a :class:`~mmgpt.multimodal.MultimodalGPT` (caption, vqa, t2i,
  shapes-tiny) and, through the same runner, the RLHF recipes (reward, dpo, ppo), whose
  objectives build their own trainer (:class:`~mmgpt.interfaces.BuildsTrainer`);
- :func:`run_judge`: an image judge on labelled images (``mmgpt train judge``);
- :func:`run_autoencoder`: an image autoencoder on the images of image data (``mmgpt train
  autoencoder``), by an objective that builds its trainer.

Both share :func:`_prepare` (recipe, overrides, validation, the output folder) and
:func:`_fit` (the trainer an objective asks for, then ``fit``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmgpt import distributed
from mmgpt.adapters.training import apply_adapter
from mmgpt.checkpoint import list_checkpoints
from mmgpt.data.errors import DataError
from mmgpt.data.sample import count_drawing_samples, describe_dataset
from mmgpt.eval.judge_training import build_judge_parts
from mmgpt.files import exclusive_lock
from mmgpt.interfaces import BuildsTrainer, Tokenizer
from mmgpt.multimodal import MultimodalGPT
from mmgpt.recipe.build import (
    TOKENIZER_DIR,
    build_autoencoder,
    build_model,
    build_multimodal_model,
    build_tokenizer,
    context_length,
    data_path_arg,
    dataset_kwargs,
    default_corpus,
    factory_default,
    fit_vocabulary,
    make_dataset,
    multimodal_data_source,
    multimodal_tokenizer,
    split_dataset,
    trainable_parts,
)
from mmgpt.recipe.spec import (
    DATA_PATH_ARGS,
    MULTIMODAL_DATA_KEYS,
    STAGE_KEYS,
    apply_overrides,
    factory_parameters,
    flatten_keys,
    load_recipe,
    override_keys,
    recipe_architecture,
    recipe_names,
    record_recipe,
    validate_recipe,
)
from mmgpt.recipe.stages import run_stages, stage_recipes
from mmgpt.registry import create, get
from mmgpt.trainer import TrainConfig, Trainer, check_no_checkpoints, seed_everything

__all__ = ["main", "run_autoencoder", "run_judge", "run_multimodal", "run_text", "run_training"]


# train keys that say how and where a run trains; the encoder_pretraining sub-run inherits them
RUN_SETTINGS = ("progress", "device", "tensorboard")


@dataclass
class Run:
    """A validated recipe and where its run goes."""

    spec: dict[str, Any]
    train_config: TrainConfig
    stage: dict[str, Any]  # multimodal recipes: train.stage / train.train_encoder
    out_dir: Path
    resume: bool
    explicit: frozenset[str]  # the dotted keys the user set (overrides, --model, ...)
    stages: list[tuple[str, dict[str, Any]]]  # a curriculum's (name, recipe), in order


def run_training(
    recipe: str | os.PathLike | Mapping[str, Any],
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Train what ``recipe`` describes; the function behind ``mmgpt train``.

    Args:
        recipe: a shipped recipe name (``"lm"``), a YAML path, or a recipe mapping.
        data: training data; sets the dataset's ``paths``/``path``/``root`` argument.
        out: output directory (default ``runs/<recipe name>``).
        resume: continue from the newest valid checkpoint in ``out``.
        overrides: ``["train.lr=1e-3", ...]`` or ``{"train.lr": "1e-3"}``.

    Returns ``{"out_dir", "model_dir", "step", "train", "eval"}`` (last metrics).
    """
    run = _prepare(recipe, out, resume, overrides)
    # one run per folder: taken before the recipe and tokenizer are written there
    lock = exclusive_lock(run.out_dir) if distributed.env_world().rank == 0 else nullcontext()
    with lock:
        if run.stages:
            return run_stages(run, run_training, data)
        if recipe_architecture(run.spec) == "multimodal":
            return run_multimodal(run, data)
        if recipe_architecture(run.spec) == "judge":
            return run_judge(run, data)
        if recipe_architecture(run.spec) == "autoencoder":
            return run_autoencoder(run, data)
        return run_text(run, data)


def _prepare(
    recipe: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike | None,
    resume: bool,
    overrides: Sequence[str] | Mapping[str, Any],
) -> Run:
    name = "recipe" if isinstance(recipe, Mapping) else Path(recipe).stem
    spec = apply_overrides(load_recipe(recipe), overrides)
    validate_recipe(spec)
    stages = stage_recipes(spec)  # every stage's keys are checked before anything trains
    train_section = dict(spec["train"])
    stage = {k: train_section.pop(k) for k in STAGE_KEYS if k in train_section}
    train_config = TrainConfig.from_dict(train_section)
    # under torchrun: join the process group now, so that one rank alone trains the tokenizer
    distributed.setup(train_config.strategy, train_config.device)
    out_dir = Path(out) if out is not None else Path("runs") / name
    if not resume:  # before anything is written there (recipe, tokenizer)
        check_no_checkpoints(out_dir)
    return Run(spec, train_config, stage, out_dir, resume, override_keys(overrides), stages)


def _fit(
    run: Run,
    model: nn.Module,
    train_data: Any,
    eval_data: Any,
    *,
    collate_fn: Any = None,
    tokenizer: Tokenizer | None = None,
    truncation: bool = False,
) -> dict[str, Any]:
    """The one trainer set-up: the objective's own trainer when it builds one (reward, DPO,
    PPO: a reward head, cached references, rollouts), else the plain :class:`Trainer`."""
    section = dict(run.spec["objective"])
    objective = create("objective", section.pop("name"), **section)
    check_data = getattr(objective, "check_data", None)
    if callable(check_data):  # e.g. diffusion: data without drawing samples stops here
        check_data(train_data)
    if isinstance(objective, BuildsTrainer):
        trainer = objective.build_trainer(
            model,
            train_data,
            run.train_config,
            eval_data=eval_data,
            out_dir=run.out_dir,
            truncation=truncation,
        )
    else:
        trainer = Trainer(
            model,
            objective,
            train_data,
            run.train_config,
            eval_data=eval_data,
            collate_fn=collate_fn,
            out_dir=run.out_dir,
            tokenizer=tokenizer,
        )
    result = trainer.fit(resume=run.resume)
    return {"out_dir": str(run.out_dir), **result}


def run_text(run: Run, data: str | os.PathLike | None = None) -> dict[str, Any]:
    """A text GPT: tokenizer (trained, loaded, or the model's own), model, text dataset."""
    spec, out_dir = run.spec, run.out_dir
    model_from = spec["model"].get("from")
    # a model the run starts from loads first: settings it cannot take fail before any write
    pretrained = build_model(dict(spec["model"]), explicit=run.explicit) if model_from else None
    out_dir.mkdir(parents=True, exist_ok=True)
    data_section = dict(spec["data"])
    dataset_name = data_section.pop("name")
    factory = get("dataset", dataset_name)
    if data is not None:
        data_section[data_path_arg(factory)] = str(data)
    path_arg = next((k for k in DATA_PATH_ARGS if data_section.get(k) is not None), None)
    if path_arg is None and "paths" in (factory_parameters(factory) or {"paths"}):
        corpus = default_corpus()
        if not corpus.is_dir():
            raise ValueError(f"no training data: pass --data PATH ({corpus} is not installed)")
        data_section["paths"] = str(corpus)
        path_arg = "paths"
    spec["data"] = {"name": dataset_name, **data_section}
    record_recipe(out_dir / "recipe.yaml", spec, run.resume)

    # tokenizer: a resumed run reuses the one it trained, so ids cannot change under it
    saved_tokenizer = out_dir / TOKENIZER_DIR
    tok_section = dict(spec["tokenizer"])
    if run.resume and (saved_tokenizer / "tokenizer.json").is_file() and tok_section.get("name"):
        tokenizer = create("tokenizer", tok_section["name"], path=str(saved_tokenizer))
    elif tok_section or model_from:
        data_paths = data_section[path_arg] if path_arg is not None else None

        def make_tokenizer() -> Any:
            made = build_tokenizer(tok_section, data_paths=data_paths, model_from=model_from)
            made.save(saved_tokenizer)
            return made

        tokenizer = distributed.on_main_process(make_tokenizer)
    else:
        tokenizer = None

    seed_everything(run.train_config.seed)  # model init is part of the reproducible run
    if pretrained is not None:
        model = (
            pretrained if tokenizer is None else fit_vocabulary(pretrained, tokenizer, model_from)
        )
    else:
        model = build_model(dict(spec["model"]), tokenizer)
    apply_adapter(model, spec.get("adapter"), out_dir=out_dir)  # then only it (+ extras) trains

    context = {"tokenizer": tokenizer, "block_size": context_length(spec["model"], model)}
    train_data = factory(**dataset_kwargs(factory, data_section, {**context, "split": "train"}))
    eval_data = None
    params = factory_parameters(factory)
    wants_eval = data_section.get("eval_fraction", factory_default(factory, "eval_fraction", True))
    if (params is None or "split" in params) and wants_eval:
        eval_data = factory(**dataset_kwargs(factory, data_section, {**context, "split": "eval"}))
    return _fit(
        run,
        model,
        train_data,
        eval_data,
        collate_fn=getattr(train_data, "collate_fn", None),
        tokenizer=tokenizer,
    )


def _image_data(
    run: Run, data: str | os.PathLike | None
) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """The image-text dataset of a run (``--data`` picks the file format) built once, so bad
    data fails before anything is written; then the resolved recipe is recorded. Returns the
    dataset, its registry name and arguments, and the recipe's own data keys
    (``eval_fraction``, ``truncation``)."""
    data_section = dict(run.spec["data"])
    own = {k: data_section.pop(k) for k in MULTIMODAL_DATA_KEYS if k in data_section}
    dataset_name, dataset_args = multimodal_data_source(data_section, data)
    run.spec["data"] = {"name": dataset_name, **dataset_args, **own}
    dataset = make_dataset(dataset_name, dataset_args, None)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    record_recipe(run.out_dir / "recipe.yaml", run.spec, run.resume)
    return dataset, dataset_name, dataset_args, own


def run_multimodal(run: Run, data: str | os.PathLike | None = None) -> dict[str, Any]:
    """A multimodal model (``model.architecture: multimodal``): image-text data, the stage's
    trainable parts, and the RLHF objectives."""
    spec, out_dir = run.spec, run.out_dir
    parts = trainable_parts(run.stage.get("stage"), run.stage.get("train_encoder"))
    dataset, dataset_name, dataset_args, own = _image_data(run, data)

    model_section = dict(spec["model"])
    pretrained_encoder = pretrain_encoder(run, data)
    if pretrained_encoder is not None:
        model_section["encoder"] = {**model_section["encoder"], "from": str(pretrained_encoder)}
    if model_section.get("from"):
        if spec["tokenizer"].get("from"):
            raise ValueError(
                "model.from brings the model's own tokenizer; remove tokenizer.from "
                f"(got {spec['tokenizer']['from']!r})"
            )
        tokenizer = None
    else:
        tokenizer = distributed.on_main_process(
            multimodal_tokenizer, spec["tokenizer"], dataset, out_dir, run.resume
        )
    seed_everything(run.train_config.seed)  # model init is part of the reproducible run
    model = build_multimodal_model(
        model_section, tokenizer, tokenizer_section=spec["tokenizer"], explicit=run.explicit
    )
    model.trainable(parts)
    apply_adapter(model, spec.get("adapter"), out_dir=out_dir)  # it decides what trains

    encoder = dict(model.encoders.items()).get("image")
    input_size = getattr(encoder, "input_size", None)
    if input_size and "image_size" in dataset_args and dataset_args["image_size"] is None:
        dataset = make_dataset(dataset_name, dataset_args, input_size[-1])
    train_data, eval_data = split_dataset(dataset, own.get("eval_fraction", 0.02))
    _check_drawings_have_a_decoder(model, train_data)
    truncation = bool(own.get("truncation", False))
    # samples may fill the model's whole context (a pretrained model's chat template adds to
    # every sample) unless the user set model.block_size: then that is the window
    window = {}
    if "model.block_size" in run.explicit:
        window["max_length"] = context_length(model_section, model.gpt)
    return _fit(
        run,
        model,
        train_data,
        eval_data,
        collate_fn=model.processor(truncation=truncation, **window),
        truncation=truncation,
    )


def pretrain_encoder(run: Run, data: str | os.PathLike | None = None) -> Path | None:
    """The ``encoder_pretraining`` section: train the recipe's encoder first with another
    recipe (e.g. ``clip``) on the same data, into ``OUT/encoder_pretraining``, and return its
    model directory, which ``model.encoder.from`` then starts this run's encoder from.

    The stage trains exactly this recipe's encoder (its ``model.encoder`` is imposed on the
    stage), so the weights fit. A finished stage is reused on resume and an interrupted one
    resumes; ``model.encoder.from`` set by the user skips the stage.
    """
    section = run.spec.get("encoder_pretraining")
    if not section:
        return None
    model = run.spec["model"]
    encoder = model.get("encoder")
    if model.get("from") or not isinstance(encoder, Mapping):
        raise ValueError(
            "encoder_pretraining trains model.encoder before this run; it needs a model built "
            "from a preset with a model.encoder (not model.from)"
        )
    if encoder.get("from"):
        print(f"model.encoder.from={encoder['from']}: encoder_pretraining skipped", flush=True)
        return None
    if not section.get("recipe"):
        raise ValueError("recipe key 'encoder_pretraining.recipe' names the recipe to run (clip)")
    overrides = section.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(
            f"recipe key 'encoder_pretraining.overrides' must be a mapping of recipe keys, e.g. "
            f"{{train: {{max_steps: 1500}}}}, got {overrides!r}"
        )
    given = flatten_keys(overrides)  # nested or dotted, as dotted keys
    stage = apply_overrides(load_recipe(section["recipe"]), given)
    # how and where this run trains (not what it learns) holds for its sub-run too, unless
    # the section sets it: `train.progress=false` on the command line silences both
    ours = run.spec.get("train") or {}
    for key in RUN_SETTINGS:
        if key in ours and f"train.{key}" not in given:
            stage["train"][key] = ours[key]
    stage["model"]["encoder"] = {k: v for k, v in encoder.items() if k != "from"}
    out = run.out_dir / "encoder_pretraining"
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        print(f"{model_dir}: encoder_pretraining done before; its encoder is reused", flush=True)
        return model_dir
    print(f"encoder_pretraining: {section['recipe']} into {out}", flush=True)
    resume = bool(list_checkpoints(out / "checkpoints"))  # an interrupted stage continues
    return Path(run_training(stage, data=data, out=out, resume=resume)["model_dir"])


def run_judge(run: Run, data: str | os.PathLike | None = None) -> dict[str, Any]:
    """An image judge (``model.architecture: judge``) on an imagefolder's labels
    (:mod:`mmgpt.eval.judge_training`); ``out/model`` holds the judge and its held-out
    accuracy, which the result repeats."""
    if run.spec.get("adapter"):
        raise ValueError("a judge recipe trains the whole judge; remove the adapter section")
    parts = build_judge_parts(run.spec, data, run.train_config.seed)  # bad data: before writes
    run.spec["data"] = {"name": run.spec["data"]["name"], **parts.data_section}
    run.out_dir.mkdir(parents=True, exist_ok=True)
    record_recipe(run.out_dir / "recipe.yaml", run.spec, run.resume)
    seed_everything(run.train_config.seed)
    trainer = Trainer(
        parts.model,
        parts.objective,
        parts.train_data,
        run.train_config,
        eval_data=parts.eval_data,
        out_dir=run.out_dir,
        save_model_fn=parts.save_fn,
    )
    result = trainer.fit(resume=run.resume)
    saved = json.loads((Path(result["model_dir"]) / "judge.json").read_text(encoding="utf-8"))
    return {"out_dir": str(run.out_dir), **result, "heldout_accuracy": saved["heldout_accuracy"]}


def run_autoencoder(run: Run, data: str | os.PathLike | None = None) -> dict[str, Any]:
    """An image autoencoder (``model.architecture: autoencoder``) on the images of image-text
    data; its objective builds the trainer (image batches, the model's own directory format)."""
    spec = run.spec
    for section in ("tokenizer", "adapter"):
        if spec.get(section):
            raise ValueError(
                f"an autoencoder recipe has no {section}; remove its {section} section"
            )
    objective = spec["objective"]["name"]
    if not hasattr(get("objective", objective), "build_trainer"):
        raise ValueError(
            f"recipe key 'objective.name': {objective!r} trains token models; an autoencoder "
            "recipe needs an objective for image batches (e.g. autoencoder)"
        )
    dataset, _, _, own = _image_data(run, data)
    seed_everything(run.train_config.seed)  # model init is part of the reproducible run
    model = build_autoencoder(spec["model"])
    train_data, eval_data = split_dataset(dataset, own.get("eval_fraction", 0.02))
    return _fit(run, model, train_data, eval_data)


def _check_drawings_have_a_decoder(model: MultimodalGPT, data: Any) -> None:
    """Samples that ask the model to draw need a model that draws: say so before training,
    not at the first batch that holds one."""
    if model.image_decoder is not None:
        return
    found = count_drawing_samples(data)
    if found is not None and found.drawing:
        raise DataError(
            f"{describe_dataset(data)}: {found.drawing} of {found.checked} samples ask the model "
            "to draw an image (an assistant turn holds <image>), but this recipe's model has no "
            "image decoder; train them with a drawing recipe (mmgpt train t2i) or remove them",
            reason="drawing_without_decoder",
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmgpt.recipe RECIPE [--data PATH] [--out DIR] [--resume] [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mmgpt.recipe", description="Train what a recipe describes."
    )
    parser.add_argument(
        "recipe", help=f"a shipped recipe ({', '.join(recipe_names())}) or a YAML file"
    )
    parser.add_argument("--data", help="training data (glob, directory or file)")
    parser.add_argument("--out", help="output directory (default runs/RECIPE)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-3")
    args = parser.parse_intermixed_args(argv)
    result = run_training(
        args.recipe, data=args.data, out=args.out, resume=args.resume, overrides=args.overrides
    )
    print(json.dumps(result, indent=2, default=str))
    return 0
