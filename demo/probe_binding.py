"""Measure at which noise level a demo base model binds each colour of a caption to its object.

    python demo/probe_binding.py --model demo/base

Two-object training scenes are noised to timestep t, and the model's x_0 prediction is read over
each object's area under two captions: the scene's own, and the same caption with the two colours
swapped between the objects ("a blue circle left of a red square" for a red circle left of a blue
square). At small t the noisy image shows the colours and a model follows it whatever the caption;
near t = T only the caption can tell. A model that binds follows the swapped caption there, putting
the colour it names on the object it names; one that reads the caption as a bag of colours follows
neither, and the colours of the sample are decided by the noise. The report gives, per t, the share
of objects whose predicted colour is nearer the colour each caption gives them than the other one.
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


def two_colour_scenes(count: int, seed: int, size: int):
    """(scenes, their images in [-1, 1], each object's area as boolean [H, W]) for `count` training
    scenes with two objects of different colours."""
    from glide_jax import shapes

    scenes, index = [], 0
    while len(scenes) < count:
        scene = shapes.scene_at(seed, index, "train")
        index += 1
        if len(scene.shapes) == 2 and scene.shapes[0].colour != scene.shapes[1].colour:
            scenes.append(scene)
    images = np.stack([scene.render(size) for scene in scenes]).astype(np.float32) / 127.5 - 1

    def area(scene, shape):   # pixels at least half covered by the shape, drawn alone
        alone = shapes.Scene(scene.background, (shape,)).render(size).astype(np.float32)
        background = np.asarray(shapes.COLOURS[scene.background], np.float32)
        full = np.linalg.norm(np.asarray(shapes.COLOURS[shape.colour], np.float32) - background)
        return np.linalg.norm(alone - background, axis=-1) >= full / 2

    return scenes, images, [[area(scene, shape) for shape in scene.shapes] for scene in scenes]


def captions(scenes, swap_colours: bool) -> list[str]:
    """One phrasing per scene (cycling through the phrasings), with the objects' colours swapped
    if asked; the same phrasing either way, so only the colours differ."""
    from glide_jax import shapes

    out = []
    for i, scene in enumerate(scenes):
        spec = scene.spec
        if swap_colours:
            (colour_a, kind_a), (colour_b, kind_b) = spec.objects
            spec = shapes.SceneSpec(spec.background, ((colour_b, kind_a), (colour_a, kind_b)), spec.relation)
        phrasings = shapes.captions_for(spec)
        out.append(phrasings[i % len(phrasings)])
    return out


def follow_rates(predict: Predictor, alpha_bar: np.ndarray, count: int = 64, seed: int = 4242, size: int = 32,
                 timesteps: Sequence[int] = TIMESTEPS, noise_seed: int = 0) -> dict[int, dict[str, float]]:
    """{t: {"own": share following the scene's caption, "swapped": share following the swapped
    caption}}; the same noise for every t and both captions."""
    from glide_jax import shapes

    scenes, images, areas = two_colour_scenes(count, seed, size)
    colours = [[np.asarray(shapes.COLOURS[s.colour], np.float32) / 127.5 - 1 for s in scene.shapes] for scene in scenes]
    noise = np.random.default_rng(noise_seed).standard_normal(images.shape).astype(np.float32)
    own, swapped = captions(scenes, False), captions(scenes, True)
    rates = {}
    for t in timesteps:
        noisy = np.sqrt(alpha_bar[t]) * images + np.sqrt(1 - alpha_bar[t]) * noise
        rates[t] = {}
        for name, texts, swap in (("own", own, False), ("swapped", swapped, True)):
            predicted = np.asarray(predict(noisy, t, texts))
            followed = 0
            for i in range(count):
                for j in range(2):
                    mean = predicted[i][areas[i][j]].mean(axis=0)
                    named, other = (colours[i][1 - j], colours[i][j]) if swap else (colours[i][j], colours[i][1 - j])
                    followed += np.linalg.norm(mean - named) < np.linalg.norm(mean - other)
            rates[t][name] = followed / (2 * count)
    return rates


def model_predictor(model_dir: Path) -> tuple[Predictor, np.ndarray]:
    """The conditional x_0 prediction of an exported demo base model, and its alpha_bar schedule."""
    import jax
    import jax.numpy as jnp

    from glide_jax import checkpoint, diffusion, tokenizers
    from glide_jax.config import ModelConfig
    from glide_jax.unet import GlideUNet

    config, params = checkpoint.load_model(model_dir, dtype=np.float32)
    config = ModelConfig.from_dict(config) if isinstance(config, dict) else config
    tokenizer = tokenizers.SentencePieceTokenizer(str(model_dir / "tokenizer.model"))
    if not config.noise_schedule:
        raise SystemExit(f"error: {model_dir / 'config.json'} names no noise_schedule")
    alpha_bar = np.cumprod(1.0 - diffusion.get_named_beta_schedule(config.noise_schedule, config.diffusion_steps))
    model = GlideUNet(config)
    apply = jax.jit(lambda x, t, tokens, mask: model.apply({"params": params}, x, t, tokens, mask))

    def predict(noisy, t, texts):
        tokens, mask = tokenizer.tokenize_batch(list(texts), config.text_ctx)
        out = np.asarray(apply(jnp.asarray(noisy), jnp.full((len(texts),), t), jnp.asarray(tokens), jnp.asarray(mask)))
        mean_prediction = out[..., :3]
        if config.prediction == "v":
            return np.sqrt(alpha_bar[t]) * noisy - np.sqrt(1 - alpha_bar[t]) * mean_prediction
        return (noisy - np.sqrt(1 - alpha_bar[t]) * mean_prediction) / np.sqrt(alpha_bar[t])

    return predict, alpha_bar


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported base model directory (config.json, params, tokenizer.model)")
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--seed", type=int, default=4242, help="the training-scene stream the scenes come from")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.model").is_file():
        raise SystemExit(f"error: {model_dir} is not an exported base model (config.json and tokenizer.model expected)")
    predict, alpha_bar = model_predictor(model_dir)
    print(f"{model_dir}: {args.scenes} two-object scenes (seed {args.seed}); share of objects whose predicted "
          "colour follows the caption")
    for t, rate in follow_rates(predict, alpha_bar, args.scenes, args.seed).items():
        print(f"t={t:4d}  own caption {rate['own']:.2f}  swapped colours {rate['swapped']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
