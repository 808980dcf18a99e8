"""Turn a `train.train` run into a bundled demo model, seed the inpainting run from the base, or grow a model.

    python demo/export.py model --run out/demo_runs/base --out demo/base --tokenizer demo/tokenizer.model
    python demo/export.py model --run out/demo_runs/clip --out demo/clip
    python demo/export.py init --run out/demo_runs/base --out out/demo_runs/base_init
    python demo/export.py inpaint-init --run out/demo_runs/base --out out/demo_runs/inpaint_init
    python demo/export.py grow --run out/demo_runs/base --attention-resolutions 16,8 --out out/demo_runs/base16_init

`model` takes the EMA params of the run's newest checkpoint, stores them as float16 (half the
size of float32; `sample.generate` upcasts on load) with the model's config through
`glide_jax.checkpoint.save_model`, and copies the model's tokenizer next to them, which is how
the sampling CLI knows which tokenizer goes with the model. `init` writes them as float32, for a
run to start from. `inpaint-init` writes the base's float32 EMA params with the input convolution
widened from 3 to 7 channels (the masked image and the mask), the new input weights zero, so the
inpainting model starts as exactly the base model. These three take `--step N` for checkpoint N
instead of the newest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INPUT_CONV = ("unet", "input_blocks_0_0", "kernel")


def newest_run_state(run: Path, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, run config, EMA params as float32 numpy) of the newest checkpoint in `run`, or of the
    one at `step`."""
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in run.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise SystemExit(f"error: no checkpoint (<step>/state) in {run}")
    if step is not None and step not in steps:
        raise SystemExit(f"error: no checkpoint at step {step} in {run}; it has {', '.join(map(str, steps))}")
    step = steps[-1] if step is None else step
    raw = json.loads((run / str(step) / "run" / "metadata").read_text()) if (
        run / str(step) / "run" / "metadata").is_file() else None
    if raw is None:
        raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(run / str(step) / "run")
    state = ocp.StandardCheckpointer().restore(run / str(step) / "state")
    ema = state["ema_params"]
    import jax
    return step, raw, jax.tree.map(lambda a: np.asarray(a, np.float32), ema)


def model_config(raw: dict) -> dict:
    from glide_jax.clip import ClipConfig
    from glide_jax.config import ModelConfig

    options = raw["model"]
    if isinstance(options, str):
        options = json.loads((ROOT / options).read_text())
    if raw["model_kind"] == "clip":
        return ClipConfig.from_dict(options).to_dict()
    return ModelConfig.from_dict(options).to_dict()


def export_model(args) -> None:
    import jax

    from glide_jax import checkpoint

    step, raw, params = newest_run_state(Path(args.run).absolute(), args.step)
    config = model_config(raw)
    half = jax.tree.map(lambda a: a.astype(np.float16) if np.issubdtype(a.dtype, np.floating) else a, params)
    out = Path(args.out)
    checkpoint.save_model(out, half, config, overwrite=True)
    if raw["model_kind"] != "clip" and config.get("xf_width"):
        if not args.tokenizer:
            raise SystemExit("error: a text-conditional model needs --tokenizer (its sentencepiece model)")
        shutil.copy(args.tokenizer, out / "tokenizer.model")
    (out / "TRAINED.json").write_text(json.dumps({"run": str(args.run), "step": step, "model_kind": raw["model_kind"],
                                                  "seed": raw.get("seed"), "storage": "float16 (EMA params)"},
                                                 indent=1) + "\n")
    print(f"wrote {out}: step {step}, {sum(a.size for a in jax.tree.leaves(half))} params")


def export_init(args) -> None:
    """The run's newest (or `--step`) EMA params, float32, with its model config: a run to start
    another from (`init_from`) without the rounding of the float16 export."""
    from glide_jax import checkpoint

    step, raw, params = newest_run_state(Path(args.run).absolute(), args.step)
    checkpoint.save_model(Path(args.out), params, model_config(raw), overwrite=True)
    print(f"wrote {args.out}: step {step} (float32 EMA params)")


def widen_for_inpainting(params: dict) -> dict:
    """The base's params with the input convolution widened from 3 to 7 channels, the new
    input weights zero (the other leaves shared, not copied)."""
    unet_key, conv_key, kernel_key = INPUT_CONV
    conv = params[unet_key][conv_key]
    kernel = conv[kernel_key]
    if kernel.shape[2] != 3:
        raise SystemExit(f"error: expected a 3-channel input convolution, got kernel {kernel.shape}")
    # GLIDE's inpainting input is [x_t, masked image, mask] along channels; zero weights for the
    # extra four leave the base model's function unchanged at the start of fine-tuning.
    widened = np.concatenate([kernel, np.zeros(kernel.shape[:2] + (4,) + kernel.shape[3:], kernel.dtype)], axis=2)
    return {**params, unet_key: {**params[unet_key], conv_key: {**conv, kernel_key: widened}}}


def inpaint_init(args) -> None:
    from glide_jax import checkpoint

    step, raw, params = newest_run_state(Path(args.run).absolute(), args.step)
    config = model_config(raw)
    params = widen_for_inpainting(params)
    config["inpaint"] = True
    checkpoint.save_model(Path(args.out), params, config, overwrite=True)
    unet_key, conv_key, kernel_key = INPUT_CONV
    print(f"wrote {args.out}: base step {step}, input kernel {params[unet_key][conv_key][kernel_key].shape}")


LAYER_NAME = re.compile(r"(input_blocks_\d+|middle_block|output_blocks_\d+)_(\d+)")


def _blocks(unet_params: dict) -> dict[str, list[tuple[str, dict]]]:
    """U-Net layers grouped by block (`input_blocks_3`, `middle_block`, ...), in order; every other
    sub-module (embeddings, output head) is a block of its own."""
    blocks: dict[str, list[tuple[int, str, dict]]] = {}
    for name, sub in unet_params.items():
        match = LAYER_NAME.fullmatch(name)
        block, index = (match.group(1), int(match.group(2))) if match else (name, 0)
        blocks.setdefault(block, []).append((index, name, sub))
    return {block: [(name, sub) for _, name, sub in sorted(layers, key=lambda t: t[0])]
            for block, layers in blocks.items()}


def _check_fits(trained: dict, fresh: dict, where: str) -> None:
    from glide_jax.config import ConfigError
    from glide_jax.training import check_params_match

    try:
        check_params_match(fresh, trained, source="trained params")
    except ConfigError as err:
        raise SystemExit(f"error: {where}: trained shapes do not fit the grown model: {err}") from None


def grow_attention(trained: dict, grown: dict) -> dict:
    """`grown` (freshly initialised params of the same U-Net with attention at more resolutions)
    with every trained layer copied in. Within a block, layers are matched in order by kind (the
    names of their sub-modules), since an inserted attention layer shifts the index of the
    upsampling layer after it; the layers only `grown` has must be attention layers and keep their
    initialisation, whose zero output projection makes them identity maps. What else only `grown`
    has keeps its initialisation too, which changes nothing the model computes: the text layout
    (`conditioning` "text_layout") and each ResBlock's zero projection of it."""
    old_blocks, new_blocks = _blocks(trained["unet"]), _blocks(grown["unet"])
    if set(old_blocks) - set(new_blocks):
        raise SystemExit(f"error: the grown U-Net lacks {sorted(set(old_blocks) - set(new_blocks))}")
    unet_params = dict(grown["unet"])
    for block, new_layers in new_blocks.items():
        pending = list(old_blocks.get(block, []))
        for name, fresh in new_layers:
            trained_keys = set(pending[0][1]) if pending else set()
            added = {key: fresh[key] for key in {"layout_proj"} & (set(fresh) - trained_keys)}
            kept = {key: value for key, value in fresh.items() if key not in added}
            if pending and trained_keys == set(kept):
                old_name, weights = pending.pop(0)
                _check_fits(weights, kept, f"unet/{old_name} -> unet/{name}")
                unet_params[name] = {**weights, **added}
            elif "qkv" not in fresh and name != "text_layout":
                raise SystemExit(f"error: unet/{name} is new in the grown U-Net but is not an attention layer "
                                 "or the text layout")
        if pending:
            raise SystemExit(f"error: trained layers {[n for n, _ in pending]} have no place in the grown U-Net")
    return {**trained, "unet": unet_params}


def grow_text_layers(trained: dict, grown: dict) -> dict:
    """`grown` (freshly initialised text-transformer params with more layers) with every trained
    layer copied in; the added layers' attention and MLP output projections are zeroed, which makes
    each of them an identity map on the residual stream."""
    import jax

    out = dict(grown)
    for name, weights in trained.items():
        _check_fits(weights, grown.get(name, {}), f"text_encoder/{name}")
        out[name] = weights
    for name in sorted(set(grown) - set(trained)):
        if not re.fullmatch(r"resblocks_\d+", name):
            raise SystemExit(f"error: text_encoder/{name} is new in the grown model but is not a transformer layer")
        layer = {**grown[name], "attn": dict(grown[name]["attn"]), "mlp": dict(grown[name]["mlp"])}
        for branch in ("attn", "mlp"):
            layer[branch]["c_proj"] = jax.tree.map(np.zeros_like, grown[name][branch]["c_proj"])
        out[name] = layer
    return out


def grow(args) -> None:
    import jax

    from glide_jax import checkpoint, unet
    from glide_jax.config import ModelConfig

    if not (args.attention_resolutions or args.text_layers or args.text_layout):
        raise SystemExit("error: grow needs --attention-resolutions, --text-layers and/or --text-layout")
    if args.run:
        step, raw, params = newest_run_state(Path(args.run).absolute())
        config = model_config(raw)
    else:
        config, params = checkpoint.load_model(args.model, dtype=np.float32)
        step = None
    if args.attention_resolutions:
        config["attention_resolutions"] = args.attention_resolutions
    if args.text_layers:
        if args.text_layers < config["xf_layers"]:
            raise SystemExit(f"error: --text-layers {args.text_layers} is fewer than the trained {config['xf_layers']}")
        config["xf_layers"] = args.text_layers
    grown_config = ModelConfig.from_dict(config)
    if args.text_layout:
        grown_config = dataclasses.replace(grown_config, conditioning={"kind": "text_layout", "size": args.text_layout})
    config = grown_config.to_dict()
    fresh = jax.tree.map(np.asarray, unet.init_params(grown_config, jax.random.key(args.seed)))
    grown = grow_attention(params, fresh)
    if "text_encoder" in params:
        grown["text_encoder"] = grow_text_layers(params["text_encoder"], fresh["text_encoder"])
    checkpoint.save_model(Path(args.out), grown, config, overwrite=True)
    added = unet.count_params(grown) - unet.count_params(params)
    layout = config["conditioning"]
    positions = f", a {layout['size']}x{layout['size']} text layout" if layout else ""
    origin = f"step {step}" if step is not None else f"from {args.model}"
    print(f"wrote {args.out}: {origin}, attention at {config['attention_resolutions']}{positions}, "
          f"{config['xf_layers']} text layers, {added} new params")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model")
    m.add_argument("--run", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer")
    e = sub.add_parser("init")
    e.add_argument("--run", required=True)
    e.add_argument("--out", required=True)
    i = sub.add_parser("inpaint-init")
    i.add_argument("--run", required=True)
    i.add_argument("--out", required=True)
    for command in (m, e, i):
        command.add_argument("--step", type=int, help="the checkpoint to export (default: the newest)")
    g = sub.add_parser("grow")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a train.train run (its newest checkpoint's EMA params)")
    source.add_argument("--model", help="a model directory written by checkpoint.save_model")
    g.add_argument("--out", required=True)
    g.add_argument("--attention-resolutions", help="U-Net attention resolutions of the grown model, e.g. 16,8")
    g.add_argument("--text-layers", type=int, help="text-transformer layers of the grown model")
    g.add_argument("--text-layout", type=int, metavar="SIZE",
                   help="add a SIZE x SIZE map of the caption over the image (conditioning text_layout), changing nothing")
    g.add_argument("--seed", type=int, default=0, help="initialises the added layers")
    args = parser.parse_args(argv)
    {"model": export_model, "init": export_init, "inpaint-init": inpaint_init, "grow": grow}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
