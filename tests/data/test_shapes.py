"""The shapes world: determinism, coverage, pixels, grammar, answers, options, exports."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER
from mmgpt.data.shapes import (
    BACKGROUND,
    COLORS,
    KINDS,
    POSITIONS,
    QUESTION_TYPES,
    SIZES,
    EndlessShapesWorld,
    Shape,
    ShapesWorld,
    caption,
    number_word,
    parse_caption,
    render_scene,
)
from mmgpt.registry import create


def pixels(sample):
    return np.asarray((sample.images or sample.output_images)[0])


def texts(sample):
    return [(t.role, t.text) for t in sample.conversation]


# -- determinism ----------------------------------------------------------------------------
def test_same_seed_gives_identical_samples_in_any_order():
    a = ShapesWorld(seed=7, size=50, image_size=32)
    b = ShapesWorld(seed=7, size=50, image_size=32)
    for i in (0, 13, 49, 5):
        sa, sb = a[i], b[i]
        assert texts(sa) == texts(sb)
        assert sa.meta == sb.meta
        np.testing.assert_array_equal(pixels(sa), pixels(sb))
    # Sample i does not depend on what was generated before it.
    assert texts(ShapesWorld(seed=7, size=50)[13]) == texts(a[13])


def test_different_seeds_differ():
    a = ShapesWorld(seed=0, size=20)
    b = ShapesWorld(seed=1, size=20)
    assert [a.scene(i) for i in range(20)] != [b.scene(i) for i in range(20)]
    differing = sum(texts(a[i]) != texts(b[i]) for i in range(20))
    assert differing >= 15


def test_scene_is_independent_of_image_size():
    assert ShapesWorld(seed=3, image_size=32).scene(9) == ShapesWorld(seed=3, image_size=64).scene(
        9
    )


# -- coverage -------------------------------------------------------------------------------
def test_every_attribute_task_and_question_type_appears():
    world = ShapesWorld(seed=0, size=400)
    seen = {"shape": set(), "color": set(), "size": set(), "position": set()}
    counts, tasks, qtypes = set(), set(), set()
    for i in range(400):
        sample = world[i]
        scene = sample.meta["scene"]
        counts.add(len(scene))
        for shape in scene:
            for key in seen:
                seen[key].add(shape[key])
        tasks.add(sample.meta["task"])
        if sample.meta["task"] == "vqa":
            qtypes.add(sample.meta["question_type"])
    assert seen == {
        "shape": set(KINDS),
        "color": set(COLORS),
        "size": set(SIZES),
        "position": set(POSITIONS),
    }
    assert counts == {1, 2, 3}
    assert tasks == {"caption", "vqa", "t2i"}
    assert qtypes == set(QUESTION_TYPES)


def test_scenes_never_repeat_a_cell_or_a_colour_kind_pair():
    world = ShapesWorld(seed=5, max_shapes=5)
    for i in range(300):
        scene = world.scene(i)
        assert len({s.position for s in scene}) == len(scene)
        assert len({(s.color, s.shape) for s in scene}) == len(scene)
        assert [POSITIONS.index(s.position) for s in scene] == sorted(
            POSITIONS.index(s.position) for s in scene
        )


# -- pixels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_render_puts_each_colour_in_its_cell_and_background_elsewhere(size):
    world = ShapesWorld(seed=11, image_size=size)
    for i in range(60):
        scene = world.scene(i)
        image = np.asarray(render_scene(scene, size))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        occupied = {s.position: s for s in scene}
        for cell, name in enumerate(POSITIONS):
            row, col = divmod(cell, 3)
            x, y = int((col + 0.5) * size / 3), int((row + 0.5) * size / 3)
            expected = COLORS[occupied[name].color] if name in occupied else BACKGROUND
            np.testing.assert_allclose(image[y, x], expected, atol=12)


@pytest.mark.parametrize("size", [32, 64])
def test_large_shapes_cover_more_pixels_and_kinds_look_different(size):
    def coverage(shape):
        image = np.asarray(render_scene([shape], size)).astype(int)
        return (np.abs(image - np.array(BACKGROUND)).sum(-1) > 30).sum()

    for kind in KINDS:
        small = coverage(Shape(kind, "red", "small", "center"))
        large = coverage(Shape(kind, "red", "large", "center"))
        assert large > 1.8 * small > 0
    # Distinct kinds give distinct masks even at 32x32 (what makes them learnable).
    masks = [np.asarray(render_scene([Shape(k, "blue", "large", "top left")], size)) for k in KINDS]
    for a, b in itertools.combinations(range(len(KINDS)), 2):
        assert np.abs(masks[a].astype(int) - masks[b].astype(int)).sum() > 0, (KINDS[a], KINDS[b])


def test_edges_are_antialiased():
    image = np.asarray(render_scene([Shape("circle", "blue", "large", "center")], 32))
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(colours) > 4  # blends between blue and the background


# -- grammar --------------------------------------------------------------------------------
def test_caption_grammar_examples():
    one = [Shape("circle", "red", "large", "left")]
    assert caption(one) == "a large red circle on the left"
    two = [Shape("circle", "red", "large", "left"), Shape("square", "blue", "small", "top")]
    assert caption(two) == (
        "two shapes: a small blue square at the top and a large red circle on the left"
    )
    three = [*two, Shape("star", "green", "small", "center")]
    assert caption(three) == (
        "three shapes: a small blue square at the top, a large red circle on the left "
        "and a small green star in the center"
    )


def test_parse_caption_inverts_caption_for_many_scenes():
    world = ShapesWorld(seed=2, max_shapes=9)
    for i in range(500):
        scene = world.scene(i)
        expected = [s.to_dict() for s in scene]
        assert parse_caption(caption(scene), strict=True) == expected
        assert parse_caption(caption(scene)) == expected  # lenient agrees on good text


def test_parse_caption_lenient_and_strict_on_bad_text():
    assert parse_caption("nothing to see here") == []
    assert parse_caption("A red circles at the top left.") == [
        {"shape": "circle", "color": "red", "size": None, "position": "top left"}
    ]
    with pytest.raises(ValueError, match="not 'a <size>"):
        parse_caption("a red circle on the left", strict=True)
    with pytest.raises(ValueError, match="count"):
        parse_caption(
            "three shapes: a large red circle on the left and a small blue square at the top",
            strict=True,
        )


# -- question answering ---------------------------------------------------------------------
def _solve(question: str, scene: list[dict]) -> str:
    """An independent reader of the question grammar, answering from the scene."""
    places = {
        "on the left": "left",
        "on the right": "right",
        "in the center": "center",
        **{f"at the {p}": p for p in POSITIONS if p not in ("left", "right", "center")},
    }

    def refer(phrase: str) -> dict:
        words = phrase.split()
        if phrase.startswith("the shape "):
            matches = [s for s in scene if s["position"] == places[phrase[len("the shape ") :]]]
        else:
            assert words[0] == "the"
            rest = words[1:]
            matches = [
                s
                for s in scene
                if all(w == "shape" or w in (s["shape"], s["color"], s["size"]) for w in rest)
            ]
        assert len(matches) == 1, (phrase, scene)
        return matches[0]

    if m := re.fullmatch(r"what colour is (.+)\?", question):
        return refer(m.group(1))["color"]
    if m := re.fullmatch(r"what size is (.+)\?", question):
        return refer(m.group(1))["size"]
    if m := re.fullmatch(r"where is (.+)\?", question):
        return refer(m.group(1))["position"]
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        target = m.group(1)
        if target in places:
            (hit,) = [s for s in scene if s["position"] == places[target]]
        else:
            (hit,) = [s for s in scene if s["color"] == target]
        return hit["shape"]
    if question == "how many shapes are there?":
        return number_word(len(scene))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return number_word(sum(s["color"] == m.group(1) for s in scene))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return number_word(sum(s["shape"] == m.group(1) for s in scene))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        present = any(s["color"] == m.group(1) and s["shape"] == m.group(2) for s in scene)
        return "yes" if present else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_agree_with_the_scene():
    world = ShapesWorld(seed=4, task="vqa", max_shapes=4, size=600)
    answers = set()
    for i in range(600):
        sample = world[i]
        question = sample.conversation[0].text.removeprefix(IMAGE_PLACEHOLDER + "\n")
        answer = sample.conversation[1].text
        assert answer == sample.meta["answer"]
        assert answer == _solve(question, sample.meta["scene"]), question
        if question == "how many shapes are there?":
            assert answer == number_word(len(sample.meta["scene"]))
        answers.add(answer)
    assert {"yes", "no", "one", "two", "three"} <= answers


# -- tasks and options ----------------------------------------------------------------------
def test_sample_layout_per_task():
    cap = ShapesWorld(task="caption", seed=1)[0]
    assert texts(cap)[0][1].startswith(IMAGE_PLACEHOLDER + "\n")
    assert texts(cap)[1][1] == caption([Shape(**s) for s in cap.meta["scene"]])
    assert len(cap.images) == cap.num_image_placeholders == 1 and cap.output_images == []

    t2i = ShapesWorld(task="t2i", seed=1, image_size=32)[0]
    assert t2i.images == [] and len(t2i.output_images) == 1
    assert t2i.output_images[0].size == (32, 32) and t2i.output_images[0].mode == "RGB"
    assert t2i.conversation[0].text == "draw " + t2i.meta["caption"]
    assert t2i.conversation[1].text == IMAGE_OUT_PLACEHOLDER
    # The target image is the rendering of the prompt's scene.
    np.testing.assert_array_equal(pixels(t2i), np.asarray(render_scene(t2i.meta["scene"], 32)))


def test_draw_max_shapes_keeps_a_subset_of_the_scene_in_drawings_only():
    full = ShapesWorld(task="mixed", seed=4, min_shapes=3, max_shapes=3, image_size=32)
    capped = ShapesWorld(
        task="mixed", seed=4, min_shapes=3, max_shapes=3, image_size=32, draw_max_shapes=1
    )
    counts = {"t2i": 0, "other": 0}
    for i in range(60):
        a, b = full[i], capped[i]
        if b.meta["task"] == "t2i":
            counts["t2i"] += 1
            (shape,) = b.meta["scene"]
            assert shape in a.meta["scene"]  # one shape of the same scene
            assert b.conversation[0].text == "draw " + caption([Shape(**shape)])
            np.testing.assert_array_equal(pixels(b), np.asarray(render_scene([shape], 32)))
        else:
            counts["other"] += 1
            assert texts(a) == texts(b) and len(b.meta["scene"]) == 3
    assert counts["t2i"] > 5 and counts["other"] > 5
    with pytest.raises(ValueError, match="draw_max_shapes"):
        ShapesWorld(draw_max_shapes=0)


def test_task_weights_set_the_mix_and_leave_unweighted_worlds_unchanged():
    from collections import Counter

    n = 3000
    weighted = ShapesWorld(task="mixed", seed=2, image_size=16, task_weights={"t2i": 2})
    counts = Counter(weighted.sample(i).meta["task"] for i in range(n))
    # expected shares 1/4, 1/4, 1/2; 5 standard deviations of a binomial at n=3000 is ~0.045
    assert abs(counts["t2i"] / n - 0.5) < 0.045, counts
    assert abs(counts["caption"] / n - 0.25) < 0.04 and abs(counts["vqa"] / n - 0.25) < 0.04
    # the sample of an index is still a pure function of (seed, index, options)
    assert texts(weighted.sample(17)) == texts(weighted.sample(17))
    only = ShapesWorld(task="mixed", seed=2, image_size=16, task_weights={"vqa": 0, "t2i": 0})
    assert {only.sample(i).meta["task"] for i in range(50)} == {"caption"}
    # no weights: the same samples as before the option existed (rng.choice, not choices)
    plain = ShapesWorld(task="mixed", seed=2, image_size=16)
    expected = ["caption", "vqa", "t2i", "t2i", "t2i", "vqa", "t2i", "vqa"]  # pinned
    assert [plain.sample(i).meta["task"] for i in range(8)] == expected
    for bad, message in (
        ({"draw": 1}, "not in this dataset's task mix"),
        ({"t2i": -1}, "task_weights.t2i must be a number >= 0"),
        ({"caption": 0, "vqa": 0, "t2i": 0}, "every task weight 0"),
        ([1, 2, 3], "must be a mapping"),
    ):
        with pytest.raises(ValueError, match=message):
            ShapesWorld(task="mixed", task_weights=bad)


def test_held_out_colour_and_kind_never_appear():
    world = ShapesWorld(
        seed=9, colors=[c for c in COLORS if c != "red"], kinds=["circle", "square", "triangle"]
    )
    for i in range(300):
        sample = world[i]
        words = " ".join(t.text for t in sample.conversation)
        assert "red" not in words and "star" not in words and "diamond" not in words
        assert all(s["color"] != "red" for s in sample.meta["scene"])


def test_bad_options_are_rejected_with_the_known_values():
    with pytest.raises(ValueError, match="colors must be a non-empty subset"):
        ShapesWorld(colors=["teal"])
    with pytest.raises(ValueError, match="task"):
        ShapesWorld(task="dance")
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesWorld(max_shapes=10)
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesWorld(colors=["red"], kinds=["circle"], max_shapes=2)
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorld(image_size=4)
    with pytest.raises(IndexError):
        ShapesWorld(size=3)[3]


def test_registry_builds_map_style_and_endless():
    world = create("dataset", "shapes", size=5, image_size=32, seed=3)
    assert isinstance(world, ShapesWorld) and len(world) == 5
    endless = create("dataset", "shapes", size=None, image_size=32, seed=3)
    assert isinstance(endless, EndlessShapesWorld)
    first = list(itertools.islice(iter(endless), 7))
    assert [texts(s) for s in first[:5]] == [texts(world[i]) for i in range(5)]
    # Resume: a fresh dataset loaded with the state continues exactly.
    resumed = EndlessShapesWorld(image_size=32, seed=3)
    partial = EndlessShapesWorld(image_size=32, seed=3)
    list(itertools.islice(iter(partial), 4))
    resumed.load_state_dict(partial.state_dict())
    assert [s.meta["index"] for s in itertools.islice(iter(resumed), 3)] == [4, 5, 6]
    assert texts(next(iter(EndlessShapesWorld(seed=3, start=6)))) == texts(first[6])


def test_endless_ranks_take_disjoint_strides():
    ranks = [EndlessShapesWorld(seed=0, rank=r, world_size=3) for r in range(3)]
    indices = [[s.meta["index"] for s in itertools.islice(iter(d), 4)] for d in ranks]
    assert indices == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


# -- exports --------------------------------------------------------------------------------
def test_imagefolder_export_loads_back_as_the_same_samples(tmp_path):
    from mmgpt.data.imagefolder import ImageFolderDataset

    world = ShapesWorld(seed=6, task=["caption", "vqa"], image_size=32)
    world.write_imagefolder(tmp_path, 12)
    loaded = ImageFolderDataset(tmp_path)
    assert len(loaded) == 12
    for i in range(12):
        original, back = world[i], loaded[i]
        assert texts(back) == texts(original)
        np.testing.assert_array_equal(pixels(back), pixels(original))
        assert back.meta["scene"] == original.meta["scene"]


def test_llava_export_loads_back(tmp_path):
    from mmgpt.data.llava import LlavaDataset

    world = ShapesWorld(seed=6, image_size=32)  # mixed: t2i samples export as captions
    path = world.write_llava(tmp_path, 9, start=100)
    loaded = LlavaDataset(path)
    assert len(loaded) == 9
    for i in range(9):
        original, back = world[100 + i], loaded[i]
        if original.meta["task"] == "t2i":
            assert back.conversation[1].text == original.meta["caption"]
        else:
            assert texts(back) == texts(original)
        np.testing.assert_array_equal(pixels(back), pixels(original))
        assert back.meta["id"] == f"{100 + i:06d}"


def test_several_questions_per_image_are_extra_turns_after_the_samples_own():
    one = ShapesWorld(task="vqa", seed=4, image_size=16)
    many = ShapesWorld(task="vqa", seed=4, image_size=16, questions_per_image=4)
    lengths = set()
    for i in range(200):
        a, b = one[i], many[i]
        assert texts(b)[:2] == texts(a)  # the first exchange is the sample's (and meta's)
        assert b.meta == a.meta
        np.testing.assert_array_equal(pixels(a), pixels(b))
        turns = texts(b)
        questions = [text for role, text in turns if role == "user"]
        assert len(set(questions)) == len(questions) and len(questions) == len(turns) // 2
        assert sum(IMAGE_PLACEHOLDER in q for q in questions) == 1
        lengths.add(len(questions))
        scene = a.meta["scene"]
        for (_, question), (_, answer) in zip(turns[0::2], turns[1::2]):
            asked = re.fullmatch(r"(?:<image>\n)?is there a (\w+) (\w+)\?", question)
            if asked:  # answered from the scene, independently of the generator
                present = any((s["color"], s["shape"]) == asked.groups() for s in scene)
                assert answer == ("yes" if present else "no"), (question, scene)
            if question.endswith("how many shapes are there?"):
                assert answer == number_word(len(scene))
    assert lengths >= {2, 3, 4}  # repeated questions are dropped, not asked twice
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="questions_per_image must be an int >= 1"):
            ShapesWorld(task="vqa", questions_per_image=bad)


def test_question_weights_change_how_often_each_type_is_asked():
    from collections import Counter

    n = 3000
    weighted = ShapesWorld(task="vqa", seed=3, image_size=16, question_weights={"exists": 5})
    counts = Counter(weighted.sample(i).meta["question_type"] for i in range(n))
    # expected shares: exists 5/10, each other type 1/10; 5 binomial sds at n=3000 are ~0.046
    assert abs(counts["exists"] / n - 0.5) < 0.046, counts
    assert all(abs(counts[t] / n - 0.1) < 0.03 for t in QUESTION_TYPES if t != "exists"), counts
    # later questions of a conversation are weighted too
    many = ShapesWorld(
        task="vqa", seed=3, image_size=16, questions_per_image=4, question_weights={"count": 0}
    )
    for i in range(200):
        questions = [text for role, text in texts(many.sample(i)) if role == "user"]
        assert not any("how many" in q for q in questions), questions
    others = [t for t in QUESTION_TYPES if t != "size"]
    only = ShapesWorld(task="vqa", seed=3, image_size=16, question_weights=dict.fromkeys(others, 0))
    assert {only.sample(i).meta["question_type"] for i in range(50)} == {"size"}
    # no weights: the questions of before the option existed (rng.choice, not choices)
    plain = ShapesWorld(task="vqa", seed=3, image_size=16)
    expected = ["count", "position", "count", "position", "shape", "shape", "color"]  # pinned
    assert [plain.sample(i).meta["question_type"] for i in range(7)] == expected
    for bad, message in (
        ({"colour": 1}, r"question type mix \['color'"),
        ({"shape": -1}, "question_weights.shape must be a number >= 0"),
        (dict.fromkeys(QUESTION_TYPES, 0), "every question type weight 0"),
        ([1, 2], "question_weights must be a mapping"),
    ):
        with pytest.raises(ValueError, match=message):
            ShapesWorld(task="vqa", question_weights=bad)
