"""Curricula: a recipe's ``stages`` section trains the recipe several times in order, each
stage starting from the whole model the stage before it trained.

.. code-block:: yaml

    stages:                   # in this order; the last one writes OUT/model
      reading: {data: {task_weights: {caption: 1, vqa: 0, t2i: 0.03}}, train: {max_steps: 2400}}
      everything: {}          # the recipe as written

- Each stage is the recipe with the stage's keys set on top of it, key by key (a mapping such
  as ``data.task_weights`` merges into the recipe's, so name every task it weighs).
- A stage after the first starts from the previous stage's model directory (``model.from``):
  tokenizer, encoder, projector, GPT and decoders all carry over, and the stage trains them
  on with its own learning-rate schedule. The recipe's ``encoder_pretraining`` runs once,
  before the first stage.
- The earlier stages train into ``OUT/stages/NAME``, the last one into ``OUT``; each writes
  its own resolved ``recipe.yaml`` and ``OUT/stages/recipe.yaml`` holds the whole recipe,
  stages included. A finished stage is reused and an interrupted one resumes, so running the
  command again (or with ``--resume``) continues where it stopped. A finished stage is reused
  even if its keys changed since; the run warns, naming them.

``encoder_pretraining`` hands on only an encoder, trained by another recipe; stages hand on
everything, trained by this one: a curriculum (captions first, then questions and drawings,
as LLaVA aligns on captions before instruction tuning).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.checkpoint import list_checkpoints
from mmgpt.recipe.spec import (
    apply_overrides,
    changed_recipe_keys,
    flatten_keys,
    recipe_architecture,
    record_recipe,
    validate_recipe,
)

if TYPE_CHECKING:
    from mmgpt.recipe.run import Run

STAGES_DIR = "stages"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def stage_recipes(spec: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, recipe)`` of each stage of ``spec``, in order, each checked like a recipe (a bad
    key names its stage) before anything trains. Empty when the recipe has no stages."""
    stages = spec.get("stages") or {}
    if not stages:
        return []
    if recipe_architecture(spec) != "multimodal":
        raise ValueError(
            "recipe section 'stages' needs model.architecture=multimodal (each stage starts "
            "from the previous stage's whole model)"
        )
    base = {**spec, "stages": {}}
    recipes = []
    for name, body in stages.items():
        if not _NAME.fullmatch(str(name)):
            raise ValueError(
                f"recipe key 'stages.{name}': a stage name is a folder name of letters, digits, "
                "'_' and '-' (its run goes to OUT/stages/NAME)"
            )
        if not isinstance(body, Mapping):
            raise ValueError(
                f"recipe key 'stages.{name}' must be a mapping of recipe keys, e.g. "
                f"{{train: {{max_steps: 2000}}}} ({{}} for the recipe as written), got {body!r}"
            )
        if body.get("stages"):
            raise ValueError(f"recipe key 'stages.{name}.stages': stages do not nest")
        try:
            stage = apply_overrides(base, flatten_keys(body)) if body else dict(base)
            validate_recipe(stage)
        except ValueError as exc:
            raise ValueError(f"recipe key 'stages.{name}': {exc}") from None
        recipes.append((str(name), stage))
    return recipes


def run_stages(
    run: Run, train: Callable[..., dict[str, Any]], data: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Train ``run.stages`` (checked by :func:`stage_recipes`) one after another with ``train``
    (``run_training``); the last stage's result is the run's."""
    recipes, out_dir, resume = run.stages, run.out_dir, run.resume
    (out_dir / STAGES_DIR).mkdir(parents=True, exist_ok=True)
    record_recipe(out_dir / STAGES_DIR / "recipe.yaml", run.spec, resume)
    previous: Path | None = None
    result: dict[str, Any] = {}
    for i, (name, stage) in enumerate(recipes):
        last = i == len(recipes) - 1
        if previous is not None:  # the whole model carries over; its encoder was pretrained
            stage["model"] = {**stage["model"], "from": str(previous)}
            stage["encoder_pretraining"] = {}
        where = out_dir if last else out_dir / STAGES_DIR / name
        model_dir = where / "model"
        if not last and (model_dir / "config.json").is_file():
            print(
                f"stage {name}: done before ({model_dir}); the next stage starts from it",
                flush=True,
            )
            _warn_if_changed(name, where / "recipe.yaml", stage)
            previous = model_dir
            continue
        again = resume if last else bool(list_checkpoints(where / "checkpoints"))
        print(f"stage {i + 1}/{len(recipes)} {name}: into {where}", flush=True)
        result = train(stage, data=data, out=where, resume=again)
        previous = Path(result["model_dir"])
    return {**result, "stages": [name for name, _ in recipes]}


def _warn_if_changed(name: str, recorded: Path, stage: Mapping[str, Any]) -> None:
    """A finished stage is reused whatever the recipe says now: say so when the stage's
    recipe changed since it trained (its keys), so that an edited stage is not mistaken for
    a trained one."""
    changed = changed_recipe_keys(recorded, stage)
    if changed:
        warnings.warn(
            f"stage {name}: reusing the model it trained before, though its recipe changed since "
            f"({', '.join(changed)}); delete {recorded.parent} to train it again",
            RuntimeWarning,
            stacklevel=3,
        )
