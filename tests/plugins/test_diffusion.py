"""The diffusion image decoder and the signal output projectors (plugins/mmgpt_diffusion)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from mmgpt.files import load_tensors, save_tensors
from mmgpt.interfaces import ModalityDecoder, Projector
from mmgpt.registry import REGISTRY, create
from mmgpt.testing import check_entry
from mmgpt.weights import load_model_state, model_state_dict
from mmgpt_diffusion import DiffusionDecoder, SignalMLP, SignalResampler

D, K, SIZE = 16, 2, 16  # condition_dim, num_condition_tokens, image side: CPU-sized


def tiny_decoder(seed: int = 0, **kwargs) -> DiffusionDecoder:
    torch.manual_seed(seed)
    config = {"condition_dim": D, "num_condition_tokens": K, "image_size": SIZE, **kwargs}
    return DiffusionDecoder(**config).eval()


@pytest.fixture(scope="module")
def decoder() -> DiffusionDecoder:
    # Shared, never trained nor modified: tests that mutate build their own.
    return tiny_decoder()


@pytest.fixture(scope="module")
def cond() -> torch.Tensor:
    return torch.randn(2, K, D, generator=torch.Generator().manual_seed(7))


# -- packaging -------------------------------------------------------------------------------
def test_import_does_not_load_diffusers() -> None:
    code = (
        "import sys, mmgpt_diffusion\n"
        "from mmgpt.registry import REGISTRY\n"
        "assert REGISTRY.get('decoder', 'diffusion') is mmgpt_diffusion.DiffusionDecoder\n"
        "print('diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_diffusers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r'pip install "mmgpt\[diffusion\]"'):
        DiffusionDecoder()


def test_discovered_through_the_entry_point() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="mmgpt.plugins")}
    assert eps.get("diffusion") == "mmgpt_diffusion"
    assert REGISTRY.distribution_of("decoder", "diffusion") == "mmgpt"
    assert REGISTRY.get("decoder", "diffusion") is DiffusionDecoder
    assert REGISTRY.get("projector", "signal_mlp") is SignalMLP
    assert REGISTRY.get("projector", "signal_resampler") is SignalResampler


@pytest.mark.parametrize(
    "kind,name",
    [("decoder", "diffusion"), ("projector", "signal_mlp"), ("projector", "signal_resampler")],
)
def test_conformance(kind: str, name: str) -> None:
    check_entry(kind, name)


# -- output projectors ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["signal_mlp", "signal_resampler"])
@pytest.mark.parametrize("k,n", [(4, 4), (4, 9)])
def test_projector_shapes_backward_and_rebuild(name: str, k: int, n: int) -> None:
    torch.manual_seed(0)
    kw = {"width": 32, "num_heads": 4} if name == "signal_resampler" else {}
    proj = create(
        "projector", name, in_dim=24, out_dim=40, num_signal_tokens=k, num_condition_tokens=n, **kw
    )
    assert isinstance(proj, Projector)
    assert (proj.in_dim, proj.out_dim) == (24, 40)
    x = torch.randn(3, k, 24)
    y = proj(x)
    assert y.shape == (3, n, 40)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    rebuilt = create("projector", name, **json.loads(json.dumps(proj.config_dict())))
    rebuilt.load_state_dict(proj.state_dict())
    torch.testing.assert_close(rebuilt(x), y.detach())
    with pytest.raises(ValueError, match="num_signal_tokens"):
        proj(torch.randn(3, k + 1, 24))
    with pytest.raises(ValueError, match="in_dim=24"):
        proj(torch.randn(3, k, 25))


def test_signal_mlp_token_map_starts_as_interpolation() -> None:
    torch.manual_seed(0)
    proj = SignalMLP(in_dim=8, out_dim=6, num_signal_tokens=3, num_condition_tokens=5)
    x = torch.randn(2, 3, 8)
    y = proj(x)
    per_token = proj.mlp(x)  # (2, 3, 6)
    # positions 0, .5, 1, 1.5, 2 over the 3 signal tokens
    torch.testing.assert_close(y[:, 0], per_token[:, 0])
    torch.testing.assert_close(y[:, 1], (per_token[:, 0] + per_token[:, 1]) / 2)
    torch.testing.assert_close(y[:, 4], per_token[:, 2])
    assert SignalMLP(in_dim=8, out_dim=6, num_signal_tokens=3).token_map is None


def test_signal_resampler_sees_token_order() -> None:
    torch.manual_seed(0)
    proj = SignalResampler(in_dim=8, out_dim=6, num_signal_tokens=4, width=16, num_heads=2)
    x = torch.randn(1, 4, 8)
    assert not torch.allclose(proj(x), proj(x.flip(1)), atol=1e-4)
    with pytest.raises(ValueError, match="divisible"):
        SignalResampler(in_dim=8, out_dim=6, width=30, num_heads=4)


# -- decoder: shapes, errors -----------------------------------------------------------------
def test_decoder_contract_and_shapes(decoder: DiffusionDecoder, cond: torch.Tensor) -> None:
    assert isinstance(decoder, ModalityDecoder)
    assert (decoder.modality, decoder.condition_dim, decoder.num_condition_tokens) == (
        "image",
        D,
        K,
    )
    images = decoder.generate(cond, num_inference_steps=2, seed=0)
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    pils = decoder.to_pil(images)
    assert len(pils) == 2 and pils[0].size == (SIZE, SIZE) and pils[0].mode == "RGB"
    latents = decoder.generate(cond, num_inference_steps=2, seed=0, output_type="latent")
    torch.testing.assert_close(images, ((latents + 1) / 2).clamp(0, 1))
    loss = decoder.training_loss(cond, torch.zeros(2, 3, SIZE, SIZE))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_decoder_rejects_bad_inputs(decoder: DiffusionDecoder, cond: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"num_condition_tokens=2, condition_dim=16"):
        decoder.generate(torch.randn(2, 3, D), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        decoder.training_loss(cond, torch.full((2, 3, SIZE, SIZE), 255.0))
    with pytest.raises(ValueError, match="16×16"):
        decoder.training_loss(cond, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch 2 but images have batch 3"):
        decoder.training_loss(cond, torch.zeros(3, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="sampler must be one of"):
        decoder.generate(cond, num_inference_steps=1, sampler="euler")
    with pytest.raises(ValueError, match="sample_size"):
        DiffusionDecoder(unet_config={"sample_size": 8})
    with pytest.raises(ValueError, match="does not accept.*'not_a_key'"):
        DiffusionDecoder(unet_config={"not_a_key": 1})
    with pytest.raises(ValueError, match="divisible by 2"):
        DiffusionDecoder(image_size=15)
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionDecoder(beta_schedule="cosine")


def test_preprocess_pil(decoder: DiffusionDecoder) -> None:
    from PIL import Image

    red = Image.new("RGB", (30, 20), (255, 0, 0))
    x = decoder.preprocess([red])
    assert x.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))


# -- decoder: sampling ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["dpm", "ddim", "ddpm"])
def test_seeded_sampling_is_reproducible(
    decoder: DiffusionDecoder, cond: torch.Tensor, sampler: str
) -> None:
    a = decoder.generate(cond, num_inference_steps=3, sampler=sampler, seed=11)
    b = decoder.generate(cond, num_inference_steps=3, sampler=sampler, seed=11)
    c = decoder.generate(cond, num_inference_steps=3, sampler=sampler, seed=12)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    g = torch.Generator().manual_seed(11)
    assert torch.equal(
        a, decoder.generate(cond, num_inference_steps=3, sampler=sampler, generator=g)
    )


def test_guidance_combines_one_batched_call(decoder: DiffusionDecoder, cond: torch.Tensor) -> None:
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    batches: list[int] = []
    hook = decoder.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            guided = decoder.predict(x, t, cond, guidance_scale=3.0)
            assert batches == [4]  # cond and null in ONE UNet call
            c = decoder.unet(x, t, encoder_hidden_states=cond).sample
            null = decoder.null_condition.expand_as(cond)
            u = decoder.unet(x, t, encoder_hidden_states=null).sample
            batches.clear()
            for off in (1.0, 0.0):
                torch.testing.assert_close(decoder.predict(x, t, cond, guidance_scale=off), c)
            assert batches == [2, 2]  # guidance off: conditional pass only
    finally:
        hook.remove()
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)


def test_guidance_one_is_the_plain_conditional_sampler(
    decoder: DiffusionDecoder, cond: torch.Tensor
) -> None:
    steps = 4
    off = decoder.generate(
        cond, steps, guidance_scale=1.0, sampler="ddim", seed=3, output_type="latent"
    )
    on = decoder.generate(
        cond, steps, guidance_scale=4.0, sampler="ddim", seed=3, output_type="latent"
    )
    assert (on - off).abs().max() > 1e-3
    # Reference: a hand-written DDIM loop calling the UNet with the condition only.
    sched = decoder.make_sampler("ddim")
    sched.set_timesteps(steps)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in sched.timesteps:
            v = decoder.unet(x, t, encoder_hidden_states=cond).sample  # v-prediction
            x = sched.step(v, t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(off, x, atol=1e-5, rtol=1e-4)


def test_ddim_and_dpm_solve_the_same_ode_when_x0_is_clipped(
    decoder: DiffusionDecoder, cond: torch.Tensor
) -> None:
    # The untrained decoder predicts x0 far outside [-1, 1], so clipping acts at every step.
    # DDIM must then take its noise from the clipped x0 (as DPM-Solver++, which steps in x0,
    # does): with the unclipped noise its result drifted further from the ODE's solution the
    # more steps it took.
    def sample(sampler: str, steps: int) -> torch.Tensor:
        return decoder.generate(cond, steps, guidance_scale=1.0, sampler=sampler, seed=5)

    reference = sample("dpm", 100)
    far = (sample("ddim", 10) - reference).abs().mean()
    near = (sample("ddim", 100) - reference).abs().mean()
    assert near < 0.008 and near < far / 2  # measured: 0.002 (0.027 before the fix)


# -- decoder: training ---------------------------------------------------------------------
def test_condition_dropout_rate_in_training_only() -> None:
    dec = tiny_decoder(p_uncond=0.25)
    with torch.no_grad():
        dec.null_condition.normal_()
    cond = torch.randn(4000, K, D)
    dec.train()
    out = dec.drop_condition(cond, torch.Generator().manual_seed(0))
    is_null = (out == dec.null_condition).all(dim=(1, 2))
    is_cond = (out == cond).all(dim=(1, 2))
    assert bool((is_null ^ is_cond).all())  # whole samples are replaced, nothing mixed
    assert abs(is_null.float().mean().item() - 0.25) < 0.03
    dec.eval()
    assert torch.equal(dec.drop_condition(cond), cond)
    # at p_uncond=0 the null condition is never trained: frozen, so optimizers skip it
    assert dec.null_condition.requires_grad
    dec.p_uncond = 0.0
    assert not dec.null_condition.requires_grad
    with pytest.raises(ValueError, match="p_uncond"):
        dec.p_uncond = 1.5


def test_training_loss_uses_the_dropped_condition(cond: torch.Tensor) -> None:
    dec = tiny_decoder(p_uncond=1.0)
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    noise = torch.randn(2, 3, SIZE, SIZE)
    t = torch.tensor([100, 700])
    dec.train()
    loss = dec.training_loss(cond, images, noise=noise, timesteps=t)
    loss.backward()
    assert dec.null_condition.grad is not None and dec.null_condition.grad.abs().sum() > 0
    dec.eval()
    with torch.no_grad():
        null = dec.null_condition.expand_as(cond)
        as_null = dec.training_loss(null, images, noise=noise, timesteps=t)
        as_cond = dec.training_loss(cond, images, noise=noise, timesteps=t)
    torch.testing.assert_close(loss.detach(), as_null)
    assert not torch.allclose(as_null, as_cond)


def test_short_training_learns_conditional_colours() -> None:
    """40 steps on two solid colours: the loss drops and the condition picks the colour."""
    dec = tiny_decoder(p_uncond=0.1)
    conds = torch.randn(2, K, D, generator=torch.Generator().manual_seed(100))
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])  # red, blue in [-1, 1]
    images = colours[:, :, None, None].expand(2, 3, SIZE, SIZE)
    idx = torch.tensor([0, 1] * 4)
    held_out_t = torch.tensor([50, 150, 300, 450, 600, 750, 850, 950])
    noise = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    def held_out_loss(c: torch.Tensor) -> float:
        dec.eval()
        with torch.no_grad():
            return dec.training_loss(c, images[idx], noise=noise, timesteps=held_out_t).item()

    before = held_out_loss(conds[idx])
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    dec.train()
    for _ in range(40):
        b = torch.randint(0, 2, (8,), generator=gen)
        loss = dec.training_loss(conds[b], images[b], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss(conds[idx])
    swapped = held_out_loss(conds[idx.flip(0)])
    assert after < 0.6 * before, (before, after)
    assert swapped > 1.5 * after, (after, swapped)  # the condition, not a prior, decides
    rgb = dec.generate(conds, num_inference_steps=10, guidance_scale=2.0, seed=0).mean(dim=(2, 3))
    assert rgb[0, 0] > rgb[0, 2] + 0.3, rgb  # red for condition 0
    assert rgb[1, 2] > rgb[1, 0] + 0.3, rgb  # blue for condition 1


def test_global_condition_feeds_the_time_embedding(cond: torch.Tensor, tmp_path: Path) -> None:
    """class_embed_type=projection: the flattened condition reaches the UNet's time embedding."""
    dec = tiny_decoder(unet_config={"class_embed_type": "projection"})
    assert dec.unet.config.projection_class_embeddings_input_dim == K * D
    assert dec.config_dict()["unet_config"]["projection_class_embeddings_input_dim"] == K * D
    x = torch.zeros(2, 3, SIZE, SIZE)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        before = dec.predict(x, t, cond)
        # only the projection changes: if the condition did not reach it, nothing would move
        dec.unet.class_embedding.linear_1.weight.mul_(3.0)
        after = dec.predict(x, t, cond)
    assert (after - before).abs().max() > 1e-3
    # the condition alone decides through that path too: swapping rows swaps the outputs
    with torch.no_grad():
        swapped = dec.predict(x, t, cond.flip(0))
    torch.testing.assert_close(swapped, after.flip(0))
    save_tensors(model_state_dict(dec), tmp_path / "decoder.safetensors")
    rebuilt = create("decoder", "diffusion", **json.loads(json.dumps(dec.config_dict()))).eval()
    load_model_state(rebuilt, load_tensors(tmp_path / "decoder.safetensors"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.predict(x, t, cond), after)


@pytest.mark.parametrize(
    ("unet_config", "message"),
    [
        ({"class_embed_type": "timestep"}, "class_embed_type must be 'projection'"),
        (
            {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 5},
            f"must be condition_dim × num_condition_tokens = {K * D}",
        ),
    ],
)
def test_global_condition_errors(unet_config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_decoder(unet_config=unet_config)


# -- decoder: persistence, memory format -----------------------------------------------------
def test_safetensors_round_trip_gives_identical_samples(
    decoder: DiffusionDecoder, cond: torch.Tensor, tmp_path: Path
) -> None:
    with torch.no_grad():
        decoder.null_condition.add_(0.5)  # a non-initial value must survive too
    try:
        save_tensors(model_state_dict(decoder), tmp_path / "decoder.safetensors")
        config = json.loads(json.dumps(decoder.config_dict()))  # as stored in config.json
        torch.manual_seed(123)
        rebuilt = create("decoder", "diffusion", **config).eval()
        expected = decoder.generate(cond, num_inference_steps=3, seed=5)
        assert not torch.equal(rebuilt.generate(cond, num_inference_steps=3, seed=5), expected)
        load_model_state(rebuilt, load_tensors(tmp_path / "decoder.safetensors"), tmp_path)
        assert torch.equal(rebuilt.generate(cond, num_inference_steps=3, seed=5), expected)
    finally:
        with torch.no_grad():
            decoder.null_condition.sub_(0.5)


def test_channels_last_matches_and_still_trains(
    decoder: DiffusionDecoder, cond: torch.Tensor
) -> None:
    nhwc = tiny_decoder(channels_last=True)
    nhwc.load_state_dict(decoder.state_dict())
    out = nhwc.generate(cond, num_inference_steps=2, seed=1)
    torch.testing.assert_close(out, decoder.generate(cond, num_inference_steps=2, seed=1))
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc.train()
    nhwc.training_loss(cond, torch.zeros(2, 3, SIZE, SIZE)).backward()
    assert nhwc.unet.conv_in.weight.grad is not None


# -- a pretrained pipeline directory ---------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable-Diffusion-like folder (latent UNet, VAE, PNDM scheduler config)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    ).save_pretrained(root / "scheduler")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps({"max_position_embeddings": 12}))
    return root


def test_pipeline_dir_loads_and_samples_in_latent_space(pipeline_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    dec = DiffusionDecoder.from_pipeline_dir(pipeline_dir).eval()
    assert (dec.condition_dim, dec.num_condition_tokens) == (
        32,
        12,
    )  # cross_attention_dim, text ctx
    assert (dec.image_size, dec.latent_channels, dec.latent_size) == (16, 4, 8)
    sched = dec.noise_scheduler.config
    assert (sched.beta_schedule, sched.prediction_type, sched.clip_sample) == (
        "scaled_linear",
        "epsilon",
        False,
    )
    # ours vs theirs: the loaded UNet computes what diffusers' own loader gives
    theirs = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(dec.unet(x, 10, c).sample, theirs(x, 10, c).sample)

    cond = torch.randn(2, 12, 32)
    latents = dec.generate(cond, num_inference_steps=2, sampler="dpm", seed=0, output_type="latent")
    assert latents.shape == (2, 4, 8, 8)
    images = dec.generate(cond, num_inference_steps=2, sampler="ddim", seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1

    dec.train()
    loss = dec.training_loss(cond, torch.rand(2, 3, 16, 16) * 2 - 1, generator=torch.Generator())
    loss.backward()
    assert dec.unet.conv_in.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in dec.vae.parameters())

    rebuilt = create("decoder", "diffusion", **json.loads(json.dumps(dec.config_dict())))
    assert rebuilt.config_dict() == dec.config_dict()
    # e.g. a text encoder's empty-prompt embedding, (1, 77, 768) for Stable Diffusion
    empty_prompt = torch.randn(1, 12, 32)
    rebuilt.set_null_condition(empty_prompt)
    assert torch.equal(rebuilt.null_condition.detach(), empty_prompt[0])
    with pytest.raises(ValueError, match=r"\(12, 32\)"):
        rebuilt.set_null_condition(torch.randn(77, 32))


def test_pipeline_dir_errors_name_the_missing_part(pipeline_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        DiffusionDecoder.from_pipeline_dir(tmp_path / "nope")
    for part, expected in [
        ("unet", r"missing unet/config\.json"),
        ("vae", r"missing vae/config\.json"),
        ("scheduler", r"missing scheduler/scheduler_config\.json"),
    ]:
        broken = tmp_path / f"no-{part}"
        shutil.copytree(pipeline_dir, broken)
        shutil.rmtree(broken / part)
        with pytest.raises(FileNotFoundError, match=expected) as info:
            DiffusionDecoder.from_pipeline_dir(broken)
        assert str(broken) in str(info.value)
    with pytest.raises(ValueError, match="cross_attention_dim=32"):
        DiffusionDecoder.from_pipeline_dir(pipeline_dir, condition_dim=768)
