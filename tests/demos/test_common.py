"""The demos' model wrapper: input checks and their messages, context fitting, adapters, and
step-locked concurrency giving each request exactly its solo result."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from demos.common import (
    NO_ADAPTER,
    ImageLimits,
    Message,
    Settings,
    UserInputError,
    load_user_image,
    user_message,
)

GREEDY = Settings(temperature=0.0, max_new_tokens=12)


def test_wrong_file_types_and_unreadable_images_are_named(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UserInputError, match=r"'notes.txt' is not an image\. Upload a PNG"):
        load_user_image(notes)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is not a png")
    with pytest.raises(UserInputError, match=r"'fake.png' could not be read as an image"):
        load_user_image(fake)


def test_other_formats_are_refused_unparsed_whatever_their_name(tmp_path: Path) -> None:
    eps = tmp_path / "drawing.png"  # PostScript: never handed to PIL's EPS plugin
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(UserInputError, match=r"^'drawing.png' holds EPS data, not an image format"):
        load_user_image(eps)


def test_images_too_costly_to_decode_are_refused_from_their_header(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (400, 400)).save(rgba)  # 8 bytes a pixel to decode: 1.2 MB
    with pytest.raises(UserInputError, match=r"'rgba.png' \(400×400, mode RGBA\) would take more"):
        load_user_image(rgba, ImageLimits(max_decoded_bytes=2**20))
    assert load_user_image(rgba).size == (400, 400)  # the demo's default budget takes it


def test_huge_images_are_refused_and_large_ones_downscaled(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)  # 48 MP, a few KB
    with pytest.raises(UserInputError, match=r"8000×6000 pixels, above this demo's limit of 16"):
        load_user_image(huge)
    large = tmp_path / "large.png"
    Image.new("RGB", (3000, 1500), (200, 10, 10)).save(large)
    warnings: list[str] = []
    image = load_user_image(large, ImageLimits(max_side=1024), warnings.append)
    assert image.size == (1024, 512) and image.mode == "RGB"
    assert warnings == [
        "'large.png' (3000×1500) was downscaled to 1024×512 pixels (the limit is 1024 px on "
        "a side)."
    ]
    assert load_user_image(large, ImageLimits(max_side=4096), warnings.append).size == (3000, 1500)
    assert len(warnings) == 1


def test_user_messages_place_images_and_refuse_empty_or_mismatched() -> None:
    with pytest.raises(UserInputError, match="The message is empty"):
        user_message("   ", [])
    assert user_message("hi", ["a.png", "b.png"]).text == "<image>\n<image>\nhi"
    assert user_message("", ["a.png"]).text == "<image>\nDescribe the image."
    assert user_message("left <image> right", ["a.png"]).text == "left <image> right"
    with pytest.raises(UserInputError, match="mentions <image> 2 time"):
        user_message("<image> and <image>", ["a.png"])


def test_settings_are_validated_with_readable_messages() -> None:
    s = Settings.from_values("0.5", 0.9, 10.0, 2, "7", None)
    assert (s.temperature, s.max_new_tokens, s.steps, s.seed) == (0.5, 10, 7, -1)
    with pytest.raises(UserInputError, match="Temperature must be between 0 and 5"):
        Settings.from_values(temperature=9)
    with pytest.raises(UserInputError, match="Max new tokens must be a whole number"):
        Settings.from_values(max_new_tokens=2.5)
    with pytest.raises(UserInputError, match="Top-p must be a number"):
        Settings.from_values(top_p="much")
    assert 0 <= Settings(seed=-1).resolve_seed() < 2**31 and Settings(seed=3).resolve_seed() == 3


def test_context_fitting_drops_oldest_exchanges_then_refuses(demo_model, tiny) -> None:
    model = demo_model
    assert model.block_size == 96 and model.image_tokens == 16 and model.can_draw
    image = tiny.circle_image()
    path = tiny.dir.parent / "circle.png"
    image.save(path)
    old = [user_message("an old question", [str(path)]), Message("assistant", "an answer", [])]
    new = user_message(tiny.image_question, [str(path)])
    everything = [{"role": m.role, "text": m.text} for m in (*old, new)]
    full = model.prompt_length(everything, [image, image])
    warnings: list[str] = []
    turns, images = model.fit([*old, new], 96 - full, warnings.append)  # just fits
    assert turns == everything and len(images) == 2 and warnings == []
    turns, images = model.fit([*old, new], 96 - full + 1, warnings.append)  # one token over
    assert turns == [{"role": "user", "text": f"<image>\n{tiny.image_question}"}]
    assert len(images) == 1
    assert warnings == [
        "The conversation is longer than the model's context of 96 tokens: the oldest 2 "
        "message(s) were left out."
    ]
    with pytest.raises(UserInputError, match=r"needs \d+ tokens; each image takes 16, and the"):
        model.fit([user_message("word " * 90, [str(path)])], 8)
    with pytest.raises(UserInputError, match="must be below the model's context of 96"):
        model.fit([new], 96)


def test_concurrent_requests_interleave_yet_match_their_solo_results(demo_model, tiny) -> None:
    model = demo_model
    settings = Settings(temperature=4.0, top_p=1.0, max_new_tokens=10)  # varied answers
    turns = [{"role": "user", "text": "tell me a story"}]
    solo = {seed: model.reply(turns, [], settings, seed)[0] for seed in range(4)}
    assert len(set(solo.values())) > 1  # the seeds matter, so a mix-up would show
    results: dict[int, str] = {}
    adapter_results: dict[int, str] = {}

    def worker(seed: int) -> None:
        results[seed] = model.reply(turns, [], settings, seed)[0]
        adapter_results[seed] = model.reply(turns, [], settings, seed, tiny.adapter)[0]

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == solo
    # adapter steps interleaved with base steps: each request still saw its own weights
    assert adapter_results == {
        s: model.reply(turns, [], settings, s, tiny.adapter)[0] for s in range(4)
    }


def test_adapters_are_found_and_picked(demo_model, tiny) -> None:
    model = demo_model
    assert model.adapter_choices() == [NO_ADAPTER, tiny.adapter]
    turns = [{"role": "user", "text": tiny.text_question}]
    base = model.reply(turns, [], GREEDY, 0)[0]
    assert base == tiny.answer
    assert model.reply(turns, [], GREEDY, 0, tiny.adapter)[0] != base
    assert model.reply(turns, [], GREEDY, 0, NO_ADAPTER)[0] == base  # switching back works
    with pytest.raises(UserInputError, match="Unknown adapter 'nope'; choose one of: none, noisy"):
        model.reply(turns, [], GREEDY, 0, "nope")


def test_replies_carry_drawn_images(demo_model, tiny) -> None:
    turns = [{"role": "user", "text": tiny.draw_prompt}]
    text, images = demo_model.reply(turns, [], Settings(temperature=0.0, steps=2), 0)
    assert text == "<image_out>" and len(images) == 1 and images[0].size == (16, 16)
    drawn = demo_model.draw("draw a blue square", Settings(steps=2), 5)
    again = demo_model.draw("draw a blue square", Settings(steps=2), 5)
    assert drawn.tobytes() == again.tobytes()  # a seed redraws the same image
    with pytest.raises(UserInputError, match="The prompt is empty"):
        demo_model.draw("  ", Settings(steps=2), 5)


def test_a_broken_adapter_is_left_out_with_a_warning(tiny, tmp_path, caplog) -> None:
    import shutil

    from demos.common import DemoModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny.dir, model_dir)
    broken = model_dir / "adapters" / "broken"
    shutil.copytree(model_dir / "adapters" / tiny.adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with caplog.at_level("WARNING", logger="mmgpt.demo"):
        model = DemoModel.load(model_dir)
    assert model.adapter_choices() == [NO_ADAPTER, tiny.adapter]  # the base model still serves
    [record] = caplog.records
    assert record.getMessage().startswith(f"adapter {broken} not loaded: ")
