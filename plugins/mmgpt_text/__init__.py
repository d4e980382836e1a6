"""mmgpt_text: the text modality of mmgpt — byte-level BPE over Hugging Face ``tokenizers``.

Importing this package registers the tokenizer ``"bpe"``:
``create("tokenizer", "bpe", path=DIR)`` loads one (an mmgpt tokenizer, or a pretrained
model's Hugging Face tokenizer directory with its special tokens, chat template and stop ids),
and ``create("tokenizer", "bpe", files=[...], vocab_size=N)`` trains one.
"""

from __future__ import annotations

from pathlib import Path

from mmgpt_text.chat_template import ChatTemplateError, render_chat_template
from mmgpt_text.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    TextTokenizer,
    create_bpe_tokenizer,
    signal_token_names,
)


def example_corpus_files() -> list[Path]:
    """The small English example corpus shipped in ``mmgpt/assets/corpus`` (sorted paths)."""
    from importlib.resources import files

    corpus = Path(str(files("mmgpt") / "assets" / "corpus"))
    return sorted(corpus.glob("*.txt"))


__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "ChatTemplateError",
    "TextTokenizer",
    "create_bpe_tokenizer",
    "example_corpus_files",
    "render_chat_template",
    "signal_token_names",
]
