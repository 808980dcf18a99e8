"""Device memory of the full-size base, from XLA's memory analysis of compiled (never run) programs.

    python -m bench.bench_memory --train --batches 8,32 --dtypes float32,bfloat16 --remat none,attention,blocks
    python -m bench.bench_memory --sampling          # the guided loops of bench/README's H200 run

`--train`: the real training step (`glide_jax.training.make_train_step`: loss, backward, clip, AdamW,
EMA; float32 params, AdamW moments and EMA; the state donated) of configs/base.json on one device,
for each compute dtype, remat policy (`glide_jax.unet.REMAT_POLICIES`) and per-device batch. It is
lowered from shapes alone (nothing is allocated) and compiled; the memory analysis gives the
argument, output, aliased (donated) and temporary bytes, and the peak estimate

    peak = arguments + outputs - aliased + temporaries

(what must be live at once at the program's worst point; the generated code is host memory on a GPU).
The bytes that do not depend on the batch (train state, parameter-sized temporaries) and those per
example are fitted per (dtype, remat) as a line through the batches compiled, and the table gives the
largest per-device batch whose peak fits in each memory size, with JAX's default GPU memory pool
(75% of the device, `XLA_PYTHON_CLIENT_MEM_FRACTION`) and with 95%.

`--sampling`: classifier-free guided sampling of 4 images (8 U-Net rows) with 20 ancestral steps in
float32 and bfloat16, and CLIP-guided sampling of 1 image, as `bench/bench_sample.py` compiles them.
The table splits the peak into params, other inputs and outputs, and temporaries, and lists the
largest temporary allocations from XLA's buffer assignment.

On a CPU host (no accelerator lent), XLA:CPU compiles these programs: its fusion decisions, layouts
and scratch differ from XLA:GPU's (cuDNN convolution workspaces, autotuning, NCHW/NHWC layout
changes), so the figures are the program's own buffers as the CPU backend assigns them, an estimate
of the GPU's, not a measurement of it. XLA:CPU also drops the optimisation barriers that
`jax.checkpoint` uses to keep its recomputation from being merged back into the forward pass, which
undoes every remat policy; XLA:GPU keeps them. To see what remat does on the CPU, this script compiles
with that pass (`cse_barrier_expander`) disabled (`--keep-remat-barriers`, on by default on a CPU).

With `--measure` on an accelerator, each training row is also run once and the device's
`peak_bytes_in_use` recorded beside the estimate; the sampling rows record it after compiling and
after running, to tell compile-time scratch (the autotuner's) from what the program holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2 ** 30
MEMORY_SIZES_GIB = (16, 24, 40, 80, 141)
POOL_FRACTIONS = (0.75, 0.95)
# XLA:CPU's pass that removes optimisation barriers (and with them, remat); see the module docstring.
KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def load() -> float:
    return round(os.getloadavg()[0], 2)


CONFIG_PATH = [ROOT / "configs" / "base.json"]   # --config replaces it (a small model, for a smoke run)


def base_config():
    from glide_jax.config import ModelConfig
    return ModelConfig.from_json(CONFIG_PATH[0])


def compiler_options(keep_barriers: bool) -> dict:
    return dict(KEEP_REMAT_BARRIERS) if keep_barriers else {}


def memory_of(compiled) -> dict:
    stats = compiled.memory_analysis()
    row = {name: int(getattr(stats, name)) for name in MEMORY_FIELDS}
    row["peak_estimate_bytes"] = (row["argument_size_in_bytes"] + row["output_size_in_bytes"]
                                  - row["alias_size_in_bytes"] + row["temp_size_in_bytes"])
    cost = compiled.cost_analysis()
    row["flops"] = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    return row


def device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# -- training ------------------------------------------------------------------------------------------

def train_program(config, dtype: str, remat: str, attention: str = "einsum"):
    """(jitted step, abstract state, batch spec maker, task, optimizer, mesh) of the real training step
    on one device."""
    from glide_jax import parallel, training
    from glide_jax.diffusion import diffusion_for_model

    ctx = config.text_ctx
    task = training.diffusion_task(config, diffusion_for_model(config), "base", compute_dtype=dtype,
                                   caption_dropout=0.2, empty_tokens=np.zeros(ctx, np.int32),
                                   empty_mask=np.zeros(ctx, bool), remat=remat, attention=attention)
    optimizer = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-4))
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    shardings = training.state_shardings(task, optimizer, mesh)
    step = training.make_train_step(task, optimizer, mesh, shardings, ema_rate=0.9999)
    return step, training.abstract_state(task, optimizer), task.batch_spec, task, optimizer, mesh


def train_row(config, dtype: str, remat: str, batch: int, keep_barriers: bool, measure: bool) -> dict:
    step, state, batch_spec, *_ = train_program(config, dtype, remat)
    load_before = load()
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_spec(batch))
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options(keep_barriers))
    t2 = time.perf_counter()
    row = {"program": "train", "dtype": dtype, "remat": remat, "batch": batch, **memory_of(compiled),
           "lower_s": t1 - t0, "compile_s": t2 - t1, "load_before": load_before, "load_after": load(),
           "platform": jax.default_backend(), "keep_remat_barriers": keep_barriers}
    if measure:
        row["device_peak_bytes"] = run_train_once(compiled, state, batch_spec(batch))
    return row


def run_train_once(compiled, state_shapes, batch_spec) -> int | None:
    """Runs the compiled step once on zero state and batch (values do not change memory)."""
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    state = jax.tree.map(zeros, state_shapes)
    batch = jax.tree.map(zeros, batch_spec)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    del state
    return device_peak()


def fit_rows(rows: list[dict]) -> list[dict]:
    """Per (dtype, remat): the peak as fixed + per_example * batch, least squares over its batches,
    and the largest batch fitting each memory size and pool fraction."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["program"] == "train":
            groups.setdefault((r["dtype"], r["remat"]), []).append(r)
    fits = []
    for (dtype, remat), group in groups.items():
        batches = np.array([r["batch"] for r in group], float)
        peaks = np.array([r["peak_estimate_bytes"] for r in group], float)
        if len(set(batches)) < 2:
            continue
        per_example, fixed = np.polyfit(batches, peaks, 1)
        largest = {}
        for size in MEMORY_SIZES_GIB:
            for fraction in POOL_FRACTIONS:
                room = size * GIB * fraction - fixed
                largest[f"{size}GiB@{fraction}"] = max(int(math.floor(room / per_example)), 0)
        residual = float(np.max(np.abs(np.polyval([per_example, fixed], batches) - peaks)))
        fits.append({"dtype": dtype, "remat": remat, "fixed_bytes": fixed, "per_example_bytes": per_example,
                     "batches": sorted(int(b) for b in batches), "max_fit_residual_bytes": residual,
                     "largest_batch": largest})
    return fits


# -- sampling ------------------------------------------------------------------------------------------

def top_allocations(dump_dir: Path, count: int = 6) -> list[str]:
    """The largest allocations of XLA's buffer assignment (its memory-usage report): size and the
    shapes of the values that share it over the program."""
    reports = sorted(dump_dir.glob("*memory-usage-report.txt"), key=lambda p: p.stat().st_size)
    if not reports:
        return []
    found = []
    for line in reports[-1].read_text().splitlines():
        parts = [p.strip() for p in line.split(";")]
        if len(parts) == 5 and re.match(r"[\d.]+[KMG]?i?B", parts[1]):
            size = float(re.match(r"([\d.]+)", parts[1]).group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(
                re.sub(r"[\d.]", "", parts[1])[:1], 1)
            found.append((size, f"{parts[1]}: {parts[4][:160]}"))
    return [text for _, text in sorted(found, key=lambda item: -item[0])[:count]]


def sampling_cases(steps: int, batch_pairs: int) -> list[tuple]:
    """(name, run, param trees as shapes, other inputs) of each sampling program."""
    from bench.bench_sample import cfg_program, clip_program
    from glide_jax.clip import ClipConfig, clip_params_shapes
    from glide_jax.unet import param_shapes

    config = base_config()
    shapes = param_shapes(config)
    cases = []
    for dtype in ("float32", "bfloat16"):
        run, inputs = cfg_program(config, dtype, batch_pairs, steps)
        cast = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)
        cases.append((f"cfg {dtype} B={batch_pairs} ({2 * batch_pairs} rows)", run, (cast,), inputs))
    clip_config = ClipConfig.from_json(ROOT / "configs" / "clip.json")
    run, inputs = clip_program(config, clip_config, 1, steps)
    cases.append(("clip float32 B=1", run, (shapes, clip_params_shapes(clip_config)), inputs))
    return cases


def sampling_rows(keep_barriers: bool, measure: bool, steps: int, batch_pairs: int) -> list[dict]:
    from bench.bench_sample import random_params

    rows = []
    for name, run, param_shapes, inputs in sampling_cases(steps, batch_pairs):
        params = param_shapes
        if measure:   # random values: bench_sample's, so that the loop's values stay finite
            params = tuple(jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), random_params(p), p)
                           for p in param_shapes)
        param_bytes = sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(param_shapes))
        load_before = load()
        peak_before = device_peak() if measure else None
        with tempfile.TemporaryDirectory() as dump:
            options = {**compiler_options(keep_barriers), "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                       "xla_dump_hlo_module_re": "jit_run"}
            compiled = jax.jit(run).lower(*params, *inputs).compile(options)
            row = {"program": "sampling", "case": name, "steps": steps, **memory_of(compiled),
                   "param_bytes": param_bytes, "top_allocations": top_allocations(Path(dump)),
                   "load_before": load_before, "load_after": load(), "platform": jax.default_backend()}
        if measure:
            row["device_peak_before_compile"] = peak_before
            row["device_peak_after_compile"] = device_peak()
            jax.block_until_ready(compiled(*params, *inputs))
            row["device_peak_after_run"] = device_peak()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# -- report --------------------------------------------------------------------------------------------

def gib(n) -> str:
    return f"{n / GIB:.2f}"


def train_table(rows: list[dict], fits: list[dict]) -> str:
    lines = ["| dtype | remat | batch | arguments GiB | outputs GiB | aliased GiB | temp GiB | peak GiB | "
             "compile s | load |", "| --- " * 10 + "|"]
    for r in rows:
        if r["program"] == "train":
            lines.append(f"| {r['dtype']} | {r['remat']} | {r['batch']} | {gib(r['argument_size_in_bytes'])} | "
                         f"{gib(r['output_size_in_bytes'])} | {gib(r['alias_size_in_bytes'])} | "
                         f"{gib(r['temp_size_in_bytes'])} | {gib(r['peak_estimate_bytes'])} | "
                         f"{r['compile_s']:.0f} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    header = " | ".join(f"{s} GiB" for s in MEMORY_SIZES_GIB)
    lines += ["", f"| dtype | remat | fixed GiB | MiB per example | {header} |",
              "| --- " * (4 + len(MEMORY_SIZES_GIB)) + "|"]
    for f in fits:
        cells = " | ".join("/".join(str(f["largest_batch"][f"{s}GiB@{fr}"]) for fr in POOL_FRACTIONS)
                           for s in MEMORY_SIZES_GIB)
        lines.append(f"| {f['dtype']} | {f['remat']} | {gib(f['fixed_bytes'])} | "
                     f"{f['per_example_bytes'] / 2**20:.0f} | {cells} |")
    lines.append(f"(largest batch with a {POOL_FRACTIONS[0]:.0%} / {POOL_FRACTIONS[1]:.0%} memory pool)")
    return "\n".join(lines)


def sampling_table(rows: list[dict]) -> str:
    lines = ["| case | all params GiB | arguments GiB | outputs GiB | temp GiB | peak GiB | load |", "| --- " * 7 + "|"]
    for r in rows:
        if r["program"] != "sampling":
            continue
        lines.append(f"| {r['case']} | {gib(r['param_bytes'])} | {gib(r['argument_size_in_bytes'])} | "
                     f"{gib(r['output_size_in_bytes'])} | {gib(r['temp_size_in_bytes'])} | "
                     f"{gib(r['peak_estimate_bytes'])} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
        lines += [f"  - {a}" for a in r["top_allocations"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="the training step's memory per batch")
    parser.add_argument("--sampling", action="store_true", help="the guided sampling loops' memory")
    parser.add_argument("--batches", default="8,32", help="per-device batches (at least two for the fit)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--remat", default="none,attention,blocks", help="remat policies, comma-separated")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=4, help="guided pairs")
    parser.add_argument("--keep-remat-barriers", choices=("auto", "yes", "no"), default="auto",
                        help="disable XLA:CPU's barrier removal (auto: on a CPU only)")
    parser.add_argument("--measure", action="store_true", help="on an accelerator, also run and read its peak")
    parser.add_argument("--config", default=str(CONFIG_PATH[0]), help="model config (default: the full-size base)")
    parser.add_argument("--json", default="bench_memory.json")
    args = parser.parse_args(argv)
    CONFIG_PATH[0] = Path(args.config)
    if not (args.train or args.sampling):
        parser.error("nothing to do: pass --train and/or --sampling")
    keep = {"auto": jax.default_backend() == "cpu", "yes": True, "no": False}[args.keep_remat_barriers]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, load {load()}", flush=True)
    rows = []
    if args.train:
        config = base_config()
        for dtype in args.dtypes.split(","):
            for remat in args.remat.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    rows.append(train_row(config, dtype, remat, batch, keep, args.measure))
                    print(json.dumps(rows[-1]), flush=True)
                    Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if args.sampling:
        rows += sampling_rows(keep, args.measure, args.sample_steps, args.sample_batch)
    fits = fit_rows(rows)
    Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                           "rows": rows, "fits": fits}, indent=1) + "\n")
    if args.train:
        print(train_table(rows, fits))
    if args.sampling:
        print(sampling_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
