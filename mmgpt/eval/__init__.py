"""Evaluation: perplexity, caption/VQA accuracy, text-to-image judging."""

from mmgpt.eval import perplexity  # noqa: F401
