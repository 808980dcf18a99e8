"""Teach a demo base model's text transformer where each shape of the caption is.

    python demo/bind_text.py --model out/demo_runs/base_v_export --out out/demo_runs/base_bind_init

Trained by the diffusion loss alone, the demo base's text transformer leaves the two objects of a
caption unbound: a linear probe of its output reads which of five places (alone, left, right, top,
bottom) an object's words stand for in 65% of cases, and even the colour a colour word names in
only 83%, so the U-Net cannot tell which colour goes where. This step trains the transformer (with
linear read-outs that are then thrown away) to carry, at each object's colour and shape words, that
object's place, and at each word its own colour or shape, on captions of the training split.
The model's other parameters are written out unchanged; fine-tune the U-Net on top with the printed
`optimizer.frozen` list, so the binding is kept, as a pretrained text encoder is kept fixed under a
new image model.

The labels come from the captions' grammar (`demo.shapes.parse_caption`), so this works only
for the procedural shapes domain; held-out colour-shape pairs never appear in its captions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLACES = ("alone", "left", "right", "top", "bottom")
# Where the first-named and the second-named object of a two-object caption are.
_PLACES_BY_RELATION = {"left of": ("left", "right"), "right of": ("right", "left"),
                       "above": ("top", "bottom"), "below": ("bottom", "top")}
TARGETS = ("colour", "shape", "place")
# Everything of the text transformer but the pooled projection, which feeds the U-Net's timestep
# embedding and is not trained here.
KEEP_TRAINABLE = ("transformer_proj",)


def object_token_labels(caption: str, tokenizer, text_ctx: int) -> np.ndarray:
    """[text_ctx, 3] int32 (colour, shape, place) indices, -1 where there is none: the object's
    place at the tokens of both its words, its colour at the colour word's and its shape at the
    shape word's. Not the colour at the shape word: captions never pair a shape with the held-out
    colours, and a transformer taught to carry colour there learns those gaps too (a probe of such
    a run read held-out pairs' colour from their shape word in 51-80% of cases, by seed, against
    100% for training pairs); with the place on both words, attention that matches the place finds
    both."""
    from demo import shapes

    spec = shapes.parse_caption(caption)
    places = _PLACES_BY_RELATION[spec.relation] if spec.relation else ("alone",)
    words = caption.split()
    pieces = [tokenizer.encode(w) for w in words]
    whole = tokenizer.encode(caption)
    if [t for p in pieces for t in p] != list(whole):
        raise ValueError(f"the tokenizer does not encode {caption!r} word by word, so its tokens cannot be "
                         "matched to words")
    if len(whole) > text_ctx:
        raise ValueError(f"{caption!r} is {len(whole)} tokens, more than text_ctx={text_ctx}")
    # Objects in the order the caption names them, which is the order of `spec.objects`.
    phrases = [i for i in range(len(words) - 1)
               if words[i] in shapes.SHAPE_COLOURS and words[i + 1].rstrip(",") in shapes.KINDS]
    if len(phrases) != len(spec.objects):
        raise ValueError(f"found {len(phrases)} '<colour> <shape>' phrases in {caption!r}, expected {len(spec.objects)}")
    labels = np.full((text_ctx, len(TARGETS)), -1, np.int32)
    starts = np.cumsum([0] + [len(p) for p in pieces])
    for i, (colour, kind), place in zip(phrases, spec.objects, places):
        colour_word, shape_word = slice(starts[i], starts[i + 1]), slice(starts[i + 1], starts[i + 2])
        labels[colour_word, 0] = shapes.SHAPE_COLOURS.index(colour)
        labels[shape_word, 1] = shapes.KINDS.index(kind)
        labels[starts[i]:starts[i + 2], 2] = PLACES.index(place)
    return labels


def caption_batch(seed: int, start: int, size: int, tokenizer, text_ctx: int, split: str = "train",
                  pairs: tuple[str, ...] = (), with_pairs: bool = False):
    """(tokens, mask, labels) of `size` captions of the `(seed, split)` scene stream from scene
    `start` on, and the index of the next scene: captions of the scenes that show none of `pairs`
    ("red square", ...), or with `with_pairs` of those that show one."""
    from demo import shapes

    rng = np.random.default_rng([seed, start])
    tokens, masks, labels = [], [], []
    index = start
    while len(tokens) < size:
        scene = shapes.scene_at(seed, index, split)
        index += 1
        if any(s.name in pairs for s in scene.shapes) != with_pairs:
            continue
        caption = scene.caption(rng)
        t, m = tokenizer.pad_and_mask(tokenizer.encode(caption), text_ctx)
        tokens.append(t)
        masks.append(m)
        labels.append(object_token_labels(caption, tokenizer, text_ctx))
    return (np.stack(tokens), np.stack(masks), np.stack(labels)), index


def frozen_paths(text_params: dict) -> list[str]:
    return [f"text_encoder/{name}" for name in sorted(text_params) if name not in KEEP_TRAINABLE]


def bind(params: dict, config: dict, tokenizer, *, steps: int, batch_size: int, learning_rate: float,
         seed: int, keep_weight: float = 1.0, validation_pairs: tuple[str, ...] = (),
         probe_size: int = 2000, log=print) -> tuple[dict, dict]:
    """(params with the text transformer trained to bind, probe accuracies before and after).

    Captions that name one of `validation_pairs` (training colour-shape pairs, "red square", ...)
    are kept out of this training and measured apart, as the held-out pairs' stand-ins: how well the
    binding carries over to pairs it was not taught is what decides a run, without the held-out
    pairs' captions taking part in the choice.

    `keep_weight` weighs a second loss, the mean squared change of every output feature (every
    position, padding and the pooled last one included) from the transformer as it was: the U-Net
    trained on those features can go on reading them while it learns to use what was added."""
    import jax
    import jax.numpy as jnp
    import optax

    from demo import shapes
    from glide_jax.config import ModelConfig
    from glide_jax.unet import GlideUNet

    model_config = ModelConfig.from_dict(config)
    if not model_config.has_text:
        raise ValueError("this model has no text transformer")
    model = GlideUNet(model_config)
    ctx, width = model_config.text_ctx, model_config.xf_width
    keys = jax.random.split(jax.random.key(seed), len(TARGETS))
    sizes = {"colour": len(shapes.SHAPE_COLOURS), "shape": len(shapes.KINDS), "place": len(PLACES)}
    readout = {name: {"kernel": jax.random.normal(k, (width, sizes[name])) / np.sqrt(width),
                      "bias": jnp.zeros(sizes[name])} for name, k in zip(TARGETS, keys)}
    fixed = {k: v for k, v in params.items() if k != "text_encoder"}

    def features_of(text_params, tokens, mask):
        text = model.apply({"params": {**fixed, "text_encoder": text_params}}, tokens, mask,
                           method=GlideUNet.encode_text)
        return text["xf_out"].astype(jnp.float32)

    def loss_and_accuracy(trainable, tokens, mask, labels):
        features = features_of(trainable["text"], tokens, mask)
        change = jnp.mean(jnp.square(features - features_of(original, tokens, mask)))
        loss, accuracy = keep_weight * change, [change]
        for j, name in enumerate(TARGETS):
            logits = features @ trainable["readout"][name]["kernel"] + trainable["readout"][name]["bias"]
            target, valid = labels[..., j], labels[..., j] >= 0
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(target, 0))
            loss = loss + jnp.sum(ce * valid) / jnp.sum(valid)
            accuracy.append(jnp.sum((logits.argmax(-1) == target) * valid) / jnp.sum(valid))
        return loss, jnp.stack(accuracy)

    def fit(trainable, train_text: bool, n_steps: int):
        labels = {"text": jax.tree.map(lambda _: "text" if train_text else "fixed", trainable["text"]),
                  "readout": jax.tree.map(lambda _: "readout", trainable["readout"])}
        optimizer = optax.multi_transform({"text": optax.adam(learning_rate), "readout": optax.adam(learning_rate),
                                           "fixed": optax.set_to_zero()}, labels)
        state = optimizer.init(trainable)

        @jax.jit
        def step(trainable, state, tokens, mask, labels):
            (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(trainable, tokens, mask, labels)
            updates, state = optimizer.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss

        index = 0
        for i in range(n_steps):
            batch, index = caption_batch(seed, index, batch_size, tokenizer, ctx, pairs=validation_pairs)
            trainable, state, loss = step(trainable, state, *batch)
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"binding loss is {float(loss)} at step {i}")
        return trainable

    # Captions for measuring come from another seed's stream.
    probe_seed = seed + 1_000_003
    probes = {"train": caption_batch(probe_seed, 0, probe_size, tokenizer, ctx, pairs=validation_pairs)[0],
              "heldout": caption_batch(probe_seed, 0, probe_size, tokenizer, ctx, "heldout")[0]}
    if validation_pairs:
        probes["validation"] = caption_batch(probe_seed, 0, probe_size, tokenizer, ctx, pairs=validation_pairs,
                                             with_pairs=True)[0]

    evaluate = jax.jit(loss_and_accuracy)

    def measure(trainable):
        return {split: dict(zip(("feature_change",) + TARGETS,
                                np.asarray(evaluate(trainable, *b)[1]).round(4).tolist()))
                for split, b in probes.items()}

    text = original = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params["text_encoder"])
    t0 = time.time()
    # Before: how much a linear read-out gets from the features as they are.
    before = measure(fit({"text": text, "readout": readout}, False, max(steps // 2, 1)))
    log(f"linear probe of the text features as they were: {before}")
    trained = fit({"text": text, "readout": readout}, True, steps)
    after = measure(trained)
    log(f"after {steps} binding steps ({time.time() - t0:.0f} s): {after}")
    out = dict(params)
    out["text_encoder"] = {name: (params["text_encoder"][name] if name in KEEP_TRAINABLE else
                                  jax.tree.map(np.asarray, trained["text"][name]))
                           for name in params["text_encoder"]}
    return out, {"before": before, "after": after}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported base model directory (config.json, params, tokenizer.model)")
    parser.add_argument("--out", required=True, help="where to write the model with the bound text transformer")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-weight", type=float, default=1.0,
                        help="weight of the mean squared change of the output features")
    parser.add_argument("--validation-pairs", default="red square,green triangle,purple circle",
                        help="training colour-shape pairs kept out of this step and measured apart "
                             "(comma-separated; empty for none)")
    args = parser.parse_args(argv)

    import json

    from demo import shapes
    from glide_jax import checkpoint, tokenizers

    pairs = tuple(p.strip() for p in args.validation_pairs.split(",") if p.strip())
    known = [f"{c} {k}" for c, k in shapes.TRAIN_COMBINATIONS]
    for pair in pairs:
        if pair not in known:
            raise SystemExit(f"error: --validation-pairs: {pair!r} is not a training colour-shape pair; "
                             f"expected some of {known}")
    model_dir = Path(args.model)
    tokenizer_path = model_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise SystemExit(f"error: {tokenizer_path} not found: the model's sentencepiece tokenizer is needed")
    config, params = checkpoint.load_model(model_dir, dtype=np.float32)
    tokenizer = tokenizers.SentencePieceTokenizer(str(tokenizer_path))
    bound, accuracy = bind(params, config, tokenizer, steps=args.steps, batch_size=args.batch_size,
                           learning_rate=args.learning_rate, seed=args.seed, keep_weight=args.keep_weight,
                           validation_pairs=pairs)
    out = Path(args.out)
    checkpoint.save_model(out, bound, config, overwrite=True)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    (out / "BINDING.json").write_text(json.dumps({**vars(args), "accuracy": accuracy}, indent=1) + "\n")
    frozen = frozen_paths(bound["text_encoder"])
    print(f"wrote {out}; fine-tune on top with optimizer.frozen='{json.dumps(frozen, separators=(',', ':'))}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
