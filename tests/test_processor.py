"""MultimodalProcessor: template, placeholder expansion, labels, counts, padding, lengths."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmgpt.data.sample import Sample, Turn
from mmgpt.processor import IGNORE_INDEX, MultimodalBatch, MultimodalProcessor

mmgpt_text = pytest.importorskip("mmgpt_text")

K = 3  # slots per image in these tests

CORPUS = (
    "User: What colour is the shape?\nAssistant: The shape is red.\n"
    "User: Describe the image.\nAssistant: A blue square and a green circle.\n"
) * 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def tok(corpus):
    return mmgpt_text.TextTokenizer.train([corpus], vocab_size=330, num_signal_tokens=4)


def colour_transform(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, 2, 2) filled with each image's colour, so tests see which image went where."""
    colours = [torch.tensor(im.getpixel((0, 0)), dtype=torch.float32) for im in images]
    return torch.stack([c[:, None, None].expand(3, 2, 2) for c in colours])


def make(tok, **kwargs) -> MultimodalProcessor:
    kwargs.setdefault("num_image_tokens", K)
    kwargs.setdefault("image_transform", colour_transform)
    return MultimodalProcessor(tok, **kwargs)


def img(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, value, value))


def test_small_example_by_hand(tok) -> None:
    sample = Sample(
        [Turn("user", "A <image> B <image>"), Turn("assistant", "red")],
        images=[img(10), img(20)],
    )
    batch = make(tok)(sample)
    e = tok.encode
    I = tok.image_token_id  # noqa: E741
    expected_ids = [
        tok.bos_id,
        *e("User: A "),
        *[I] * K,
        *e(" B "),
        *[I] * K,
        *e("\n"),
        *e("Assistant:"),
        *e(" red"),
        tok.eos_id,
        *e("\n"),
    ]
    n_prompt = len(expected_ids) - len(e(" red")) - 1 - len(e("\n"))
    expected_labels = (
        [IGNORE_INDEX] * n_prompt + e(" red") + [tok.eos_id] + [IGNORE_INDEX] * len(e("\n"))
    )
    assert batch.input_ids.tolist() == [expected_ids]
    assert batch.labels.tolist() == [expected_labels]
    assert batch.attention_mask.tolist() == [[1] * len(expected_ids)]
    first = 1 + len(e("User: A "))
    second = first + K + len(e(" B "))
    assert batch.image_positions.tolist() == [[0, first], [0, second]]
    assert batch.images[:, 0, 0, 0].tolist() == [10.0, 20.0]
    assert batch.signal_positions.shape == (0, 2) and batch.output_images is None
    # the learned tokens decode to exactly the reply and its end
    learned = [t for t in batch.labels[0].tolist() if t != IGNORE_INDEX]
    assert tok.decode(learned) == " red<eos>"


def test_any_number_of_images_at_any_position(tok) -> None:
    samples = [
        Sample([Turn("user", "<image>"), Turn("assistant", "ok")], images=[img(1)]),
        Sample(
            [
                Turn("user", "<image><image> then text <image>"),
                Turn("assistant", "see <image> here"),
                Turn("user", "last <image>"),
            ],
            images=[img(2), img(3), img(4), img(5), img(6)],
        ),
        Sample([Turn("user", "no images"), Turn("assistant", "fine")]),
    ]
    batch = make(tok)(samples)
    I = tok.image_token_id  # noqa: E741
    assert batch.images.shape == (6, 3, 2, 2)
    assert batch.images[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6]  # placeholder order
    assert batch.image_positions[:, 0].tolist() == [0, 1, 1, 1, 1, 1]
    for row in range(3):
        slots = (batch.input_ids[row] == I).nonzero().flatten().tolist()
        starts = [s for r, s in batch.image_positions.tolist() if r == row]
        assert slots == [s + k for s in starts for k in range(K)]  # K slots per image, no more
    assert (batch.labels[batch.input_ids == I] == IGNORE_INDEX).all()  # image slots in
    # an assistant turn are not learned either


def test_labels_cover_every_assistant_turn_only(tok) -> None:
    sample = Sample(
        [
            Turn("user", "What colour is the shape?"),
            Turn("assistant", "The shape is red."),
            Turn("user", "Describe the image."),
            Turn("assistant", "A blue square."),
        ]
    )
    batch = make(tok)(sample)
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    learned = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert learned == [lab for lab in labels if lab != IGNORE_INDEX]  # labels == ids where on
    assert tok.decode(learned) == " The shape is red.<eos> A blue square.<eos>"
    text = tok.decode(ids)
    assert text == (
        "<bos>User: What colour is the shape?\nAssistant: The shape is red.<eos>\n"
        "User: Describe the image.\nAssistant: A blue square.<eos>\n"
    )
    assert text == make(tok).template.render(sample.conversation)


def test_image_out_expands_to_learned_signal_tokens(tok, corpus) -> None:
    out = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    sample = Sample(
        [Turn("user", "Draw two."), Turn("assistant", "Here <image_out> and <image_out>")],
        output_images=out,
    )
    batch = make(tok)(sample)
    sig = tok.signal_token_ids
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    assert batch.signal_positions.tolist() == [[0, s] for s in _find(ids, sig)]
    assert len(batch.signal_positions) == 2
    for _, s in batch.signal_positions.tolist():
        assert labels[s : s + len(sig)] == sig  # the model must learn to emit them
    assert batch.output_images == out  # no transform given: the PIL images as given

    transformed = make(tok, output_image_transform=lambda ims: torch.zeros(len(ims), 3, 8, 8))
    assert transformed(sample).output_images.shape == (2, 3, 8, 8)

    no_signal = mmgpt_text.TextTokenizer.train([corpus], vocab_size=330, num_signal_tokens=0)
    with pytest.raises(ValueError, match=r"'<image_out>'.*no signal tokens"):
        make(no_signal)(sample)


def _find(ids: list[int], pattern: list[int]) -> list[int]:
    return [i for i in range(len(ids)) if ids[i : i + len(pattern)] == pattern]


def test_count_mismatch_names_the_sample_and_both_counts(tok) -> None:
    proc = make(tok)
    bad = Sample(
        [Turn("user", "<image> and <image>"), Turn("assistant", "x")],
        images=[img(1)],
        meta={"source": "data/train.json", "line": 12},
    )
    with pytest.raises(ValueError, match=r"sample data/train\.json:12: .*2 '<image>'.* 1 image"):
        proc([bad])
    anonymous = Sample([Turn("user", "text"), Turn("assistant", "x")], images=[img(1)])
    good = Sample([Turn("user", "<image>"), Turn("assistant", "x")], images=[img(1)])
    with pytest.raises(ValueError, match=r"sample 1 of the batch: .*0 '<image>'.* 1 image"):
        proc([good, anonymous])
    outs = Sample(
        [Turn("user", "draw"), Turn("assistant", "<image_out>")],
        output_images=[img(1), img(2)],
    )
    with pytest.raises(ValueError, match=r"1 '<image_out>'.* 2 output image"):
        proc([outs])
    with pytest.raises(ValueError, match="no image encoder"):
        MultimodalProcessor(tok)([good])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(tok, side: str) -> None:
    short = Sample([Turn("user", "<image>"), Turn("assistant", "ok")], images=[img(7)])
    long = Sample(
        [Turn("user", "Describe the image. <image>"), Turn("assistant", "A blue square.")],
        images=[img(8)],
    )
    proc = make(tok, padding_side=side)
    alone = proc([short])
    batch = proc([short, long])
    n = alone.input_ids.size(1)
    T = batch.input_ids.size(1)
    pad = T - n
    assert pad > 0
    real = slice(pad, T) if side == "left" else slice(0, n)
    padding = slice(0, pad) if side == "left" else slice(n, T)
    assert batch.input_ids[0, real].tolist() == alone.input_ids[0].tolist()
    assert batch.labels[0, real].tolist() == alone.labels[0].tolist()
    assert (batch.input_ids[0, padding] == tok.pad_id).all()
    assert (batch.labels[0, padding] == IGNORE_INDEX).all()
    assert batch.attention_mask[0].tolist() == [int(real.start <= t < real.stop) for t in range(T)]
    assert batch.attention_mask[1].all()
    shift = pad if side == "left" else 0
    assert batch.image_positions[0].tolist() == [0, alone.image_positions[0, 1].item() + shift]


def test_max_length_raises_or_truncates_outside_spans(tok) -> None:
    sample = Sample(
        [
            Turn("user", "Describe the image. <image> and <image>"),
            Turn("assistant", "A blue square."),
        ],
        images=[img(1), img(2)],
        meta={"source": "x.jsonl", "line": 3},
    )
    full = make(tok)(sample)
    second = full.image_positions[1, 1].item()
    with pytest.raises(ValueError, match=r"sample x\.jsonl:3: \d+ tokens exceed max_length=\d+"):
        make(tok, max_length=second + 1)(sample)
    # a cut inside the second image drops that whole image
    cut = make(tok, max_length=second + 1, truncation=True)(sample)
    assert cut.input_ids.size(1) == second
    assert cut.input_ids[0].tolist() == full.input_ids[0, :second].tolist()
    assert cut.image_positions.tolist() == full.image_positions[:1].tolist()
    assert cut.images.shape[0] == 1
    # a cut after the span keeps it
    kept = make(tok, max_length=second + K + 1, truncation=True)(sample)
    assert kept.input_ids.size(1) == second + K + 1 and kept.images.shape[0] == 2


def test_generation_prompt_matches_training_tokenization(tok) -> None:
    conversation = [Turn("user", "<image>\nWhat colour is the shape?")]
    proc = make(tok)
    prompt = proc.encode_prompt(conversation, [img(1)])
    train = proc(Sample([*conversation, Turn("assistant", "red")], images=[img(1)]))
    n = len(prompt.input_ids)
    assert train.input_ids[0, :n].tolist() == prompt.input_ids  # same prefix, ends "Assistant:"
    assert (
        train.labels[0, n - 1].item() == IGNORE_INDEX and train.labels[0, n].item() != IGNORE_INDEX
    )
    assert (
        proc.build_prompt(conversation)
        == "<bos>User: <image>\nWhat colour is the shape?\nAssistant:"
    )
    batch = proc.prompt_batch([conversation, "raw <image> text"], [[img(1)], [img(2)]])
    assert batch.labels is None and batch.attention_mask[:, -1].all()  # left padded
    assert batch.images[:, 0, 0, 0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="must end with a user turn"):
        proc.encode_prompt([*conversation, Turn("assistant", "red")], [img(1)])
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) but 0 image"):
        proc.encode_prompt(conversation, [])


def test_batch_moves_and_bad_turns_raise(tok) -> None:
    batch = make(tok)(Sample([Turn("user", "<image>"), Turn("assistant", "x")], images=[img(1)]))
    assert isinstance(batch, MultimodalBatch) and len(batch) == 1
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.meta == batch.meta

    from types import SimpleNamespace

    odd = SimpleNamespace(
        conversation=[{"role": "system", "text": "hi"}], meta={"source": "odd.json", "line": 1}
    )
    with pytest.raises(ValueError, match=r"sample odd\.json:1: conversation\[0\].*'system'"):
        make(tok)([odd])
    with pytest.raises(ValueError, match="padding_side"):
        make(tok, padding_side="middle")
