"""Convert the reference's PyTorch state dicts into glide-jax parameters.

    python -m glide_jax.convert --checkpoint base.pt --config configs/base.json --out models/base
    python -m glide_jax.convert --clip-image clip_image_enc.pt --clip-text clip_text_enc.pt \
        --config configs/clip.json --out models/clip
    python -m glide_jax.convert --model-dir models/base --format safetensors --out hub/base

The Flax modules are named after the reference's module tree, so every parameter's reference key
follows from its Flax path by a few renaming rules (`torch_key`). The converter builds the full
expected key set from the config (without allocating anything), checks the state dict against it
(missing, unexpected and mis-shaped keys are all reported at once, by name, before anything is
written) and then transposes each tensor from PyTorch's layout to Flax's:

- 2-D convolutions: OIHW -> HWIO;
- linear layers: [out, in] -> [in, out];
- the U-Net attention's 1x1 `Conv1d` projections: [out, in, 1] -> [in, out] (a Dense in NHWC).

Tensors stored in float16 (as the released checkpoints store most weights) are upcast to float32.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from flax import traverse_util

from .config import ConfigError, ModelConfig
from .unet import count_params, param_shapes

# Renaming rules applied in order to a Flax path joined with ".": reference key = result.
_RENAMES: list[tuple[str, str]] = [
    (r"^unet\.", ""),
    (r"^text_encoder\.", ""),
    (r"^resblocks_(\d+)\.", r"transformer.resblocks.\1."),
    (r"^(input_blocks|output_blocks)_(\d+)_(\d+)\.", r"\1.\2.\3."),
    (r"^middle_block_(\d+)\.", r"middle_block.\1."),
    (r"^time_embed_(\d+)\.", r"time_embed.\1."),
    (r"^out_norm\.", "out.0."),
    (r"^out_conv\.", "out.2."),
    (r"\.in_norm\.", ".in_layers.0."),
    (r"\.in_conv\.", ".in_layers.2."),
    (r"\.emb_proj\.", ".emb_layers.1."),
    (r"\.out_norm\.", ".out_layers.0."),
    (r"\.out_conv\.", ".out_layers.3."),
    (r"\.(scale|kernel|embedding)$", ".weight"),
]

# U-Net attention projections are 1x1 Conv1d in the reference, Dense layers here.
_CONV1D_PROJECTIONS = re.compile(r"^unet\..*\.(qkv|encoder_kv|proj_out)\.kernel$")


class ConversionError(ValueError):
    """The state dict does not fit the config; the message lists every offending key."""


def torch_key(flax_path: str) -> str:
    key = flax_path
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _layout(flax_path: str, flax_ndim: int) -> str:
    if not flax_path.endswith(".kernel"):
        return "same"
    if flax_ndim == 4:
        return "conv2d"
    if _CONV1D_PROJECTIONS.match(flax_path):
        return "conv1d"
    return "linear"


def _torch_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "conv2d":
        h, w, i, o = shape
        return (o, i, h, w)
    if layout == "conv1d":
        return (shape[1], shape[0], 1)
    if layout == "linear":
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(layout: str, value: np.ndarray) -> np.ndarray:
    if layout == "conv2d":
        return value.transpose(2, 3, 1, 0)
    if layout == "conv1d":
        return value[..., 0].T
    if layout == "linear":
        return value.T
    return value


def expected_state_dict(param_tree) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Reference key -> (flax path, reference shape, layout) for a parameter (shape) tree."""
    expected = {}
    for flax_path, leaf in traverse_util.flatten_dict(param_tree, sep=".").items():
        layout = _layout(flax_path, len(leaf.shape))
        expected[torch_key(flax_path)] = (flax_path, _torch_shape(layout, tuple(leaf.shape)), layout)
    return expected


def check_state_dict(state_dict: dict[str, np.ndarray], expected: dict, source: str) -> None:
    """Raise one ConversionError naming every missing, unexpected and mis-shaped key."""
    problems = []
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(
            f"{k} (expected shape {expected[k][1]})" for k in missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(
            f"{k} (shape {tuple(np.shape(state_dict[k]))})" for k in unexpected))
    for key in sorted(set(expected) & set(state_dict)):
        found = tuple(np.shape(state_dict[key]))
        if found != expected[key][1]:
            problems.append(f"{key}: expected shape {expected[key][1]}, found {found}")
    if problems:
        raise ConversionError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


def convert_state_dict(state_dict: dict[str, np.ndarray], config: ModelConfig,
                       source: str = "state dict") -> dict:
    """Reference U-Net state dict -> nested float32 Flax params for `GlideUNet(config)`."""
    expected = expected_state_dict(param_shapes(config))
    return _convert(state_dict, expected, source)


def _convert(state_dict, expected, source) -> dict:
    check_state_dict(state_dict, expected, source)
    flat = {}
    for key, (flax_path, _, layout) in expected.items():
        value = np.asarray(state_dict[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise ConversionError(f"{source}: {key} has dtype {value.dtype}, expected a floating tensor")
        flat[flax_path] = np.ascontiguousarray(_to_flax(layout, value.astype(np.float32)))
    return traverse_util.unflatten_dict(flat, sep=".")


def convert_checkpoint(checkpoint: str | Path, config: ModelConfig, out_dir: str | Path, *,
                       overwrite: bool = False, format: str = "orbax") -> dict:
    """`.pt` file -> params saved in `out_dir` (orbax or safetensors, with the config beside them)."""
    from .checkpoint import save_model
    from .pt_reader import load_state_dict

    state_dict = load_state_dict(checkpoint)
    params = convert_state_dict(state_dict, config, source=str(checkpoint))
    save_model(out_dir, params, config.to_dict(), overwrite=overwrite, format=format)
    return params


def convert_clip_checkpoints(image_checkpoint: str | Path, text_checkpoint: str | Path, config,
                             out_dir: str | Path, *, overwrite: bool = False, format: str = "orbax") -> dict:
    """The noised CLIP's two `.pt` files -> one params tree (image and text encoders) in `out_dir`."""
    from .checkpoint import save_model
    from .clip import load_clip_checkpoints

    params = load_clip_checkpoints(image_checkpoint, text_checkpoint, config)
    save_model(out_dir, params, config.to_dict(), overwrite=overwrite, format=format)
    return params


def export_model(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                 format: str = "safetensors") -> dict:
    """A converted model (either format) written again in `format`, its config unchanged."""
    from .checkpoint import load_model, save_model

    config, params = load_model(model_dir)
    save_model(out_dir, params, config, overwrite=overwrite, format=format)
    return params


def full_size_check(manifest: dict, config: ModelConfig) -> tuple[int, dict]:
    """Compare the expected key set/shapes for `config` with a manifest's; returns (param count, expected)."""
    shapes = param_shapes(config)
    expected = expected_state_dict(shapes)
    manifest_shapes = {k: _ShapeOnly(tuple(v[0])) for k, v in manifest["keys"].items()}
    check_state_dict(manifest_shapes, expected, "manifest")
    return count_params(shapes), expected


class _ShapeOnly:
    """Stands in for a tensor when only its shape is known (manifests)."""

    def __init__(self, shape):
        self.shape = shape


def main(argv: list[str] | None = None) -> int:
    from .clip import ClipConfig, ClipConversionError

    parser = argparse.ArgumentParser(prog="python -m glide_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="reference U-Net .pt state dict (torch is not needed)")
    parser.add_argument("--clip-image", help="the noised CLIP's image encoder .pt (with --clip-text)")
    parser.add_argument("--clip-text", help="the noised CLIP's text encoder .pt (with --clip-image)")
    parser.add_argument("--model-dir", help="a converted model directory to write again in --format")
    parser.add_argument("--config", help="model config JSON (the reference's option names; not with --model-dir)")
    parser.add_argument("--out", required=True, help="output directory for the params + config.json")
    parser.add_argument("--format", choices=("orbax", "safetensors"), default="orbax",
                        help="orbax (default; sharded restore on many hosts) or safetensors (one file, for "
                             "exchange and the Hugging Face Hub)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted model")
    args = parser.parse_args(argv)
    is_clip = bool(args.clip_image or args.clip_text)
    if sum(map(bool, (args.checkpoint, is_clip, args.model_dir))) != 1 or (
            is_clip and not (args.clip_image and args.clip_text)):
        parser.error("give one of --checkpoint (a U-Net), both --clip-image and --clip-text, or --model-dir")
    if bool(args.config) == bool(args.model_dir):
        parser.error("--config goes with --checkpoint/--clip-*, and a --model-dir brings its own")
    try:
        if args.model_dir:
            from .checkpoint import CheckpointError

            try:
                params = export_model(args.model_dir, args.out, overwrite=args.overwrite, format=args.format)
            except CheckpointError as err:
                raise ValueError(str(err)) from None
            source = args.model_dir
        elif is_clip:
            config = ClipConfig.from_json(args.config)
            params = convert_clip_checkpoints(args.clip_image, args.clip_text, config, args.out,
                                              overwrite=args.overwrite, format=args.format)
            source = f"{args.clip_image} + {args.clip_text}"
        else:
            config = ModelConfig.from_json(args.config)
            params = convert_checkpoint(args.checkpoint, config, args.out, overwrite=args.overwrite,
                                        format=args.format)
            source = args.checkpoint
    except (ConfigError, ConversionError, ClipConversionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {source} ({count_params(params):,} parameters) -> {args.out}")
    return 0


if __name__ == "__main__":
    from glide_jax.errors import run_cli

    sys.exit(run_cli(main, "glide_jax.convert"))
