"""The contrastive objective: CLIP and SigLIP losses against hand-written references, the
towers' model and its directory, the collator's checks, and ``mmgpt train clip`` end to end
(a pretrained encoder handed to the caption recipe with ``model.from``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmgpt.data.sample import Sample, Turn
from mmgpt.objectives.contrastive import (
    ContrastiveModel,
    ContrastiveObjective,
    Standardization,
    clip_loss,
    siglip_loss,
)


def pairs(seed: int = 0, n: int = 3, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_clip_loss_is_the_symmetric_cross_entropy() -> None:
    image, text = pairs()
    scale = 7.5
    n = len(image)
    images_to_texts = texts_to_images = 0.0
    for i in range(n):
        row = [scale * dot(image[i], text[j]) for j in range(n)]
        column = [scale * dot(image[j], text[i]) for j in range(n)]
        images_to_texts -= row[i] - math.log(sum(math.exp(v) for v in row))
        texts_to_images -= column[i] - math.log(sum(math.exp(v) for v in column))
    expected = (images_to_texts / n + texts_to_images / n) / 2
    assert float(clip_loss(image, text, scale)) == pytest.approx(expected, rel=1e-12)
    # the scale is a tensor in training (exp of the learned parameter): gradients reach it
    log_scale = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
    loss = clip_loss(image, text, log_scale.exp())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad != 0


def test_siglip_loss_is_the_pairwise_sigmoid_loss_with_bias() -> None:
    image, text = pairs(seed=1, n=4)
    scale, bias = 10.0, -3.0
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * dot(image[i], text[j]) + bias
            total += math.log(1 + math.exp(-z * logit))  # −log σ(z · logit)
    expected = total / n
    assert float(siglip_loss(image, text, scale, bias)) == pytest.approx(expected, rel=1e-12)
    # matched pairs that agree more lower the loss
    assert float(siglip_loss(image, image, scale, bias)) < expected


def test_standardization_holds_its_statistics_and_has_a_batchs_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    reference = 3.0 + 2.0 * torch.randn(50, 5, generator=g, dtype=torch.float64)
    x = (1.0 + 0.5 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    norm = Standardization(5).double()
    norm.set_statistics(reference)
    mean = [sum(float(v) for v in reference[:, c]) / 50 for c in range(5)]
    var = [sum((float(v) - mean[c]) ** 2 for v in reference[:, c]) / 49 for c in range(5)]
    expected = torch.tensor(
        [
            [(float(x[i, c].detach()) - mean[c]) / math.sqrt(var[c] + 1e-5) for c in range(5)]
            for i in range(6)
        ],
        dtype=torch.float64,
    )
    for training in (False, True):  # the same values in both modes, item by item
        norm.train(training)
        torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm(x[:2]), expected[:2], rtol=1e-12, atol=1e-12)
    # training: batch normalization's gradient, blind to what moves the whole batch together
    weights = torch.randn(6, 5, generator=g, dtype=torch.float64)
    (norm(x) * weights).sum().backward()
    batch_norm_grad = torch.func.grad(
        lambda v: (F.batch_norm(v, None, None, training=True, eps=1e-5) * weights).sum()
    )(x.detach())
    batch_std = (x.detach().var(dim=0, unbiased=False) + 1e-5).sqrt()
    r = batch_std / torch.tensor(var, dtype=torch.float64).add(1e-5).sqrt()
    torch.testing.assert_close(x.grad, r * batch_norm_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad.sum(dim=0), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"statistics need features \(N, C\) with N >= 2"):
        norm.set_statistics(reference[:1])


def test_the_objective_rejects_an_unknown_loss() -> None:
    with pytest.raises(ValueError, match=r"loss must be one of \('clip', 'siglip'\), got 'info'"):
        ContrastiveObjective(loss="info")


# -- the model and its collator (tiny MultimodalGPT) ----------------------------------------

pytest.importorskip("timm")
mmgpt_text = pytest.importorskip("mmgpt_text")

from mmgpt.data.shapes import ShapesWorld  # noqa: E402
from mmgpt.multimodal import MultimodalGPT  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    world = ShapesWorld(task="caption", size=200, max_shapes=1, image_size=32)
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(world[i].meta["caption"] for i in range(200)))
    return mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)


def towers(tok, loss: str = "clip") -> ContrastiveModel:
    torch.manual_seed(0)
    backbone = MultimodalGPT.build("gpt-nano", tok, block_size=24)
    return ContrastiveObjective(loss=loss, embed_dim=16).wrap(backbone)


def test_model_embeds_and_round_trips(tok, tmp_path: Path) -> None:
    model = towers(tok, "siglip")
    world = ShapesWorld(task="caption", size=4, max_shapes=1, image_size=32)
    batch = model.collator()([world[i] for i in range(4)])
    with torch.no_grad():
        model(batch)  # training mode: the norms' running statistics move
    model.eval()
    assert model.image_norm.running_var.ne(1).all()
    assert batch.inputs.shape == (4, 3, 32, 32)
    assert batch.input_ids.shape[0] == 4
    assert all(batch.input_ids[i, n - 1] == tok.eos_id for i, n in enumerate(batch.lengths))
    with torch.no_grad():
        out = model(batch)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    assert float(out.logit_scale) == pytest.approx(10.0) and float(out.logit_bias.detach()) == -10.0
    # a caption's embedding does not depend on the padding after it
    alone = model.collator()([world[0]])
    torch.testing.assert_close(model(alone).text_embeds[0], out.text_embeds[0])

    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    # the norms' buffers keep BatchNorm1d's names: directories saved with it still load
    assert set(model.image_norm.state_dict()) == set(torch.nn.BatchNorm1d(4).state_dict()) - {
        "weight",
        "bias",
    }
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "contrastive_config.json").read_text())
    assert config == {"architecture": "contrastive", "format_version": 1, "modality": "image",
                      "embed_dim": 16, "loss": "siglip"}  # fmt: skip
    loaded = ContrastiveModel.from_pretrained(tmp_path)
    with torch.no_grad():
        again = loaded(batch)
    torch.testing.assert_close(again.image_embeds, out.image_embeds)
    torch.testing.assert_close(again.text_embeds, out.text_embeds)
    assert float(loaded.logit_scale.detach()) == 2.5
    # the directory is a multimodal model directory: other recipes start from it
    backbone = MultimodalGPT.from_pretrained(tmp_path)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone.state_dict()[key]), key
    with pytest.raises(FileNotFoundError, match="not a contrastive model directory"):
        ContrastiveModel.from_pretrained(tmp_path / "missing")


def test_an_embedding_in_training_depends_on_its_pair_alone(tok) -> None:
    """Batch normalization's training mode standardized each pair with its batch's statistics,
    so the other pairs of a batch changed its embedding; the towers' norms must not."""
    world = ShapesWorld(task="caption", size=12, max_shapes=1, image_size=32)
    first = [world[i] for i in range(4)]
    batch = [world[i] for i in range(4, 8)]
    others = [batch[0], *(world[i] for i in range(8, 11))]  # the same first pair
    outputs = []
    for second in (batch, others):
        model = towers(tok).train()
        collate = model.collator()
        model(collate(first))  # the reference for the next batch
        outputs.append(model(collate(second)))
    torch.testing.assert_close(outputs[0].image_embeds[0], outputs[1].image_embeds[0])
    torch.testing.assert_close(outputs[0].text_embeds[0], outputs[1].text_embeds[0])
    assert not torch.allclose(outputs[0].image_embeds[1], outputs[1].image_embeds[1])


def test_training_and_evaluation_compute_the_same_function(tok) -> None:
    """After some steps, a held-out batch scores the same in both modes: the statistics are
    the last training batch's under the weights as they are (not moving averages that lag
    the weights, which made batch normalization's evaluation differ from its training)."""
    world = ShapesWorld(task="caption", size=56, max_shapes=1, image_size=32)
    model = towers(tok).train()
    collate = model.collator(truncation=True)
    objective = ContrastiveObjective()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(6):
        optimizer.zero_grad()
        objective(model, collate([world[i] for i in range(8 * step, 8 * step + 8)])).loss.backward()
        optimizer.step()
    last = collate([world[i] for i in range(40, 48)])
    batch = collate([world[i] for i in range(48, 56)])  # not trained on
    model.eval()
    with torch.no_grad():
        evaluated = objective(model, batch)
        expected_mean = model.pool_inputs(last.inputs).mean(dim=0)
    model.train()
    trained = objective(model, batch)  # standardized with the same batch, `last`
    assert trained.metrics["loss"] == pytest.approx(evaluated.metrics["loss"], rel=1e-5)
    assert trained.metrics["image_to_text"] == evaluated.metrics["image_to_text"]
    torch.testing.assert_close(model.image_norm.running_mean, expected_mean)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).image_embeds, model.eval()(batch).image_embeds)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_every_trainable_parameter_gets_a_gradient(tok, loss: str) -> None:
    """What the loss cannot reach is frozen (DDP needs a gradient for every trainable
    parameter in every step): the projector, and CLIP's unused bias."""
    model = towers(tok, loss)
    world = ShapesWorld(task="caption", size=4, max_shapes=1, image_size=32)
    ContrastiveObjective(loss=loss)(
        model, model.collator()([world[i] for i in range(4)])
    ).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n, p in trainable.items() if p.grad is None]
    assert not any(n.startswith("backbone.projectors.") for n in trainable)
    assert ("logit_bias" in trainable) == (loss == "siglip")
    assert any(n.startswith("backbone.encoders.image.") for n in trainable)
    assert "backbone.gpt.transformer.wte.weight" in trainable


def test_collator_checks_items_and_caption_length(tok) -> None:
    model = towers(tok)
    image = ShapesWorld(task="caption", size=1, image_size=32)[0].images[0]
    collate = model.collator()
    two = Sample(
        [Turn("user", "<image><image>"), Turn("assistant", "a red circle")], [image, image]
    )
    with pytest.raises(ValueError, match=r"has 2 image item\(s\); each image-text pair needs"):
        collate([two])
    silent = Sample([Turn("user", "<image>"), Turn("assistant", "")], [image])
    with pytest.raises(ValueError, match="has no caption"):
        collate([silent])
    long = Sample([Turn("user", "<image>"), Turn("assistant", "a red circle " * 20)], [image])
    with pytest.raises(ValueError, match=r"exceeds the model's context \(24\).*data.truncation"):
        collate([long])
    cut = model.collator(truncation=True)([long])
    assert cut.input_ids.shape == (1, 24) and int(cut.input_ids[0, -1]) == tok.eos_id
    one = collate([ShapesWorld(task="caption", size=1, max_shapes=1, image_size=32)[0]])
    with pytest.raises(ValueError, match=r"at least 2 pairs .* got 1; raise train.batch_size"):
        ContrastiveObjective()(model, one)
    with pytest.raises(TypeError, match="expected a ContrastiveBatch"):
        ContrastiveObjective()(model, {"input_ids": torch.zeros(1, 2)})


# -- mmgpt train clip -------------------------------------------------------------------------

TINY = [
    "data.eval_fraction=0.1",
    "train.batch_size=16",
    "train.max_steps=40",
    "train.warmup_steps=4",
    "train.lr=4e-3",
    "train.min_lr=4e-4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.eval_batches=1",
    "train.seed=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
]


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_clip_recipe_trains_the_encoder_and_hands_it_to_caption(tmp_path: Path) -> None:
    from mmgpt.files import load_tensors
    from mmgpt.recipe import run_training

    folder = tmp_path / "folder"
    ShapesWorld(task="caption", image_size=32, max_shapes=1, seed=4).write_imagefolder(folder, 96)
    clip = run_training("clip", data=folder, out=tmp_path / "clip", overrides=TINY)
    logged = train_records(tmp_path / "clip")
    assert len(logged) == 40
    first = sum(r["loss"] for r in logged[:5]) / 5
    last = sum(r["loss"] for r in logged[-5:]) / 5
    assert first > 2.0  # about log(16): the towers start apart
    assert last < 0.75 * first, (first, last)
    assert logged[-1]["image_to_text"] > 0.3  # retrieval within a batch of 16 (chance 1/16)
    assert "loss" in clip["eval"]

    model_dir = Path(clip["model_dir"])
    towers_model = ContrastiveModel.from_pretrained(model_dir)
    assert towers_model.loss == "clip" and towers_model.encoder.frozen is False
    clip_weights = load_tensors(model_dir / "model.safetensors")
    encoder_keys = [k for k in clip_weights if k.startswith("encoders.image.")]
    assert encoder_keys

    # the caption recipe starts from the pretrained model; the encoder trains at 1/10 of the lr
    caption = run_training(
        "caption",
        data=folder,
        out=tmp_path / "caption",
        overrides=[
            f"model.from={model_dir}",
            "train.train_encoder=true",
            "train.lr_multipliers.encoder=0.1",
            "train.max_steps=3",
            "train.warmup_steps=1",
            *[o for o in TINY if not o.startswith(("train.max_steps", "train.warmup_steps"))],
        ],
    )
    first_step = train_records(tmp_path / "caption")[0]
    assert first_step["lr_encoder"] == pytest.approx(0.1 * first_step["lr"], rel=1e-12)
    tuned = load_tensors(Path(caption["model_dir"]) / "model.safetensors")
    moved = [k for k in encoder_keys if not torch.equal(tuned[k], clip_weights[k])]
    assert moved  # it trained from the contrastive encoder ...
    for key in encoder_keys:  # ... and stayed close to it at a tenth of the lr
        change = (tuned[key] - clip_weights[key]).abs().max()
        assert change <= 2 * 3 * 0.1 * 4e-3, key  # AdamW moves a weight by ~lr per step


def test_an_evaluation_tail_of_one_pair_counts_for_nothing(tmp_path) -> None:
    """Evaluation keeps its last, partial batch: one pair there has no negatives, and must
    neither stop the run nor move the held-out loss; in training it stays an error."""
    import mmgpt_text
    from mmgpt.data.shapes import ShapesWorld
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.objectives.contrastive import ContrastiveObjective
    from mmgpt.trainer import TrainConfig

    world = ShapesWorld(task="caption", size=64, max_shapes=1, image_size=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(world[i].meta["caption"] for i in range(64)))
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)
    torch.manual_seed(0)
    backbone = MultimodalGPT.build("gpt-nano", tok, block_size=24)
    objective = ContrastiveObjective(loss="clip", embed_dim=16)
    train = ShapesWorld(task="caption", size=8, max_shapes=1, image_size=32)
    held_out = ShapesWorld(task="caption", size=3, max_shapes=1, image_size=32, seed=5)
    config = TrainConfig.from_dict(
        {"batch_size": 2, "max_steps": 1, "eval_every": 1, "device": "cpu", "progress": False}
    )
    trainer = objective.build_trainer(backbone, train, config, eval_data=held_out, out_dir=tmp_path)
    result = trainer.fit()
    assert result["step"] == 1 and math.isfinite(result["eval"]["loss"])
    pair = trainer.model.collator()([held_out[0]])
    trainer.model.train()
    with pytest.raises(ValueError, match="a training batch needs at least 2 pairs"):
        objective(trainer.model, pair)
