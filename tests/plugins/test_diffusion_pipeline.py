"""A Stable Diffusion pipeline directory as the image decoder (``model.image_decoder.
pipeline_dir``), on a tiny random ``StableDiffusionPipeline`` saved by diffusers: the decoder
reproduces diffusers' own pipeline, and ``mmgpt train t2i`` fine-tunes it and draws through
the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("timm")

from mmgpt.cli import main
from mmgpt.files import load_tensors
from mmgpt.imagegen import generate_images
from mmgpt.pretrained import load_model
from mmgpt_diffusion import DiffusionDecoder

CONTEXT, WIDTH = 12, 32  # the text encoder's context and width: the conditioning shape
IMAGE = 16  # pixels; the VAE halves it once


def clip_tokenizer(directory: Path):
    """A CLIP BPE tokenizer over single letters, written offline."""
    from transformers import CLIPTokenizer

    directory.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for letter in "abcdefghijklmnopqrstuvwxyz":
            vocab[letter + suffix] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=CONTEXT
    )


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``StableDiffusionPipeline.save_pretrained`` of tiny random parts (PNDM scheduler, as
    Stable Diffusion 1.x ships)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = clip_tokenizer(root / "letters")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet(
        sample_size=IMAGE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=IMAGE,
        norm_num_groups=4,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_decoder_reproduces_the_stable_diffusion_pipeline(
    sd_dir: Path, guidance_scale: float
) -> None:
    """Ours vs theirs: fed the text encoder's prompt embedding as its condition (and the empty
    prompt's as the null condition), the decoder draws diffusers' image, seed for seed."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    # DDIM's default clip_sample=True is not in a PNDM config; the decoder never clips latents
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)

    def embed(text: str) -> torch.Tensor:
        ids = pipe.tokenizer(
            [text], padding="max_length", max_length=CONTEXT, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]  # (1, CONTEXT, WIDTH)

    prompt, empty = embed("a red dog"), embed("")
    theirs = pipe(
        prompt_embeds=prompt,
        negative_prompt_embeds=empty,
        guidance_scale=guidance_scale,
        num_inference_steps=4,
        height=IMAGE,
        width=IMAGE,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images

    decoder = DiffusionDecoder(pipeline_dir=sd_dir).eval()
    assert (decoder.num_condition_tokens, decoder.condition_dim) == (CONTEXT, WIDTH)
    decoder.set_null_condition(empty)
    ours = decoder.generate(
        prompt, num_inference_steps=4, guidance_scale=guidance_scale, sampler="ddim", seed=0
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_t2i_recipe_fine_tunes_a_pipeline_directory(
    sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mmgpt train t2i model.image_decoder.pipeline_dir=DIR`` trains the pipeline's UNet (its
    VAE frozen) under the GPT's conditions; the model directory loads without the folder, and
    ``mmgpt generate`` draws at its size."""
    folder = tmp_path / "sd"
    shutil.copytree(sd_dir, folder)
    out = tmp_path / "sd-t2i"
    argv = ["train", "t2i", "--out", str(out)]
    settings = [
        f"model.image_decoder.pipeline_dir={folder}",
        # the recipe's pixel-UNet settings: the pipeline brings its own
        "model.image_decoder.unet_config=null",
        "model.image_decoder.condition_dim=null",
        "model.image_decoder.num_condition_tokens=null",
        f"model.image_decoder.image_size={IMAGE}",
        f"data.image_size={IMAGE}",
        "data.size=64",
        "train.max_steps=12",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_every=1",
        "train.progress=false",
        "train.tensorboard=false",
        "data.eval_fraction=0",
    ]
    assert main([*argv, *settings]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["diffusion_loss"] > 0 for x in lines if x["split"] == "train")

    model = load_model(out / "model")
    decoder = model.image_decoder
    assert (decoder.num_condition_tokens, decoder.condition_dim) == (CONTEXT, WIDTH)
    assert model.output_projector.num_condition_tokens == CONTEXT  # signal states → 12 × 32
    # the UNet trained, the VAE did not
    start = load_tensors(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    saved = load_tensors(out / "model" / "model.safetensors")
    assert any(not torch.equal(saved[f"image_decoder.unet.{k}"], v) for k, v in start.items())
    vae = load_tensors(sd_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[f"image_decoder.vae.{k}"], v) for k, v in vae.items())

    # another machine: the folder is gone; the directory records configs, not the path
    config = json.loads((out / "model" / "config.json").read_text())["image_decoder"]["config"]
    assert "pipeline_dir" not in config and set(config["pipeline_config"]) == {
        "unet",
        "vae",
        "scheduler",
    }
    shutil.rmtree(folder)
    prompt = "draw a large red circle on the left"
    drawn = [
        generate_images(load_model(out / "model"), [prompt], seeds=[2], force_image=True)[0][0][0]
        for _ in range(2)
    ]
    assert list(drawn[0].getdata()) == list(drawn[1].getdata())

    drawings = tmp_path / "drawings"
    command = ["generate", "--model", str(out / "model"), "--prompt", prompt]
    assert main([*command, "--out-dir", str(drawings), "--steps", "3"]) == 0
    png = drawings / "image_0.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.size == (IMAGE, IMAGE) and image.mode == "RGB"
