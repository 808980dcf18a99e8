"""What the persistent compile cache (glide_jax.compile_cache) saves: the same program compiled by
two fresh processes that share a new, empty cache directory.

    PYTHONPATH=. python bench/bench_compile_cache.py --cli            # the demo CLI, twice
    PYTHONPATH=. python bench/bench_compile_cache.py --full --steps 2 # full-size guided base, twice

`--cli`: `python -m sample.generate --prompt "a red circle on a white background"` (the demo base
and upsampler) run twice; the compile seconds are the ones the CLI prints per stage (trace,
lower and XLA compile, or on the second run the load from the cache), plus each process's wall time.
`--full`: configs/base.json at random weights, the guided base stage (`stages.sample_base`, CFG 3,
`--steps` ancestral steps, one image) in two child processes; their StageTiming compile seconds.
The 1-minute load average is printed with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a white background"
COMPILED = re.compile(r"^(\w[\w-]*) \(.*(?:compiled in ([0-9.]+) s|cached program), sampled in ([0-9.]+) s")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def full_child(steps: int) -> None:
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_sample import random_params

    from glide_jax import compile_cache, stages
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import diffusion_for_model
    from glide_jax.unet import param_shapes

    compile_cache.enable()
    config = ModelConfig.from_json(ROOT / "configs" / "base.json")
    params = stages.prepare_params(random_params(param_shapes(config)))
    tokens = np.zeros((1, config.text_ctx), np.int32)
    tokens[0, :4] = [100, 101, 102, 103]
    mask = tokens > 0
    timing = stages.StageTiming()
    stages.sample_base(config, params, tokens, mask, jax.random.key(0), diffusion=diffusion_for_model(config, str(steps)),
                       guidance_scale=3.0, timing=timing)
    print(json.dumps({"base": timing.compile_s}))


def _run(command, env) -> tuple[dict, float, str]:
    load = _load()
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{command} failed:\n{proc.stderr[-3000:]}")
    compile_s, sample_s = {}, {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            compile_s.update(json.loads(line))
        match = COMPILED.match(line)
        if match:
            compile_s[match.group(1)] = float(match.group(2) or 0.0)
            sample_s[match.group(1)] = float(match.group(3))
    return compile_s, sample_s, wall, f"{load}-{_load()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cli", action="store_true")
    mode.add_argument("--full", action="store_true")
    p.add_argument("--steps", type=int, default=2, help="--full: sampling steps (the compile time does not "
                                                        "depend on them: one lax.scan)")
    p.add_argument("--cli-args", default="", help="--cli: more arguments for the CLI, e.g. "
                                                   "'--batch-size 3' (split on spaces)")
    p.add_argument("--full-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_child:
        full_child(args.steps)
        return 0
    if not (args.cli or args.full):
        p.error("give --cli or --full")

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, GLIDE_JAX_COMPILE_CACHE=cache, PYTHONPATH=str(ROOT))
        if args.cli:
            command = [sys.executable, "-m", "sample.generate", "--prompt", PROMPT, "--out", out, "--quiet"] + args.cli_args.split()
        else:
            command = [sys.executable, __file__, "--full-child", "--steps", str(args.steps)]
        rows = []
        for run in ("first", "second"):
            compile_s, sample_s, wall, load = _run(command, env)
            rows.append((run, compile_s, sample_s, wall, load))
            print(run, json.dumps(compile_s), "sampled", json.dumps(sample_s), f"process wall {wall:.1f} s, load {load}",
                  flush=True)
    first = sum(rows[0][1].values())
    print(f"\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| run | compile s per stage | compile s total | sampling s per stage | process wall s | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run, compile_s, sample_s, wall, load in rows:
        stages_text = ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items())
        sampled = ", ".join(f"{k} {v:.1f}" for k, v in sample_s.items()) or "-"
        total = sum(compile_s.values())
        share = f" ({100 * total / first:.0f}% of the first)" if run == "second" and first else ""
        print(f"| {run} | {stages_text} | {total:.1f}{share} | {sampled} | {wall:.1f} | {load} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
