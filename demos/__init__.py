"""Gradio demos of mmgpt: inference only, no training code.

- :mod:`demos.chat` — multimodal chat: images in, text and images out, streamed (a text-only
  language model gets the same chat, text only).
- :mod:`demos.text_to_image` — a prompt → a gallery of images with their seeds.
- :mod:`demos.preferences` — pick the better of two sampled answers; pairs go to a
  preference JSONL that the RLHF recipes read.

Start them with ``mmgpt demo`` or :func:`mmgpt.demo.launch_demo`; each app module also runs
as ``python -m demos.<app> --model DIR``. :mod:`demos.common` holds what the apps share: the
model wrapper, input checks with their limits, and generation settings.
"""
