"""Text-to-image on the user's own data, through the command line: an imagefolder of drawn
images (greyscale, RGBA, different sizes) and LLaVA conversations whose assistant turn holds
the image train drawings, data without drawing samples stops before training, and the trained
model draws with ``mmgpt generate``'s default arguments (a context of 64 positions)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

pytest.importorskip("diffusers")
pytest.importorskip("timm")
pytest.importorskip("mmgpt_text")

from mmgpt.cli import main

SIZE = 16  # the decoder's image size in these runs
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 225)}
KINDS = ("circle", "square", "triangle")
CANVASES = [(40, 40), (64, 48), (30, 50), (90, 70)]
# tiny settings: a few steps of a smaller UNet at 16 px, every step logged, nothing held out
SMALL = [
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "data.eval_fraction=0",
    f"model.image_decoder.image_size={SIZE}",
    "model.image_decoder.unet_config.block_out_channels=[8,16]",
]


def draw_shape(kind: str, colour: str, canvas: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", canvas, (245, 245, 240))
    w, h = canvas
    r = min(w, h) // 3
    box = (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif kind == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (w // 2, box[1])], fill=COLOURS[colour])
    return image


def write_images(directory) -> list[tuple[str, str]]:
    """Nine drawn images, ``(file name, caption)``: RGB, greyscale and RGBA (transparent
    background) PNGs and a JPEG, of four sizes."""
    (directory / "images").mkdir(parents=True)
    rows = []
    for i, (kind, colour) in enumerate((k, c) for k in KINDS for c in COLOURS):
        image = draw_shape(kind, colour, CANVASES[i % len(CANVASES)])
        name = f"images/{i:02d}_{colour}_{kind}"
        if i % 3 == 1:  # greyscale
            image.convert("L").save(directory / f"{name}.png")
            name += ".png"
        elif i % 3 == 2:  # transparent background, the shape opaque
            rgba = image.convert("RGBA")
            rgba.putdata([(*p[:3], 0 if p[:3] == (245, 245, 240) else 255) for p in rgba.getdata()])
            rgba.save(directory / f"{name}.png")
            name += ".png"
        elif i == 3:
            image.save(directory / f"{name}.jpg", quality=95)
            name += ".jpg"
        else:
            image.save(directory / f"{name}.png")
            name += ".png"
        rows.append((name, f"a {colour} {kind}"))
    return rows


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("my_images")
    rows = write_images(root)
    lines = [json.dumps({"file_name": name, "text": caption}) for name, caption in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train_lines(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["split"] == "train"]


@pytest.fixture(scope="module")
def trained(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "my-t2i"
    argv = ["train", "t2i", "--data", str(imagefolder), "--out", str(out)]
    code = main([*argv, *SMALL, "train.max_steps=12", "data.prompt_template=draw {text}"])
    assert code == 0
    return out


def test_an_imagefolder_trains_drawings_with_the_t2i_recipe(trained) -> None:
    lines = train_lines(trained)
    assert [line["step"] for line in lines] == list(range(1, 13))
    # every batch held drawing samples: the decoder trained at every step
    assert all(line["images"] == 4 and line["diffusion_loss"] > 0 for line in lines)
    assert all(line["tokens_per_s"] > 0 for line in lines)  # multimodal batches count tokens
    assert lines[-1]["lm_loss"] < lines[0]["lm_loss"]  # it learned to answer with [IMG0]..
    recorded = yaml.safe_load((trained / "recipe.yaml").read_text())["data"]
    assert recorded["name"] == "imagefolder" and recorded["task"] == "t2i"
    assert recorded["prompt_template"] == "draw {text}"


def test_a_decoder_stage_trains_only_the_drawing_side(trained, imagefolder, tmp_path) -> None:
    # train.stage=decoder (NExT-GPT's decoding-side alignment): the output projector and the
    # UNet learn on the frozen GPT's signal states; the GPT, encoder and projector are carried
    # over bit for bit, so the stage cannot unlearn any language
    from mmgpt.files import load_tensors

    out = tmp_path / "decoder"
    argv = ["train", "t2i", "--data", str(imagefolder), "--out", str(out)]
    stage = ["train.stage=decoder", "objective.lm_weight=0", f"model.from={trained / 'model'}"]
    assert main([*argv, *SMALL, *stage, "train.max_steps=3"]) == 0
    lines = train_lines(out)
    assert len(lines) == 3 and all(line["diffusion_loss"] > 0 for line in lines)
    before = load_tensors(trained / "model" / "model.safetensors")
    after = load_tensors(out / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"image_decoder", "output_projector"}


def test_generate_with_default_arguments_draws_a_png_of_the_decoder_size(
    trained, tmp_path, capsys
) -> None:
    model = yaml.safe_load((trained / "recipe.yaml").read_text())["model"]
    assert model["block_size"] == 64  # the old default of 64 new tokens left no room here
    torch.manual_seed(0)
    drawings = tmp_path / "drawings"
    argv = ["generate", "--model", str(trained / "model"), "--prompt", "draw a red circle"]
    code = main([*argv, "--out-dir", str(drawings)])
    out, err = capsys.readouterr()
    assert code == 0, err
    png = drawings / "image_0.png"
    assert str(png) in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (SIZE, SIZE) and image.mode == "RGB"
    # an explicit value that leaves no room stays a clear error
    code = main([*argv, "--max-new-tokens", "64"])
    assert code == 2
    assert "max_new_tokens=64 leaves no room for a prompt" in capsys.readouterr().err


def test_llava_conversations_whose_assistant_turn_holds_the_image_train_drawings(
    tmp_path,
) -> None:
    rows = write_images(tmp_path)
    records = [
        {
            "id": str(i),
            "image": name,
            "conversations": [
                {"from": "human", "value": f"please draw {caption}"},
                {"from": "gpt", "value": "Here it is: <image>"},
            ],
        }
        for i, (name, caption) in enumerate(rows)
    ]
    (tmp_path / "draw.json").write_text(json.dumps(records, indent=1))
    out = tmp_path / "run"
    argv = ["train", "t2i", "--data", str(tmp_path / "draw.json"), "--out", str(out)]
    assert main([*argv, *SMALL, "train.max_steps=2"]) == 0
    lines = train_lines(out)
    assert len(lines) == 2
    assert all(line["images"] == 4 and line["diffusion_loss"] > 0 for line in lines)
    assert all(line["tokens_per_s"] > 0 for line in lines)  # multimodal batches count tokens
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["name"] == "llava"


def test_data_without_drawing_samples_stops_before_training(imagefolder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "t2i", "--data", str(imagefolder), "--out", str(out)]
    assert main([*argv, *SMALL, "train.max_steps=2", "data.task=caption"]) == 2
    err = capsys.readouterr().err
    assert f"no drawing samples in {imagefolder}: none of its 9 samples" in err
    assert "data.task=t2i" in err and "assistant ('gpt') turn holds <image>" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()

    # LLaVA records that only ask about their image
    records = [
        {
            "image": "images/00_red_circle.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "a red circle"},
            ],
        }
    ] * 3
    (imagefolder / "questions.json").write_text(json.dumps(records))
    try:
        argv = ["train", "t2i", "--data", str(imagefolder / "questions.json"), "--out", str(out)]
        assert main([*argv, *SMALL, "train.max_steps=2"]) == 2
    finally:
        (imagefolder / "questions.json").unlink()
    assert "no drawing samples in " + str(imagefolder / "questions.json") in (
        capsys.readouterr().err
    )
    assert not (out / "metrics.jsonl").exists()


def test_drawing_samples_for_a_model_that_cannot_draw_stop_before_training(
    tmp_path, capsys
) -> None:
    rows = write_images(tmp_path)
    records = [
        {
            "image": name,
            "conversations": [
                {"from": "human", "value": f"please draw {caption}"},
                {"from": "gpt", "value": "<image>"},
            ],
        }
        for name, caption in rows
    ]
    (tmp_path / "draw.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    argv = ["train", "caption", "--data", str(tmp_path / "draw.json"), "--out", str(out)]
    assert main([*argv, "train.max_steps=2", "train.batch_size=2", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "draw.json" in err and "has no image decoder" in err and "mmgpt train t2i" in err
    assert not (out / "metrics.jsonl").exists()
