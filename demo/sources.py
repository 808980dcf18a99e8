"""The demo's data source: procedural captioned-shapes scenes (`demo.shapes`) for `glide_jax.data`.

Importing this module registers the source kind "shapes" (`glide_jax.data.register_source`), so a
run config's `data.source` can be `{"kind": "shapes", ...}` (train imports the modules named in
`data.plugins`, `["demo"]` by default). Beside the images and captions it implements the two
optional `Source` hooks: hard-negative captions (`negative_caption`, for `negative_weight`
training) and the objects' boxes (`object_boxes`, for "object" inpainting masks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from demo import shapes as shapes_lib
from glide_jax.data import DataError, Source, register_source

# Seeds the draw of which records' negatives name another relation apart from the scene stream.
_RELATION_NEGATIVE_STREAM = 0x9A28
# What a relation negative may name (`relation_negative_kinds`): the inverse relation, or one
# across the relation's axis (`shapes.other_relations`).
RELATION_NEGATIVE_KINDS = ("inverted", "across")


class ShapesSource(Source):
    """The procedural captioned-shapes dataset, rendered directly at the loader's image size. It
    is endless; an "epoch" is `epoch_size` fresh scenes (epoch e holds scenes e*epoch_size ...
    (e+1)*epoch_size - 1 of the `(seed, split)` stream), which gives it the same position
    bookkeeping as the file sources. The caption phrasing is chosen per record from the loader's
    seeded per-record generator. `extra_shape_kinds` (train split only) also draws shapes of those
    kinds, in every colour (`shapes.training_combinations`). `relation_negatives` is the share of
    two-shape records whose negative caption names another relation instead of swapping the two
    objects' colours or kinds, since the swaps all keep the relation right: of the
    `relation_negative_kinds` ("inverted", "across"; both by default, drawn as often), which one
    per record."""

    shuffle = False   # scenes are independent draws already

    def __init__(self, seed: int = 0, split: str = "train", epoch_size: int = 100_000,
                 extra_shape_kinds: Sequence[str] = (), relation_negatives: float = 0.0,
                 relation_negative_kinds: Sequence[str] = RELATION_NEGATIVE_KINDS):
        if split not in shapes_lib.SPLITS:
            raise DataError(f"shapes source: 'split' must be one of {shapes_lib.SPLITS}, got {split!r}")
        if epoch_size <= 0:
            raise DataError(f"shapes source: 'epoch_size' must be positive, got {epoch_size}")
        if not isinstance(extra_shape_kinds, (list, tuple)):
            raise DataError(f"shapes source: 'extra_shape_kinds' must be a list of shape kind names, "
                            f"got {extra_shape_kinds!r}")
        if extra_shape_kinds and split != "train":
            raise DataError(f"shapes source: 'extra_shape_kinds' apply to the train split only, got split {split!r}")
        try:
            self.allowed = (shapes_lib.training_combinations((), extra_shape_kinds)
                            if split == "train" else shapes_lib.ALL_COMBINATIONS)
        except ValueError as e:
            raise DataError(f"shapes source: {e}") from None
        if isinstance(relation_negatives, bool) or not isinstance(relation_negatives, (int, float)) \
                or not 0 <= relation_negatives <= 1:
            raise DataError(f"shapes source: 'relation_negatives' must be a fraction in [0, 1], "
                            f"got {relation_negatives!r}")
        if isinstance(relation_negative_kinds, str) or not relation_negative_kinds \
                or not set(relation_negative_kinds) <= set(RELATION_NEGATIVE_KINDS):
            raise DataError(f"shapes source: 'relation_negative_kinds' must be a non-empty list of "
                            f"{list(RELATION_NEGATIVE_KINDS)}, got {relation_negative_kinds!r}")
        self.seed, self.split, self.epoch_size = int(seed), split, int(epoch_size)
        self.relation_negatives = float(relation_negatives)
        self.relation_negative_kinds = tuple(dict.fromkeys(relation_negative_kinds))
        self.extra_shape_kinds = tuple(extra_shape_kinds)

    def __len__(self):
        return self.epoch_size

    def scene(self, index: int, epoch: int) -> shapes_lib.Scene:
        return shapes_lib.scene_at(self.seed, epoch * self.epoch_size + index, self.split,
                                   (), self.extra_shape_kinds)

    def load(self, index, epoch, image_size, rng):
        scene = self.scene(index, epoch)
        options = shapes_lib.captions_for(scene.spec)
        return scene.render(image_size), options[int(rng.integers(len(options)))]

    def negative_caption(self, index, epoch, rng):
        scene = self.scene(index, epoch)
        if self.relation_negatives and len(scene.shapes) == 2:
            other = self._relation_negative(scene, index, epoch, rng)
            if other is not None:
                return other
        return self._swapped_negative(scene, index, rng)

    def _relation_negative(self, scene, index, epoch, rng) -> str | None:
        """For a `relation_negatives` share of two-shape records (drawn from the record's own index,
        so however the records are split up), the caption of another relation."""
        draw = np.random.default_rng([self.seed, _RELATION_NEGATIVE_STREAM, epoch * self.epoch_size + index])
        if draw.random() >= self.relation_negatives:
            return None
        inverse, *across = shapes_lib.other_relations(scene.spec)
        kind = self.relation_negative_kinds[int(draw.integers(len(self.relation_negative_kinds)))]
        spec = inverse if kind == "inverted" else across[int(draw.integers(len(across)))]
        options = shapes_lib.captions_for(spec)
        return options[int(rng.integers(len(options)))]

    def _swapped_negative(self, scene, index, rng) -> str | None:
        # The two shapes' colours, or their kinds, exchanged: the caption's words unchanged, their
        # binding reversed; which of the two alternates from record to record. Nothing names a
        # held-out colour-shape pair, which training never shows.
        options = [other for other in (shapes_lib.swapped(scene, "colour"), shapes_lib.swapped(scene, "kind"))
                   if other is not None and set(other.spec.objects) <= set(self.allowed)]
        if not options:
            return None
        return options[index % len(options)].caption(rng)

    def object_boxes(self, index, epoch):
        return [s.box for s in self.scene(index, epoch).shapes]

    def fingerprint(self):
        extra = f":kinds+{','.join(self.extra_shape_kinds)}" if self.extra_shape_kinds else ""
        return f"shapes:{self.seed}:{self.split}:{self.epoch_size}{extra}"


def shapes_source(spec: dict) -> ShapesSource:
    """`{"kind": "shapes", "seed": 0, "split": "train", "epoch_size": 100000,
    "extra_shape_kinds": ["diamond", "cross"], "relation_negatives": 0.5,
    "relation_negative_kinds": ["inverted", "across"]}` (all optional but `kind`)."""
    return ShapesSource(**{key: value for key, value in spec.items() if key != "kind"})


register_source("shapes", shapes_source,
                keys=("seed", "split", "epoch_size", "extra_shape_kinds", "relation_negatives",
                      "relation_negative_kinds"))
