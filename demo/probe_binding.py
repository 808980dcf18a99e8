"""Measure at which noise level a demo base model binds each colour of a caption to its object.

    python demo/probe_binding.py --model demo/base

Two-object training scenes are noised to timestep t, and the model's x_0 prediction is read over
each object's area under two captions: the scene's own, and the same caption with the two colours
swapped between the objects ("a blue circle left of a red square" for a red circle left of a blue
square). At small t the noisy image shows the colours and a model follows it whatever the caption;
near t = T only the caption can tell. A model that binds follows the swapped caption there, putting
the colour it names on the object it names; one that reads the caption as a bag of colours follows
neither, and the colours of the sample are decided by the noise. One-object scenes under a caption
naming another colour show, for comparison, how far the caption decides a colour where nothing has
to be bound. The report gives, per t, the share of objects whose predicted colour is nearer the
colour the caption gives them than the other one. `--without pooled-text` / `--without
token-attention` / `--without text-layout` zero one of the ways the U-Net reads the caption (the
pooled vector added to the timestep embedding, the tokens in attention, the text layout where the
model has one), to see which one carries the colours: the pooled vector cannot tell two objects
apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TIMESTEPS = (300, 500, 700, 800, 900, 950, 990)

# (noisy images [B, H, W, 3] in [-1, 1], timestep, captions) -> x_0 predictions [B, H, W, 3]
Predictor = Callable[[np.ndarray, int, Sequence[str]], np.ndarray]


def probe_scenes(count: int, seed: int, objects: int) -> list:
    """The first `count` training scenes of stream `seed` with `objects` shapes (of two different
    colours when there are two)."""
    from demo import shapes

    scenes, index = [], 0
    while len(scenes) < count:
        scene = shapes.scene_at(seed, index, "train")
        index += 1
        if len(scene.shapes) == objects and len({s.colour for s in scene.shapes}) == objects:
            scenes.append(scene)
    return scenes


def object_areas(scene, size: int) -> list[np.ndarray]:
    """Per shape, the pixels [size, size] at least half covered by it (drawn alone)."""
    from demo import shapes

    background = np.asarray(shapes.COLOURS[scene.background], np.float32)
    areas = []
    for shape in scene.shapes:
        alone = shapes.Scene(scene.background, (shape,)).render(size).astype(np.float32)
        full = np.linalg.norm(np.asarray(shapes.COLOURS[shape.colour], np.float32) - background)
        areas.append(np.linalg.norm(alone - background, axis=-1) >= full / 2)
    return areas


def changed_colours(scene) -> tuple[str, ...]:
    """The colours the changed caption gives the scene's shapes: two shapes swap theirs; one shape
    gets the next colour of the palette that is neither its own nor the background."""
    from demo import shapes

    if len(scene.shapes) == 2:
        return tuple(shape.colour for shape in shapes.swapped(scene, "colour").shapes)
    own = scene.shapes[0].colour
    palette = shapes.SHAPE_COLOURS
    start = palette.index(own)
    others = [palette[(start + k) % len(palette)] for k in range(1, len(palette))]
    return (next(c for c in others if c != scene.background),)


def captions(scenes, change_colours: bool) -> list[str]:
    """One phrasing per scene (cycling through the phrasings), with the colours changed
    (`changed_colours`) if asked; the same phrasing either way, so only the colours differ."""
    from demo import shapes

    out = []
    for i, scene in enumerate(scenes):
        spec = scene.spec
        if change_colours:
            objects = tuple((colour, kind) for colour, (_, kind) in zip(changed_colours(scene), spec.objects))
            spec = shapes.SceneSpec(spec.background, objects, spec.relation)
        phrasings = shapes.captions_for(spec)
        out.append(phrasings[i % len(phrasings)])
    return out


def follow_rates(predict: Predictor, alpha_bar: np.ndarray, count: int = 64, seed: int = 4242, size: int = 32,
                 timesteps: Sequence[int] = TIMESTEPS, noise_seed: int = 0) -> dict[int, dict[str, float]]:
    """{t: {"own": two-object scenes, their own caption; "swapped": the colours swapped between
    the objects; "recoloured": one-object scenes, a caption naming another colour}}: the share of
    objects whose predicted colour is nearer the one the caption names than the other. The same
    noise for every t and caption."""
    from demo import shapes

    def colour(name):
        return np.asarray(shapes.COLOURS[name], np.float32) / 127.5 - 1

    rates: dict[int, dict[str, float]] = {t: {} for t in timesteps}
    for objects, kinds in ((2, (("own", False), ("swapped", True))), (1, (("recoloured", True),))):
        scenes = probe_scenes(count, seed, objects)
        images = np.stack([scene.render(size) for scene in scenes]).astype(np.float32) / 127.5 - 1
        areas = [object_areas(scene, size) for scene in scenes]
        noise = np.random.default_rng(noise_seed).standard_normal(images.shape).astype(np.float32)
        for t in timesteps:
            noisy = np.sqrt(alpha_bar[t]) * images + np.sqrt(1 - alpha_bar[t]) * noise
            for name, change in kinds:
                predicted = np.asarray(predict(noisy, t, captions(scenes, change)))
                followed = 0
                for i, scene in enumerate(scenes):
                    drawn = [s.colour for s in scene.shapes]
                    named = changed_colours(scene) if change else drawn
                    for j in range(objects):
                        other = drawn[j] if change else drawn[1 - j]
                        mean = predicted[i][areas[i][j]].mean(axis=0)
                        followed += np.linalg.norm(mean - colour(named[j])) < np.linalg.norm(mean - colour(other))
                rates[t][name] = followed / (objects * count)
    return rates


# What `--without` zeroes: the pooled caption vector added to the timestep embedding, the
# caption's tokens in every attention layer (their keys and values), or the text layout's
# projections into the ResBlocks (`model.text_layout_size`).
TEXT_PATHS = {"pooled-text": lambda path: path[:2] == ("text_encoder", "transformer_proj"),
              "token-attention": lambda path: "encoder_kv" in path,
              "text-layout": lambda path: "layout_proj" in path}


def without_text_path(params: dict, which: str) -> dict:
    """`params` with one of the U-Net's ways of reading the caption zeroed (TEXT_PATHS)."""
    import jax

    if which not in TEXT_PATHS:
        raise SystemExit(f"error: --without must be one of {sorted(TEXT_PATHS)}, got {which!r}")
    matches = TEXT_PATHS[which]
    found = []

    def zero_if_matching(path, leaf):
        names = tuple(str(getattr(key, "key", key)) for key in path)
        if matches(names):
            found.append(names)
            return np.zeros_like(leaf)
        return leaf

    out = jax.tree_util.tree_map_with_path(zero_if_matching, params)
    if not found:
        raise SystemExit(f"error: the model has no {which} parameters to zero")
    return out


def model_predictor(model_dir: Path, without: str | None = None) -> tuple[Predictor, np.ndarray]:
    """The conditional x_0 prediction of an exported demo base model (with a text path zeroed if
    `without` names one), and its alpha_bar schedule."""
    import jax
    import jax.numpy as jnp

    from glide_jax import diffusion, tokenizers, weights
    from glide_jax.unet import GlideUNet

    try:   # also refuses an inpainting or upsampling model, which would need inputs the probe lacks
        config, params = weights.load_local(model_dir, "base", dtype=np.float32)
    except weights.WeightsError as err:
        raise SystemExit(f"error: {err}") from None
    if without:
        params = without_text_path(params, without)
    tokenizer = tokenizers.SentencePieceTokenizer(str(model_dir / "tokenizer.model"))
    process = diffusion.diffusion_for_model(config)
    model = GlideUNet(config)

    @jax.jit
    def x0_prediction(noisy, t, tokens, mask):
        output = model.apply({"params": params}, noisy, t, tokens, mask)
        mean_prediction, _ = process.split_model_output(output, noisy)
        return process.predict_xstart(noisy, t, mean_prediction)

    def predict(noisy, t, texts):
        tokens, mask = tokenizer.tokenize_batch(list(texts), config.text_ctx)
        return np.asarray(x0_prediction(jnp.asarray(noisy), jnp.full((len(texts),), t), jnp.asarray(tokens),
                                        jnp.asarray(mask)))

    return predict, np.asarray(process.alphas_cumprod)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported base model directory (config.json, params, tokenizer.model)")
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--seed", type=int, default=4242, help="the training-scene stream the scenes come from")
    parser.add_argument("--without", choices=sorted(TEXT_PATHS),
                        help="zero one of the U-Net's ways of reading the caption, to see which carries the colours")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.model").is_file():
        raise SystemExit(f"error: {model_dir} is not an exported base model (config.json and tokenizer.model expected)")
    predict, alpha_bar = model_predictor(model_dir, args.without)
    without = f", without {args.without}" if args.without else ""
    print(f"{model_dir}{without}: {args.scenes} two-object and {args.scenes} one-object scenes (seed {args.seed}); "
          "share of objects whose predicted colour is the one the caption names")
    for t, rate in follow_rates(predict, alpha_bar, args.scenes, args.seed).items():
        print(f"t={t:4d}  two objects: own caption {rate['own']:.2f}, colours swapped {rate['swapped']:.2f}"
              f"  one object, another colour named: {rate['recoloured']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
