"""Model FLOP utilisation (MFU) of the full-size base: training and batched guided sampling.

    python -m bench.bench_mfu --train-batches 32 --sample-batches 16 --dtypes bfloat16     # on a GPU
    python -m bench.bench_mfu --train-batches 1 --sample-batches 1 --dtypes float32 --steps 2   # on a CPU

FLOPs come from XLA's cost analysis of the compiled programs (`compiled.cost_analysis()["flops"]`):
- training: the real step (`glide_jax.training.make_train_step`: forward, backward, clip, AdamW, EMA)
  of configs/base.json on one device. With a remat policy the step recomputes activations; its own
  count ("hardware FLOPs") is reported beside the model FLOPs, which are those of the same step
  compiled without remat, the figure MFU is defined on.
- sampling: one classifier-free guided step (the U-Net on 2·B rows and the guidance mix), compiled
  alone, because XLA's cost analysis counts a loop's body once whatever its trip count; a sampling
  loop of N steps is N such steps plus one text encoding (compiled alone too). The time is that of
  `bench_sample`'s compiled loop (the whole sampler as one `lax.scan`), its second run.

MFU = FLOPs per second achieved / the device's peak. The peak: `--peak-tflops`, else the table
below by device kind (dense, no sparsity: bfloat16 tensor-core peak for bfloat16 rows, TF32 for
float32 rows, which is what XLA's default matmul precision uses on these GPUs), else on a CPU the
rate of a large float32 matmul measured here (an achievable peak, not the datasheet's: MFU against it
is the share of the CPU's matmul rate the model reaches).

The 1-minute load average is printed before and after every row: on a shared machine the
figures are as noisy as the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Dense peak TFLOP/s per device kind substring (NVIDIA datasheets): (bfloat16, TF32).
GPU_PEAK_TFLOPS = {
    "H200": (989.4, 494.7),
    "H100 PCIe": (756.5, 378.0),
    "H100 NVL": (835.5, 417.5),
    "H100": (989.4, 494.7),        # SXM (device kind "NVIDIA H100 80GB HBM3")
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
}


def load() -> float:
    return round(os.getloadavg()[0], 2)


CONFIG_PATH = [ROOT / "configs" / "base.json"]   # --config replaces it (a small model, for a smoke run)


def base_config():
    from glide_jax.config import ModelConfig
    return ModelConfig.from_json(CONFIG_PATH[0])


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):     # older JAX: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def measured_matmul_tflops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of a size² x size² matmul (2·size³ FLOPs) on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size)).astype(dtype)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def peak_tflops(dtype: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-tflops"
    device = jax.devices()[0]
    if device.platform == "gpu":
        for name, (bf16, tf32) in GPU_PEAK_TFLOPS.items():
            if name in device.device_kind:
                return (bf16 if dtype == "bfloat16" else tf32), f"{name} datasheet, dense {'bf16' if dtype == 'bfloat16' else 'TF32'}"
        raise SystemExit(f"no peak known for {device.device_kind!r}: pass --peak-tflops")
    return measured_matmul_tflops("float32"), "measured 2048² float32 matmul on this host"


# -- training ------------------------------------------------------------------------------------------

def train_row(config, dtype: str, batch: int, steps: int, remat: str, attention: str, peak) -> dict:
    from bench.bench_memory import train_program
    from bench.bench_sample import random_params
    from glide_jax import parallel, training
    from glide_jax.unet import param_shapes

    step, state_shapes, batch_spec, task, optimizer, mesh = train_program(config, dtype, remat, attention)
    keep = {"xla_disable_hlo_passes": "cse_barrier_expander"} if jax.default_backend() == "cpu" and remat != "none" else {}
    load_before = load()
    t0 = time.perf_counter()
    compiled = step.lower(state_shapes, batch_spec(batch)).compile(keep)
    compile_s = time.perf_counter() - t0
    hardware_flops = flops_of(compiled)
    model_flops = hardware_flops
    if remat != "none":
        plain = train_program(config, dtype, "none", attention)[0]
        model_flops = flops_of(plain.lower(state_shapes, batch_spec(batch)).compile())
    # Random params (bench_sample's): the initialiser's own compile would take minutes on a CPU.
    state = training.create_train_state(task, optimizer, jax.random.key(0), mesh,
                                        params=random_params(param_shapes(config)))
    rng = np.random.default_rng(0)
    spec = batch_spec(batch)
    data = {"images": rng.uniform(-1, 1, spec["images"].shape).astype(np.float32),
            "tokens": rng.integers(0, config.n_vocab, spec["tokens"].shape).astype(np.int32),
            "mask": np.ones(spec["mask"].shape, bool)}
    data = parallel.shard_batch(data, mesh)
    state, metrics = compiled(state, data)     # warm-up
    jax.block_until_ready(metrics)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    step_s, cpu_s = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    del state
    return finish({"program": "train", "dtype": dtype, "batch": batch, "remat": remat, "attention": attention,
                   "steps": steps, "compile_s": compile_s, "model_flops": model_flops, "hardware_flops": hardware_flops,
                   "step_s": step_s, "step_cpu_s": cpu_s, "images_per_s": batch / step_s,
                   "loss": float(metrics["loss"]), "load_before": load_before}, peak)


def finish(row: dict, peak) -> dict:
    peak_value, peak_source = peak
    row["achieved_tflops"] = row["model_flops"] / row["step_s"] / 1e12
    row["hardware_tflops"] = row["hardware_flops"] / row["step_s"] / 1e12
    row.update(peak_tflops=peak_value, peak_source=peak_source, mfu=row["achieved_tflops"] / peak_value,
               load_after=load(), device=jax.devices()[0].device_kind, jax=jax.__version__)
    print(json.dumps(row), flush=True)
    return row


# -- sampling ------------------------------------------------------------------------------------------

def sampling_flops(config, dtype: str, batch_pairs: int, attention: str, params_shapes) -> tuple[float, float]:
    """(FLOPs of one guided step on 2·B rows, FLOPs of encoding the 2·B captions once)."""
    from bench.bench_sample import _tokens
    from glide_jax.sampling import classifier_free_guidance
    from glide_jax.unet import GlideUNet

    model = GlideUNet(config, jnp.dtype(dtype), attention=attention)
    tokens, mask = _tokens(config, batch_pairs)
    rows = 2 * batch_pairs
    size = config.image_size

    def encode(params, tokens, mask):
        return model.apply({"params": params}, tokens, mask, method=GlideUNet.encode_text)

    def step(params, text, x, timesteps):
        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, text, method=GlideUNet.denoise)
        return classifier_free_guidance(model_fn, 3.0)(x, timesteps)

    text_shapes = jax.eval_shape(encode, params_shapes, tokens, mask)
    x = jax.ShapeDtypeStruct((rows, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((rows,), jnp.int32)
    step_flops = flops_of(jax.jit(step).lower(params_shapes, text_shapes, x, t).compile())
    text_flops = flops_of(jax.jit(encode).lower(params_shapes, tokens, mask).compile())
    return step_flops, text_flops


def sample_row(config, dtype: str, batch_pairs: int, steps: int, attention: str, peak) -> dict:
    from bench.bench_sample import _time_compiled, cfg_program, random_params
    from glide_jax.unet import param_shapes

    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), param_shapes(config))
    load_before = load()
    step_flops, text_flops = sampling_flops(config, dtype, batch_pairs, attention, shapes)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_params(param_shapes(config)))
    run, inputs = cfg_program(config, dtype, batch_pairs, steps, attention)
    timing = _time_compiled(run, (params,) + inputs, steps)
    loop_flops = text_flops + steps * step_flops
    # Time and FLOPs per step both include the loop's one text encoding, spread over its steps.
    row = {"program": "sample", "dtype": dtype, "batch": batch_pairs, "rows": 2 * batch_pairs,
           "attention": attention, "steps": steps, "compile_s": timing["compile_s"],
           "step_flops": step_flops, "text_flops": text_flops, "model_flops": loop_flops / steps,
           "hardware_flops": loop_flops / steps, "step_s": timing["step_s"], "step_cpu_s": timing["step_cpu_s"],
           "images_per_s": batch_pairs / timing["step_s"], "load_before": load_before}
    return finish(row, peak)


def flops_row(config, program: str, dtype: str, batch: int, remat: str, attention: str) -> dict:
    """FLOPs only (compiled, not run): for MFU from a step time measured elsewhere."""
    from bench.bench_memory import train_program
    from glide_jax.unet import param_shapes

    if program == "train":
        step, state_shapes, batch_spec, *_ = train_program(config, dtype, remat, attention)
        flops = {"model_flops": flops_of(step.lower(state_shapes, batch_spec(batch)).compile())}
    else:
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), param_shapes(config))
        step_flops, text_flops = sampling_flops(config, dtype, batch, attention, shapes)
        flops = {"model_flops": step_flops, "text_flops": text_flops}
    row = {"program": program, "dtype": dtype, "batch": batch, "remat": remat if program == "train" else "-",
           "attention": attention, **flops, "load": load()}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| program | dtype | B | remat | attention | GFLOP/step (model) | step s | CPU s | TFLOP/s | "
             "peak TFLOP/s | MFU | load |", "| --- " * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['dtype']} | {r['batch']} | {r.get('remat', '-')} | {r['attention']} | "
                     f"{r['model_flops'] / 1e9:,.0f} | {r['step_s']:.3f} | {r['step_cpu_s']:.2f} | "
                     f"{r['achieved_tflops']:.3f} | {r['peak_tflops']:.3f} | {r['mfu']:.1%} | "
                     f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_mfu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-batches", default="", help="per-device training batches ('' = none)")
    parser.add_argument("--sample-batches", default="", help="guided pairs per sampling batch ('' = none)")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--remat", default="none", help="remat policy of the training rows")
    parser.add_argument("--attention", default="einsum", help="comma list of einsum, xla, cudnn")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps / sampling loop length")
    parser.add_argument("--flops-only", action="store_true", help="compile and count FLOPs; time nothing")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, instead of the table/measurement")
    parser.add_argument("--config", default=str(CONFIG_PATH[0]), help="model config (default: the full-size base)")
    parser.add_argument("--json", default="bench_mfu.json")
    args = parser.parse_args(argv)
    CONFIG_PATH[0] = Path(args.config)
    config = base_config()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, load {load()}", flush=True)
    rows = []
    if args.flops_only:
        for dtype in args.dtypes.split(","):
            for attention in args.attention.split(","):
                rows += [flops_row(config, "train", dtype, int(b), args.remat, attention)
                         for b in args.train_batches.split(",") if b]
                rows += [flops_row(config, "sample", dtype, int(b), args.remat, attention)
                         for b in args.sample_batches.split(",") if b]
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    for dtype in args.dtypes.split(","):
        peak = peak_tflops(dtype, args.peak_tflops)
        print(f"peak {peak[0]:.3f} TFLOP/s ({peak[1]}), load {load()}", flush=True)
        for attention in args.attention.split(","):
            for batch in (int(b) for b in args.train_batches.split(",") if b):
                rows.append(train_row(config, dtype, batch, args.steps, args.remat, attention, peak))
            for batch in (int(b) for b in args.sample_batches.split(",") if b):
                rows.append(sample_row(config, dtype, batch, max(args.steps, 2), attention, peak))
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if rows and rows[0]["peak_source"].startswith("measured"):
        remeasure(rows)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


def remeasure(rows: list[dict]) -> None:
    """A CPU's matmul rate measured once moves with the other jobs' load (116 against 206 GFLOP/s in
    two windows of the shared 2-core host): measure again after the rows and rate them all against the
    best of both, which is the closer one to what the host can do."""
    again = measured_matmul_tflops("float32")
    best = max([again] + [r["peak_tflops"] for r in rows])
    print(f"peak measured again: {again:.3f} TFLOP/s, load {load()}; MFU against the best, {best:.3f}", flush=True)
    for r in rows:
        r.update(peak_measured_first=r["peak_tflops"], peak_measured_after=again, peak_tflops=best,
                 mfu=r["achieved_tflops"] / best)


if __name__ == "__main__":
    sys.exit(main())
