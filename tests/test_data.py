"""Procedural data: determinism, renderer, grammar round trips, held-out split, exact analyzer."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from scipy import ndimage

from rfmpc.data import (
    COLOURS,
    DEFAULT_SHAPES,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    VOCABULARY,
    Object,
    Scene,
    analyze,
    attribute_accuracy,
    coverage,
    detect,
    grid_coverage,
    heldout_prompts,
    is_heldout,
    make_batch,
    parse_prompt,
    parse_prompt_roles,
    render,
    render_batch,
    sample_scene,
    split_words,
    to_prompt,
    visible_colours,
)
from rfmpc.data.scene import POSITION_CENTERS, SIZE_EXTENTS

REQUIRED_POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")


def _scenes(seed, n, **kw):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


# ----------------------------------------------------------------------------- determinism


def test_make_batch_is_deterministic_from_a_seed():
    a = make_batch(7, 16)
    b = make_batch(7, 16)
    c = make_batch(8, 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert a[1] != c[1]
    images, prompts, scenes = a
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.float32
    assert len(prompts) == len(scenes) == 16
    # Each prompt describes its image's scene.
    assert [parse_prompt(p) for p in prompts] == scenes
    # A Generator continues the stream: two batches of 8 from one Generator = 16 from the seed.
    rng = np.random.default_rng(7)
    first, second = make_batch(rng, 8), make_batch(rng, 8)
    assert first[2] + second[2] == a[2]


def test_sample_scene_follows_the_rules():
    scenes = _scenes(0, 2000, gradient_fraction=0.3, shapes=SHAPES)
    n_two = sum(len(s.objects) == 2 for s in scenes)
    assert 850 < n_two < 1150  # two_object_fraction = 0.5
    for s in scenes:
        assert len({o.position for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert o.colour in visible_colours(s.background, s.gradient)
    # Every value of every attribute occurs.
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.position for o in objs} == set(POSITIONS)
    assert {o.size for o in objs} == set(SIZES)
    assert {s.background for s in scenes} == set(COLOURS)
    # The default mix: the three required shapes, solid backgrounds.
    default = _scenes(1, 300)
    assert {o.shape for s in default for o in s.objects} == set(DEFAULT_SHAPES)
    assert all(s.gradient is None for s in default)


def test_scene_validation_names_the_problem():
    with pytest.raises(ValueError, match="colour='pink'"):
        Object("circle", "pink", "center")
    with pytest.raises(ValueError, match="shape='hexagon'"):
        Object("hexagon", "red", "center")
    with pytest.raises(ValueError, match="distinct positions"):
        Scene((Object("circle", "red", "center"), Object("square", "blue", "center")), "green")
    with pytest.raises(ValueError, match="invisible"):
        Scene((Object("circle", "red", "center"),), "red")
    with pytest.raises(TypeError, match="numpy Generator"):
        sample_scene(0)
    # Objects are stored in reading order, so listing order does not matter.
    a, b = Object("circle", "red", "bottom right"), Object("square", "blue", "top left")
    assert Scene((a, b), "green") == Scene((b, a), "green")
    assert Scene((a, b), "green").objects == (b, a)


# ----------------------------------------------------------------------------- renderer


def test_coverage_is_antialiased_and_has_the_right_area():
    res = 32
    for size, extent in SIZE_EXTENTS.items():
        e = extent * res
        exact = {"circle": np.pi * e * e / 4, "square": e * e, "triangle": e * e / 2}
        for shape, area in exact.items():
            m = coverage(shape, size, (16.3, 15.6), res)
            assert abs(m.sum() - area) / area < 0.02, (shape, size, m.sum(), area)
            # Anti-aliased: fractional edge pixels exist; values are coverages.
            assert np.any((m > 0.05) & (m < 0.95))
            assert m.min() >= 0 and m.max() <= 1
    ring = coverage("ring", "large", (16.0, 16.0), res)
    assert ring[16, 16] == 0 and ring.max() == 1  # a hole in the middle
    star = coverage("star", "large", (16.0, 16.0), res)
    assert 0.2 * (9**2) < star.sum() < 0.5 * (9**2)


def test_render_layout_border_and_gradient():
    scenes = _scenes(3, 300, shapes=SHAPES, gradient_fraction=0.5)
    images = render_batch(scenes)
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    for s, img in zip(scenes, images):
        top = np.asarray(PALETTE[s.background], np.float32)
        bottom = top if s.gradient is None else np.asarray(PALETTE[s.gradient], np.float32)
        t = (np.arange(32, dtype=np.float32) + 0.5) / 32
        expect = (1 - t)[:, None] * top[None, :] + t[:, None] * bottom[None, :]
        # The border is pure background (objects keep a margin).
        np.testing.assert_allclose(img[:, 0], expect, atol=1e-6)
        np.testing.assert_allclose(img[:, -1], expect, atol=1e-6)
        np.testing.assert_allclose(img[0], np.broadcast_to(expect[0], (32, 3)), atol=1e-6)
    # Objects never overlap: coverage masks of every pair of positions are disjoint.
    for p, q in [(p, q) for p in POSITIONS for q in POSITIONS if p < q]:
        a = grid_coverage("square", "large", p, 32)
        b = grid_coverage("square", "large", q, 32)
        assert not np.any((a > 0) & (b > 0)), (p, q)
    # A rendered object has its palette colour in its interior, at its anchor.
    s = Scene((Object("square", "orange", "top right"),), "blue")
    x, y = (np.asarray(POSITION_CENTERS["top right"]) * 32).astype(int)
    np.testing.assert_allclose(render(s)[y, x], PALETTE["orange"], atol=1e-6)
    assert render(s, 64).shape == (64, 64, 3)


def test_render_batch_of_64_is_fast():
    scenes = _scenes(4, 64, shapes=SHAPES)
    render_batch(scenes)  # fill the mask cache
    best = min(_cpu_time(render_batch, scenes) for _ in range(5))
    assert best < 0.05, f"rendering 64 scenes took {best * 1e3:.1f} ms of CPU time"


def _cpu_time(f, *args):
    """CPU seconds of one call (process time: robust to other jobs sharing the machine)."""
    t = time.process_time()
    f(*args)
    return time.process_time() - t


# ----------------------------------------------------------------------------- grammar


def test_every_template_round_trips():
    scenes = _scenes(5, 400, shapes=SHAPES, gradient_fraction=0.3)
    for s in scenes:
        prompts = {style: to_prompt(s, style) for style in STYLES}
        assert len(set(prompts.values())) == len(STYLES)  # real paraphrases
        for style, p in prompts.items():
            assert parse_prompt(p) == s, (style, p)
    s = Scene(
        (Object("circle", "red", "top left"), Object("square", "blue", "bottom right", "small")),
        "green",
    )
    assert to_prompt(s) == (
        "a red circle at the top left and a small blue square at the bottom right on a green "
        "background"
    )
    assert parse_prompt("top-left red circle, blue background") == Scene(
        (Object("circle", "red", "top left"),), "blue"
    )


def test_canonical_form_covers_the_required_vocabulary():
    count = 0
    for colour in ("red", "green", "blue", "yellow", "white", "black", "orange", "purple"):
        for shape in ("circle", "square", "triangle"):
            for position in REQUIRED_POSITIONS:
                for bg in COLOURS:
                    text = f"a {colour} {shape} at the {position} on a {bg} background"
                    if bg == colour:
                        with pytest.raises(ValueError, match="invisible"):
                            parse_prompt(text)
                        continue
                    expect = Scene((Object(shape, colour, position, "large"),), bg)
                    assert parse_prompt(text) == expect, text
                    count += 1
    assert count == 8 * 3 * 5 * 7


def test_parse_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown word 'pink'.*Valid colours: \['red'"):
        parse_prompt("a pink circle at the top left on a blue background")
    with pytest.raises(ValueError, match=r"unknown word 'hexagon'.*shapes"):
        parse_prompt("a red hexagon at the top left on a blue background")
    with pytest.raises(ValueError, match="exactly one background"):
        parse_prompt("a red circle at the top left")
    with pytest.raises(ValueError, match="no position"):
        parse_prompt("a red circle on a blue background")
    with pytest.raises(ValueError, match="exactly one shape"):
        parse_prompt("a red circle square at the top on a blue background")
    with pytest.raises(ValueError, match="distinct positions"):
        parse_prompt("a red circle at the top and a white square at the top on a blue background")
    with pytest.raises(TypeError):
        parse_prompt(3)


def test_parse_roles_and_tokenizer_split_agree():
    scene, words, roles = parse_prompt_roles(
        "a blue background with a small white square in the lower right and a red circle in the "
        "upper left"
    )
    assert scene.objects[0] == Object("circle", "red", "top left")  # reading order
    assert scene.objects[1] == Object("square", "white", "bottom right", "small")
    role = dict(zip(words, roles))
    assert role["red"] == role["circle"] == role["upper"] == 0
    assert role["white"] == role["square"] == role["lower"] == 1
    assert roles[words.index("blue")] == "background" and role["background"] == "background"
    assert split_words("Top-left red circle, blue background!") == [
        "top", "-", "left", "red", "circle", ",", "blue", "background", "!",
    ]  # fmt: skip
    assert set(VOCABULARY) >= set(COLOURS) | set(SHAPES) | set(SIZES)


# ----------------------------------------------------------------------------- held-out split


def test_heldout_scenes_never_appear_in_training_batches():
    _, _, train = make_batch(11, 3000, two_object_fraction=0.3)
    _, _, held = make_batch(12, 300, split="heldout", two_object_fraction=0.3)
    assert not any(is_heldout(s) for s in train)
    assert all(is_heldout(s) for s in held)
    train_set = set(train)
    assert not train_set & set(held)
    # About 10% of all scenes are held out.
    share = np.mean([is_heldout(s) for s in _scenes(13, 3000)])
    assert 0.07 < share < 0.13
    prompts, scenes = heldout_prompts(200, seed=0)
    assert len(prompts) == len(set(scenes)) == 200
    assert [len(s.objects) for s in scenes] == [1] * 100 + [2] * 100
    assert all(is_heldout(s) for s in scenes) and not set(scenes) & train_set
    assert [parse_prompt(p) for p in prompts] == scenes
    assert heldout_prompts(200, seed=0) == (prompts, scenes)


# ----------------------------------------------------------------------------- analyzer


@pytest.mark.parametrize(
    "kw",
    [
        dict(shapes=DEFAULT_SHAPES),
        dict(shapes=SHAPES, gradient_fraction=0.5),
    ],
)
def test_analyzer_is_exact_on_own_renders(kw):
    scenes = _scenes(21, 300, two_object_fraction=0.5, **kw)
    wrong = [s for s in scenes if analyze(render(s)) != s]
    assert not wrong, f"{len(wrong)} of {len(scenes)} misread, e.g. {wrong[0]}"
    for s in scenes[:100]:
        acc = attribute_accuracy(render(s), s)
        assert all(v == 1.0 for v in acc.values()), (s, acc)


def test_analyzer_is_exact_at_64px():
    for s in _scenes(22, 40, shapes=SHAPES, gradient_fraction=0.3):
        assert analyze(render(s, 64)) == s


def test_analyzer_is_robust_to_noise_blur_and_bad_images():
    scenes = _scenes(23, 150)
    rng = np.random.default_rng(0)
    exact, means = 0, []
    for s in scenes:
        img = render(s)
        noisy = np.clip(img + 0.05 * rng.standard_normal(img.shape), 0, 1)
        blurred = ndimage.gaussian_filter(img, (0.8, 0.8, 0))
        exact += analyze(noisy) == s
        means.append(attribute_accuracy(noisy, s)["mean"])
        means.append(attribute_accuracy(blurred, s)["mean"])
    assert exact >= 0.97 * len(scenes)
    assert np.mean(means) >= 0.98
    # A blank image: background only, nothing detected, every object attribute wrong.
    blank = np.full((32, 32, 3), PALETTE["blue"], np.float32)
    assert analyze(blank) == Scene((), "blue")
    acc = attribute_accuracy(blank, scenes[0])
    assert acc["count"] == 0 and acc["shape"] == 0 and acc["all"] == 0
    # Three objects where the prompt asked for two: attributes right, count wrong.
    three = Scene(
        (
            Object("circle", "red", "top left"),
            Object("square", "white", "center"),
            Object("triangle", "yellow", "bottom right", "small"),
        ),
        "black",
    )
    assert analyze(render(three)) == three
    two = Scene(three.objects[:2], "black")
    acc = attribute_accuracy(render(three), two)
    assert acc["colour"] == acc["shape"] == acc["position"] == 1 and acc["count"] == 0
    assert acc["all"] == 0
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        analyze(np.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        analyze(np.full((32, 32, 3), -1.0))


def test_attribute_accuracy_scores_each_attribute():
    s = Scene(
        (Object("circle", "red", "top left"), Object("square", "white", "bottom right", "small")),
        "blue",
    )
    img = render(s)
    off_colour = dataclasses.replace(s.objects[0], colour="yellow")
    acc = attribute_accuracy(img, Scene((off_colour, s.objects[1]), "blue"))
    assert acc["colour"] == 0.5 and acc["shape"] == acc["position"] == acc["size"] == 1
    assert acc["mean"] == pytest.approx(8 / 9) and acc["all"] == 0
    off_size = dataclasses.replace(s.objects[1], size="large", shape="triangle")
    acc = attribute_accuracy(img, Scene((s.objects[0], off_size), "green"))
    assert acc["size"] == acc["shape"] == 0.5 and acc["background"] == 0
    assert acc["mean"] == pytest.approx(6 / 9)
    dets = detect(img)
    assert [d.match for d in dets] == pytest.approx([1.0, 1.0], abs=1e-4)
