"""What the progress callback costs per step: `progress=` compiles a `jax.debug.callback` into every
step of the sampling loop (`glide_jax.stages._reporting_steps`).

    PYTHONPATH=. python bench/bench_progress.py --model demo --steps 20 --repeats 5
    PYTHONPATH=. python bench/bench_progress.py --model full --steps 2 --repeats 2

Two measurements, A/B interleaved in one process (the machine is shared; each is the median of
`--repeats` alternating runs):
1. the callback alone: a `lax.scan` of 1000 steps whose "model" is one multiply of a 32x32x3 image,
   with and without the reporting wrapper: the difference is the callback's own cost per step;
2. the base stage (`stages.sample_base`, CFG 3, one image) of `--model` (demo, or configs/base.json
   at random weights) with and without `progress=True`, wall and process CPU time per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import _model  # noqa: E402

from glide_jax import stages  # noqa: E402
from glide_jax.diffusion import diffusion_for_model  # noqa: E402


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _ab(run_off, run_on, repeats: int) -> dict:
    """Median (wall, cpu) of each, runs alternating off/on after one warm-up of each."""
    run_off(), run_on()
    off, on = [], []
    for _ in range(repeats):
        off.append(_timed(run_off))
        on.append(_timed(run_on))
    med = lambda runs, i: float(np.median([r[i] for r in runs]))  # noqa: E731
    return {"off_wall": med(off, 0), "on_wall": med(on, 0), "off_cpu": med(off, 1), "on_cpu": med(on, 1)}


def callback_alone(steps: int, repeats: int) -> dict:
    def model_fn(x_t, timesteps):
        return x_t * 0.999

    def loop(fn):
        def run(x):
            def body(x, t):
                return fn(x, jnp.full((1,), t)), None
            return jax.lax.scan(body, x, jnp.arange(steps))[0]
        return jax.jit(run)

    x = jnp.ones((1, 32, 32, 3))
    plain, reporting = loop(model_fn), loop(stages._reporting_steps(model_fn))
    with stages.reporting_progress(lambda t: None):
        r = _ab(lambda: plain(x).block_until_ready(), lambda: reporting(x).block_until_ready(), repeats)
    return {k: v / steps for k, v in r.items()}


def stage(model: str, steps: int, repeats: int) -> dict:
    config, params = _model(model)
    params = stages.prepare_params(params)
    diffusion = diffusion_for_model(config, str(steps))
    tokens = np.zeros((1, config.text_ctx), np.int32)
    tokens[0, :4] = np.arange(1, 5) % config.n_vocab
    mask = tokens > 0

    def run(progress):
        def call():
            with stages.reporting_progress(lambda t: None):
                stages.sample_base(config, params, tokens, mask, jax.random.key(0), diffusion=diffusion,
                                   guidance_scale=3.0, progress=progress)
        return call

    r = _ab(run(False), run(True), repeats)
    return {k: v / steps for k, v in r.items()}


def _row(name: str, r: dict, load: str, unit: float, unit_name: str) -> str:
    wall = (r["on_wall"] - r["off_wall"]) / r["off_wall"] * 100
    cpu = (r["on_cpu"] - r["off_cpu"]) / r["off_cpu"] * 100
    return (f"| {name} | {r['off_wall'] * unit:.3f} | {r['on_wall'] * unit:.3f} | {wall:+.1f}% | "
            f"{r['off_cpu'] * unit:.3f} | {r['on_cpu'] * unit:.3f} | {cpu:+.1f}% | {unit_name} | {load} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("demo", "full", "none"), default="demo")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("GLIDE_JAX_COMPILE_CACHE", "0")

    rows = []
    load = _load()
    alone = callback_alone(1000, max(args.repeats, 5))
    rows.append(_row("callback alone (1000-step scan, 32x32x3 multiply)", alone, f"{load}-{_load()}", 1e6, "µs"))
    print(rows[-1], flush=True)
    if args.model != "none":
        load = _load()
        r = stage(args.model, args.steps, args.repeats)
        rows.append(_row(f"{args.model} base stage, CFG 3, 1 image, {args.steps} steps", r, f"{load}-{_load()}",
                         1e3, "ms"))
        print(rows[-1], flush=True)
    print("\n| case | step off (wall) | step on (wall) | wall change | step off (CPU) | step on (CPU) | CPU change "
          "| unit | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
