"""A LLaVA checkpoint (tiny, random, saved by transformers) served by the chat demo: the API
takes an image and answers with the model's own greedy reply."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")
pytest.importorskip("transformers")

from gradio_client import Client, handle_file
from PIL import Image

from mmgpt.generation import GenerationConfig
from mmgpt.hf_fixtures import build_llava_dir
from mmgpt.pretrained import load_model


def test_the_chat_serves_a_llava_checkpoint_with_images(demo_helpers, tmp_path) -> None:
    directory = build_llava_dir(tmp_path / "llava")
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    with demo_helpers.launched(directory, "chat") as app:
        client = Client(app.local_url, verbose=False)
        message = {"text": "What is in the picture?", "files": [handle_file(str(image))]}
        reply, images = client.predict(message, temperature=0.0, max_new_tokens=6, api_name="/chat")
    model = load_model(directory)
    conversation = [{"role": "user", "text": "<image>\nWhat is in the picture?"}]
    expected = model.generate(
        [conversation],
        [[Image.open(image).convert("RGB")]],
        GenerationConfig(max_new_tokens=6, temperature=0.0),
    ).texts[0]
    assert images == [] and reply and reply == expected.strip()
