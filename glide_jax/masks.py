"""Random inpainting masks for training.

A mask is float32 (H, W, 1) with 1 = keep (the known pixels given to the model) and 0 = to be
generated. Four kinds, drawn with configurable proportions (`MaskConfig`):

  * "rect": one or more axis-aligned rectangular holes;
  * "brush": free-form brush strokes (random walks of thick line segments with round joints),
    like hand-drawn erasures;
  * "outpaint": everything is generated except one kept rectangle, which teaches extending an
    image beyond its borders;
  * "object": a hole over one object's box, grown by a random margin on each side; only for
    sources that know where their objects are (`object_boxes`). It teaches what a user does most
    ("replace this object with ..."): the hole holds the whole object, so the caption's object that
    is nowhere in view must be generated, once, inside it.

Determinism: every mask is a pure function of the numpy Generator's state and the config; a
mask consumes a fixed sequence of draws for its kind, so seeding the Generator (e.g. with
`np.random.default_rng([seed, step])`) reproduces masks exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

MASK_KINDS = ("rect", "brush", "outpaint", "object")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Proportions of mask kinds and their size ranges (fractions of the image side).

    rect_weight, brush_weight, outpaint_weight: relative frequency of each kind (normalised).
    rect_count, rect_size: number of holes and the range of each hole's side.
    brush_strokes, brush_vertices: strokes per mask and vertices per stroke.
    brush_width, brush_step: stroke thickness and segment length.
    keep_size: side range of the kept rectangle for "outpaint".
    object_weight, object_margin: frequency of "object" holes and the range of the margin added
      to each side of the object's box.
    """
    rect_weight: float = 0.4
    brush_weight: float = 0.4
    outpaint_weight: float = 0.2
    rect_count: tuple[int, int] = (1, 3)
    rect_size: tuple[float, float] = (0.2, 0.6)
    brush_strokes: tuple[int, int] = (1, 4)
    brush_vertices: tuple[int, int] = (3, 8)
    brush_width: tuple[float, float] = (0.05, 0.15)
    brush_step: tuple[float, float] = (0.1, 0.35)
    keep_size: tuple[float, float] = (0.3, 0.7)
    object_weight: float = 0.0
    object_margin: tuple[float, float] = (0.0, 0.5)

    def __post_init__(self):
        weights = self.weights
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"MaskConfig weights must be >= 0 with a positive sum, got "
                             f"rect={self.rect_weight} brush={self.brush_weight} "
                             f"outpaint={self.outpaint_weight} object={self.object_weight}")
        for name in ("rect_count", "brush_strokes", "brush_vertices"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"MaskConfig.{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        for name in ("rect_size", "brush_width", "brush_step", "keep_size"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"MaskConfig.{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {(lo, hi)}")
        lo, hi = self.object_margin
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"MaskConfig.object_margin must be (lo, hi) with 0 <= lo <= hi <= 1, got {(lo, hi)}")

    @property
    def weights(self) -> tuple[float, float, float, float]:
        return (self.rect_weight, self.brush_weight, self.outpaint_weight, self.object_weight)


def _rect(height, width, rng, frac_range):
    """A random rectangle (top, left, bottom, right), sides in `frac_range` of the image, at
    least one pixel, fully inside the image."""
    h = max(1, int(round(rng.uniform(*frac_range) * height)))
    w = max(1, int(round(rng.uniform(*frac_range) * width)))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, top + h, left + w


def _brush(height, width, rng, config):
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    side = min(height, width)
    for _ in range(int(rng.integers(config.brush_strokes[0], config.brush_strokes[1] + 1))):
        n = int(rng.integers(config.brush_vertices[0], config.brush_vertices[1] + 1))
        thickness = max(1, int(round(rng.uniform(*config.brush_width) * side)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        points = [(x, y)]
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(n - 1):
            # Mostly keep direction so strokes look drawn rather than jittered.
            angle += rng.normal(0, 0.8)
            step = rng.uniform(*config.brush_step) * side
            x = float(np.clip(x + step * np.cos(angle), 0, width - 1))
            y = float(np.clip(y + step * np.sin(angle), 0, height - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=thickness)
        r = thickness / 2
        for px, py in points:   # round caps and joints
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return np.asarray(canvas) > 0


def _object_hole(height, width, rng, boxes, margin_range):
    top, left, bottom, right = boxes[int(rng.integers(len(boxes)))]
    grow = rng.uniform(*margin_range, size=4)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    # Every pixel the grown box touches: the renderer antialiases, so edge pixels whose centres lie
    # just outside the box still carry some of the object.
    return ((rows + 1 > (top - grow[0]) * height) & (rows < (bottom + grow[2]) * height)
            & (cols + 1 > (left - grow[1]) * width) & (cols < (right + grow[3]) * width))


def sample_mask_and_kind(height: int, width: int, rng: np.random.Generator,
                         config: MaskConfig = MaskConfig(),
                         object_boxes: list[tuple[float, float, float, float]] | None = None
                         ) -> tuple[np.ndarray, str]:
    """One mask (H, W, 1) float32, 1 = keep, and its kind (one of `MASK_KINDS`).

    `object_boxes`: (top, left, bottom, right) of each object in the image, as fractions of its
    height and width; required when `config.object_weight` > 0."""
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if config.object_weight > 0 and not object_boxes:
        raise ValueError("MaskConfig.object_weight > 0 needs the objects' boxes, and none were given "
                         "(only sources that define object_boxes provide them)")
    weights = np.asarray(config.weights, dtype=np.float64)
    kind = MASK_KINDS[int(rng.choice(len(MASK_KINDS), p=weights / weights.sum()))]
    if kind == "rect":
        hole = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(config.rect_count[0], config.rect_count[1] + 1))):
            t, l, b, r = _rect(height, width, rng, config.rect_size)
            hole[t:b, l:r] = True
        keep = ~hole
    elif kind == "brush":
        keep = ~_brush(height, width, rng, config)
    elif kind == "outpaint":
        keep = np.zeros((height, width), dtype=bool)
        t, l, b, r = _rect(height, width, rng, config.keep_size)
        keep[t:b, l:r] = True
    else:
        keep = ~_object_hole(height, width, rng, object_boxes, config.object_margin)
    return keep.astype(np.float32)[..., None], kind


def sample_mask(height: int, width: int, rng: np.random.Generator,
                config: MaskConfig = MaskConfig(),
                object_boxes: list[tuple[float, float, float, float]] | None = None) -> np.ndarray:
    """One mask (H, W, 1) float32, 1 = keep, 0 = to generate."""
    return sample_mask_and_kind(height, width, rng, config, object_boxes)[0]


def sample_masks(batch_size: int, height: int, width: int, rng: np.random.Generator,
                 config: MaskConfig = MaskConfig()) -> np.ndarray:
    """`batch_size` masks (B, H, W, 1) float32, drawn one after another from `rng`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return np.stack([sample_mask(height, width, rng, config) for _ in range(batch_size)])


def apply_mask(images: np.ndarray, masks: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Known pixels kept, the rest set to `fill`: the masked image an inpainting model sees.
    images (..., H, W, C), masks (..., H, W, 1)."""
    if masks.shape[-1] != 1 or masks.shape[:-1] != images.shape[:-1]:
        raise ValueError(f"masks of shape {masks.shape} do not fit images of shape {images.shape}; "
                         "expected (..., H, W, 1) with the images' leading dimensions")
    return images * masks + fill * (1 - masks)
