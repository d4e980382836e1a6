"""The byte-level BPE tokenizer plugin (mmgpt_text): round trip, specials, persistence, registry,
foreign (GPT-2-style) tokenizer.json files, and errors."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from mmgpt.interfaces import Tokenizer as TokenizerProtocol
from mmgpt.registry import REGISTRY, create
from mmgpt_text import TextTokenizer, create_bpe_tokenizer, example_corpus_files
from mmgpt_text.tokenizer import METADATA_FILE

VOCAB = 400
SPECIAL_STRINGS = ["<pad>", "<bos>", "<eos>", "<image>", *[f"[IMG{i}]" for i in range(8)]]


@pytest.fixture(scope="module")
def corpus() -> list[Path]:
    files = example_corpus_files()
    assert len(files) >= 2 and all(f.stat().st_size > 0 for f in files)
    return files


@pytest.fixture(scope="module")
def tok(corpus: list[Path]) -> TextTokenizer:
    return TextTokenizer.train(corpus, vocab_size=VOCAB)


# -- GPT-2-style tokenizer written by hand (no download) ----------------------------------
# Merges in the GPT-2 format ("Ġ" is the byte-level form of a space); each result is a token.
GPT2_MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("Ġ", "a"),
    ("i", "n"),
    ("Ġ", "s"),
    ("e", "r"),
    ("Ġ", "c"),
    ("i", "r"),
    ("l", "e"),
    ("c", "le"),
    ("Ġc", "ir"),
    ("Ġcir", "cle"),
    ("r", "e"),
    ("Ġ", "re"),
    ("Ġre", "d"),
    ("o", "n"),
    ("Ġ", "on"),
]
GPT2_STRINGS = [
    "the red circle",
    " the red circle is on the square",
    "Hello<|endoftext|>world<|endoftext|>",
    "  spaces\tand\nnewlines\r\n",
    "naïve café 日本語 😀",
    "<image> is not special for GPT-2 itself",
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vocab.json + merges.txt → transformers' GPT2TokenizerFast → saved tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path_factory.mktemp("gpt2_src")
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in GPT2_MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (src / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in GPT2_MERGES), encoding="utf-8"
    )
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(src))
    out = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(str(out))
    assert (out / "tokenizer.json").is_file()
    return out


# -- round trip ---------------------------------------------------------------------------
_pieces = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            *SPECIAL_STRINGS,
            "<|endoftext|>",
            "<imag",
            "e>",
            "[IMG",
            "[IMG8]",
            "😀",
            "👩‍👩‍👧",
            "🇫🇷",
            "日本語の文章",
            "한국어",
            "\x00",
            "\x7f",
            "\x1b[0m",
            "\r\n",
            "   ",
            "\t\t\n\n",
            "\u200b",
            "\ufeff",
            "\u00a0",
            "e\u0301",
            "é",
            "Ġ",
            "ĠĠ",
        ]
    ),
    st.text(alphabet=st.characters(categories=["Cc", "Zs", "Zl", "Zp"]), max_size=10),
    st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=5),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=8),
)
unicode_text = st.lists(_pieces, max_size=8).map("".join)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=unicode_text)
def test_round_trip_is_lossless(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode(wrapped) == "<bos>" + text + "<eos>"


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=40))
def test_skip_special_tokens_removes_exactly_the_specials(tok: TextTokenizer, text: str) -> None:
    for s in SPECIAL_STRINGS:
        text = text.replace(s, "")
    ids = tok.encode(f"<image>{text}[IMG0]", add_bos=True, add_eos=True)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_training_learns_merges_from_the_corpus(tok: TextTokenizer) -> None:
    # With merges learned, common corpus words take far fewer tokens than bytes.
    sentence = "The red circle is above the blue square."
    ids = tok.encode(sentence)
    assert len(ids) < len(sentence.encode()) / 2
    assert 12 + 256 < tok.vocab_size <= VOCAB
    assert len(tok) == tok.vocab_size
    # Every byte has a token even though most bytes never occur in the corpus.
    assert len(tok.encode("\x00\x01\x02")) == 3


def test_special_tokens_are_single_distinct_ids(tok: TextTokenizer) -> None:
    assert isinstance(tok, TokenizerProtocol)
    ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id, *tok.signal_token_ids]
    assert len(set(ids)) == len(ids) == 12
    assert all(0 <= i < tok.vocab_size for i in ids)
    for s, i in zip(SPECIAL_STRINGS, ids):
        assert tok.token_to_id(s) == i
        assert tok.encode(s) == [i]
        assert tok.decode([i]) == s
    assert tok.encode("a<image>b").count(tok.image_token_id) == 1
    assert tok.encode("<image><image>") == [tok.image_token_id] * 2
    # no whitespace is swallowed around a special token
    assert tok.decode(tok.encode(" <image> \n")) == " <image> \n"
    assert tok.token_to_id("[IMG8]") is None
    assert tok.config_dict() == {"name": "bpe", "num_signal_tokens": 8}


def test_encode_flags_and_decode_inputs(tok: TextTokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("a red star")
    assert tok.encode("a red star", add_bos=True) == [tok.bos_id, *ids]
    assert tok.encode("a red star", add_eos=True) == [*ids, tok.eos_id]
    assert tok.encode("", add_bos=True, add_eos=True) == [tok.bos_id, tok.eos_id]
    assert tok.encode_batch(["a", "a red star"], add_eos=True)[1] == [*ids, tok.eos_id]
    assert tok.decode(torch.tensor(ids)) == "a red star"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_num_signal_tokens(corpus: list[Path]) -> None:
    t = TextTokenizer.train(corpus, vocab_size=300, num_signal_tokens=2)
    assert [t.id_to_token(i) for i in t.signal_token_ids] == ["[IMG0]", "[IMG1]"]
    assert t.token_to_id("[IMG2]") is None
    assert t.config_dict() == {"name": "bpe", "num_signal_tokens": 2}
    t0 = TextTokenizer.train(corpus, vocab_size=300, num_signal_tokens=0)
    assert t0.signal_token_ids == []
    with pytest.raises(ValueError, match="num_signal_tokens"):
        TextTokenizer.train(corpus, vocab_size=300, num_signal_tokens=-1)


def test_training_is_deterministic(corpus: list[Path], tok: TextTokenizer) -> None:
    again = TextTokenizer.train(corpus, vocab_size=VOCAB)
    assert again.backend.to_str() == tok.backend.to_str()


# -- persistence --------------------------------------------------------------------------
def test_save_load_round_trip(tok: TextTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tk")
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == [
        METADATA_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    meta = json.loads((tmp_path / "tk" / METADATA_FILE).read_text())
    assert meta["image_token"] == "<image>" and meta["signal_tokens"][0] == "[IMG0]"
    texts = ["Draw a red circle. <image> Here it is [IMG0][IMG7]", "日本語 😀 \x00\t", ""]
    for path in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        loaded = TextTokenizer.from_file(path)
        assert loaded.encode_batch(texts, add_bos=True) == tok.encode_batch(texts, add_bos=True)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
            tok.vocab_size,
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
        )
        assert loaded.image_token_id == tok.image_token_id
        assert loaded.signal_token_ids == tok.signal_token_ids
    # The file is a standard tokenizer.json: plain `tokenizers` reads it with the same ids.
    plain = Tokenizer.from_file(str(tmp_path / "tk" / "tokenizer.json"))
    assert plain.encode(texts[0], add_special_tokens=False).ids == tok.encode(texts[0])
    # no temp files left behind by the atomic writes
    assert not list((tmp_path / "tk").glob(".*"))


def test_pickle_round_trip(tok: TextTokenizer) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("<image> a blue heart") == tok.encode("<image> a blue heart")


# -- registry -----------------------------------------------------------------------------
def test_registry_load_and_train(tok: TextTokenizer, corpus: list[Path], tmp_path: Path) -> None:
    assert REGISTRY.distribution_of("tokenizer", "bpe") == "mmgpt"
    assert REGISTRY.get("tokenizer", "bpe") is create_bpe_tokenizer
    eps = {ep.name: ep.value for ep in entry_points(group="mmgpt.plugins")}
    assert eps.get("text") == "mmgpt_text"

    tok.save(tmp_path)
    cfg = tok.config_dict()
    loaded = create("tokenizer", cfg.pop("name"), path=tmp_path, **cfg)
    assert loaded.encode("a <image> b") == tok.encode("a <image> b")

    trained = create(
        "tokenizer", "bpe", files=[str(corpus[0])], vocab_size=300, num_signal_tokens=3
    )
    assert isinstance(trained, TextTokenizer)
    assert trained.vocab_size <= 300 and len(trained.signal_token_ids) == 3
    # a directory and a glob select the same files
    by_dir = create("tokenizer", "bpe", files=corpus[0].parent, vocab_size=300)
    by_glob = create("tokenizer", "bpe", files=[str(corpus[0].parent / "*.txt")], vocab_size=300)
    assert by_dir.backend.to_str() == by_glob.backend.to_str()


def test_registry_argument_errors(tmp_path: Path, corpus: list[Path], tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="exactly one of path= .* or files=.*neither"):
        create("tokenizer", "bpe")
    with pytest.raises(ValueError, match="both were given"):
        create("tokenizer", "bpe", path=tmp_path, files=corpus, vocab_size=300)
    with pytest.raises(ValueError, match="needs vocab_size"):
        create("tokenizer", "bpe", files=corpus)
    tok.save(tmp_path)
    with pytest.raises(ValueError, match="vocab_size= applies only to training"):
        create("tokenizer", "bpe", path=tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="has 8 signal tokens but num_signal_tokens=4"):
        create("tokenizer", "bpe", path=tmp_path, num_signal_tokens=4)


# -- errors -------------------------------------------------------------------------------
def test_load_errors_name_the_file(tmp_path: Path, tok: TextTokenizer) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextTokenizer.from_file(missing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer\.json"):
        TextTokenizer.from_file(empty_dir)
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: not a valid Hugging Face tokenizer"):
        TextTokenizer.from_file(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": "world"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"other\.json: not a valid Hugging Face tokenizer"):
        TextTokenizer.from_file(other)
    saved = tmp_path / "saved"
    tok.save(saved)
    (saved / METADATA_FILE).write_text('{"bos_token": "<bos>"}', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{METADATA_FILE}: invalid mmgpt tokenizer metadata"):
        TextTokenizer.from_file(saved)
    (saved / METADATA_FILE).write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "image_token": "<picture>",
                "signal_tokens": [],
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="image token '<picture>' is not in the tokenizer"):
        TextTokenizer.from_file(saved)


def test_training_errors(tmp_path: Path, corpus: list[Path]) -> None:
    with pytest.raises(ValueError, match="too small.*at least 268"):
        TextTokenizer.train(corpus, vocab_size=267)
    with pytest.raises(ValueError, match="too small.*at least 260"):
        TextTokenizer.train(corpus, vocab_size=259, num_signal_tokens=0)
    assert TextTokenizer.train(corpus, vocab_size=268).vocab_size == 268  # bytes + specials only
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: training file not found"):
        TextTokenizer.train([corpus[0], missing], vocab_size=300)
    with pytest.raises(ValueError, match="no training files matched"):
        TextTokenizer.train([str(tmp_path / "*.txt")], vocab_size=300)
    with pytest.raises(ValueError, match="no training files given"):
        TextTokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match="contains no"):
        TextTokenizer.train(tmp_path, vocab_size=300)
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="all training files are empty"):
        TextTokenizer.train(tmp_path, vocab_size=300)
    (tmp_path / "c.txt").write_bytes(b"valid text\n\xff\xfe broken \xc3\n")
    with pytest.raises(ValueError, match=r"c\.txt: training file is not valid UTF-8"):
        TextTokenizer.train(tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="min_frequency"):
        TextTokenizer.train(corpus, vocab_size=300, min_frequency=0)


# -- foreign tokenizer.json (GPT-2 style) -------------------------------------------------
def test_gpt2_tokenizer_json_matches_transformers(gpt2_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    original = len(ref)
    eot = ref.convert_tokens_to_ids("<|endoftext|>")

    tok = TextTokenizer.from_file(gpt2_dir)
    assert tok.bos_id == tok.eos_id == tok.pad_id == eot
    # mmgpt's tokens are appended after the original vocabulary, in order
    assert tok.image_token_id == original
    assert tok.signal_token_ids == list(range(original + 1, original + 9))
    assert tok.vocab_size == original + 9
    for s in GPT2_STRINGS:
        if "<image>" in s:
            continue
        expected = ref.encode(s, add_special_tokens=False)
        assert tok.encode(s) == expected, s
        assert tok.decode(expected) == ref.decode(expected) == s
    # merges from the hand-written merges.txt are applied
    assert tok.encode(" the red circle") == [
        ref.convert_tokens_to_ids(t) for t in ("Ġthe", "Ġred", "Ġcircle")
    ]
    assert tok.encode("x<image>y") == [
        *ref.encode("x", add_special_tokens=False),
        original,
        *ref.encode("y", add_special_tokens=False),
    ]

    # The bare tokenizer.json, without transformers' tokenizer_config.json, maps the same way.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(gpt2_dir / "tokenizer.json", bare / "tokenizer.json")
    assert not (bare / "tokenizer_config.json").exists()
    tok_bare = TextTokenizer.from_file(bare / "tokenizer.json", num_signal_tokens=2)
    assert tok_bare.eos_id == tok_bare.bos_id == eot
    assert tok_bare.vocab_size == original + 3

    # Saving it keeps the appended tokens and roles.
    tok.save(tmp_path / "saved")
    again = TextTokenizer.from_file(tmp_path / "saved")
    assert again.vocab_size == tok.vocab_size and again.eos_id == eot
    assert again.encode_batch(GPT2_STRINGS) == tok.encode_batch(GPT2_STRINGS)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=unicode_text)
def test_gpt2_round_trip(gpt2_dir: Path, text: str) -> None:
    tok = _gpt2_cached(gpt2_dir)
    assert tok.decode(tok.encode(text)) == text


_GPT2_CACHE: dict[Path, TextTokenizer] = {}


def _gpt2_cached(path: Path) -> TextTokenizer:
    if path not in _GPT2_CACHE:
        _GPT2_CACHE[path] = TextTokenizer.from_file(path)
    return _GPT2_CACHE[path]


def _foreign(tmp_path: Path, specials: list[str], config: dict | None = None) -> Path:
    """A tiny byte-level BPE tokenizer.json with the given special tokens, as another library would
    write it, optionally with padding/truncation switched on and a tokenizer_config.json."""
    byte_vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(specials)
    t.enable_truncation(max_length=4)
    t.enable_padding(length=16, pad_id=0)
    d = tmp_path / "foreign"
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def test_foreign_without_end_token_gets_eos_appended(tmp_path: Path) -> None:
    d = _foreign(tmp_path, ["[PAD]", "[MASK]"])
    tok = TextTokenizer.from_file(d)
    assert tok.pad_id == 256  # existing [PAD] reused
    assert tok.eos_token == "<eos>" and tok.bos_id == tok.eos_id
    assert tok.eos_id == 258 and tok.image_token_id == 259  # appended after [PAD], [MASK]
    # truncation/padding stored in the file are switched off: encode returns the text's ids
    text = "a longer text than four tokens"
    assert len(tok.encode(text)) == len(text.encode())
    assert tok.decode(tok.encode(text)) == text


def test_foreign_tokenizer_config_names_the_roles(tmp_path: Path) -> None:
    d = _foreign(
        tmp_path,
        ["<s>", "</s>", "<|eot|>", "<image>"],
        {"bos_token": "<s>", "eos_token": {"content": "<|eot|>"}, "pad_token": None},
    )
    tok = TextTokenizer.from_file(d)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "<|eot|>", "<|eot|>")
    assert tok.image_token_id == 259  # the existing <image> is reused, not duplicated
    assert tok.signal_token_ids == list(range(260, 268))
