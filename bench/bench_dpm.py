"""Time per image: GLIDE's 100-step ancestral (DDPM) recipe against DPM-Solver++ 2M at 10-25 steps.

    python bench/bench_dpm.py --steps 3 --json /tmp/bench_dpm.json

Full-size base (configs/base.json), random weights (as bench_sample.py draws them), one guided
pair (the U-Net runs on 2 rows per step: the prompt and the empty prompt), float32. Both samplers
call the U-Net once per step, so a full-length run is not needed: each sampler is compiled for
`--steps` steps, run once to warm up and once timed, and the time per image at N steps is
N × (timed loop / `--steps`). The timed loop includes the text encoding, which runs once per
image, so this slightly overstates the per-step cost. Compile time does not depend on the step
count (one `lax.scan`), so it is reported once per sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import _tokens, random_params  # noqa: E402

from glide_jax.config import ModelConfig  # noqa: E402
from glide_jax.diffusion import diffusion_for_model  # noqa: E402
from glide_jax.sampling import classifier_free_guidance, ddpm_sample, dpm_solver_pp_sample  # noqa: E402
from glide_jax.unet import GlideUNet, param_shapes  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SAMPLE_FNS = {"ddpm": ddpm_sample, "dpm++2m": dpm_solver_pp_sample}
RECIPES = [("ddpm", 100)] + [("dpm++2m", n) for n in (10, 15, 20, 25)]


def time_sampler(name: str, params, config: ModelConfig, steps: int) -> dict:
    model = GlideUNet(config)
    diffusion = diffusion_for_model(config, str(steps))
    tokens, mask = _tokens(config, 1)
    shape = (2, config.image_size, config.image_size, 3)
    sample_fn = SAMPLE_FNS[name]

    def run(params, tokens, mask, key, guidance_scale):
        text = model.apply({"params": params}, tokens, mask, method=GlideUNet.encode_text)

        def model_fn(x_t, timesteps):
            return model.apply({"params": params}, x_t, timesteps, text, method=GlideUNet.denoise)

        return sample_fn(classifier_free_guidance(model_fn, guidance_scale), diffusion, shape, key)[:1]

    args = (params, tokens, mask, jax.random.key(0), jnp.float32(3.0))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    t1 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t2, c2 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(compiled(*args))
    t3, c3 = time.perf_counter(), time.process_time()
    if not np.isfinite(np.asarray(out)).all():
        raise RuntimeError(f"{name} produced non-finite values; the timing would be meaningless")
    return {"sampler": name, "timed_steps": steps, "compile_s": t1 - t0, "step_s": (t3 - t2) / steps,
            "step_cpu_s": (c3 - c2) / steps, "load_before": load_before, "load_after": os.getloadavg()}


def table(results: dict) -> str:
    by_name = {r["sampler"]: r for r in results["timings"]}
    rows = ["| sampler | steps | s/step (wall) | s/image (wall) | CPU s/image | + compile s | vs DDPM 100 |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    ddpm = by_name["ddpm"]["step_s"] * 100
    for name, steps in RECIPES:
        r = by_name[name]
        per_image = r["step_s"] * steps
        rows.append(f"| {name} | {steps} | {r['step_s']:.2f} | {per_image:.1f} | {r['step_cpu_s'] * steps:.1f} "
                    f"| {r['compile_s']:.1f} | {ddpm / per_image:.1f}x |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed loop (>= 2)")
    parser.add_argument("--config", default=str(CONFIGS / "base.json"), help="model config (default: the base)")
    parser.add_argument("--json", default="bench_dpm.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a respaced diffusion needs two steps)")
    config = ModelConfig.from_json(args.config)
    params = jax.device_put(random_params(param_shapes(config)))
    results = {"device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
               "jax_version": jax.__version__, "config": args.config, "timings": []}
    print(f"load average {os.getloadavg()}", flush=True)
    for name in SAMPLE_FNS:
        r = time_sampler(name, params, config, args.steps)
        results["timings"].append(r)
        print(json.dumps(r), flush=True)
    print(f"load average {os.getloadavg()}", flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
