"""The tagging objective: the shapes world's per-cell labels, the loss against per-label
cross-entropies written out, the heads' directory, the errors, and ``mmgpt train tagging``
end to end (an encoder that learns its labels, handed to another recipe with
``model.encoder.from``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmgpt.data.sample import Sample, Turn
from mmgpt.data.shapes import POSITIONS, ShapesWorld, cell_label_classes, cell_labels
from mmgpt.objectives.tagging import (
    TaggingBatch,
    TaggingModel,
    TaggingObjective,
    label_classes,
    sample_labels,
)
from mmgpt.processor import IGNORE_INDEX


def test_cell_labels_name_each_cells_shape_colour_and_size() -> None:
    scene = [
        {"shape": "star", "color": "red", "size": "small", "position": "top left"},
        {"shape": "circle", "color": "blue", "size": "large", "position": "center"},
    ]
    labels = cell_labels(scene)
    assert len(labels) == 27 and list(labels)[:3] == [
        "top left/shape",
        "top left/color",
        "top left/size",
    ]
    assert (labels["top left/shape"], labels["top left/color"], labels["top left/size"]) == (
        "star",
        "red",
        "small",
    )
    assert labels["center/shape"] == "circle" and labels["center/size"] == "large"
    empty = [p for p in POSITIONS if p not in ("top left", "center")]
    assert all(labels[f"{p}/{a}"] == "none" for p in empty for a in ("shape", "color", "size"))
    classes = cell_label_classes()
    assert list(classes) == list(labels)
    assert classes["top/shape"][0] == "none" and len(classes["top/shape"]) == 6
    assert len(classes["top/color"]) == 9 and len(classes["top/size"]) == 3
    assert all(labels[k] in classes[k] for k in labels)


# -- the model (tiny MultimodalGPT) -------------------------------------------------------------

pytest.importorskip("timm")
mmgpt_text = pytest.importorskip("mmgpt_text")

from mmgpt.multimodal import MultimodalGPT  # noqa: E402

CLASSES = {"a": ["x", "y"], "b": ["p", "q", "r"]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("a small red circle on the left\na large blue square at the top\n")
    return mmgpt_text.TextTokenizer.train([corpus], vocab_size=280)


def tagger(tok, classes=CLASSES) -> TaggingModel:
    torch.manual_seed(0)
    backbone = MultimodalGPT.build("gpt-nano", tok, block_size=24)
    return TaggingModel(backbone, classes)


def image_batch(n: int, seed: int = 0) -> torch.Tensor:
    world = ShapesWorld(task="caption", size=n, max_shapes=2, image_size=32, seed=seed)
    return [world[i].images[0] for i in range(n)]


def test_loss_is_the_mean_of_each_labels_cross_entropy(tok) -> None:
    model = tagger(tok)
    inputs = model.encoder.preprocess(image_batch(4))
    targets = torch.tensor([[0, 2], [1, IGNORE_INDEX], [1, 0], [IGNORE_INDEX, 1]])
    out = TaggingObjective(labels=["a", "b"])(model, TaggingBatch(inputs, targets))
    logits = model(inputs)
    assert logits.shape == (4, 2, 3)
    assert torch.all(logits[:, 0, 2] == -1e4)  # label a has 2 classes: its third column is padding
    # reference: each label's cross-entropy over its own classes and known items, then the mean
    a = F.cross_entropy(logits[[0, 1, 2], 0, :2], targets[[0, 1, 2], 0])
    b = F.cross_entropy(logits[[0, 2, 3], 1, :3], targets[[0, 2, 3], 1])
    assert float(out.loss.detach()) == pytest.approx(float((a + b).detach() / 2), rel=1e-5)
    picks = logits.argmax(-1)
    right = [
        (i, j)
        for i in range(4)
        for j in range(2)
        if targets[i, j] != IGNORE_INDEX and picks[i, j] == targets[i, j]
    ]
    assert out.metrics["accuracy"] == pytest.approx(len(right) / 6)
    whole = sum(
        all(targets[i, j] == IGNORE_INDEX or picks[i, j] == targets[i, j] for j in range(2))
        for i in range(4)
    )
    assert out.metrics["all_correct"] == pytest.approx(whole / 4)
    assert out.weight == 4.0


def test_only_the_encoder_and_the_heads_train_and_each_gets_a_gradient(tok) -> None:
    model = tagger(tok)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith("backbone.encoders.image.") or not n.startswith("backbone.") for n in trainable
    )
    assert not any(p.requires_grad for p in model.backbone.gpt.parameters())
    inputs = model.encoder.preprocess(image_batch(3))
    TaggingObjective(labels=["a", "b"])(
        model, TaggingBatch(inputs, torch.tensor([[0, 1]] * 3))
    ).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_directory_round_trip_predicts_the_same(tok, tmp_path: Path) -> None:
    model = tagger(tok, cell_label_classes()).eval()
    images = image_batch(3, seed=5)
    model.save_pretrained(tmp_path / "tagger")
    config = json.loads((tmp_path / "tagger" / "tagging_config.json").read_text())
    assert config["architecture"] == "tagging" and list(config["classes"]) == list(
        cell_label_classes()
    )
    loaded = TaggingModel.from_pretrained(tmp_path / "tagger")
    inputs = model.encoder.preprocess(images)
    torch.testing.assert_close(loaded(inputs), model(inputs))
    predicted = loaded.predict(images)
    assert len(predicted) == 3 and set(predicted[0]) == set(cell_label_classes())
    assert all(predicted[0][k] in cell_label_classes()[k] for k in predicted[0])
    # the directory is also an ordinary model directory
    assert isinstance(MultimodalGPT.from_pretrained(tmp_path / "tagger"), MultimodalGPT)
    with pytest.raises(FileNotFoundError, match="not a tagging model directory"):
        TaggingModel.from_pretrained(tmp_path / "nothing")


def test_bad_labels_are_named(tok) -> None:
    with pytest.raises(ValueError, match="labels must be 'cells'"):
        TaggingObjective(labels=[])
    with pytest.raises(ValueError, match="labels must be 'cells'"):
        TaggingObjective(labels=["a", "a"])
    plain = Sample(
        [Turn("user", "<image>\nhi"), Turn("assistant", "x")], meta={"source": "rows.jsonl:3"}
    )
    with pytest.raises(ValueError, match=r"rows.jsonl:3 has no shapes scene .*objective.labels"):
        sample_labels(plain, "cells")
    with pytest.raises(ValueError, match=r"rows.jsonl:3 has no 'color' field"):
        sample_labels(plain, ["color"])
    one_value = [Sample([], meta={"color": "red"}), Sample([], meta={"color": "red"})]
    with pytest.raises(ValueError, match=r"\['color'\] take fewer than 2 values"):
        label_classes(["color"], [one_value])

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield Sample([], meta={"color": "red"})

    with pytest.raises(ValueError, match="named labels need a dataset whose items can be counted"):
        label_classes(["color"], [Stream()])
    with pytest.raises(ValueError, match="attention_heads=3 must divide"):
        TaggingModel(
            MultimodalGPT.build("gpt-nano", tok, block_size=24), CLASSES, attention_heads=3
        )
    with pytest.raises(TypeError, match="expected a TaggingBatch"):
        TaggingObjective()(tagger(tok), {"inputs": None})


# -- mmgpt train tagging ------------------------------------------------------------------------

TINY = [
    "data.eval_fraction=0.25",
    "train.batch_size=32",
    "train.max_steps=60",
    "train.warmup_steps=5",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.eval_batches=0",
    "train.seed=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
]


def colour_folder(folder: Path, n: int) -> None:
    """One-shape images whose metadata rows carry ``color`` and ``kind`` fields."""
    world = ShapesWorld(
        task="caption",
        image_size=32,
        max_shapes=1,
        seed=4,
        colors=["red", "blue", "green", "yellow"],
    )
    world.write_imagefolder(folder, n)
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    for row in rows:
        row["color"], row["kind"] = row["scene"][0]["color"], row["scene"][0]["shape"]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tagging_recipe_learns_named_labels_and_hands_the_encoder_on(tmp_path: Path) -> None:
    from mmgpt.files import load_tensors
    from mmgpt.recipe import run_training

    folder = tmp_path / "folder"
    colour_folder(folder, 160)
    result = run_training(
        "tagging",
        data=folder,
        out=tmp_path / "tagging",
        overrides=["objective.labels=[color]", *TINY],
    )
    lines = (tmp_path / "tagging" / "metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, lines) if r["split"] == "train"]
    assert len(logged) == 60
    assert sum(r["loss"] for r in logged[-5:]) < 0.5 * sum(r["loss"] for r in logged[:5])
    # 4 colours: chance 0.25 on the 40 held-out images
    assert result["eval"]["accuracy"] > 0.8, result["eval"]
    model_dir = Path(result["model_dir"])
    tagger_model = TaggingModel.from_pretrained(model_dir)
    assert tagger_model.classes == {"color": ["blue", "green", "red", "yellow"]}

    # another recipe's encoder starts from the tagged one (only the encoder's tensors)
    caption = run_training(
        "caption",
        data=folder,
        out=tmp_path / "caption",
        overrides=[  # the caption recipe keeps its encoder frozen: the weights stay as loaded
            f"model.encoder.from={model_dir}",
            "train.max_steps=1",
            *[o for o in TINY if not o.startswith("train.max_steps")],
        ],
    )
    tagged = load_tensors(model_dir / "model.safetensors", prefix="encoders.image.")
    started = load_tensors(
        Path(caption["model_dir"]) / "model.safetensors", prefix="encoders.image."
    )
    assert tagged and all(torch.equal(started[k], v) for k, v in tagged.items())


def test_cells_labels_train_from_an_exported_shapes_folder(tmp_path: Path) -> None:
    from mmgpt.recipe import run_training

    folder = tmp_path / "shapes"
    ShapesWorld(task="caption", image_size=32, max_shapes=2, seed=6).write_imagefolder(folder, 64)
    result = run_training(
        "tagging",
        data=folder,
        out=tmp_path / "cells",
        overrides=["train.max_steps=3", *[o for o in TINY if not o.startswith("train.max_steps")]],
    )
    model = TaggingModel.from_pretrained(result["model_dir"])
    assert list(model.classes) == list(cell_label_classes())
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0 and result["eval"]["items"] > 0
