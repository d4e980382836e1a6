"""Recipes: YAML files that name registry entries and set their arguments, and the runners
that train what they describe. See :mod:`mmgpt.recipe.spec` for the format."""

from mmgpt.recipe.build import (
    build_model,
    build_multimodal_model,
    build_tokenizer,
    conversation_text,
    trainable_parts,
)
from mmgpt.recipe.run import main, run_training
from mmgpt.recipe.spec import (
    apply_overrides,
    load_recipe,
    parse_scalar,
    recipe_names,
    validate_recipe,
)

__all__ = [
    "apply_overrides",
    "build_model",
    "build_multimodal_model",
    "build_tokenizer",
    "conversation_text",
    "load_recipe",
    "main",
    "parse_scalar",
    "recipe_names",
    "run_training",
    "trainable_parts",
    "validate_recipe",
]
