"""Image generation by MultimodalGPT: forced signal spans, streaming order, seeds, guidance."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
mmgpt_text = pytest.importorskip("mmgpt_text")

from mmgpt.generation import GenerationConfig, StepState  # noqa: E402
from mmgpt.imagegen import (  # noqa: E402
    ImageEvent,
    ImageGenerationConfig,
    TextEvent,
    decode_images,
    gather_signal_states,
    generate_images,
    signal_condition,
    signal_spans,
)
from mmgpt.multimodal import MultimodalGPT  # noqa: E402

K = 4  # signal tokens
CORPUS = "User: draw a large red circle on the left\nAssistant: here is a red circle done\n" * 30
PROMPT = [{"role": "user", "text": "draw a large red circle on the left"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=280, num_signal_tokens=K)


@pytest.fixture(scope="module")
def model(tok) -> MultimodalGPT:
    torch.manual_seed(0)
    m = MultimodalGPT.build(
        "gpt-nano",
        tok,
        encoder=None,
        block_size=64,
        image_decoder="diffusion",
        image_decoder_kwargs={"condition_dim": 16, "num_condition_tokens": 2, "image_size": 16},
        output_projector="signal_mlp",
    )
    with torch.no_grad():  # a null condition unlike any real one, so guidance matters
        m.image_decoder.null_condition.normal_()
    return m.eval()


class Script:
    """Token hook forcing a fixed reply (``None`` entries: let the model choose) and recording
    what the model itself would have picked (greedy argmax) at each step."""

    def __init__(self, tokens: list[int | None]) -> None:
        self.tokens = tokens
        self.argmax: list[int] = []

    def __call__(self, state: StepState) -> dict[int, int] | None:
        self.argmax.append(int(state.logits[0].argmax()))
        if state.step < len(self.tokens) and self.tokens[state.step] is not None:
            return {0: self.tokens[state.step]}
        return None


def text_ids(tok, text: str) -> list[int]:
    return tok.encode(text)


def fast(**kwargs: Any) -> ImageGenerationConfig:
    kwargs.setdefault("steps", 3)
    kwargs.setdefault("seed", 7)
    return ImageGenerationConfig(**kwargs)


def test_after_img0_the_span_is_forced_even_against_the_model(model, tok) -> None:
    signal = tok.signal_token_ids
    # the reply: two words, [IMG0] (forced by the script), then only None: the model would
    # pick anything, but [IMG1]..[IMG3] must follow
    script = Script([*text_ids(tok, " a red"), signal[0], None, None, None, None])
    config = GenerationConfig(max_new_tokens=9, temperature=0)
    out = model.generate([PROMPT], None, config, token_hook=_chain(script, model))
    tokens = out.tokens[0]
    start = tokens.index(signal[0])
    assert tokens[start : start + K] == signal
    forced_steps = range(start + 1, start + K)
    assert any(script.argmax[s] != tokens[s] for s in forced_steps), "the model agreed anyway"
    assert signal_spans(tokens, signal) == [start]
    assert signal_spans([*signal[:2], 5, *signal], signal) == [3]  # a broken span is no span


def _chain(script: Script, model: MultimodalGPT):
    """The forcing hook of stream()/generate_images() with a user hook in front."""
    from mmgpt.imagegen import _SignalHook

    return _SignalHook(model.tokenizer.signal_token_ids, script)


def test_stream_yields_text_image_text_in_order(model, tok) -> None:
    signal = tok.signal_token_ids
    before, after = text_ids(tok, " a red"), text_ids(tok, " circle done")
    script = Script([*before, signal[0], None, None, None, *after, tok.eos_id])
    events = list(
        model.stream(
            PROMPT,
            config=GenerationConfig(max_new_tokens=20, temperature=0),
            image_config=fast(),
            token_hook=script,
        )
    )
    kinds = [type(e).__name__ for e in events]
    first_image = kinds.index("ImageEvent")
    assert set(kinds[:first_image]) == {"TextEvent"} and kinds.count("ImageEvent") == 1
    assert set(kinds[first_image + 1 :]) == {"TextEvent"}
    text_before = "".join(e.text for e in events[:first_image])
    text_after = "".join(e.text for e in events[first_image + 1 :])
    assert (text_before, text_after) == ("a red", " circle done")  # no signal tokens in text
    image = events[first_image]
    assert isinstance(image, ImageEvent) and image.index == 0 and image.seed == 7
    assert image.image.size == (16, 16)

    # the image is the decoder's output for the span's hidden states of a full forward
    reply = [*before, *signal, *after]
    embeds, _ = model.prepare_prompts([PROMPT])
    with torch.no_grad():
        x = torch.cat([embeds, model.gpt.get_input_embeddings()(torch.tensor([reply]))], dim=1)
        hidden = model.gpt(inputs_embeds=x).hidden_states[0, embeds.size(1) :]
    start = len(before)
    expected = decode_images(model, hidden[None, start : start + K], fast(), seed=7)[0]
    assert _close(image.image, expected)

    out = model.generate_multimodal(
        PROMPT,
        config=GenerationConfig(max_new_tokens=20, temperature=0),
        image_config=fast(),
        token_hook=Script([*before, signal[0], None, None, None, *after, tok.eos_id]),
    )
    assert out.text == "a red circle done" and len(out.images) == 1
    assert out.images[0].tobytes() == image.image.tobytes()


def _close(a, b, tol: int = 2) -> bool:
    """Images equal up to a rounding step (cached vs full attention differ in the last bits)."""
    ta = torch.tensor(list(a.getdata()), dtype=torch.int16)
    tb = torch.tensor(list(b.getdata()), dtype=torch.int16)
    return bool((ta - tb).abs().max() <= tol)


def test_seeded_sampling_is_reproducible_and_guidance_changes_the_image(model, tok) -> None:
    signal = tok.signal_token_ids

    def draw(**image_kwargs: Any) -> Any:
        torch.manual_seed(123)  # text sampling draws its seed from the global generator
        out = model.generate_multimodal(
            PROMPT,
            config=GenerationConfig(max_new_tokens=8, temperature=1.0),
            image_config=fast(**image_kwargs),
            token_hook=Script([signal[0]]),
        )
        assert len(out.images) == 1
        return out

    a, b = draw(guidance_scale=3.0), draw(guidance_scale=3.0)
    assert a.text == b.text and a.images[0].tobytes() == b.images[0].tobytes()
    unguided = draw(guidance_scale=1.0)
    assert unguided.images[0].tobytes() != a.images[0].tobytes()
    other_seed = draw(guidance_scale=3.0, seed=8)
    assert other_seed.images[0].tobytes() != a.images[0].tobytes()
    assert model.training is False and model.image_decoder.training is False

    short = GenerationConfig(max_new_tokens=8)
    torch.manual_seed(5)  # seed=None: the base seed comes from torch's global generator
    c = model.generate_multimodal(
        PROMPT, config=short, image_config=fast(seed=None), token_hook=Script([signal[0]])
    )
    torch.manual_seed(5)
    d = model.generate_multimodal(
        PROMPT, config=short, image_config=fast(seed=None), token_hook=Script([signal[0]])
    )
    assert c.events[0].seed == d.events[0].seed
    assert c.images[0].tobytes() == d.images[0].tobytes()


def test_a_span_that_ends_generation_still_draws_and_a_cut_span_does_not(model, tok) -> None:
    signal = tok.signal_token_ids
    before = text_ids(tok, " a red")
    script = [*before, signal[0]]
    # the span's last token is the last new token: its state comes from a full forward
    ends = model.generate_multimodal(
        PROMPT,
        config=GenerationConfig(max_new_tokens=len(before) + K, temperature=0),
        image_config=fast(),
        token_hook=Script(script),
    )
    longer = model.generate_multimodal(
        PROMPT,
        config=GenerationConfig(max_new_tokens=len(before) + K + 1, temperature=0),
        image_config=fast(),
        token_hook=Script([*script, None, None, None, tok.eos_id]),
    )
    assert len(ends.images) == len(longer.images) == 1
    assert _close(ends.images[0], longer.images[0])
    cut = model.generate_multimodal(
        PROMPT,
        config=GenerationConfig(max_new_tokens=len(before) + 2, temperature=0),
        image_config=fast(),
        token_hook=Script(script),
    )
    assert cut.images == [] and cut.text == "a red"


def test_stop_strings_hold_within_the_text_around_images(model, tok) -> None:
    signal = tok.signal_token_ids
    script = Script(
        [*text_ids(tok, " a red"), signal[0], None, None, None, *text_ids(tok, " circle done")]
    )
    events = list(
        model.stream(
            PROMPT,
            config=GenerationConfig(max_new_tokens=20, temperature=0, stop_strings=["done"]),
            image_config=fast(),
            token_hook=script,
        )
    )
    kinds = [type(e) for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] is not k]
    assert collapsed == [TextEvent, ImageEvent, TextEvent]
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == "a red circle "


def test_output_projector_shapes(model, tok) -> None:
    hidden = torch.randn(3, 10, 48)
    positions = torch.tensor([[0, 1], [2, 6], [0, 5]])
    states = gather_signal_states(hidden, positions, K)
    assert states.shape == (3, K, 48)
    torch.testing.assert_close(states[1], hidden[2, 6:10])
    condition = signal_condition(model, states)
    assert condition.shape == (3, 2, 16)  # (M, num_condition_tokens, condition_dim)
    with pytest.raises(ValueError, match="runs past the sequence"):
        gather_signal_states(hidden, torch.tensor([[0, 8]]), K)
    with pytest.raises(ValueError, match=r"signal states must have shape"):
        signal_condition(model, torch.randn(1, K + 1, 48))


def test_batched_generate_images_forces_a_span_per_prompt(model, tok) -> None:
    prompts = [PROMPT, [{"role": "user", "text": "draw a red circle"}]]
    out = generate_images(model, prompts, fast(), seeds=[1, 2], force_image=True)
    assert len(out) == 2 and all(len(per_prompt) == 2 for per_prompt in out)
    assert all(len(images) == 1 and images[0].size == (16, 16) for images in out[0])
    assert out[0][0][0].tobytes() != out[1][0][0].tobytes()  # another seed, another image


def test_models_that_cannot_draw_say_so(tok) -> None:
    plain = MultimodalGPT.build("gpt-nano", tok, encoder=None, block_size=64)
    with pytest.raises(ValueError, match="no image_decoder and no output_projector"):
        list(plain.stream(PROMPT, image_config=fast()))
    text = plain.generate_multimodal(PROMPT, config=GenerationConfig(max_new_tokens=4))
    assert text.images == []
    with pytest.raises(ValueError, match="steps"):
        ImageGenerationConfig(steps=0)


def test_cli_generate_writes_pngs_and_prints_their_paths(tok, tmp_path, capsys) -> None:
    from PIL import Image

    from mmgpt.cli import main

    torch.manual_seed(0)
    drawer = MultimodalGPT.build(
        "gpt-nano",
        tok,
        encoder=None,
        block_size=64,
        image_decoder="diffusion",
        image_decoder_kwargs={"condition_dim": 16, "num_condition_tokens": 2, "image_size": 16},
        output_projector="signal_mlp",
    )
    with torch.no_grad():  # a GPT whose every position prefers [IMG0]: it always draws
        drawer.gpt.transformer.ln_f.weight.zero_()
        wte = drawer.gpt.get_input_embeddings().weight
        drawer.gpt.transformer.ln_f.bias.copy_(wte[tok.signal_token_ids[0]] * 100)
    drawer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", "draw a red circle"]
    options = ["--max-new-tokens", str(2 * K), "--temperature", "0", "--steps", "2"]
    code = main([*args, "--out-dir", str(out), *options])
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    expected = [str(out / "image_0.png"), str(out / "image_1.png")]
    assert printed == expected
    for path in expected:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (16, 16)
    assert (out / "text.txt").read_text() == ""  # signal tokens never reach the text


def test_batch_renormalization_values_of_inference_gradients_of_batch_norm() -> None:
    """``statistics="renorm"``: training conditions take the running statistics' values (what
    inference sees, no batch noise) and batch normalization's gradient."""
    from mmgpt.registry import create

    torch.manual_seed(0)
    options = dict(in_dim=8, out_dim=3, num_signal_tokens=K, num_condition_tokens=2)
    proj = create("projector", "signal_standardized", statistics="renorm", momentum=0.25, **options)
    batches = [torch.randn(16, K, 8) * 3 + 1 for _ in range(5)]
    means, variances = [], []
    proj.train()
    for b in batches:
        with torch.no_grad():
            flat = proj.inner(b).reshape(16, -1)
        means.append(flat.mean(0))
        variances.append(flat.var(0))
        out = proj(b)
    # the first four batches are averaged as they come (weights 1, 1/2, 1/3, 1/4), then the
    # momentum takes over (the fifth weighs 0.25, not 1/5)
    expected_mean = torch.stack(means[:4]).mean(0) * 0.75 + means[4] * 0.25
    expected_var = torch.stack(variances[:4]).mean(0) * 0.75 + variances[4] * 0.25
    torch.testing.assert_close(proj.norm.running_mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.norm.running_var, expected_var, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the last batch standardized by the statistics it updated
        flat = proj.inner(batches[4]).reshape(16, -1)
        standardized = (flat - expected_mean) / (expected_var + 1e-5).sqrt()
    torch.testing.assert_close(out.reshape(16, -1).detach(), standardized, atol=1e-4, rtol=1e-4)
    proj.eval()  # inference reads the same statistics: the same conditions
    torch.testing.assert_close(proj(batches[4]), out.detach())

    # the gradient reaching the inner outputs is batch normalization's, scaled by σ_B/σ
    proj.train()
    y = proj.inner(batches[1]).reshape(16, -1).detach().requires_grad_(True)
    upstream = torch.randn(16, 6)
    (proj._renormalize(y) * upstream).sum().backward()
    ours = y.grad.clone()
    with torch.no_grad():
        scale = (y.var(0, unbiased=False) + 1e-5).sqrt() / (proj.norm.running_var + 1e-5).sqrt()
    z = y.detach().requires_grad_(True)
    batch_norm = torch.nn.functional.batch_norm(z, None, None, training=True, eps=1e-5)
    (batch_norm * upstream * scale).sum().backward()
    torch.testing.assert_close(ours, z.grad, atol=1e-5, rtol=1e-4)
    assert float(ours.sum(0).abs().max()) < 1e-4  # a shift shared by the batch gets no gradient
    proj(batches[1]).square().sum().backward()  # and the inner projector gets one
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.inner.parameters())

    config = proj.config_dict()
    assert config["statistics"] == "renorm"
    rebuilt = create("projector", "signal_standardized", **config)
    rebuilt.load_state_dict(proj.state_dict())
    torch.testing.assert_close(rebuilt.eval()(batches[2]), proj.eval()(batches[2]))
    # models saved before the option keep their config
    assert "statistics" not in create("projector", "signal_standardized", **options).config_dict()
    with pytest.raises(ValueError, match="statistics must be one of"):
        create("projector", "signal_standardized", statistics="running", **options)


def test_standardized_projector_removes_what_every_prompt_shares() -> None:
    from mmgpt.registry import create

    proj = create(
        "projector",
        "signal_standardized",
        in_dim=8,
        out_dim=6,
        num_signal_tokens=K,
        num_condition_tokens=2,
    )
    # states that share a big common part and differ only a little, like a fresh GPT's
    shared = torch.randn(1, K, 8) * 5
    states = shared + 0.1 * torch.randn(64, K, 8)
    proj.train()
    out = proj(states)  # (64, 2, 6)
    assert out.shape == (64, 2, 6)
    with torch.no_grad():
        y = proj.inner(states)  # (64, 2, 6): the shared part dominates
        expected = (y - y.mean(0)) / (y.var(0, unbiased=False) + 1e-5).sqrt()
    assert float(y.mean(0).abs().mean()) > 10 * float(y.std(0).mean())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert proj(states[:1]).shape == (1, 2, 6)  # one sample in training: running statistics
    for _ in range(200):  # the running statistics converge to the batch ones
        proj(states)
    proj.eval()
    torch.testing.assert_close(proj(states), out, atol=0.05, rtol=0)
    rebuilt = create("projector", "signal_standardized", **proj.config_dict())
    rebuilt.load_state_dict(proj.state_dict())
    torch.testing.assert_close(rebuilt.eval()(states), proj(states))
