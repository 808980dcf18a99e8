"""Measure what a demo noised CLIP reads in a caption: which near misses it scores below the truth.

    python demo/probe_clip.py --clip demo/clip

Two-object training scenes are noised to timestep t and scored (the CLIP's similarity of image
and caption) against their own caption and against four near misses phrased the same way, so
that only the changed words differ: the two objects' colours exchanged, their shapes exchanged,
the relation inverted ("right of" for "left of"), and the relation turned across its axis
("above" for "left of"). The report gives, per t, the share of scenes whose own caption scores
strictly higher than each near miss (0.5 is a coin toss; a CLIP that reads a caption as a bag of
colour and shape words scores a swap exactly as its own caption, and ties count as losses), and
the share whose own caption is the best of all the scenes' captions (retrieval; 1 / scenes by
chance). CLIP guidance can only push an image towards what its CLIP tells apart: if it cannot
tell "left of" from "right of", its gradient does nothing for a caption's relation.
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

TIMESTEPS = (0, 250, 500, 700, 850)
NEAR_MISSES = ("colours swapped", "shapes swapped", "relation inverted", "relation across")

# (noisy images [B, H, W, 3] in [-1, 1], timestep, captions [C]) -> similarities [B, C]
Scorer = Callable[[np.ndarray, int, Sequence[str]], np.ndarray]


def probe_scenes(count: int, seed: int) -> list:
    """The first `count` two-object training scenes of stream `seed` whose objects differ in both
    colour and shape, so that every near miss changes the caption."""
    from demo import shapes

    scenes, index = [], 0
    while len(scenes) < count:
        scene = shapes.scene_at(seed, index, "train")
        index += 1
        if len(scene.shapes) == 2 and all(shapes.swapped(scene, a) is not None for a in ("colour", "kind")):
            scenes.append(scene)
    return scenes


def near_misses(scene) -> dict:
    """{name in NEAR_MISSES: SceneSpec} for a scene of `probe_scenes`."""
    from demo import shapes

    inverted, across, _ = shapes.other_relations(scene.spec)
    return {"colours swapped": shapes.swapped(scene, "colour").spec, "shapes swapped": shapes.swapped(scene, "kind").spec,
            "relation inverted": inverted, "relation across": across}


def phrase(spec, index: int) -> str:
    """Phrasing `index` (cycling) of `spec`: the same index for a scene and its near misses."""
    from demo import shapes

    phrasings = shapes.captions_for(spec)
    return phrasings[index % len(phrasings)]


def win_rates(score: Scorer, alpha_bar: np.ndarray, count: int = 128, seed: int = 4242, size: int = 32,
              timesteps: Sequence[int] = TIMESTEPS, noise_seed: int = 0) -> dict[int, dict[str, float]]:
    """{t: {near miss: share of scenes whose own caption scores strictly higher, "retrieval": share
    whose own caption scores highest of all the scenes' own captions}}. The same noise for every t."""
    scenes = probe_scenes(count, seed)
    images = np.stack([scene.render(size) for scene in scenes]).astype(np.float32) / 127.5 - 1
    noise = np.random.default_rng(noise_seed).standard_normal(images.shape).astype(np.float32)
    own = [phrase(scene.spec, i) for i, scene in enumerate(scenes)]
    misses = [near_misses(scene) for scene in scenes]
    rates: dict[int, dict[str, float]] = {}
    for t in timesteps:
        noisy = np.sqrt(alpha_bar[t]) * images + np.sqrt(1 - alpha_bar[t]) * noise
        own_scores = np.asarray(score(noisy, t, own))   # [scenes, scenes]
        diagonal = np.diagonal(own_scores)
        others = np.where(np.eye(count, dtype=bool), -np.inf, own_scores)
        rates[t] = {"retrieval": float(np.mean(diagonal > others.max(axis=1)))}
        for name in NEAR_MISSES:
            captions = [phrase(m[name], i) for i, m in enumerate(misses)]
            miss_scores = np.diagonal(np.asarray(score(noisy, t, captions)))
            rates[t][name] = float(np.mean(diagonal > miss_scores))
    return rates


def clip_scorer(clip_dir: Path, vocab_dir: str | None = None) -> tuple[Scorer, np.ndarray]:
    """The similarity of an exported demo CLIP (as its guidance computes it, up to the scale) and
    the alpha_bar schedule of its noise levels."""
    import jax
    import jax.numpy as jnp

    from glide_jax import clip, diffusion, tokenizers, weights

    try:
        config, params = weights.load_local(clip_dir, "clip", dtype=np.float32)
    except weights.WeightsError as err:
        raise SystemExit(f"error: {err}") from None
    tokenizer = tokenizers.ClipBPETokenizer(vocab_dir)
    image_embeddings = jax.jit(lambda x, t: clip.encode_image(params, config, x, t))
    text_embeddings = jax.jit(lambda tokens, length: clip.encode_text(params, config, tokens, length))

    def score(noisy, t, captions):
        tokens, length = tokenizer.batch_padded_and_len(list(captions), config.max_text_len)
        z_image = image_embeddings(jnp.asarray(noisy), jnp.full((len(noisy),), t, jnp.int32))
        return np.asarray(z_image @ text_embeddings(jnp.asarray(tokens), jnp.asarray(length)).T)

    alpha_bar = np.cumprod(1 - diffusion.get_named_beta_schedule(config.beta_schedule, config.n_timesteps))
    return score, alpha_bar


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", required=True, help="an exported demo CLIP directory (config.json, params)")
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=4242, help="the training-scene stream the scenes come from")
    parser.add_argument("--vocab-dir", help="CLIP's BPE vocabulary (default: the cache, downloaded once)")
    args = parser.parse_args(argv)
    score, alpha_bar = clip_scorer(Path(args.clip), args.vocab_dir)
    print(f"{args.clip}: {args.scenes} two-object scenes (seed {args.seed}); share whose own caption scores "
          f"above each near miss, and above every other scene's caption (retrieval)")
    for t, rate in win_rates(score, alpha_bar, args.scenes, args.seed).items():
        print(f"t={t:4d}  " + "  ".join(f"{name} {rate[name]:.2f}" for name in NEAR_MISSES)
              + f"  retrieval {rate['retrieval']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
