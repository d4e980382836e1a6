"""Generation against an uncached reference: sampling, KV cache, batching, stops, streaming, hooks."""

from __future__ import annotations

import pytest
import torch

from mmgpt.config import gpt_config
from mmgpt.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    ForceAfter,
    GenerationConfig,
    StepState,
    apply_repetition_penalty,
    generate,
    generate_text,
    sample_next_token,
    stream,
    stream_batch,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from mmgpt.model import GPT

V = 64
POS_ENCODINGS = ("learned", "rotary", "sinusoidal")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 20, 30, 40]]


def tiny(pos_encoding: str = "learned", **overrides) -> GPT:
    # Untied head and a large init: varied greedy continuations instead of one repeated token.
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=48, init_std=0.5, tie_embeddings=False)
    return GPT(gpt_config("gpt-nano", pos_encoding=pos_encoding, **{**cfg, **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny()


def reference(model: GPT, prompt: list[int], config: GenerationConfig, generator=None) -> list[int]:
    """No cache: re-run the full sequence every step and take its last logits."""
    ids, new = list(prompt), []
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, prompt] = True
    with torch.no_grad():
        for _ in range(config.max_new_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1]
            if config.greedy and config.repetition_penalty == 1.0:
                tok = int(logits.argmax())
            else:
                tok = int(sample_next_token(logits, config, generator=generator, seen=seen))
            if tok in config.stop_token_ids:
                break
            new.append(tok)
            ids.append(tok)
            seen[0, tok] = True
    return new


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("stop_token_ids", 3),
        ("stop_token_ids", [-1]),
        ("stop_strings", "END"),
        ("stop_strings", [""]),
        ("seed", -1),
        ("seed", []),
        ("truncate_prompt", "right"),
        ("do_sample", "yes"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"GenerationConfig\.{field}"):
        GenerationConfig(**{field: value})


def test_config_normalises_sequences_and_greedy_flag():
    cfg = GenerationConfig(stop_token_ids=[3, 4], stop_strings=["a"], seed=[1, 2])
    assert cfg.stop_token_ids == (3, 4) and cfg.stop_strings == ("a",) and cfg.seed == (1, 2)
    assert GenerationConfig(temperature=0).greedy and GenerationConfig(do_sample=False).greedy
    assert not GenerationConfig(temperature=0.7).greedy


# --------------------------------------------------------------------------------------
# Logits processing on hand-made logits
# --------------------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0], [0.0, -1.0, 2.0, 1.5, 0.5]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, False, True], [False, False, True, True, False]]
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 2)[kept], logits[kept])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.7, 0.1, 0.1, 0.1]])
    logits = probs.log()
    # row 0 sorted: 0.5, 0.3 (0.8), 0.15 (0.95), 0.05
    assert top_p_filter(logits, 0.75).isfinite().tolist()[0] == [False, True, False, True]
    assert top_p_filter(logits, 0.9).isfinite().tolist()[0] == [False, True, True, True]
    assert top_p_filter(logits, 0.4).isfinite().tolist()[0] == [False, True, False, False]
    # the most likely token alone already exceeds p
    assert top_p_filter(logits, 0.6).isfinite().tolist()[1] == [True, False, False, False]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0]]


def test_repetition_penalty_counts_the_prompt(model):
    # Greedy with a huge penalty can never repeat any token: not from the prompt, not its own.
    cfg = GenerationConfig(max_new_tokens=20, temperature=0, repetition_penalty=1e6)
    out = generate(model, [PROMPTS[0]], cfg, pad_id=0)[0]
    assert len(set(out)) == len(out) and not set(out) & set(PROMPTS[0])
    assert out == reference(model, PROMPTS[0], cfg)


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = probs.log().expand(40000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, GenerationConfig(), generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    # top_k=2 renormalises over the two most likely tokens: 3/7 and 4/7
    draws = sample_next_token(logits, GenerationConfig(top_k=2), generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0, 0, 3 / 7, 4 / 7, 0]), atol=0.01, rtol=0)
    # temperature 0.5 squares the probabilities before renormalising
    draws = sample_next_token(logits, GenerationConfig(temperature=0.5), generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, probs**2 / (probs**2).sum(), atol=0.01, rtol=0)


# --------------------------------------------------------------------------------------
# KV-cache decoding vs the uncached reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_greedy_equals_uncached_argmax_reference(pos_encoding):
    model = tiny(pos_encoding)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    out = generate(model, [PROMPTS[0]], cfg, pad_id=0)[0]
    assert out == reference(model, PROMPTS[0], cfg)
    assert len(set(out)) > 3  # a real continuation, not one repeated token


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_seeded_sampling_cached_equals_uncached(pos_encoding):
    model = tiny(pos_encoding)
    cfg = GenerationConfig(
        max_new_tokens=16, temperature=1.5, top_k=20, top_p=0.95, repetition_penalty=1.3, seed=7
    )
    out = generate(model, [PROMPTS[2]], cfg, pad_id=0)[0]
    assert out == reference(model, PROMPTS[2], cfg, torch.Generator().manual_seed(7))
    greedy = generate(
        model, [PROMPTS[2]], GenerationConfig(max_new_tokens=16, temperature=0), pad_id=0
    )
    assert out != greedy  # the sampling path really sampled


def test_seed_makes_results_reproducible_and_independent_of_global_rng(model):
    cfg = GenerationConfig(max_new_tokens=12, temperature=2.0, seed=3)
    torch.manual_seed(1)
    a = generate(model, PROMPTS, cfg, pad_id=0)
    torch.manual_seed(2)
    b = generate(model, PROMPTS, cfg, pad_id=0)
    assert a == b
    c = generate(
        model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=2.0, seed=4), pad_id=0
    )
    assert c != a
    # seed=None draws from the global RNG, so torch.manual_seed reproduces it
    unseeded = GenerationConfig(max_new_tokens=12, temperature=2.0)
    torch.manual_seed(5)
    d = generate(model, PROMPTS, unseeded, pad_id=0)
    torch.manual_seed(5)
    assert generate(model, PROMPTS, unseeded, pad_id=0) == d


def test_temperature_to_zero_is_greedy(model):
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0), pad_id=0)
    for cfg in (
        GenerationConfig(max_new_tokens=12, do_sample=False, temperature=5.0, seed=1),
        GenerationConfig(max_new_tokens=12, temperature=1e-4, seed=1),
    ):
        assert generate(model, PROMPTS, cfg, pad_id=0) == greedy


# --------------------------------------------------------------------------------------
# Batching with left padding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time_greedy(pos_encoding):
    model = tiny(pos_encoding)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    batched = generate(model, PROMPTS, cfg, pad_id=63)
    assert batched == [generate(model, [p], cfg, pad_id=63)[0] for p in PROMPTS]
    assert batched[0] == reference(model, PROMPTS[0], cfg)


def test_batched_sampling_with_per_row_seeds_equals_one_at_a_time(model):
    base = dict(max_new_tokens=12, temperature=1.5, top_p=0.9)
    batched = generate(model, PROMPTS, GenerationConfig(**base, seed=[11, 12, 13]), pad_id=0)
    alone = [
        generate(model, [p], GenerationConfig(**base, seed=s), pad_id=0)[0]
        for p, s in zip(PROMPTS, [11, 12, 13])
    ]
    assert batched == alone
    with pytest.raises(ValueError, match="2 per-row seeds for a batch of 3"):
        generate(model, PROMPTS, GenerationConfig(**base, seed=[1, 2]), pad_id=0)


def test_tensor_prompts_with_attention_mask_equal_list_prompts(model):
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    ids = torch.tensor([[0, 0, 9, 8], [10, 20, 30, 40]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = generate(model, ids, cfg, pad_id=0, attention_mask=mask)
    assert out == generate(model, PROMPTS[1:], cfg, pad_id=0)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids, cfg, pad_id=0, attention_mask=mask.flip(1))


# --------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------


def test_stop_token_ends_only_its_row_and_is_excluded(model, monkeypatch):
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0), pad_id=0)
    # a token new to row 0 at j >= 2 that some other row never produces
    j = next(
        j
        for j in range(2, 12)
        if free[0][j] not in free[0][:j] and any(free[0][j] not in t for t in free[1:])
    )
    stop = free[0][j]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=[stop])
    fed = []  # input ids of every forward call: prefill, then one column per step
    forward = model.forward

    def spy(*args, **kwargs):
        fed.append(kwargs["input_ids"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    out = generate(model, PROMPTS, cfg, pad_id=63, return_dict=True)
    monkeypatch.undo()
    for row, tokens in enumerate(free):
        cut = tokens.index(stop) if stop in tokens else len(tokens)
        assert out.tokens[row] == tokens[:cut]
        assert out.finish_reasons[row] == ("stop" if stop in tokens else "length")
        assert out.stop_reasons[row] == (stop if stop in tokens else None)
    assert out.tokens[0] == free[0][:j]
    assert "length" in out.finish_reasons  # that row ran on to the limit
    # a row that stopped at step s is fed its stop token at call s + 1, then only padding
    padded = [
        ids[row, 0]
        for row, tokens in enumerate(out.tokens)
        if out.finish_reasons[row] == "stop"
        for ids in fed[len(tokens) + 2 :]
    ]
    assert padded and all(t == 63 for t in padded)
    assert out.prompt_lengths == [len(p) for p in PROMPTS]


def letters(ids: list[int]) -> str:
    """A fake tokenizer's decode: every token is two characters, lower then upper case."""
    return "".join("abcdefgh"[t // 8] + "ABCDEFGH"[t % 8] for t in ids)


def test_stop_string_spanning_two_tokens_stops_exactly(model):
    free = generate(
        model, [PROMPTS[0]], GenerationConfig(max_new_tokens=16, temperature=0), pad_id=0
    )[0]
    text = letters(free)
    # the boundary between tokens 4 and 5: upper case of one, lower case of the next
    stop = text[9:11]
    first = text.find(stop)
    n_tokens = next(n for n in range(1, len(free) + 1) if stop in letters(free[:n]))
    assert first % 2 == 1 and n_tokens == first // 2 + 2  # really split across two tokens
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, stop_strings=["zzz", stop])
    out = generate(model, [PROMPTS[0]], cfg, pad_id=0, decode=letters, return_dict=True)
    assert out.tokens[0] == free[:n_tokens]  # the completing token is kept
    assert out.texts[0] == text[:first]  # the text is cut before the stop string
    assert (out.finish_reasons[0], out.stop_reasons[0]) == ("stop", stop)
    with pytest.raises(ValueError, match="stop_strings need a decode function"):
        generate(model, [PROMPTS[0]], cfg, pad_id=0)


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


def test_stream_yields_the_tokens_of_generate(model):
    free = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=12, seed=5), pad_id=0)[0]
    cfg = GenerationConfig(max_new_tokens=12, seed=5, stop_token_ids=[free[6]])
    expected = generate(model, [PROMPTS[0]], cfg, pad_id=0)[0]
    assert list(stream(model, PROMPTS[0], cfg)) == expected == free[: free.index(free[6])]
    assert list(stream(model, torch.tensor(PROMPTS[0]), cfg)) == expected


def test_stream_batch_events_rebuild_generate(model):
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, temperature=0), pad_id=0)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0, stop_token_ids=[free[1][2]])
    expected = generate(model, PROMPTS, cfg, pad_id=0, return_dict=True)
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    ends = {}
    for event in stream_batch(model, PROMPTS, cfg, pad_id=0):
        assert event.row not in ends  # nothing after a row's final event
        if event.token_id is None:
            ends[event.row] = (event.finish_reason, event.stop_reason)
        else:
            tokens[event.row].append(event.token_id)
    assert tokens == expected.tokens
    assert ends == {r: (expected.finish_reasons[r], expected.stop_reasons[r]) for r in range(3)}


class ByteTokenizer:
    """Fake byte-level tokenizer: a token may be part of a UTF-8 character."""

    PIECES = (
        b"",
        b"",
        b"",
        *[bytes([c]) for c in b"helo wrd!"],
        b"\xc3",
        b"\xa9",
        b"\xe2\x82",
        b"\xac",
    )
    eos_id, bos_id, pad_id = 0, 1, 2

    def __init__(self) -> None:
        self.ids = {p: i for i, p in enumerate(self.PIECES) if p}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.ids[bytes([b])] for b in text.encode()]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")

    def ids_of(self, *pieces: bytes) -> list[int]:
        return [self.ids[p] for p in pieces]


def forcing(sequence: list[int]):
    """A token hook that makes row 0 emit ``sequence`` whatever the model prefers."""

    def hook(state: StepState) -> dict[int, int] | None:
        return {0: sequence[state.step]} if state.step < len(sequence) else None

    return hook


def test_stream_text_never_yields_partial_utf8_and_holds_back_stop_prefixes(model):
    tok = ByteTokenizer()
    # "hé€ lo!d": é and € split over tokens, then "lo" could start the stop string "lod"
    seq = tok.ids_of(b"h", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b" ", b"l", b"o", b"!", b"d")
    cfg = GenerationConfig(max_new_tokens=len(seq), temperature=0, stop_strings=["lod"])
    chunks = list(stream_text(model, tok, "he", cfg, token_hook=forcing(seq)))
    assert chunks == ["h", "é", "€", " ", "lo!", "d"]
    # a stop string spanning tokens cuts the text, and its first characters never show
    cfg = GenerationConfig(max_new_tokens=len(seq), temperature=0, stop_strings=["lo!"])
    chunks = list(stream_text(model, tok, "he", cfg, token_hook=forcing(seq)))
    assert chunks == ["h", "é", "€", " "]
    assert generate_text(model, tok, "he", cfg, token_hook=forcing(seq)) == "hé€ "


def test_stream_text_stops_at_eos_and_flushes_an_unfinished_character(model):
    tok = ByteTokenizer()
    seq = [*tok.ids_of(b"h", b"e", b"\xc3"), tok.eos_id, *tok.ids_of(b"d")]
    cfg = GenerationConfig(max_new_tokens=len(seq), temperature=0)
    assert list(stream_text(model, tok, "h", cfg, token_hook=forcing(seq))) == ["h", "e", "\ufffd"]
    assert generate_text(model, tok, "h", cfg, token_hook=forcing(seq), stop_at_eos=False) == (
        "he\ufffdd"
    )


def test_stream_text_with_the_bpe_tokenizer(tmp_path):
    mmgpt_text = pytest.importorskip("mmgpt_text")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nthe dog ate the hat\n" * 20, encoding="utf-8")
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300, num_signal_tokens=2)
    model = tiny(vocab_size=tok.vocab_size)
    target = "the cät ate €5 "
    seq = tok.encode(target)
    # ä and € are unseen in training, so their bytes are separate tokens
    assert any(tok.decode(seq[:i]).endswith("\ufffd") for i in range(1, len(seq)))
    cfg = GenerationConfig(max_new_tokens=len(seq) + 1, temperature=0, stop_strings=["€5 "])
    chunks = list(stream_text(model, tok, "the", cfg, token_hook=forcing(seq)))
    assert "".join(chunks) == "the cät ate "
    assert all("\ufffd" not in c for c in chunks) and len(chunks) > 3


# --------------------------------------------------------------------------------------
# Prompt length
# --------------------------------------------------------------------------------------


def test_long_prompt_errors_unless_left_truncation(model):
    long = [(7 * i) % V for i in range(45)]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    with pytest.raises(ValueError, match=r"prompt 1 has 45 positions.*max_new_tokens=8.*53.*48"):
        generate(model, [[1, 2], long], cfg, pad_id=0)
    left = GenerationConfig(max_new_tokens=8, temperature=0, truncate_prompt="left")
    out = generate(model, [[1, 2], long], left, pad_id=0, return_dict=True)
    assert out.tokens == generate(model, [[1, 2], long[-40:]], cfg, pad_id=0)
    assert out.prompt_lengths == [2, 40]
    with pytest.raises(ValueError, match="leaves no room"):
        generate(
            model, [[1]], GenerationConfig(max_new_tokens=48, truncate_prompt="left"), pad_id=0
        )


def test_default_max_new_tokens_adapts_to_the_room_the_prompt_leaves():
    """A context of 64 positions: the old fixed default of 64 new tokens left no room for any
    prompt; unset, the reply takes the room left, and an explicit 64 stays an error."""
    small = tiny(block_size=64)
    assert GenerationConfig().max_new_tokens is None and DEFAULT_MAX_NEW_TOKENS == 64

    def run(prompts, **config):
        return generate(small, prompts, GenerationConfig(temperature=0, **config), pad_id=0)

    prompt = [(3 * i) % V for i in range(10)]
    out = run([prompt])[0]
    assert len(out) == 54 and out == run([prompt], max_new_tokens=54)[0]  # no stop: to the end
    # batched: the longest prompt sets the room; each row as it would be alone with that room
    assert run([prompt, [1, 2]]) == [run([p], max_new_tokens=54)[0] for p in (prompt, [1, 2])]
    with pytest.raises(ValueError, match=r"max_new_tokens=64 leaves no room for a prompt.*64"):
        run([prompt], max_new_tokens=64)
    # a prompt that fills the context: an error, or its last block_size - 32 positions
    full = [(5 * i) % V for i in range(64)]
    with pytest.raises(ValueError, match=r"64 positions and fills the model's context"):
        run([full])
    assert run([full], truncate_prompt="left") == run([full[-32:]], max_new_tokens=32)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_default_max_new_tokens_is_64_where_64_fits(pos_encoding):
    model = tiny(pos_encoding, block_size=128)
    sixty_four = GenerationConfig(max_new_tokens=64, temperature=1.3, seed=5)
    unset = GenerationConfig(temperature=1.3, seed=5)
    for prompts in ([PROMPTS[0]], PROMPTS):
        assert generate(model, prompts, unset, pad_id=0) == generate(
            model, prompts, sixty_four, pad_id=0
        )
    embeds = model.transformer.wte(torch.tensor([PROMPTS[0]]))
    tokens = generate(model, None, unset, pad_id=0, inputs_embeds=embeds)
    assert len(tokens[0]) == 64
    # a prompt of 100: the 28 positions left, where 64 new tokens would not fit
    long = [(7 * i) % V for i in range(100)]
    assert len(generate(model, [long], unset, pad_id=0)[0]) == 28


def test_bad_prompts_raise_clear_errors(model):
    cfg = GenerationConfig(max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], cfg, pad_id=0)
    with pytest.raises(ValueError, match=f"token id {V} is outside the vocabulary"):
        generate(model, [[1, V]], cfg, pad_id=0)
    with pytest.raises(ValueError, match="wrap a single prompt"):
        generate(model, [1, 2, 3], cfg, pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        generate(model, [[1]], cfg, pad_id=V)


# --------------------------------------------------------------------------------------
# Multimodal hooks: inputs_embeds, forced tokens, hidden states
# --------------------------------------------------------------------------------------


def test_inputs_embeds_prefill_equals_input_ids_prefill():
    model = tiny("rotary")
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.5, seed=[1, 2])
    ids = torch.tensor([[0, 0, 9, 8], [10, 20, 30, 40]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        embeds = model.transformer.wte(ids)
    from_embeds = generate(model, None, cfg, pad_id=0, inputs_embeds=embeds, attention_mask=mask)
    assert from_embeds == generate(model, ids, cfg, pad_id=0, attention_mask=mask)
    greedy = GenerationConfig(max_new_tokens=5, temperature=0)
    streamed = list(stream(model, None, greedy, inputs_embeds=embeds[1:]))
    assert streamed == generate(model, [PROMPTS[2]], greedy, pad_id=0)[0]


def test_forced_tokens_and_their_hidden_states_match_a_full_forward():
    model = tiny("learned")
    trigger, signal = 60, [61, 62, 63]
    force_after = ForceAfter(trigger, signal)
    seen_hidden = []

    def hook(state: StepState) -> dict[int, int] | None:
        seen_hidden.append(state.hidden_states.clone())
        if state.step == 2:  # both rows start an "image" at their third new token
            return {0: trigger, 1: trigger}
        return force_after(state)

    cfg = GenerationConfig(max_new_tokens=9, temperature=1.5, seed=[3, 4])
    out = generate(
        model,
        PROMPTS[:2],
        cfg,
        pad_id=0,
        token_hook=hook,
        return_hidden_states=True,
        return_dict=True,
    )
    for row, prompt in enumerate(PROMPTS[:2]):
        tokens = out.tokens[row]
        assert tokens[2:6] == [trigger, *signal] and len(tokens) == 9
        with torch.no_grad():
            full = model(torch.tensor([prompt + tokens])).hidden_states[0]  # (T, C)
        positions = range(len(prompt), len(prompt) + len(tokens))
        torch.testing.assert_close(out.hidden_states[row], full[positions], atol=1e-4, rtol=1e-4)
        # the hook saw, at each step, the hidden state of the row's last fed position
        for step in range(len(tokens)):
            torch.testing.assert_close(
                seen_hidden[step][row], full[len(prompt) + step - 1], atol=1e-4, rtol=1e-4
            )
    assert out.hidden_states[0].requires_grad is False and not out.hidden_states[0].is_inference()


def test_hidden_states_of_a_row_stopped_by_a_stop_string(model):
    free = generate(
        model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10, temperature=0), pad_id=0
    )[0]
    stop = letters(free)[5:9]  # ends inside token 4
    cfg = GenerationConfig(max_new_tokens=10, temperature=0, stop_strings=[stop])
    out = generate(
        model,
        [PROMPTS[0]],
        cfg,
        pad_id=0,
        decode=letters,
        return_hidden_states=True,
        return_dict=True,
    )
    tokens = out.tokens[0]
    assert tokens == free[:5]
    with torch.no_grad():
        full = model(torch.tensor([PROMPTS[0] + tokens])).hidden_states[0]
    torch.testing.assert_close(out.hidden_states[0], full[len(PROMPTS[0]) :], atol=1e-4, rtol=1e-4)


def test_force_after_validates_and_is_stateless():
    hook = ForceAfter(5, [6, 7])
    state = StepState(0, [[1, 5], [5, 6], [5, 6, 7], [9]], [False, False, False, False], None, None)
    assert hook(state) == {0: 6, 1: 7}
    with pytest.raises(ValueError, match="ForceAfter"):
        ForceAfter(5, [])


def test_dropout_model_generates_in_eval_mode_and_keeps_its_mode():
    model = tiny(dropout=0.5)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    expected = generate(model, [PROMPTS[0]], cfg, pad_id=0)
    model.train()
    assert generate(model, [PROMPTS[0]], cfg, pad_id=0) == expected
    assert model.training
