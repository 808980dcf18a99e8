"""Training throughput of the base text-to-image model: images/s per size, precision and device count.

    python -m bench.bench_train                              # small size, f32 + bf16, 1 and 8 devices
    python -m bench.bench_train --sizes small,full --steps 3 --json bench_train.json

Each device count runs in its own process (the simulated CPU device count must be set before
JAX starts; on a GPU/TPU host the real devices are used, and a count above what exists is
skipped). The step timed is the real one (`glide_jax.training.make_train_step`: loss, backward,
clip, AdamW, EMA) on a synthetic batch, so data loading is not part of the figure. Scaling is
weak scaling: `--per-device-batch` stays fixed, the global batch grows with the devices.

On a CPU host the simulated devices share the same cores, so 8 "devices" cannot be faster than
1; that row shows the cost of partitioning and collectives, not a speed-up.

Sizes: `small` is a 32px, 32-channel, two-level U-Net with a 1-layer text transformer (about
1M parameters: a size whose compilation fits a shared 2-core CI machine); `full` is the released
GLIDE base (configs/base.json, 385M parameters).
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

SMALL = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
         "attention_resolutions": "8", "num_head_channels": 32, "text_ctx": 16, "xf_width": 64,
         "xf_layers": 1, "xf_heads": 2, "n_vocab": 1024, "dropout": 0.1}


def model_options(size: str) -> dict:
    if size == "small":
        return dict(SMALL)
    if size == "full":
        return json.loads((ROOT / "configs" / "base.json").read_text())
    raise SystemExit(f"--sizes: unknown size {size!r} (small, full)")


def measure(size: str, dtype: str, per_device_batch: int, steps: int, devices) -> dict:
    """Compile, run one warm-up step, then time `steps` steps on `devices`; one result row."""
    import jax
    import numpy as np

    from glide_jax import parallel, training
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import diffusion_for_model
    from glide_jax.unet import count_params

    config = ModelConfig.from_dict(model_options(size))
    diffusion = diffusion_for_model(config)
    ctx = config.text_ctx
    task = training.diffusion_task(config, diffusion, "base", compute_dtype=dtype, caption_dropout=0.2,
                                   empty_tokens=np.zeros(ctx, np.int32), empty_mask=np.zeros(ctx, bool))
    opt_cfg = training.OptimizerConfig(learning_rate=1e-4)
    optimizer = training.make_optimizer(opt_cfg)
    mesh = parallel.make_mesh(devices=devices)
    global_batch = per_device_batch * mesh.size
    rng = np.random.default_rng(0)
    size_px = config.image_size
    batch = parallel.shard_batch({
        "images": rng.uniform(-1, 1, (global_batch, size_px, size_px, 3)).astype(np.float32),
        "tokens": rng.integers(0, config.n_vocab, (global_batch, ctx)).astype(np.int32),
        "mask": np.ones((global_batch, ctx), bool)}, mesh)

    start = time.perf_counter()
    state = training.create_train_state(task, optimizer, jax.random.key(0), mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    # The full size takes minutes to initialise and compile: say where it is, for a run cut short.
    print(f"{size} {dtype}: initialised in {init_s:.1f} s", file=sys.stderr, flush=True)
    shardings = training.state_shardings(task, optimizer, mesh)
    step = training.make_train_step(task, optimizer, mesh, shardings, ema_rate=0.9999)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    print(f"{size} {dtype}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    state, metrics = compiled(state, batch)   # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    return {"size": size, "precision": dtype, "devices": mesh.size, "platform": jax.devices()[0].platform,
            "params": count_params(state.params), "global_batch": global_batch, "steps": steps,
            "step_s": elapsed / steps, "images_per_sec": global_batch * steps / elapsed,
            "init_s": init_s, "compile_s": compile_s, "loss": float(metrics["loss"])}


def worker(args) -> None:
    import jax

    available = jax.devices()
    if len(available) < args.count:
        # Accelerators cannot be simulated: a count above what this host has gives no row.
        print(f"{args.count} devices asked for, {len(available)} {available[0].platform} device(s) here: "
              "row skipped", file=sys.stderr)
        print("[]")
        return
    rows = []
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            steps = args.full_steps if size == "full" else args.steps
            rows.append(measure(size, dtype, args.per_device_batch, steps, available[:args.count]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


def table(rows: list[dict]) -> str:
    header = ["size", "precision", "devices", "global_batch", "step_s", "images_per_sec", "compile_s", "params"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(" | ".join([r["size"], r["precision"], str(r["devices"]), str(r["global_batch"]),
                                 f"{r['step_s']:.3f}", f"{r['images_per_sec']:.2f}", f"{r['compile_s']:.1f}",
                                 f"{r['params'] / 1e6:.1f}M"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small", help="comma list of small, full")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes (params stay float32)")
    parser.add_argument("--devices", default="1,8", help="device counts; simulated on CPU")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps for the small size")
    parser.add_argument("--full-steps", type=int, default=1, help="timed steps for the full size")
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    rows = []
    for count in (int(c) for c in args.devices.split(",")):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        # Only the host platform is simulated: on a GPU/TPU host JAX still picks the accelerator.
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}").strip()
        cmd = [sys.executable, "-m", "bench.bench_train", "--worker", "--count", str(count),
               "--sizes", args.sizes, "--dtypes", args.dtypes,
               "--per-device-batch", str(args.per_device_batch), "--steps", str(args.steps),
               "--full-steps", str(args.full_steps)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            print(f"worker with {count} device(s) failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
