"""Distance from the reference GLIDE on this backend, per matmul precision and compute dtype.

    python bench/bench_parity.py [--golden ../shared/golden] [--json parity.json]

The golden tests hold float32 model outputs to 1e-4 of the original on the CPU. Accelerators compute
float32 matrix products and convolutions at reduced precision unless told otherwise (at
`jax_default_matmul_precision` = `default`, XLA uses TF32 on NVIDIA GPUs and bfloat16 passes on
TPUs), so the same checkpoint gives other numbers there: bench/README.md has what an H200 gave. For
each golden U-Net whose `.pt` is present, this reports the largest and the mean absolute difference
from the reference's output, and the share of values further apart than one 8-bit level (2/255),
under `default`, `high` and `highest` precision and with bfloat16 compute; then the same for the
final image of the golden DDIM run with classifier-free guidance (base model, whole sampler
compiled; DDIM is deterministic, so the final image shows how far the error grows over a run).

A benchmark, not a test: it names what a user would see, on the machine it runs on. The golden
folder is `--golden`, else `$GLIDE_JAX_GOLDEN`, else `../shared/golden` beside the project.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.config import ModelConfig
from glide_jax.convert import convert_state_dict
from glide_jax.diffusion import GaussianDiffusion
from glide_jax.pt_reader import load_state_dict
from glide_jax.sampling import classifier_free_guidance, ddim_sample
from glide_jax.unet import GlideUNet

ROOT = Path(__file__).resolve().parent.parent
UNETS = ("base", "upsample", "base_inpaint", "upsample_inpaint")
PRECISIONS = ("default", "high", "highest")


def nhwc(array) -> jnp.ndarray:
    return jnp.asarray(np.moveaxis(np.asarray(array), -3, -1))


def conditioning(inputs) -> dict:
    return {name: nhwc(inputs[name]) for name in ("low_res", "inpaint_image", "inpaint_mask") if name in inputs}


ONE_LEVEL = 2 / 255  # one step of an 8-bit image, in the model's [-1, 1] range


def distance(ours, reference) -> dict:
    diff = np.abs(np.asarray(ours, np.float32) - np.asarray(reference, np.float32))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "share_over_one_level": float((diff > ONE_LEVEL).mean())}


def variants():
    """(label, compute dtype, matmul precision) for every case measured."""
    return [(p, jnp.float32, p) for p in PRECISIONS] + [("bfloat16", jnp.bfloat16, "default")]


def unet_rows(golden: Path, name: str) -> tuple[list[dict], tuple]:
    config = ModelConfig.from_json(golden / f"{name}.config.json")
    checkpoint = golden / f"{name}.pt"
    params = convert_state_dict(load_state_dict(checkpoint), config, source=str(checkpoint))
    inputs = np.load(golden / f"{name}.inputs.npz")
    expected = nhwc(np.load(golden / f"{name}.outputs.npz")["output"])
    rows = []
    for label, dtype, precision in variants():
        model = GlideUNet(config, dtype)
        with jax.default_matmul_precision(precision):
            out = jax.jit(model.apply)({"params": params}, nhwc(inputs["x_t"]), jnp.asarray(inputs["timesteps"]),
                                       jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["mask"]),
                                       **conditioning(inputs))
        rows.append({"what": f"{name} U-Net output", "variant": label, **distance(out, expected)})
    return rows, (config, params)


def ddim_rows(golden: Path, config: ModelConfig, params) -> list[dict]:
    ref = np.load(golden / "trace_ddim_cfg.npz")
    diffusion = GaussianDiffusion.create(str(ref["schedule"]), 1000, str(ref["respacing"]))
    noise = nhwc(ref["noise"])
    expected = nhwc(ref["per_step"][-1])  # the last step's x
    rows = []
    for label, dtype, precision in variants():
        model = GlideUNet(config, dtype)

        @jax.jit
        def run(params, tokens, mask, noise, scale):
            text = model.apply({"params": params}, tokens, mask, method=GlideUNet.encode_text)

            def model_fn(x_t, timesteps):
                return model.apply({"params": params}, x_t, timesteps, text, method=GlideUNet.denoise)

            return ddim_sample(classifier_free_guidance(model_fn, scale), diffusion, noise.shape,
                               jax.random.key(0), noise=noise, clip_denoised=True)

        with jax.default_matmul_precision(precision):
            out = run(params, jnp.asarray(ref["tokens"], jnp.int32), jnp.asarray(ref["mask"]), noise,
                      jnp.float32(ref["guidance_scale"]))
        rows.append({"what": f"base DDIM+CFG final image ({diffusion.num_timesteps} steps)", "variant": label,
                     **distance(out, expected)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, help="the golden folder (default: $GLIDE_JAX_GOLDEN or "
                                                     "../shared/golden beside the project)")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    golden = args.golden or Path(os.environ.get("GLIDE_JAX_GOLDEN") or ROOT.parent / "shared" / "golden")
    if not golden.is_dir():
        parser.error(f"golden folder not found at {golden} (pass --golden or set GLIDE_JAX_GOLDEN)")

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}", flush=True)
    rows, base = [], None
    for name in UNETS:
        if not (golden / f"{name}.pt").is_file():
            print(f"{name}: {golden / (name + '.pt')} absent, not measured", flush=True)
            continue
        unet, loaded = unet_rows(golden, name)
        rows += unet
        base = loaded if name == "base" else base
        for r in unet:
            print(json.dumps(r), flush=True)
    if base is not None and (golden / "trace_ddim_cfg.npz").is_file():
        for r in ddim_rows(golden, *base):
            rows.append(r)
            print(json.dumps(r), flush=True)

    print("\n| what | variant | max abs | mean abs | share > 2/255 |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['what']} | {r['variant']} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | "
              f"{r['share_over_one_level']:.2%} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device.device_kind, "platform": device.platform,
                                         "jax": jax.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
