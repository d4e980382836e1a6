"""The chat's Attention view: the last reply's attention rows on the tiny demo model, checked
against the prompt-only maps of ``mmgpt.eval.attention`` and the model's own greedy reply; and
the view in Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")

from demos.attention_view import MEAN, figures, reply_attention, show_attention
from demos.chat import to_messages, user_entry
from demos.common import DemoModel, UserInputError
from mmgpt.eval.attention import patch_grid, prompt_attentions


@pytest.fixture(scope="module")
def circle_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("attention-uploads") / "circle.png"
    tiny.circle_image(64).save(path)
    return path


def exchange(question: str, files: list[str], answer: str) -> list[dict]:
    return [user_entry(question, files), {"role": "assistant", "content": answer}]


def test_reply_rows_continue_the_prompt_maps_and_sum_to_one(
    demo_model: DemoModel, tiny, circle_file: Path
) -> None:
    history = exchange(tiny.image_question, [str(circle_file)], tiny.answer)
    result = reply_attention(demo_model, to_messages(history))
    P, R = result.prompt_length, result.reply_length
    T = len(result.tokens)
    assert (R, T) == (T - P, P + R) and R >= 3
    # the reply is read back as the model writes it: the overfitted model's greedy tokens
    assert "".join(result.tokens[P:]).strip() == tiny.answer
    turns, images = demo_model.fit(to_messages(history)[:1], 8)
    # under the model lock with the adapter off, as the chat answered (a LoRA is loaded)
    prompt = demo_model.run(
        lambda: prompt_attentions(demo_model.model, demo_model.tokenizer, turns, images)
    )
    assert result.tokens[:P] == prompt.tokens  # the prompt the answer was generated from
    assert result.image_slots == prompt.image_slots and result.image_slots[0][1] > 1
    for full, alone in zip(result.weights, prompt.weights, strict=True):
        # causal attention: the prompt's rows do not see the reply
        torch.testing.assert_close(full[:, :P, :P], alone, atol=1e-5, rtol=0)
        assert bool((full[:, :P, P:] == 0).all())
    # the chosen adapter is on for the forward pass (it changes the weights)
    noisy = reply_attention(demo_model, to_messages(history), adapter=tiny.adapter)
    assert not torch.allclose(noisy.weights[-1], result.weights[-1], atol=1e-3)
    L, H = len(result.weights), result.weights[0].size(0)
    for layer in (MEAN, *range(L)):
        for head in (MEAN, *range(H)):
            m = result.matrix(layer, head)
            assert m.shape == (R, T)
            torch.testing.assert_close(m.sum(-1), torch.ones(R), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.matrix(1, 0), result.weights[1][0, P:])
    torch.testing.assert_close(
        result.matrix(MEAN, MEAN), torch.stack(result.weights).mean((0, 1))[P:]
    )


def test_figures_of_an_exchange_with_an_image(
    demo_model: DemoModel, tiny, circle_file: Path
) -> None:
    history = exchange(tiny.image_question, [str(circle_file)], tiny.answer)
    view = show_attention(demo_model, to_messages(history), "1", MEAN)
    result = reply_attention(demo_model, to_messages(history))
    m = result.matrix(1, MEAN)
    torch.testing.assert_close(view.matrix, m)
    R, T = m.shape
    cell = max(4, 384 // max(R, T))
    assert view.heatmap.size == (T * cell, R * cell)  # columns: positions, rows: reply tokens
    (picture, caption), (grid, grid_caption) = view.overlays
    assert picture.size == (64, 64)  # drawn over the uploaded image
    (first, count) = result.image_slots[0]
    share = float(m[:, first : first + count].sum(1).mean())
    assert caption == f"image 1: {share:.1%} of the reply's attention"
    rows, cols = patch_grid(count)
    grid_cell = max(4, 384 // max(rows, cols))
    assert grid.size == (cols * grid_cell, rows * grid_cell)
    assert grid_caption == f"image 1, patch grid {(rows, cols)}"
    # the prompt tokens: each image once, the rest token by token, scaled by the largest
    texts = [text for text, _ in view.prompt_tokens]
    assert texts.count("[image 1]") == 1 and "<image>" not in texts
    assert len(texts) == result.prompt_length - count + 1
    scores = [score for _, score in view.prompt_tokens]
    assert max(scores) == pytest.approx(1.0) and min(scores) >= 0
    to_prompt = m[:, : result.prompt_length].mean(0)
    image_score = float(to_prompt[first : first + count].sum())
    assert scores[texts.index("[image 1]")] == pytest.approx(
        image_score / max(image_score, float(to_prompt.max())), abs=1e-6
    )
    prompt_share = float(m[:, : result.prompt_length].sum(1).mean())
    assert f"give {prompt_share:.1%} of their attention" in view.summary


def test_remember_uses_the_earlier_turns_and_errors_are_for_the_user(
    demo_model: DemoModel, tiny
) -> None:
    history = [
        *exchange(tiny.text_question, [], tiny.answer),
        *exchange(tiny.text_question, [], tiny.answer),
    ]
    alone = reply_attention(demo_model, to_messages(history))
    both = reply_attention(demo_model, to_messages(history), remember=True)
    assert both.prompt_length > alone.prompt_length
    assert both.tokens[-alone.reply_length :] == alone.tokens[alone.prompt_length :]
    assert figures(alone).overlays == []  # no image, no overlay
    with pytest.raises(UserInputError, match="There is no reply yet"):
        show_attention(demo_model, to_messages(history[:1]))
    with pytest.raises(UserInputError, match="The last reply is empty"):
        show_attention(demo_model, to_messages(exchange(tiny.text_question, [], "…")))
    with pytest.raises(UserInputError, match=r"Choose a layer from 0 to \d+, or 'mean'"):
        show_attention(demo_model, to_messages(history), layer="99")
    with pytest.raises(UserInputError, match=r"Choose a head from 0 to \d+, or 'mean'"):
        show_attention(demo_model, to_messages(history), head="x")


def test_a_text_model(tmp_path: Path) -> None:
    mmgpt_text = pytest.importorskip("mmgpt_text")
    from mmgpt.config import GPTConfig
    from mmgpt.model import GPT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("User: hello there\nAssistant: general kenobi\n" * 20, encoding="utf-8")
    tokenizer = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2))
    model = DemoModel(gpt, tokenizer=tokenizer)
    history = exchange("hello there", [], "general kenobi")
    result = reply_attention(model, to_messages(history))
    ids = [*model.prompt_ids([{"role": "user", "text": "hello there"}])]
    ids += tokenizer.encode(" general kenobi")
    with torch.no_grad():
        expected = gpt(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    assert result.prompt_length == len(ids) - len(tokenizer.encode(" general kenobi"))
    for full, reference in zip(result.weights, expected, strict=True):
        torch.testing.assert_close(full, reference[0], atol=1e-5, rtol=0)
    view = figures(result, "0", "1")
    torch.testing.assert_close(view.matrix.sum(-1), torch.ones(result.reply_length))
    assert view.overlays == [] and "to the images" not in view.summary


def test_attention_view_in_the_browser(tiny, browser, circle_file: Path) -> None:
    from playwright.sync_api import expect

    with tiny.launched(tiny.dir, "chat") as app, tiny.page_of(browser, app.local_url) as page:
        page.set_input_files("#message input[type=file]", str(circle_file))
        expect(page.locator("#message img")).to_have_count(1)
        box = page.locator("#message textarea")
        box.fill(tiny.image_question)
        box.press("Enter")
        expect(page.locator("#chatbot [data-testid=bot]").last).to_have_text(tiny.answer)
        page.get_by_text("Attention", exact=True).click()  # open the accordion
        page.click("#attention-show")
        expect(page.locator("#attention-summary")).to_contain_text("of their attention")
        expect(page.locator("#attention-heatmap img")).to_have_count(1)
        expect(page.locator("#attention-images img")).to_have_count(2)  # overlay and grid
        expect(page.locator("#attention-tokens")).to_contain_text("[image 1]")
        tiny.save_screenshot(page, "chat-attention")
        assert page.external == []
