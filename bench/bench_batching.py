"""Does batching pay? Images/s of the compiled base stage (`glide_jax.stages.sample_base`, the
program `Pipeline` runs) at several batch sizes, with and without LLVM optimisation.

    PYTHONPATH=. python bench/bench_batching.py --model demo --batch-sizes 1,4,16 --steps 10
    PYTHONPATH=. python bench/bench_batching.py --model full --batch-sizes 1,4 --steps 2

`--model demo`: the bundled demo base (32 px); `--model full`: configs/base.json at random
weights (bench_sample.random_params). Classifier-free guidance scale 3, ancestral sampling, so
each image runs the U-Net on 2 rows per step. `--progress` compiles the per-step host callback
into the loop (what the CLI's progress bar costs), and runs each case with and without it.

Each XLA setting (`--variants`, see `VARIANTS`: `default` = glide-jax as shipped, `xla-default` =
XLA's own defaults (`GLIDE_JAX_XLA_OPTIONS=0`), `O0` =
`--xla_backend_optimization_level=0`, what the CLI used to force for every demo run, `1thread` =
one intra-op thread) runs in its own subprocess, since XLA reads its flags once per process. In each, per batch size: compile (reported), one warm-up run, then the
median of `--repeats` timed runs. The 1-minute load average is printed with every row; the
machine is shared, so compare rows of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (XLA_FLAGS added, environment added). "default" is glide-jax as shipped (its CPU compiler
# options, glide_jax.xla_options); "xla-default" compiles with XLA's own defaults instead.
VARIANTS = {
    "default": ("", {}),
    "xla-default": ("", {"GLIDE_JAX_XLA_OPTIONS": "0"}),
    "O0": ("--xla_backend_optimization_level=0", {}),
    "1thread": ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", {}),
}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _model(name: str):
    import jax
    import numpy as np

    from glide_jax.config import ModelConfig

    if name == "demo":
        from glide_jax import weights

        config, params = weights.load("demo", "base", dtype=np.float32)
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_sample import random_params

        from glide_jax.unet import param_shapes

        config = ModelConfig.from_json(ROOT / "configs" / "base.json")
        params = random_params(param_shapes(config))
    return config, jax.device_put(params)


def child(args) -> None:
    """One XLA setting: every batch size, one JSON line each on stdout."""
    import jax
    import numpy as np

    from glide_jax import stages
    from glide_jax.diffusion import diffusion_for_model

    config, params = _model(args.model)
    params = stages.prepare_params(params)
    diffusion = diffusion_for_model(config, str(args.steps))
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        tokens = np.zeros((batch, config.text_ctx), np.int32)
        mask = np.zeros((batch, config.text_ctx), bool)
        tokens[:, :4] = np.arange(1, 5) % config.n_vocab
        mask[:, :4] = True
        for progress in ([False, True] if args.progress else [False]):
            def call(timing=None):
                with stages.reporting_progress(lambda t: None):
                    return stages.sample_base(config, params, tokens, mask, jax.random.key(0), diffusion=diffusion,
                                              guidance_scale=3.0, timing=timing, progress=progress)

            load_before = _load()
            timing = stages.StageTiming()
            call(timing)   # compiles, then runs once (warm-up)
            runs, cpus = [], []
            for _ in range(args.repeats):
                t, cpu = stages.StageTiming(), time.process_time()
                call(t)
                runs.append(t.run_s)
                cpus.append(time.process_time() - cpu)
            run_s, cpu_s = float(np.median(runs)), float(np.median(cpus))
            print(json.dumps({
                "opt": args.opt, "batch": batch, "progress": progress, "compile_s": round(timing.compile_s, 2),
                "run_s": round(run_s, 4), "runs": [round(r, 4) for r in runs],
                "step_s": round(run_s / args.steps, 5), "cpu_step_s": round(cpu_s / args.steps, 5), "images_per_s": round(batch / run_s, 4),
                "image_steps_per_s": round(batch * args.steps / run_s, 3),
                "load_before": load_before, "load_after": _load()}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("demo", "full"), default="demo")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="default,O0", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--progress", action="store_true", help="also time each case with the progress callback")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--opt", help=argparse.SUPPRESS)   # set in the child
    args = p.parse_args(argv)
    if args.opt is not None:
        child(args)
        return 0

    rows = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for opt in args.variants.split(","):
        flags, extra_env = VARIANTS[opt]
        env = dict(os.environ, GLIDE_JAX_COMPILE_CACHE="0", PYTHONPATH=str(ROOT), **extra_env)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        command = [sys.executable, __file__, "--opt", opt, "--model", args.model, "--batch-sizes", args.batch_sizes,
                   "--steps", str(args.steps), "--repeats", str(args.repeats)] + (["--progress"] if args.progress else [])
        proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)

    print(f"\n{args.model} base, CFG 3, {args.steps} steps, median of {args.repeats} runs")
    print("| XLA flags | batch | progress | compile s | s/step (wall) | s/step (CPU) | CPU s per image-step | images/s "
          "| image-steps/s | vs batch 1 | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    single = {(r["opt"], r["progress"]): r["image_steps_per_s"] for r in rows if r["batch"] == 1}
    for r in rows:
        base = single.get((r["opt"], r["progress"]))
        ratio = f"{r['image_steps_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['opt']} | {r['batch']} | {'on' if r['progress'] else 'off'} | {r['compile_s']} | {r['step_s']} | {r['cpu_step_s']} | "
              f"{r['cpu_step_s'] / r['batch']:.4f} | "
              f"{r['images_per_s']} | {r['image_steps_per_s']} | {ratio} | {r['load_before']}-{r['load_after']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
