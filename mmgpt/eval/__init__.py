"""Evaluation: perplexity, caption/VQA accuracy, text-to-image judging."""

from mmgpt.eval import caption, judge, metrics, perplexity, t2i, vqa  # noqa: F401
from mmgpt.eval.run import run_eval  # noqa: F401
