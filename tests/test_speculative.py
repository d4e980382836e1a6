"""Speculative decoding: greedy output equals the target's own, sampling keeps its distribution."""

from __future__ import annotations

import pytest
import torch

from mmgpt import compiled_step
from mmgpt.config import gpt_config
from mmgpt.generation import GenerationConfig, generate, sampling_probs, stream_text
from mmgpt.model import GPT
from mmgpt.speculative import SpeculativeStats, greedy_accept, sampling_accept

V = 64
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 20, 30, 40], [33]]


def tiny(pos_encoding: str = "learned", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=48, init_std=0.5, tie_embeddings=False)
    return GPT(gpt_config("gpt-nano", pos_encoding=pos_encoding, **{**cfg, **overrides})).eval()


def noisy_copy(model: GPT, scale: float, seed: int = 1) -> GPT:
    """A draft that agrees with the target often but not always."""
    draft = GPT(model.config).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


GREEDY = GenerationConfig(max_new_tokens=20, temperature=0)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_plain_greedy_with_a_different_draft(pos_encoding, k):
    target = tiny(pos_encoding)
    draft = noisy_copy(target, 0.05)
    stats = SpeculativeStats()
    for prompt in PROMPTS:
        want = generate(target, [prompt], GREEDY, pad_id=0)
        out = generate(
            target,
            [prompt],
            GREEDY,
            pad_id=0,
            draft_model=draft,
            num_draft_tokens=k,
            return_dict=True,
        )
        assert out.tokens == want
        assert out.finish_reasons == ["length"]
        for name in ("rounds", "proposed", "accepted"):
            setattr(stats, name, getattr(stats, name) + getattr(out.speculative, name))
    # the draft really differs from the target: some proposals fail, many pass
    assert 0.2 < stats.acceptance_rate < 0.95, stats


def test_greedy_speculative_with_a_smaller_draft_model():
    target = tiny("rotary", n_kv_head=1)  # grouped-query target
    draft = tiny("rotary", seed=5, n_layer=1, n_embd=24, n_head=2)
    for prompt in PROMPTS:
        want = generate(target, [prompt], GREEDY, pad_id=0)
        got = generate(target, [prompt], GREEDY, pad_id=0, draft_model=draft, num_draft_tokens=4)
        assert got == want


@pytest.mark.parametrize("k", [1, 4])
def test_a_draft_equal_to_the_target_is_always_accepted(k):
    target = tiny("rotary")
    out = generate(
        target,
        [PROMPTS[0]],
        GREEDY,
        pad_id=0,
        draft_model=target,
        num_draft_tokens=k,
        return_dict=True,
    )
    assert out.tokens == generate(target, [PROMPTS[0]], GREEDY, pad_id=0)
    assert out.speculative.acceptance_rate == 1.0
    # 20 tokens: the first from the prefill, then rounds of k + 1 (the last one shorter)
    assert out.speculative.tokens_per_round > k  # each round emits its k proposals + 1
    assert out.speculative.rounds == -(-(20 - 1 - 1) // (k + 1))


def test_speculative_on_the_static_cache_equals_plain_greedy(monkeypatch):
    """compile=True with the compiler unavailable: the static cache's rewind path, eagerly."""
    monkeypatch.setattr(compiled_step, "_UNAVAILABLE", [])
    monkeypatch.setattr(compiled_step, "missing_compiler", lambda: "no C++ compiler (test)")
    target = tiny("rotary")
    draft = noisy_copy(target, 0.05)
    static = GenerationConfig(max_new_tokens=20, temperature=0, compile=True)
    with pytest.warns(RuntimeWarning):
        for prompt in PROMPTS:
            want = generate(target, [prompt], GREEDY, pad_id=0)
            got = generate(
                target, [prompt], static, pad_id=0, draft_model=draft, num_draft_tokens=3
            )
            assert got == want


def test_speculative_stops_at_a_stop_token_like_plain_decoding():
    target = tiny()
    draft = noisy_copy(target, 0.05)
    free = generate(target, [PROMPTS[0]], GREEDY, pad_id=0)[0]
    stop = free[9]
    cfg = GenerationConfig(max_new_tokens=20, temperature=0, stop_token_ids=[stop])
    want = generate(target, [PROMPTS[0]], cfg, pad_id=0, return_dict=True)
    got = generate(
        target, [PROMPTS[0]], cfg, pad_id=0, draft_model=draft, num_draft_tokens=4, return_dict=True
    )
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons == ["stop"]
    assert stop not in got.tokens[0]


class LetterTokenizer:
    """Token i is the character chr(48 + i); eos 0 never comes up in these continuations."""

    eos_id, bos_id, pad_id = 0, 1, 2

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [self.bos_id] * add_bos + [ord(c) - 48 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(48 + i) for i in ids)


def test_stream_text_reports_the_acceptance_rate():
    target = tiny()
    tok = LetterTokenizer()
    stats = SpeculativeStats()
    text = "".join(
        stream_text(target, tok, [1, 2, 3], GREEDY, draft_model=target, speculative_stats=stats)
    )
    assert text == "".join(stream_text(target, tok, [1, 2, 3], GREEDY))
    assert stats.rounds > 0 and stats.acceptance_rate == 1.0


def test_speculative_refuses_what_it_cannot_do():
    target = tiny()
    draft = tiny(seed=3)
    with pytest.raises(ValueError, match="one prompt at a time, got 2"):
        generate(target, PROMPTS[:2], GREEDY, pad_id=0, draft_model=draft)
    with pytest.raises(ValueError, match="num_draft_tokens: expected an integer >= 1"):
        generate(target, PROMPTS[:1], GREEDY, pad_id=0, draft_model=draft, num_draft_tokens=0)
    with pytest.raises(
        ValueError, match="its vocabulary \\(32\\) differs from the model's \\(64\\)"
    ):
        generate(target, PROMPTS[:1], GREEDY, pad_id=0, draft_model=tiny(vocab_size=32))
    with pytest.raises(ValueError, match="its context \\(block_size=16\\) is shorter"):
        generate(target, PROMPTS[:1], GREEDY, pad_id=0, draft_model=tiny(block_size=16))
    penalty = GenerationConfig(max_new_tokens=5, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="does not support repetition_penalty=1.2"):
        generate(target, PROMPTS[:1], penalty, pad_id=0, draft_model=draft)
    embeds = torch.randn(1, 3, target.config.n_embd)
    with pytest.raises(ValueError, match="does not support inputs_embeds"):
        generate(target, None, GREEDY, pad_id=0, inputs_embeds=embeds, draft_model=draft)
    with pytest.raises(ValueError, match="does not support return_hidden_states"):
        generate(
            target, PROMPTS[:1], GREEDY, pad_id=0, draft_model=draft, return_hidden_states=True
        )


# --------------------------------------------------------------------------------------
# The acceptance rules
# --------------------------------------------------------------------------------------


def test_greedy_accept_takes_the_matching_prefix_and_the_targets_next_token():
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 5, 1, 4]):
        logits[row, best] = 1.0
    assert greedy_accept(torch.tensor([2, 5, 1]), logits) == (3, 4)  # all pass: bonus token
    assert greedy_accept(torch.tensor([2, 0, 1]), logits) == (1, 5)  # 2nd fails: target's 5
    assert greedy_accept(torch.tensor([3, 5, 1]), logits) == (0, 2)


def tv_distance(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_rejection_rule_emits_tokens_distributed_as_the_target():
    """Draw x ~ q, apply the rule: the first emitted token must follow p, not q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    q = torch.tensor([[0.1, 0.1, 0.3, 0.2, 0.3]])
    counts = torch.zeros(5)
    n = 20000
    accepted = 0
    for _ in range(n):
        x = torch.multinomial(q[0], 1, generator=g)
        k, nxt = sampling_accept(x, q, p, g)
        counts[int(x) if k == 1 else nxt] += 1
        accepted += k
    assert tv_distance(counts, p[0]) < 0.015
    assert tv_distance(counts, q[0]) > 0.3  # a rule that kept the draft would fail above
    # acceptance probability is sum_x min(p, q) = 0.1 + 0.1 + 0.2 + 0.1 + 0 = 0.5
    assert abs(accepted / n - 0.5) < 0.015


def test_sampled_speculative_tokens_follow_the_targets_distribution():
    """End to end on a vocabulary of 8: the second new token (the first comes from the
    prefill; the second is always decided by a verification) has the target's marginal
    distribution, computed exactly by enumerating the first."""
    vocab = 8
    target = tiny(vocab_size=vocab, init_std=0.4)
    draft = tiny(vocab_size=vocab, init_std=0.4, seed=7, n_layer=1)
    cfg = GenerationConfig(max_new_tokens=3, temperature=1.0)
    prompt = [3, 1, 4]
    with torch.no_grad():
        p1 = sampling_probs(target(torch.tensor([prompt])).logits[:, -1], cfg)[0]
        marginal = torch.zeros(vocab)
        for x1 in range(vocab):
            logits = target(torch.tensor([[*prompt, x1]])).logits[:, -1]
            marginal += p1[x1] * sampling_probs(logits, cfg)[0]
        q_marginal = torch.zeros(vocab)  # what a rule that kept the draft's tokens would give
        for x1 in range(vocab):
            logits = draft(torch.tensor([[*prompt, x1]])).logits[:, -1]
            q_marginal += p1[x1] * sampling_probs(logits, cfg)[0]
    assert 0.5 * float((marginal - q_marginal).abs().sum()) > 0.2  # the draft really differs
    counts = torch.zeros(vocab)
    stats = SpeculativeStats()
    n = 1200
    for seed in range(n):
        out = generate(
            target,
            [prompt],
            GenerationConfig(max_new_tokens=3, temperature=1.0, seed=seed),
            pad_id=0,
            draft_model=draft,
            num_draft_tokens=1,
            return_dict=True,
        )
        counts[out.tokens[0][1]] += 1
        stats.proposed += out.speculative.proposed
        stats.accepted += out.speculative.accepted
    assert tv_distance(counts, marginal) < 0.06
    assert 0.05 < stats.acceptance_rate < 0.95


# --------------------------------------------------------------------------------------
# mmgpt generate --draft-model / --draft-tokens / --compile
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory):
    from mmgpt.config import GPTConfig
    from mmgpt_text import TextTokenizer

    root = tmp_path_factory.mktemp("speculative-cli")
    (root / "corpus.txt").write_text("the red square and the blue circle. " * 20, encoding="utf-8")
    tokenizer = TextTokenizer.train([root / "corpus.txt"], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32
    )
    target = GPT(config).eval()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    target.save_pretrained(root / "target", tokenizer=tokenizer)
    noisy_copy(target, 0.05).save_pretrained(root / "draft", tokenizer=tokenizer)
    return root, target, tokenizer


def test_generate_command_with_a_draft_model(model_dirs, capsys):
    from mmgpt import cli
    from mmgpt.generation import generate_text

    root, target, tokenizer = model_dirs
    argv = ["generate", "--model", str(root / "target"), "--prompt", "the red"]
    argv += ["--max-new-tokens", "16", "--temperature", "0"]
    expected = generate_text(
        target, tokenizer, "the red", GenerationConfig(max_new_tokens=16, temperature=0)
    )
    assert expected.strip()
    code = cli.main([*argv, "--draft-model", str(root / "draft"), "--draft-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and out == expected + "\n"
    assert "draft tokens accepted:" in err and "tokens per target forward" in err

    assert cli.main([*argv, "--draft-tokens", "3"]) == 2
    assert "--draft-tokens: goes with --draft-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--draft-model", str(root / "draft"), "--draft-tokens", "0"])
    assert "--draft-tokens" in capsys.readouterr().err


def test_generate_command_compile_flag(model_dirs, capsys, monkeypatch):
    from mmgpt import cli

    monkeypatch.setattr(compiled_step, "_UNAVAILABLE", [])
    monkeypatch.setattr(compiled_step, "missing_compiler", lambda: "no C++ compiler (test)")
    root = model_dirs[0]
    argv = ["generate", "--model", str(root / "target"), "--prompt", "the red"]
    argv += ["--max-new-tokens", "16", "--temperature", "0"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match="GenerationConfig.compile: no C\\+\\+ compiler"):
        assert cli.main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == plain
