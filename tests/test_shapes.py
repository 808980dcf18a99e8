"""The procedural shapes dataset: determinism, splits, layout margins, captions and the analyser."""

import dataclasses
import itertools

import numpy as np
import pytest

from demo import shapes as S


def _scenes(n, seed=0, split="train"):
    return [S.scene_at(seed, i, split) for i in range(n)]


def test_scenes_are_a_pure_function_of_seed_split_index():
    a = _scenes(50, seed=3)
    assert a == _scenes(50, seed=3)
    assert a != _scenes(50, seed=4)
    assert list(itertools.islice(S.iter_scenes(3, "train", start=10), 5)) == a[10:15]
    assert np.array_equal(a[7].render(32), S.scene_at(3, 7).render(32))


def test_splits_respect_held_out_combinations():
    held = set(S.HELD_OUT_COMBINATIONS)
    assert 3 <= len(held) <= 4
    train = _scenes(2000, split="train")
    heldout = _scenes(500, split="heldout")
    assert not any((s.colour, s.kind) in held for sc in train for s in sc.shapes)
    assert all(any((s.colour, s.kind) in held for s in sc.shapes) for sc in heldout)
    # Every training combination and every held-out one does occur in its split.
    assert {(s.colour, s.kind) for sc in train for s in sc.shapes} == set(S.TRAIN_COMBINATIONS)
    assert held <= {(s.colour, s.kind) for sc in heldout for s in sc.shapes}
    with pytest.raises(ValueError, match="unknown split"):
        S.scene_at(0, 0, "test")


def test_extra_shape_colours_add_every_kind_in_them_to_training_only():
    extra = S.training_combinations(["black", "gray"])
    assert extra[:len(S.TRAIN_COMBINATIONS)] == S.TRAIN_COMBINATIONS
    assert set(extra) - set(S.TRAIN_COMBINATIONS) == {(c, k) for c in ("black", "gray") for k in S.KINDS}
    assert S.training_combinations() == S.TRAIN_COMBINATIONS
    scenes = [S.scene_at(0, i, "train", ("black", "gray")) for i in range(2000)]
    pairs = {(s.colour, s.kind) for sc in scenes for s in sc.shapes}
    assert pairs == set(extra)          # every one drawn, no held-out pair among them
    assert all(s.colour != sc.background for sc in scenes for s in sc.shapes)
    for bad, message in (("red", "not already a shape colour"), ("pink", "'pink'")):
        with pytest.raises(ValueError, match=message):
            S.training_combinations([bad])
    with pytest.raises(ValueError, match="repeat a colour"):
        S.training_combinations(["gray", "gray"])
    with pytest.raises(ValueError, match="train split only"):
        S.scene_at(0, 0, "heldout", ("black",))


def test_extra_shape_kinds_come_in_every_colour_in_training_only_and_render_as_drawn():
    pool = S.training_combinations(extra_kinds=["diamond", "cross"])
    assert pool[:len(S.TRAIN_COMBINATIONS)] == S.TRAIN_COMBINATIONS
    assert set(pool) - set(S.TRAIN_COMBINATIONS) == {(c, k) for c in S.SHAPE_COLOURS for k in ("diamond", "cross")}
    both = S.training_combinations(["black"], ["cross"])
    assert ("black", "cross") in both and ("black", "circle") in both and ("red", "diamond") not in both
    scenes = [S.scene_at(0, i, "train", (), ("diamond", "cross")) for i in range(2000)]
    assert {(s.colour, s.kind) for sc in scenes for s in sc.shapes} == set(pool)
    assert [S.scene_at(0, i) for i in range(50)] == [S.scene_at(0, i, "train", (), ()) for i in range(50)]
    # The drawn areas are the geometry's: a diamond half its box, a cross of arms a third wide 5/9.
    for kind, area in (("diamond", 0.5), ("cross", 5 / 9)):
        image = S.Scene("black", (S.Shape("white", kind, (0.5, 0.5), 0.5),)).render(64)
        assert abs((image[..., 0] / 255).sum() / (32 * 32) - area) < 0.01
        assert image[32, 32].tolist() == [255, 255, 255] and image[17, 17].tolist() == [0, 0, 0]   # box corner empty
    assert S.parse_caption("a red diamond to the left of a blue cross on a gray background").objects == \
        (("red", "diamond"), ("blue", "cross"))
    with pytest.raises(ValueError, match="extra shape kind 'circle'"):
        S.training_combinations(extra_kinds=["circle"])
    with pytest.raises(ValueError, match="repeat a kind"):
        S.training_combinations(extra_kinds=["cross", "cross"])
    with pytest.raises(ValueError, match="train split only"):
        S.scene_at(0, 0, "heldout", (), ("cross",))


def test_layout_has_clear_margins_and_valid_colours():
    counts = {1: 0, 2: 0}
    for sc in _scenes(1500) + _scenes(300, split="heldout"):
        counts[len(sc.shapes)] += 1
        assert all(s.colour != sc.background for s in sc.shapes)
        assert sc.background in S.BACKGROUND_COLOURS
        for s in sc.shapes:
            for c in s.centre:   # fully inside the image, off the border
                assert S.BORDER - 1e-9 <= c - s.size / 2 and c + s.size / 2 <= 1 - S.BORDER + 1e-9
        if len(sc.shapes) == 2:
            a, b = sc.shapes
            axis = 0 if sc.relation in ("left of", "right of") else 1
            sign = -1 if sc.relation in ("left of", "above") else 1
            gap = sign * (a.centre[axis] - b.centre[axis]) - (a.size + b.size) / 2
            assert gap >= S.MIN_GAP - 1e-9
            assert abs(a.centre[1 - axis] - b.centre[1 - axis]) <= S.MAX_OFFSET + 1e-9
    assert counts[1] > 500 and counts[2] > 500
    assert {sc.relation for sc in _scenes(300)} == set(S.RELATIONS) | {None}


def test_render_is_antialiased_and_consistent_across_sizes():
    scene = S.Scene("white", (S.Shape("red", "square", (0.5, 0.5), 0.5),))
    img = scene.render(32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 16]) == S.COLOURS["red"] and tuple(img[1, 1]) == (255, 255, 255)
    tri = S.Scene("black", (S.Shape("white", "triangle", (0.5, 0.5), 0.61),)).render(32)
    assert len(np.unique(tri[..., 0])) > 2   # partial-coverage edge pixels exist
    for sc in _scenes(20):
        big = sc.render(64).astype(np.float32)
        small = sc.render(32).astype(np.float32)
        down = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(down - small).mean() < 1.0


def _equivalent(a: S.SceneSpec, b: S.SceneSpec) -> bool:
    if a.background != b.background:
        return False
    if a.objects == b.objects and a.relation == b.relation:
        return True
    return (len(a.objects) == 2 and a.objects == b.objects[::-1]
            and a.relation == S.INVERSE_RELATION[b.relation])


def test_every_caption_parses_back_to_its_scene():
    for sc in _scenes(200) + _scenes(50, split="heldout"):
        captions = sc.captions()
        assert len(set(captions)) == len(captions) >= 4
        for text in captions:
            assert _equivalent(S.parse_caption(text), sc.spec), text
    rng = np.random.default_rng(0)
    sc = S.scene_at(0, 1)
    assert {sc.caption(rng) for _ in range(100)} == set(sc.captions())
    assert S.parse_caption("A Blue Disc to the left of a grey square, on a black background") == \
        S.SceneSpec("black", (("blue", "circle"), ("gray", "square")), "left of")


def test_scene_from_caption_renders_what_the_caption_says():
    rng = np.random.default_rng(2)
    for text in ("a yellow triangle below a purple circle on a black background",
                 "a gray background with a white square to the right of a green triangle",
                 "a blue circle, white background"):
        scene = S.scene_from_caption(text, rng)
        assert _equivalent(S.parse_caption(text), scene.spec)
        assert S.score(S.parse_caption(text), S.analyse(scene.render(32)))["all"], text


@pytest.mark.parametrize("text, match", [
    ("a red circle", "background"),
    ("a circle on a white background", "one or two"),
    ("a red circle and a blue square on a white background", "no relation"),
])
def test_parse_caption_errors_name_what_is_missing(text, match):
    with pytest.raises(S.CaptionParseError, match=match):
        S.parse_caption(text)


@pytest.mark.parametrize("size", [32, 64])
def test_analyser_recovers_ground_truth(size):
    scenes = _scenes(200, seed=11) + _scenes(100, seed=11, split="heldout")
    results = [S.score(sc, S.analyse(sc.render(size))) for sc in scenes]
    for key in ("colour", "shape", "background", "relation", "count", "all"):
        accuracy = np.mean([r[key] for r in results])
        assert accuracy >= 0.99, (key, accuracy)


def test_analyser_on_smallest_shapes_and_every_kind_colour_background():
    size = 32
    for (colour, kind), bg in itertools.product(S.ALL_COMBINATIONS, S.BACKGROUND_COLOURS):
        if colour == bg:
            continue
        for cx in (0.3, 0.517, 0.7):   # sub-pixel positions change the pixelation
            scene = S.Scene(bg, (S.Shape(colour, kind, (cx, 0.45), S.PAIR_SIZE[0]),))
            analysis = S.analyse(scene.render(size))
            assert S.score(scene, analysis)["all"], (scene, analysis["objects"])


def test_score_rejects_mismatches():
    scene = S.Scene("gray", (S.Shape("red", "circle", (0.25, 0.5), 0.3),
                             S.Shape("blue", "square", (0.75, 0.5), 0.3)), "left of")
    analysis = S.analyse(scene.render(32))
    assert S.score(scene, analysis)["all"]
    assert S.score(S.parse_caption("a blue square to the right of a red circle on a gray background"),
                   analysis)["all"]
    wrong_relation = S.score(dataclasses.replace(scene, relation="right of"), analysis)
    assert not wrong_relation["relation"] and wrong_relation["colour"] and not wrong_relation["all"]
    wrong_colour = S.score(S.SceneSpec("gray", (("green", "circle"), ("blue", "square")), "left of"),
                           analysis)
    assert not wrong_colour["colour"] and wrong_colour["shape"] and not wrong_colour["all"]
    wrong_kind = S.score(S.SceneSpec("gray", (("red", "triangle"), ("blue", "square")), "left of"),
                         analysis)
    assert not wrong_kind["shape"] and not wrong_kind["all"]
    assert not S.score(S.SceneSpec("white", scene.spec.objects, "left of"), analysis)["background"]
    blank = S.analyse(np.full((32, 32, 3), 128, np.uint8))
    assert blank["objects"] == [] and blank["background"] == "gray"
    assert S.score(scene, blank) == {"colour": False, "shape": False, "relation": False,
                                     "background": True, "count": False, "all": False}


def test_invalid_scenes_and_images_are_rejected():
    with pytest.raises(ValueError, match="invisible"):
        S.Scene("white", (S.Shape("white", "circle", (0.5, 0.5), 0.3),))
    with pytest.raises(ValueError, match="unknown shape kind"):
        S.Shape("red", "hexagon", (0.5, 0.5), 0.3)
    with pytest.raises(ValueError, match="relation"):
        S.Scene("white", (S.Shape("red", "circle", (0.5, 0.5), 0.3),), "above")
    with pytest.raises(ValueError, match="uint8"):
        S.analyse(np.zeros((32, 32, 3), np.float32))


@pytest.mark.parametrize("attribute", ["colour", "kind"])
def test_swapped_exchanges_one_attribute_of_two_shapes_and_nothing_else(attribute):
    scenes = _scenes(40)
    pairs = [scene for scene in scenes
             if len(scene.shapes) == 2 and getattr(scene.shapes[0], attribute) != getattr(scene.shapes[1], attribute)]
    assert pairs
    for scene in pairs:
        swapped = S.swapped(scene, attribute)
        assert [getattr(s, attribute) for s in swapped.shapes] == [getattr(s, attribute) for s in reversed(scene.shapes)]
        rest = lambda shape: {k: v for k, v in dataclasses.asdict(shape).items() if k != attribute}
        assert [rest(s) for s in swapped.shapes] == [rest(s) for s in scene.shapes]
        assert (swapped.background, swapped.relation) == (scene.background, scene.relation)
    one = next(scene for scene in scenes if len(scene.shapes) == 1)
    assert S.swapped(one, attribute) is None
    pair = pairs[0]
    alike = dataclasses.replace(pair, shapes=(pair.shapes[0], dataclasses.replace(
        pair.shapes[1], **{attribute: getattr(pair.shapes[0], attribute)})))
    assert S.swapped(alike, attribute) is None
    with pytest.raises(ValueError, match="attribute must be 'colour' or 'kind'"):
        S.swapped(pair, "size")


def test_other_relations_name_the_inverse_first_then_the_two_across_the_axis():
    spec = S.SceneSpec("white", (("red", "circle"), ("blue", "square")), "left of")
    others = S.other_relations(spec)
    assert [o.relation for o in others] == ["right of", "above", "below"]
    assert all((o.background, o.objects) == (spec.background, spec.objects) for o in others)
    assert [o.relation for o in S.other_relations(dataclasses.replace(spec, relation="below"))] == \
        ["above", "left of", "right of"]
    # Each one's captions, read back, say what it says (some name the second object first) and none
    # is a phrasing of the scene's own.
    flipped = lambda s: S.SceneSpec(s.background, s.objects[::-1], S.INVERSE_RELATION[s.relation])
    for other in others:
        assert all(S.parse_caption(c) in (other, flipped(other)) and c not in S.captions_for(spec)
                   for c in S.captions_for(other))
    with pytest.raises(ValueError, match="a one-object scene has no relation"):
        S.other_relations(S.SceneSpec("white", (("red", "circle"),)))
