"""Sampling benchmark: full-size GLIDE base with classifier-free guidance (and CLIP guidance).

    python bench/bench_sample.py --batch-sizes 1,2,4 --dtypes float32,bfloat16 --steps 3 \
        --torch-python /tmp/torchvenv/bin/python --torch-pythonpath /tmp/ref --json /tmp/bench.json

Random weights with the shapes of configs/base.json (drawn with numpy, scaled by 1/sqrt(fan-in):
`init_params` would spend minutes compiling the initialiser on a loaded CPU, and timings do not
depend on the values). For each
compute dtype and batch size (in guided pairs: the model runs on 2·B images per step) it
compiles the whole sampler (text encoding once, then one `lax.scan` of `--steps` ancestral steps
with guidance) and reports the trace+lower and compile times, the per-step time and images/s of
the compiled loop (its second run; the first one is a warm-up), and the peak memory during that
case (host RSS on CPU, the device's peak bytes in use on an accelerator).

With `--torch-python`, the original PyTorch implementation (openai/glide-text2im, importable from
`--torch-pythonpath`) is timed in a subprocess on the same shapes right after, step by step with
its own `p_sample` (no_grad; float32 on `--torch-device`, or float16 with `--torch-fp16`, which is
then compared with our bfloat16 rows), and the table shows our/original ratios of wall time and
of process CPU time per step (on a shared machine the CPU time is the steadier measure of work).
The original runs its text transformer inside every step (its released configs do not cache the
text embedding); its text-encoder time is recorded in the JSON (`text_encoder_s`).

`--clip` also times CLIP-guided sampling (the unguided model on B images plus the gradient of the
noised CLIP's image encoder, released sizes) against classifier-free guidance on B images.

The machine is shared: the 1-minute load average is recorded before and after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax import xla_options
from glide_jax.clip import ClipConfig, clip_cond_fn, clip_params_shapes, l2_normalize
from glide_jax.config import ModelConfig
from glide_jax.diffusion import diffusion_for_model
from glide_jax.sampling import classifier_free_guidance, ddpm_sample
from glide_jax.unet import GlideUNet, count_params, param_shapes

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# -- memory ------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS count (VmHWM) for this process; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakMemory:
    """Peak memory while the `with` block runs: device stats on an accelerator, else the host's
    peak RSS, restarted for the block (Linux's clear_refs). Only where that is refused is RSS
    sampled every 20 ms instead, by a thread that costs the timed loop a few percent on 2 cores
    (it preempts one of XLA's two compute threads 50 times a second)."""

    def __init__(self):
        self.device = jax.devices()[0]
        self.on_host = self.device.platform == "cpu"

    def __enter__(self):
        self._thread = None
        if self.on_host and not _reset_peak_rss():
            self.peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.on_host:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self.peak = max(self.peak, _rss_bytes())
            else:
                self.peak = _peak_rss_bytes()
            self.kind = "host RSS"
        else:
            stats = self.device.memory_stats() or {}
            # A running peak over the whole process: cases run in increasing size, so it is the
            # current case's unless an earlier one was larger.
            self.peak = stats.get("peak_bytes_in_use", 0)
            self.kind = f"{self.device.platform} peak_bytes_in_use"
        return False


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def random_params(shapes, seed: int = 0):
    """Float32 params of the given shapes: kernels N(0, 1/fan_in), norm scales 1, biases 0."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(shape.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(shape.shape, np.float32)
        fan_in = int(np.prod(shape.shape[:-1])) if len(shape.shape) > 1 else 1
        return rng.standard_normal(shape.shape, np.float32) / np.float32(np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# -- JAX cases ----------------------------------------------------------------------------------------


def _tokens(config: ModelConfig, batch_pairs: int):
    # Conditional rows: some caption-length prompt; unconditional rows: empty (all padding).
    tokens = np.zeros((2 * batch_pairs, config.text_ctx), np.int32)
    mask = np.zeros((2 * batch_pairs, config.text_ctx), bool)
    tokens[:batch_pairs, :12] = np.arange(100, 112)
    mask[:batch_pairs, :12] = True
    return jnp.asarray(tokens), jnp.asarray(mask)


def _options(xla: str) -> dict | None:
    """"glide": the compiler options glide-jax's own programs get (glide_jax.xla_options); "default": none."""
    return xla_options.compiler_options(jax.devices()) if xla == "glide" else None


def _time_compiled(run, args, steps: int, options: dict | None) -> dict:
    """Compile `run` for `args` (with XLA `options`), run it once to warm up and once timed."""
    t0 = time.perf_counter()
    lowered = jax.jit(run).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t3, c3 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(compiled(*args))
    t4, c4 = time.perf_counter(), time.process_time()
    if not np.isfinite(np.asarray(out, np.float32)).all():
        raise RuntimeError("the sampler produced non-finite values; the timing would be meaningless")
    return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "first_run_s": t3 - t2,
            "loop_s": t4 - t3, "step_s": (t4 - t3) / steps, "step_cpu_s": (c4 - c3) / steps}


def cfg_program(config: ModelConfig, dtype: str, batch_pairs: int, steps: int, attention: str = "einsum"):
    """The compiled-as-one guided sampler of `bench_cfg` and the inputs it is called with but the params:
    `run(params, tokens, mask, key, guidance_scale)` -> [B, H, W, 3]."""
    model = GlideUNet(config, DTYPES[dtype], attention=attention)
    diffusion = diffusion_for_model(config, str(steps))
    tokens, mask = _tokens(config, batch_pairs)
    shape = (2 * batch_pairs, config.image_size, config.image_size, 3)

    def run(params, tokens, mask, key, guidance_scale):
        text = model.apply({"params": params}, tokens, mask, method=GlideUNet.encode_text)

        def model_fn(x_t, timesteps):
            return model.apply({"params": params}, x_t, timesteps, text, method=GlideUNet.denoise)

        guided = classifier_free_guidance(model_fn, guidance_scale)
        return ddpm_sample(guided, diffusion, shape, key)[:batch_pairs]

    return run, (tokens, mask, jax.random.key(0), jnp.float32(3.0))


def bench_cfg(params, config: ModelConfig, dtype: str, batch_pairs: int, steps: int, xla: str = "glide") -> dict:
    """Classifier-free guided ancestral sampling of `batch_pairs` images (2·B rows per step)."""
    run, inputs = cfg_program(config, dtype, batch_pairs, steps)
    options = _options(xla)
    load_before = _load()
    with PeakMemory() as memory:
        timing = _time_compiled(run, (params,) + inputs, steps, options)
    return {"kind": "cfg", "dtype": dtype, "xla": xla, "xla_options": options,
            "batch_pairs": batch_pairs, "model_batch": 2 * batch_pairs,
            "steps": steps, **timing, "images_per_s": batch_pairs / timing["step_s"],
            "peak_memory_bytes": memory.peak, "memory_kind": memory.kind,
            "load_before": load_before, "load_after": _load()}


def clip_program(config: ModelConfig, clip_config: ClipConfig, batch: int, steps: int):
    """The CLIP-guided sampler of `bench_clip` (float32) and its inputs but the two param trees:
    `run(params, clip_params, tokens, mask, text_embeddings, key)` -> [B, H, W, 3]."""
    model = GlideUNet(config, jnp.float32)
    diffusion = diffusion_for_model(config, str(steps))
    tokens, mask = _tokens(config, batch)
    tokens, mask = tokens[:batch], mask[:batch]
    shape = (batch, config.image_size, config.image_size, 3)
    text_embeddings = l2_normalize(jax.random.normal(jax.random.key(1), (batch, clip_config.n_embd)))

    def run(params, clip_params, tokens, mask, text_embeddings, key):
        text = model.apply({"params": params}, tokens, mask, method=GlideUNet.encode_text)

        def model_fn(x_t, timesteps):
            return model.apply({"params": params}, x_t, timesteps, text, method=GlideUNet.denoise)

        cond_fn = clip_cond_fn(clip_params, clip_config, text_embeddings, 3.0)
        return ddpm_sample(model_fn, diffusion, shape, key, cond_fn=cond_fn)

    return run, (tokens, mask, text_embeddings, jax.random.key(0))


def bench_clip(params, config: ModelConfig, clip_params, clip_config: ClipConfig, batch: int,
               steps: int) -> dict:
    """CLIP-guided ancestral sampling of `batch` images: the model on B rows plus CLIP's gradient."""
    run, inputs = clip_program(config, clip_config, batch, steps)
    load_before = _load()
    with PeakMemory() as memory:
        timing = _time_compiled(run, (params, clip_params) + inputs, steps, _options("glide"))
    return {"kind": "clip", "dtype": "float32", "xla": "glide", "batch_pairs": batch, "model_batch": batch,
            "steps": steps, **timing, "images_per_s": batch / timing["step_s"],
            "peak_memory_bytes": memory.peak, "memory_kind": memory.kind,
            "load_before": load_before, "load_after": _load()}


# -- the original, in a subprocess ---------------------------------------------------------------------

# Runs under the torch interpreter; argv[1] is a JSON job. Prints one JSON line.
_TORCH_JOB = r"""
import json, os, sys, time
import numpy as np
import torch as th
from glide_text2im.model_creation import create_model_and_diffusion, model_and_diffusion_defaults

def peak_rss():
    # VmHWM starts afresh at exec; ru_maxrss would carry over the forking (JAX) parent's peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

job = json.loads(sys.argv[1])
th.manual_seed(0)
dev = th.device(job["device"])
options = model_and_diffusion_defaults()
# As many warm-up steps as timed ones, as our loop gets a whole warm-up run: torch's first steps
# after start-up are up to 30% slower than its later ones (its allocator is still growing).
warmup = job["steps"]
options.update(use_fp16=job["fp16"], timestep_respacing=str(warmup + job["steps"]))
model, diffusion = create_model_and_diffusion(**options)
model.eval()
if job["fp16"]:
    model.convert_to_fp16()  # what the original's notebooks do on a GPU
model.to(dev)

def sync():
    # CUDA kernels run asynchronously: a step is only over once the device says so.
    if dev.type == "cuda":
        th.cuda.synchronize()
b, ctx = job["batch"], options["text_ctx"]
guided = job["kind"] == "cfg"
rows = 2 * b if guided else b
tokens = th.zeros((rows, ctx), dtype=th.long, device=dev)
mask = th.zeros((rows, ctx), dtype=th.bool, device=dev)
tokens[:b, :12] = th.arange(100, 112, device=dev)
mask[:b, :12] = True

def model_fn(x_t, ts, **kwargs):
    if not guided:
        return model(x_t, ts, tokens=tokens, mask=mask)
    half = x_t[: len(x_t) // 2]
    out = model(th.cat([half, half], dim=0), ts, tokens=tokens, mask=mask)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = th.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + 3.0 * (cond - uncond)
    return th.cat([th.cat([half_eps, half_eps], dim=0), rest], dim=1)

cond_fn = None
if job["kind"] == "clip":
    from glide_text2im.clip.encoders import ImageEncoder
    c = job["clip_config"]
    image_encoder = ImageEncoder(image_size=c["image_size"], patch_size=c["patch_size"], n_embd=c["n_embd"],
                                 n_head=c["n_head_image"], n_xf_blocks=c["n_xf_blocks_image"],
                                 n_head_state=c["n_head_state_image"], n_timestep=c["n_timesteps"],
                                 device=dev).to(dev)
    z_text = th.nn.functional.normalize(th.randn(b, c["n_embd"], device=dev), dim=-1)
    scale = float(np.log(c["logit_scale"]))

    def cond_fn(x, t, **kwargs):
        with th.enable_grad():
            x = x.detach().requires_grad_(True)
            z = image_encoder((x + 1) * 127.5, t)
            z = z / (th.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)
            loss = np.exp(scale) * (z_text * z).sum()
            return th.autograd.grad(loss, x)[0].detach() * 3.0

x = th.randn((rows, 3, 64, 64), device=dev)
times, cpu_times = [], []
with th.no_grad():
    text_times = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        model.get_text_emb(tokens, mask)
        sync()
        text_times.append(time.perf_counter() - t0)
    for i in reversed(range(warmup + job["steps"])):  # the first (highest-t) steps are the warm-up
        t = th.full((rows,), i, dtype=th.long, device=dev)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        x = diffusion.p_sample(model_fn, x, t, cond_fn=cond_fn, model_kwargs={})["sample"]
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
print(json.dumps({"step_times_s": times[warmup:], "step_cpu_times_s": cpu_times[warmup:], "warmup_steps_s": times[:warmup], "text_encoder_s": text_times[-1],
                  "peak_rss_bytes": peak_rss(), "device": str(dev), "fp16": job["fp16"],
                  "peak_device_bytes": th.cuda.max_memory_allocated() if dev.type == "cuda" else None,
                  "threads": th.get_num_threads(), "torch": th.__version__}))
"""


def bench_torch(python: str, pythonpath: str | None, kind: str, batch: int, steps: int,
                device: str = "cpu", fp16: bool = False) -> dict:
    job = {"kind": kind, "batch": batch, "steps": steps, "device": device, "fp16": fp16,
           "clip_config": ClipConfig.from_json(CONFIGS / "clip.json").to_dict()}
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load_before = _load()
    done = subprocess.run([python, "-c", _TORCH_JOB, json.dumps(job)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the original's benchmark failed ({python}, PYTHONPATH={pythonpath}):\n"
                           f"{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["step_s"] = float(np.median(result["step_times_s"]))
    result["step_cpu_s"] = float(np.median(result["step_cpu_times_s"]))
    result.update(kind=kind, batch_pairs=batch, load_before=load_before, load_after=_load())
    return result


# -- report -------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(results: dict) -> str:
    torch_by = {(r["kind"], r["batch_pairs"]): r for r in results["torch"]}
    cfg32 = {r["batch_pairs"]: r for r in results["jax"]
             if r["kind"] == "cfg" and r["dtype"] == "float32" and r["xla"] == "glide"}
    lines = [
        f"device: {results['device']}; jax {results['jax_version']}; {results['cpu_count']} CPUs; "
        f"params init {results['init_s']:.1f} s",
        "kind  dtype     xla      B  rows  compile_s  lower_s  step_s  cpu_s   img/s   peak_GiB  load  | "
        "torch_step_s  ratio  torch_cpu_s  cpu_ratio  torch_peak_GiB  load",
    ]
    for r in results["jax"]:
        t = torch_by.get((r["kind"], r["batch_pairs"]))
        cols = (f"{r['kind']:<5} {r['dtype']:<9} {r['xla']:<8} {r['batch_pairs']:<2} {r['model_batch']:<5} "
                f"{r['compile_s']:9.1f}  {r['trace_lower_s']:7.1f}  {r['step_s']:7.4f}  "
                f"{r['step_cpu_s']:5.2f}  {r['images_per_s']:6.3f}  {_gib(r['peak_memory_bytes']):>8}  "
                f"{r['load_before']:4.1f}")
        if t is not None and r["dtype"] == results["torch_compared_dtype"]:
            torch_peak = t.get("peak_device_bytes") or t["peak_rss_bytes"]
            cols += (f"  | {t['step_s']:12.4f}  {r['step_s'] / t['step_s']:5.2f}  {t['step_cpu_s']:11.2f}  "
                     f"{r['step_cpu_s'] / t['step_cpu_s']:9.2f}  {_gib(torch_peak):>14}  "
                     f"{t['load_before']:4.1f}")
        lines.append(cols)
    for r in results["jax"]:
        if r["kind"] == "clip" and r["batch_pairs"] in cfg32:
            lines.append(f"CLIP-guided / classifier-free step (float32, B={r['batch_pairs']}): "
                         f"{r['step_s']:.2f} s / {cfg32[r['batch_pairs']]['step_s']:.2f} s = "
                         f"{r['step_s'] / cfg32[r['batch_pairs']]['step_s']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,2,4", help="guided pairs per batch, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per timed loop (>= 2)")
    parser.add_argument("--clip", action="store_true", help="also time CLIP guidance (float32, B=1)")
    parser.add_argument("--clip-batch", type=int, default=1)
    parser.add_argument("--torch-python", help="interpreter with torch to time the original with")
    parser.add_argument("--torch-pythonpath", help="PYTHONPATH that makes glide_text2im importable")
    parser.add_argument("--torch-device", default="cpu", help="where the original runs: cpu or cuda")
    parser.add_argument("--torch-fp16", action="store_true",
                        help="run the original in float16 (its GPU setting); compared with our bfloat16 rows")
    parser.add_argument("--xla-options", choices=("glide", "default", "both"), default="glide",
                        help="compile with glide-jax's XLA options (glide_jax.xla_options), without them "
                             "(XLA's defaults), or both, one after the other for each classifier-free case")
    parser.add_argument("--json", default="bench_sample.json", help="where to write the results")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")
    xla_settings = ("default", "glide") if args.xla_options == "both" else (args.xla_options,)
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a respaced diffusion needs two steps)")

    config = ModelConfig.from_json(CONFIGS / "base.json")
    t0 = time.perf_counter()
    params = jax.device_put(random_params(param_shapes(config)))
    results = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
               "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "jax_version": jax.__version__, "n_params": count_params(params),
               "init_s": time.perf_counter() - t0, "args": vars(args), "jax": [], "torch": [],
               "matmul_precision": str(jax.config.jax_default_matmul_precision),
               "torch_compared_dtype": "bfloat16" if args.torch_fp16 else "float32"}
    print(f"{count_params(params):,} parameters, init {results['init_s']:.1f} s, load {_load()}", flush=True)

    for dtype in dtypes:
        cast = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), params)
        for b in batch_sizes:
            for xla in xla_settings:
                r = bench_cfg(cast, config, dtype, b, args.steps, xla)
                results["jax"].append(r)
                print(json.dumps(r), flush=True)
        del cast
    if args.clip:
        clip_config = ClipConfig.from_json(CONFIGS / "clip.json")
        clip_params = jax.device_put(random_params(clip_params_shapes(clip_config), seed=2))
        r = bench_clip(params, config, clip_params, clip_config, args.clip_batch, args.steps)
        results["jax"].append(r)
        print(json.dumps(r), flush=True)
    if args.torch_python:
        del params  # leave the memory to the original
        jobs = [("cfg", b) for b in batch_sizes] + ([("clip", args.clip_batch)] if args.clip else [])
        for kind, b in jobs:
            r = bench_torch(args.torch_python, args.torch_pythonpath, kind, b, args.steps,
                            args.torch_device, args.torch_fp16 and kind == "cfg")
            results["torch"].append(r)
            print(json.dumps(r), flush=True)

    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
