"""A procedural captioned-shapes dataset and an analyser that checks images against captions.

Small demo models are trained on CPU with this domain, and text alignment is evaluated with it:
every scene is one or two flat shapes (circle, square, upright triangle) in a named colour on a
plain background of another named colour, with captions such as
"a red circle to the left of a blue square on a white background".

Scenes are frozen dataclasses that hold geometry in normalised coordinates (x to the right,
y downwards, both in [0, 1]), so the same scene renders at any resolution (32 px for the base
model, 64 px for the upsampler). Rendering is numpy with supersampled anti-aliasing.

Generation is a pure function of `(seed, split, index)` (`scene_at`), so a stream can be
resumed or sharded by index; `iter_scenes` is the endless stream. A fixed list of colour-shape
combinations (`HELD_OUT_COMBINATIONS`) never appears in `split="train"`; every
`split="heldout"` scene contains at least one of them, which lets an evaluation measure
compositional generalisation.

`analyse` recovers background, objects (colour, kind, centroid) and the relation from an image;
`score` compares that against a scene or a parsed caption (`parse_caption`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Iterator, Sequence

import numpy as np

# Palette in sRGB. Colours were chosen far enough apart that the nearest-colour classification
# of a shape's interior is unambiguous even against the lowest-contrast pair (purple on gray).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 170),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUND_COLOURS: tuple[str, ...] = ("white", "black", "gray")
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# Kinds only a training stream that asks for them draws (`training_combinations`), each in every
# shape colour: they show colours that go with any kind, without adding a prompt to an evaluation
# (which names KINDS only) or a held-out pair to training. The analyser reads KINDS only.
EXTRA_KINDS: tuple[str, ...] = ("diamond", "cross")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Never generated for training; every held-out scene contains at least one of these.
HELD_OUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("yellow", "triangle"),
    ("blue", "circle"),
    ("purple", "square"),
    ("white", "triangle"),
)
SPLITS = ("train", "heldout")

TRAIN_COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (c, k) for c in SHAPE_COLOURS for k in KINDS if (c, k) not in HELD_OUT_COMBINATIONS)
ALL_COMBINATIONS: tuple[tuple[str, str], ...] = tuple((c, k) for c in SHAPE_COLOURS for k in KINDS)


def training_combinations(extra_colours: Sequence[str] = (),
                          extra_kinds: Sequence[str] = ()) -> tuple[tuple[str, str], ...]:
    """The colour-shape pairs a training stream draws from: TRAIN_COMBINATIONS, plus every kind in
    each of `extra_colours` (palette colours that are not in SHAPE_COLOURS, e.g. the background
    colours "black" and "gray"), plus each of `extra_kinds` (from EXTRA_KINDS) in every shape
    colour, extra ones included. Both are meant to weaken the prior that a kind has only its
    training colours (demo/REPRODUCE.md says how they did), without adding any prompt to an
    evaluation (those name SHAPE_COLOURS and KINDS only) or any held-out pair to training."""
    return _training_combinations(tuple(extra_colours), tuple(extra_kinds))


@functools.lru_cache(maxsize=None)   # scene_at asks for every scene it draws
def _training_combinations(extra: tuple[str, ...], extra_kinds: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    for colour in extra:
        if colour not in COLOURS or colour in SHAPE_COLOURS:
            raise ValueError(f"extra shape colour {colour!r}: expected a palette colour that is not "
                             f"already a shape colour, one of {[c for c in COLOURS if c not in SHAPE_COLOURS]}")
    if len(set(extra)) != len(extra):
        raise ValueError(f"extra shape colours repeat a colour: {list(extra)}")
    for kind in extra_kinds:
        if kind not in EXTRA_KINDS:
            raise ValueError(f"extra shape kind {kind!r}: expected one of {list(EXTRA_KINDS)}")
    if len(set(extra_kinds)) != len(extra_kinds):
        raise ValueError(f"extra shape kinds repeat a kind: {list(extra_kinds)}")
    return (TRAIN_COMBINATIONS + tuple((c, k) for c in extra for k in KINDS)
            + tuple((c, k) for k in extra_kinds for c in SHAPE_COLOURS + extra))

# Layout constants, in fractions of the image side.
BORDER = 0.04          # shapes stay this far from the image edge
SINGLE_SIZE = (0.30, 0.55)
PAIR_SIZE = (0.22, 0.36)
MIN_GAP = 0.08         # free space between two shapes along the relation's axis
MAX_OFFSET = 0.10      # largest centre offset across the relation's axis
# With these bounds the centroid separation along the relation's axis is >= 0.27 while the
# offset across it is <= 0.16 (a triangle's centroid sits size/6 below its box centre), so the
# relation read back from centroids is never ambiguous.

_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape: `centre` (x, y) and `size` (box side) are fractions of the image side."""
    colour: str
    kind: str
    centre: tuple[float, float]
    size: float

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.kind not in KINDS + EXTRA_KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS + EXTRA_KINDS}")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the square the shape is drawn in, fractions of the side."""
        (x, y), half = self.centre, self.size / 2
        return (y - half, x - half, y + half, x + half)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a caption says: background, (colour, kind) per object, and the relation of the first
    object to the second (None for one object)."""
    background: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class Scene:
    """One or two shapes on a plain background. For two shapes, `relation` states where
    `shapes[0]` is relative to `shapes[1]` ("left of", "right of", "above", "below")."""
    background: str
    shapes: tuple[Shape, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.background not in COLOURS:
            raise ValueError(f"unknown background colour {self.background!r}")
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"a scene holds one or two shapes, got {len(self.shapes)}")
        if (len(self.shapes) == 2) != (self.relation is not None):
            raise ValueError("a relation is required for exactly two shapes and forbidden otherwise")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
        for s in self.shapes:
            if s.colour == self.background:
                raise ValueError(f"{s.name} is invisible on a {self.background} background")

    @property
    def spec(self) -> SceneSpec:
        return SceneSpec(self.background, tuple((s.colour, s.kind) for s in self.shapes),
                         self.relation)

    def render(self, size: int) -> np.ndarray:
        """Renders the scene as a uint8 array of shape (size, size, 3)."""
        return render(self, size)

    def captions(self) -> list[str]:
        """All phrasings of this scene's caption, in a fixed order."""
        return captions_for(self.spec)

    def caption(self, rng: np.random.Generator) -> str:
        """One phrasing, chosen with `rng`."""
        options = self.captions()
        return options[int(rng.integers(len(options)))]


def swapped(scene: Scene, attribute: str) -> Scene | None:
    """The scene with its two shapes' `attribute` ("colour" or "kind") exchanged (same places, same
    background), or None when that changes nothing: one shape, or two alike in it. Its caption is
    the hardest negative for the scene's image: the same words, only bound the other way."""
    if attribute not in ("colour", "kind"):
        raise ValueError(f"attribute must be 'colour' or 'kind', got {attribute!r}")
    if len(scene.shapes) != 2:
        return None
    first, second = scene.shapes
    if getattr(first, attribute) == getattr(second, attribute):
        return None
    return dataclasses.replace(scene, shapes=(dataclasses.replace(first, **{attribute: getattr(second, attribute)}),
                                              dataclasses.replace(second, **{attribute: getattr(first, attribute)})))


def other_relations(spec: SceneSpec) -> list[SceneSpec]:
    """The two-object `spec` with each other relation in its place, the inverse first, then the two
    across its axis. Their captions name the right objects and background in the wrong places:
    the hard negatives for a relation, as `swapped`'s are for which object has which colour."""
    if spec.relation is None:
        raise ValueError("a one-object scene has no relation to change")
    inverse = INVERSE_RELATION[spec.relation]
    return [dataclasses.replace(spec, relation=r)
            for r in (inverse,) + tuple(r for r in RELATIONS if r not in (spec.relation, inverse))]


# -- captions ----------------------------------------------------------------------------------

_SINGLE_TEMPLATES = (
    "a {a} on a {bg} background",
    "a {a} against a {bg} background",
    "a {bg} background with a {a}",
    "a picture of a {a} on a {bg} background",
    "{a}, {bg} background",
)
_PAIR_TEMPLATES = (
    "a {a} {rel} a {b} on a {bg} background",
    "on a {bg} background, a {a} {rel} a {b}",
    "a {a} {rel} a {b}, {bg} background",
    "a {b} {inv} a {a} on a {bg} background",
    "a {bg} background with a {b} {inv} a {a}",
)
_REL_PHRASE = {"left of": "to the left of", "right of": "to the right of",
               "above": "above", "below": "below"}


def captions_for(spec: SceneSpec) -> list[str]:
    """Every phrasing of a scene specification (all name shapes, colours, background, relation)."""
    names = [f"{c} {k}" for c, k in spec.objects]
    if len(names) == 1:
        return [t.format(a=names[0], bg=spec.background) for t in _SINGLE_TEMPLATES]
    rel, inv = _REL_PHRASE[spec.relation], _REL_PHRASE[INVERSE_RELATION[spec.relation]]
    return [t.format(a=names[0], b=names[1], rel=rel, inv=inv, bg=spec.background)
            for t in _PAIR_TEMPLATES]


_COLOUR_WORDS = {**{c: c for c in COLOURS}, "grey": "gray", "violet": "purple"}
_KIND_WORDS = {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
               "square": "square", "squares": "square", "triangle": "triangle",
               "triangles": "triangle", "diamond": "diamond", "cross": "cross"}
_RELATION_PATTERNS = (
    (re.compile(r"\b(?:to the |on the )?left of\b"), "left of"),
    (re.compile(r"\b(?:to the |on the )?right of\b"), "right of"),
    (re.compile(r"\b(?:above|over)\b"), "above"),
    (re.compile(r"\b(?:below|under|beneath)\b"), "below"),
)


class CaptionParseError(ValueError):
    """A caption does not describe a scene of this domain; the message says what is missing."""


def parse_caption(text: str) -> SceneSpec:
    """Reads a caption of this domain back into a `SceneSpec`.

    The background is the colour word directly before "background" (or "backdrop"); the objects
    are the "<colour> <kind>" pairs in reading order; the relation is the relation phrase found
    between the two objects, and relates the first-mentioned object to the second.
    """
    words = re.findall(r"[a-z]+", text.lower())
    background = None
    objects: list[tuple[str, str, int]] = []
    for i, w in enumerate(words):
        if w in ("background", "backdrop") and i > 0 and words[i - 1] in _COLOUR_WORDS:
            background = _COLOUR_WORDS[words[i - 1]]
        if w in _KIND_WORDS and i > 0 and words[i - 1] in _COLOUR_WORDS:
            objects.append((_COLOUR_WORDS[words[i - 1]], _KIND_WORDS[w], i))
    if background is None:
        raise CaptionParseError(f"no '<colour> background' in caption {text!r}")
    if not 1 <= len(objects) <= 2:
        raise CaptionParseError(
            f"expected one or two '<colour> <shape>' phrases in {text!r}, found {len(objects)}")
    relation = None
    if len(objects) == 2:
        between = " ".join(words[objects[0][2] + 1:objects[1][2] - 1])
        for pattern, rel in _RELATION_PATTERNS:
            if pattern.search(between):
                relation = rel
                break
        if relation is None:
            raise CaptionParseError(f"no relation between the two shapes in {text!r}")
    return SceneSpec(background, tuple((c, k) for c, k, _ in objects), relation)


def scene_from_caption(text: str, rng: np.random.Generator) -> Scene:
    """A renderable scene matching a caption (`parse_caption`), laid out with `rng`."""
    return layout_scene(parse_caption(text), rng)


# -- generation --------------------------------------------------------------------------------

_SPLIT_IDS = {"train": 0, "heldout": 1}


def _check_split(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return _SPLIT_IDS[split]


def scene_at(seed: int, index: int, split: str = "train", extra_colours: Sequence[str] = (),
             extra_kinds: Sequence[str] = ()) -> Scene:
    """The `index`-th scene of the stream `(seed, split)`; a pure function of its arguments.
    `extra_colours` and `extra_kinds` (train split only) add shapes of those colours and kinds
    (`training_combinations`); either makes a different stream."""
    split_id = _check_split(split)
    if (extra_colours or extra_kinds) and split != "train":
        raise ValueError(f"extra shape colours and kinds are for the train split only, got split {split!r}")
    rng = np.random.default_rng([int(seed), split_id, int(index)])
    n = 1 + int(rng.integers(2))
    if split == "train":
        pool = training_combinations(extra_colours, extra_kinds)
        combos = [pool[i] for i in rng.integers(len(pool), size=n)]
    else:
        combos = [HELD_OUT_COMBINATIONS[int(rng.integers(len(HELD_OUT_COMBINATIONS)))]]
        if n == 2:
            combos.append(ALL_COMBINATIONS[int(rng.integers(len(ALL_COMBINATIONS)))])
            if rng.random() < 0.5:
                combos.reverse()
    used = {c for c, _ in combos}
    backgrounds = [b for b in BACKGROUND_COLOURS if b not in used]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if n == 2 else None
    return layout_scene(SceneSpec(background, tuple(combos), relation), rng)


def iter_scenes(seed: int, split: str = "train", start: int = 0,
                extra_colours: Sequence[str] = (), extra_kinds: Sequence[str] = ()) -> Iterator[Scene]:
    """Endless deterministic stream of scenes, beginning at index `start`."""
    _check_split(split)
    for index in itertools.count(start):
        yield scene_at(seed, index, split, extra_colours, extra_kinds)


def layout_scene(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Places the objects of `spec` at random (sizes, positions) so that its relation holds with
    a clear margin. Useful to render a reference image for a parsed caption."""
    if len(spec.objects) == 1:
        (colour, kind), = spec.objects
        size = float(rng.uniform(*SINGLE_SIZE))
        lo, hi = BORDER + size / 2, 1 - BORDER - size / 2
        centre = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        return Scene(spec.background, (Shape(colour, kind, centre, size),))

    sa, sb = (float(s) for s in rng.uniform(*PAIR_SIZE, size=2))
    span = 1 - 2 * BORDER
    gap = float(rng.uniform(MIN_GAP, span - sa - sb))
    # Along the relation's axis: the first box starts somewhere in the slack left over.
    start = BORDER + float(rng.uniform(0, span - sa - sb - gap))
    first, second = start + sa / 2, start + sa + gap + sb / 2   # smaller coordinate first
    # Across the axis: both centres within the borders and within MAX_OFFSET of each other.
    lo_a, hi_a = BORDER + sa / 2, 1 - BORDER - sa / 2
    lo_b, hi_b = BORDER + sb / 2, 1 - BORDER - sb / 2
    across_a = float(rng.uniform(lo_a, hi_a))
    across_b = float(np.clip(across_a + rng.uniform(-MAX_OFFSET, MAX_OFFSET), lo_b, hi_b))

    rel = spec.relation
    if rel in ("left of", "above"):
        along_a, along_b = first, second
    else:
        # The second box occupies the low coordinates; reuse the same layout mirrored in size.
        along_b, along_a = start + sb / 2, start + sb + gap + sa / 2
    if rel in ("left of", "right of"):
        ca, cb = (along_a, across_a), (along_b, across_b)
    else:
        ca, cb = (across_a, along_a), (across_b, along_b)
    (col_a, kind_a), (col_b, kind_b) = spec.objects
    return Scene(spec.background, (Shape(col_a, kind_a, ca, sa), Shape(col_b, kind_b, cb, sb)), rel)


# -- rendering ---------------------------------------------------------------------------------

def _coverage(shape: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean inside-test at sample points (xs: (1, N), ys: (N, 1), normalised)."""
    cx, cy = shape.centre
    h = shape.size / 2
    if shape.kind == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape.kind == "square":
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape.kind == "diamond":
        return np.abs(xs - cx) + np.abs(ys - cy) <= h
    if shape.kind == "cross":
        # Arms a third of the box wide: thick enough to stay a cross at a pair's 7 px on 32 px.
        dx, dy, arm = np.abs(xs - cx), np.abs(ys - cy), h / 3
        return ((dx <= arm) & (dy <= h)) | ((dy <= arm) & (dx <= h))
    # Upright triangle in its box: apex at the top centre, base along the bottom edge, so the
    # half-width grows from 0 at the top to h at the bottom.
    top = cy - h
    return (ys <= cy + h) & (np.abs(xs - cx) <= (ys - top) / 2)


def render(scene: Scene, size: int, supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Renders `scene` at `size` x `size` pixels as uint8 (H, W, 3).

    Each pixel averages `supersample`^2 point samples, so edges are anti-aliased and the same
    scene looks the same at every resolution.
    """
    if size < 8:
        raise ValueError(f"render size must be at least 8 pixels, got {size}")
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs, ys = coords[None, :], coords[:, None]
    # Shapes never overlap, so each pixel is a convex mix of the background and the shapes'
    # colours weighted by their coverage; compositing at the output size keeps this cheap.
    img = np.empty((size, size, 3), dtype=np.float32)
    img[...] = np.asarray(COLOURS[scene.background], dtype=np.float32)
    for shape in scene.shapes:
        inside = _coverage(shape, xs, ys).reshape(size, supersample, size, supersample)
        cov = inside.sum(axis=(1, 3), dtype=np.float32)[..., None] / (supersample * supersample)
        img += cov * (np.asarray(COLOURS[shape.colour], dtype=np.float32) - img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -- analysis ----------------------------------------------------------------------------------

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)

FOREGROUND_THRESHOLD = 45.0   # RGB distance from the background (purple on gray is ~89 apart)
MIN_OBJECT_AREA = 0.01        # fraction of the image; smaller blobs are noise
CIRCLE_SQUARE_FILL = 0.89     # fill of the bounding box: circle pi/4 ~ 0.79, square 1
TRIANGLE_SKEW = 0.28          # |vertical skewness|: triangle ~0.57, circle and square 0


def nearest_colour(rgb: Sequence[float]) -> str:
    d = np.sum((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2, axis=1)
    return _PALETTE_NAMES[int(np.argmin(d))]


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels of a boolean mask (0 = not in mask), by propagating the
    minimum label to neighbours until nothing changes."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    labels = np.where(mask, labels, 0)
    uniques = np.unique(labels[labels > 0])
    remap = np.zeros(big + 1, dtype=np.int64)
    remap[uniques] = np.arange(1, len(uniques) + 1)
    return remap[labels], len(uniques)


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] \
        | p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]


def _classify_kind(alpha: np.ndarray) -> tuple[str, float, float]:
    """Kind from a coverage map (values in [0, 1]); returns (kind, fill, skew).

    Extents are sums of per-column / per-row maximum coverage, which measure partially covered
    edge pixels fractionally, so the fill ratio stays meaningful for shapes only ~7 px wide.
    """
    area = float(alpha.sum())
    width = float(alpha.max(axis=0).sum())
    height = float(alpha.max(axis=1).sum())
    fill = area / max(width * height, 1e-6)
    ys = np.arange(alpha.shape[0], dtype=np.float64)[:, None]
    mean_y = float((alpha * ys).sum() / area)
    var_y = float((alpha * (ys - mean_y) ** 2).sum() / area)
    skew = float((alpha * (ys - mean_y) ** 3).sum() / area) / max(var_y, 1e-6) ** 1.5
    if abs(skew) > TRIANGLE_SKEW:
        kind = "triangle"
    elif fill > CIRCLE_SQUARE_FILL:
        kind = "square"
    else:
        kind = "circle"
    return kind, fill, skew


def analyse(image: np.ndarray) -> dict:
    """Describes a uint8 (H, W, 3) image of this domain; deterministic, JSON-able result.

    Background: median of the border pixels, named by the nearest palette colour. Foreground:
    pixels further than FOREGROUND_THRESHOLD from the background colour, split into 4-connected
    components; components under MIN_OBJECT_AREA of the image are dropped. Per object: colour is
    the palette colour nearest to the median of its most saturated pixels; kind comes from the
    fill ratio of its bounding box and its vertical skewness (`_classify_kind`); centroid is
    coverage-weighted, in normalised (x, y). Objects are listed by decreasing area; `relation`
    describes objects[0] relative to objects[1] when there are exactly two.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"analyse expects a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(axis=-1))
    labels, count = _label_components(dist > FOREGROUND_THRESHOLD)

    objects = []
    for label in range(1, count + 1):
        comp = labels == label
        if comp.sum() < MIN_OBJECT_AREA * h * w:
            continue
        core = comp & (dist >= 0.8 * dist[comp].max())
        rgb = np.median(img[core], axis=0)
        direction = rgb - bg_rgb
        region = _dilate(_dilate(comp)) & ~(labels > 0) | comp
        alpha = ((img - bg_rgb) @ direction) / max(float(direction @ direction), 1e-6)
        alpha = np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)
        rows, cols = np.nonzero(region)
        crop = alpha[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        kind, fill, skew = _classify_kind(crop)
        total = float(alpha.sum())
        yy, xx = np.mgrid[0:h, 0:w]
        cx = float(((xx + 0.5) * alpha).sum() / total) / w
        cy = float(((yy + 0.5) * alpha).sum() / total) / h
        objects.append({"colour": nearest_colour(rgb), "kind": kind, "centroid": [cx, cy],
                        "area": total / (h * w), "fill": fill, "skew": skew,
                        "rgb": [float(v) for v in rgb]})
    objects.sort(key=lambda o: -o["area"])
    relation = None
    if len(objects) == 2:
        relation = relation_between(objects[0]["centroid"], objects[1]["centroid"])
    return {"background": nearest_colour(bg_rgb), "background_rgb": [float(v) for v in bg_rgb],
            "objects": objects, "relation": relation}


def relation_between(a: Sequence[float], b: Sequence[float]) -> str:
    """Where point `a` is relative to point `b` along the axis of larger separation."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def score(scene: Scene | SceneSpec, analysis: dict) -> dict[str, bool]:
    """Checks an `analyse` result against a scene (or a parsed caption).

    Detected objects are assigned to the scene's objects by the assignment that matches the most
    colours and kinds (ties: the one whose relation holds). `count`: as many objects as asked;
    `colour` / `shape`: every scene object's assigned detection has its colour / kind;
    `relation`: the assigned centroids are in the stated relation (true for one object);
    `all`: every check holds.
    """
    spec = scene.spec if isinstance(scene, Scene) else scene
    found = analysis["objects"]
    n = len(spec.objects)
    best = None
    for perm in itertools.permutations(range(len(found)), min(n, len(found))):
        colour = [found[j]["colour"] == spec.objects[i][0] for i, j in enumerate(perm)]
        shape = [found[j]["kind"] == spec.objects[i][1] for i, j in enumerate(perm)]
        if n == 1:
            relation = True
        elif len(perm) == 2:
            relation = relation_between(found[perm[0]]["centroid"],
                                        found[perm[1]]["centroid"]) == spec.relation
        else:
            relation = False
        key = (sum(colour) + sum(shape), relation)
        if best is None or key > best[0]:
            best = (key, len(perm) == n and all(colour), len(perm) == n and all(shape), relation)
    if best is None:
        result = {"colour": False, "shape": False, "relation": False}
    else:
        result = {"colour": best[1], "shape": best[2], "relation": bool(best[3])}
    result["background"] = analysis["background"] == spec.background
    result["count"] = len(found) == n
    result["all"] = all(result.values())
    return result
