"""Beam search against brute force, greedy, single prompts, full recomputation and transformers;
the decoding options of ``mmgpt generate``."""

from __future__ import annotations

from itertools import pairwise, product
from pathlib import Path

import pytest
import torch

from mmgpt import cli
from mmgpt.config import GPTConfig
from mmgpt.generation import (
    GenerationConfig,
    _beam_search,
    _Decoding,
    generate,
    generate_text,
    stream,
    stream_text,
)
from mmgpt.model import GPT

V, STEPS, EOS = 6, 3, 0
PROMPT = [3, 1, 4]


def tiny(vocab_size: int = V, std: float = 0.15, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16, init_std=std
    )
    return GPT(config).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny()


@pytest.fixture(scope="module")
def wide() -> GPT:
    return tiny(vocab_size=40, std=0.5, seed=1)


@torch.no_grad()
def full_logprobs(model: GPT, prompt: list[int], seqs: list[list[int]]) -> torch.Tensor:
    """(N, steps) log-prob of each new token, one full forward per sequence (no cache)."""
    ids = torch.tensor([prompt + s for s in seqs])
    logp = model(ids).logits.float().log_softmax(-1)[:, len(prompt) - 1 : -1]
    return logp.gather(-1, ids[:, len(prompt) :, None])[..., 0]


def brute_force(model: GPT, lp: float) -> list[tuple[float, list[int]]]:
    """Every finished sequence of at most STEPS new tokens, scored, best first."""
    seqs = [list(s) for s in product(range(V), repeat=STEPS)]
    tok_lp = full_logprobs(model, PROMPT, seqs)
    scored = {}
    for n, s in enumerate(seqs):
        end = s.index(EOS) + 1 if EOS in s else STEPS  # new tokens, the stop token included
        tokens = tuple(s[: end - 1] if EOS in s else s)
        scored[tokens] = float(tok_lp[n, :end].sum()) / end**lp
    return sorted(((score, list(t)) for t, score in scored.items()), key=lambda x: -x[0])


def beams(model: GPT, prompts, **options) -> object:
    config = GenerationConfig(max_new_tokens=STEPS, stop_token_ids=[EOS], **options)
    return generate(model, prompts, config, pad_id=EOS, return_dict=True)


@pytest.mark.parametrize("lp", [1.0, 0.0, 2.0, -0.5])
def test_exhaustive_beams_equal_brute_force_n_best(model, lp):
    expected = brute_force(model, lp)
    assert len(expected) == 1 + 5 + 25 + 125  # stop after 0, 1, 2 tokens, or 3 tokens
    n = 12
    assert all(a[0] - b[0] > 1e-5 for a, b in pairwise(expected[: n + 1]))  # no ties
    out = beams(model, [PROMPT], num_beams=V**STEPS, length_penalty=lp, num_return_sequences=n)
    assert out.tokens == [t for _, t in expected[:n]]
    assert out.scores == pytest.approx([s for s, _ in expected[:n]], abs=1e-5)
    assert out.scores == sorted(out.scores, reverse=True)
    for tokens, reason, stop in zip(out.tokens, out.finish_reasons, out.stop_reasons):
        # a finished (stop-token) sequence never continues: it is shorter than STEPS
        assert (reason, stop) == (("stop", EOS) if len(tokens) < STEPS else ("length", None))
        assert EOS not in tokens


def test_length_penalty_decides_between_short_and_long_finished_sequences(model):
    # Near-uniform logits: each token costs about log(6), so without a length penalty the
    # sequence that stops at once wins, and a strong one prefers the longest.
    short = beams(model, [PROMPT], num_beams=8, length_penalty=0.0).tokens[0]
    long = beams(model, [PROMPT], num_beams=8, length_penalty=3.0).tokens[0]
    assert short == brute_force(model, 0.0)[0][1] == []
    assert long == brute_force(model, 3.0)[0][1] and len(long) == STEPS


@pytest.mark.parametrize(("stop", "penalty"), [([], 1.0), ([7], 1.0), ([7], 1.4)])
def test_one_beam_is_greedy(wide, stop, penalty):
    # the beam algorithm itself (generate takes the greedy path for num_beams=1)
    options = dict(max_new_tokens=8, stop_token_ids=stop, repetition_penalty=penalty)
    greedy = generate(wide, [PROMPT], GenerationConfig(temperature=0, **options), pad_id=0)
    beam = GenerationConfig(num_beams=1, length_penalty=0.0, **options)
    run = _Decoding(
        wide,
        [PROMPT],
        beam,
        pad_id=0,
        inputs_embeds=None,
        attention_mask=None,
        decode=None,
        token_hook=None,
        return_hidden_states=False,
        host_sync=False,
    )
    assert _beam_search(run).tokens == greedy


def test_padded_batch_equals_each_prompt_alone_and_cached_scores_equal_recomputation(wide):
    prompts = [[5, 9, 2, 7, 1, 3], [11], [4, 4, 8]]
    options = dict(max_new_tokens=6, num_beams=4, num_return_sequences=3, length_penalty=0.7)
    config = GenerationConfig(**options, stop_token_ids=[2], repetition_penalty=1.3)
    batch = generate(wide, prompts, config, pad_id=0, return_dict=True)
    assert len(batch.tokens) == 9
    for i, p in enumerate(prompts):
        alone = generate(wide, [p], config, pad_id=0, return_dict=True)
        assert batch.tokens[3 * i : 3 * i + 3] == alone.tokens
        assert batch.scores[3 * i : 3 * i + 3] == pytest.approx(alone.scores, abs=1e-5)
        assert batch.prompt_lengths[3 * i : 3 * i + 3] == [len(p)] * 3
    # The scores (made step by step through the reordered KV cache) are those of a full
    # forward over prompt + tokens: log-probs after the repetition penalty of seen tokens.
    config = GenerationConfig(**options, stop_token_ids=[2])
    out = generate(wide, prompts, config, pad_id=0, return_dict=True)
    assert len({tuple(t) for t in out.tokens}) == 9  # distinct sequences
    for row, (tokens, score) in enumerate(zip(out.tokens, out.scores)):
        new = tokens + ([2] if out.finish_reasons[row] == "stop" else [])
        total = float(full_logprobs(wide, prompts[row // 3], [new]).sum())
        assert score == pytest.approx(total / len(new) ** 0.7, abs=1e-4)


def test_stop_strings_end_beams_and_stream_text_gives_the_best_text(wide):
    class Letters:  # token i is the letter chr(97 + i % 26)
        eos_id, pad_id, bos_id = 39, 38, 37

        def encode(self, text, add_bos=False):
            return [ord(c) - 97 for c in text]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + i % 26) for i in ids)

    tok = Letters()
    config = GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=3)
    free = generate(wide, [PROMPT], config, pad_id=0, return_dict=True, decode=tok.decode)
    stop = free.texts[0][2:4]  # a stop string the best sequence contains
    config = GenerationConfig(max_new_tokens=8, num_beams=3, stop_strings=[stop])
    out = generate(wide, [PROMPT], config, pad_id=0, return_dict=True, decode=tok.decode)
    assert stop in out.stop_reasons
    for tokens, text, reason in zip(out.tokens, out.texts, out.stop_reasons):
        if reason == stop:  # the token completing the stop string is kept, the text is cut
            assert tok.decode(tokens).endswith(stop) and stop not in text
            assert stop not in tok.decode(tokens)[:-1]
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, stop_strings=[stop])
    text = generate_text(wide, tok, PROMPT, cfg, stop_at_eos=False)
    assert text == out.texts[0]
    assert list(stream_text(wide, tok, PROMPT, cfg, stop_at_eos=False)) == [text]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2.0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=0), "num_return_sequences"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(num_beams=2, temperature=0.7), "temperature"),
        (dict(num_beams=2, top_k=5), "top_k"),
        (dict(num_beams=2, top_p=0.9), "top_p"),
    ],
)
def test_config_rejects_bad_beam_options_naming_the_field(options, field):
    with pytest.raises(ValueError, match=rf"GenerationConfig\.{field}:"):
        GenerationConfig(**options)


def test_beams_refuse_streaming_hooks_and_hidden_states(wide):
    config = GenerationConfig(max_new_tokens=4, num_beams=2, temperature=0)
    with pytest.raises(ValueError, match="cannot stream"):
        list(stream(wide, PROMPT, config))
    with pytest.raises(ValueError, match="token_hook"):
        generate(wide, [PROMPT], config, pad_id=0, token_hook=lambda state: None)
    with pytest.raises(ValueError, match="return_hidden_states"):
        generate(wide, [PROMPT], config, pad_id=0, return_hidden_states=True)


def test_beams_equal_transformers(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    from mmgpt.pretrained import save_hf_gpt2

    torch.manual_seed(3)
    config = GPTConfig(
        vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh"
    )
    ours = GPT(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))  # peaked distributions: no near-ties
    save_hf_gpt2(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = [7, 3, 9, 1]
    # (no repetition penalty: transformers applies it to log-probs, mmgpt to logits)
    for lp in (1.0, 0.0, 2.0):
        cfg = GenerationConfig(
            max_new_tokens=7,
            num_beams=4,
            num_return_sequences=2,
            length_penalty=lp,
            stop_token_ids=[5],
        )
        mine = generate(ours, [prompt], cfg, pad_id=0)
        with torch.no_grad():
            hf = theirs.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=7,
                num_beams=4,
                num_return_sequences=2,
                length_penalty=lp,
                early_stopping="never",
                do_sample=False,
                eos_token_id=5,
                pad_token_id=0,
            )
        expected = []
        for row in hf[:, len(prompt) :].tolist():
            expected.append(row[: row.index(5)] if 5 in row else row)
        assert mine == expected, lp


# -- the command line ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT, object]:
    from mmgpt_text import TextTokenizer

    root = tmp_path_factory.mktemp("beam-cli")
    (root / "corpus.txt").write_text("the red square and the blue circle. " * 20, encoding="utf-8")
    tokenizer = TextTokenizer.train([root / "corpus.txt"], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32
    )
    gpt = GPT(config).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.2 * torch.randn_like(p))
    gpt.save_pretrained(root / "model", tokenizer=tokenizer)
    return root / "model", gpt, tokenizer


def cli_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert (code, err) == (0, ""), err
    assert out.endswith("\n")
    return out[:-1]


@pytest.mark.parametrize(
    ("flags", "options"),
    [
        (["--num-beams", "3"], dict(num_beams=3)),
        (["--num-beams", "3", "--length-penalty", "-1.5"], dict(num_beams=3, length_penalty=-1.5)),
        (["--temperature", "0", "--repetition-penalty", "1.8"], dict(repetition_penalty=1.8)),
    ],
    ids=["num-beams", "length-penalty", "repetition-penalty"],
)
def test_generate_decoding_flags(model_dir, capsys, flags, options):
    path, gpt, tokenizer = model_dir
    argv = ["generate", "--model", str(path), "--prompt", "the red", "--max-new-tokens", "8"]
    config = GenerationConfig(max_new_tokens=8, temperature=0, **options)
    expected = generate_text(gpt, tokenizer, "the red", config)
    plain = generate_text(
        gpt, tokenizer, "the red", GenerationConfig(max_new_tokens=8, temperature=0)
    )
    assert expected.strip() and expected != plain  # the flag changes the reply
    assert cli_text([*argv, *flags], capsys) == expected


def test_generate_stop_flag_is_repeatable(model_dir, capsys):
    argv = [
        "generate",
        "--model",
        str(model_dir[0]),
        "--prompt",
        "the red",
        "--max-new-tokens",
        "10",
    ]
    argv += ["--temperature", "0"]
    full = cli_text(argv, capsys)
    first, second = full[4:6], full[2:4]
    assert first not in full[:5] and second not in full[:3]
    expected = full[: full.index(second)]
    assert cli_text([*argv, "--stop", first, "--stop", second], capsys) == expected
    assert cli_text([*argv, "--stop", first], capsys) == full[: full.index(first)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-beams", "0"], "--num-beams"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--length-penalty", "inf"], "--length-penalty"),
    ],
)
def test_generate_rejects_bad_decoding_values(model_dir, capsys, flags, message):
    argv = ["generate", "--model", str(model_dir[0]), "--prompt", "the", *flags]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_generate_refuses_sampling_with_beams(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir[0]), "--prompt", "the"]
    code = cli.main([*argv, "--num-beams", "2", "--top-k", "5"])
    assert code == 2 and "GenerationConfig.top_k: beam search" in capsys.readouterr().err


def test_multimodal_generate_passes_beams_through(tmp_path: Path):
    pytest.importorskip("timm")
    from PIL import Image

    from mmgpt.data.sample import Turn
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt_text import TextTokenizer

    (tmp_path / "corpus.txt").write_text("User: What colour is it?\nAssistant: red\n" * 20)
    tok = TextTokenizer.train([tmp_path / "corpus.txt"], vocab_size=300)
    torch.manual_seed(0)
    mm = MultimodalGPT.build("gpt-nano", tok, block_size=64).eval()
    prompts = [[Turn("user", "<image>\nWhat colour is it?")], "<image> red"]
    images = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (32, 32), 90)]]
    config = GenerationConfig(max_new_tokens=5, num_beams=3, num_return_sequences=2)
    out = mm.generate(prompts, images, config)
    embeds, mask = mm.prepare_prompts(prompts, images)
    direct = generate(
        mm.gpt,
        None,
        mm._generation_config(config, True),
        pad_id=int(tok.pad_id),
        inputs_embeds=embeds,
        attention_mask=mask,
        return_dict=True,
    )
    assert out.tokens == direct.tokens and len(out.texts) == 4
    assert out.texts[2:] == [tok.decode(t, skip_special_tokens=True) for t in out.tokens[2:]]
    best = mm.generate_text(prompts[0], images[0], GenerationConfig(max_new_tokens=5, num_beams=3))
    assert best == out.texts[0]
