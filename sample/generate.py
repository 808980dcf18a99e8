"""Generate images from text: base model, then the upsampler (the bundled demo models or GLIDE).

    python -m sample.generate --prompt "a red circle on a white background"
    python -m sample.generate --model glide --prompt "an oil painting of a corgi" --batch-size 4 --out out/
    python -m sample.generate --prompt-file prompts.txt --respacing 100 --upsample-steps fast27
    python -m sample.generate --prompt "a corgi in a field" --inpaint-image grass.png --inpaint-mask mask.png
    python -m sample.generate --prompt "a red cube" --guidance clip --clip-guidance-scale 3

Writes `OUT/NNNN.png` (image NNNN = prompt index × batch size + repeat) and `OUT/grid.png`
(one row per prompt). Models (`--model`):

* `demo` (the default without `--checkpoint-dir`): the small 32px base → 64px upsampler family
  bundled in `demo/`, trained by glide-jax on the captioned-shapes domain (`demo/REPRODUCE.md`).
  No network. Each model directory holds its tokenizer (`tokenizer.model`, sentencepiece; the
  noised CLIP's BPE vocabulary), so the right one is used without guessing. There is no demo
  upsample-inpaint model: inpainting runs the demo inpainting base model, then the plain demo
  upsampler on its output.
* `glide`: the released GLIDE (filtered) weights with GLIDE's BPE: downloaded and converted once
  into the cache, or, with `--checkpoint-dir`, converted models (`base/`, `upsample/`,
  `base_inpaint/`, `upsample_inpaint/`, `clip/`) or the reference's `.pt` files.

A model that is asked for and missing is an error; neither kind ever stands in for the other.

Progress is reported per stage (compile time, sampling time, steps/s): each stage is one compiled
program, and a per-step host callback would cost a device→host synchronisation every step and
fire once per device under sharding, for a number the per-stage time already gives.

Multi-process: start one copy per host with GLIDE_COORDINATOR_ADDRESS, GLIDE_NUM_PROCESSES and
GLIDE_PROCESS_ID set; all hosts sample together and each writes its share of the images
(image i on process i mod process count); process 0 writes the grid.

Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

EXIT_BAD_INPUT = 2

# The reference's notebooks: 100 base steps, 27 upsampler steps.
DEFAULT_RESPACING = "100"
DEFAULT_UPSAMPLE_RESPACING = "fast27"
# The demo models: 50 + 25 steps keep the whole cascade well under a minute on two CPU cores.
# The base samples with ancestral (DDPM) steps. The small upsampler runs deterministic DDIM from
# its input noised to t=500 rather than from pure noise: its eps predictions at the noisiest steps
# are too coarse to hold the input's colours (measured with `python -m sample.evaluate`, see
# demo/REPRODUCE.md).
DEMO_RESPACING = "50"
DEMO_UPSAMPLE_RESPACING = "25"
DEMO_SAMPLER = "ddpm"
DEMO_UPSAMPLE_SAMPLER = "ddim"
DEMO_UPSAMPLE_START = 500
# The reference's CLIP-guided notebook guides at 3. The demo scale was tuned with item 9's two-run
# CLIP (demo/REPRODUCE.md) on the evaluation's tuning prompts (192 prompts of prompt seed 777, one
# seed): every check of a caption right in 84.9% of images at 10 and at 20, 83.3% at 30 (unguided
# 79.2%), relations 83 / 86 / 92%, held-out pairs 75 / 79 / 75%; 20 gives the best colours and
# held-out pairs. It was kept, not re-tuned, for the three-run CLIP bundled now (88.0% there).
DEFAULT_CLIP_GUIDANCE_SCALE = 3.0
DEMO_CLIP_GUIDANCE_SCALE = 20.0
FULL_CHAIN_START = 999   # the schedule's last step: the upsampler starts from pure noise
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
MODEL_CHOICES = ("demo", "glide")
MATMUL_PRECISIONS = ("default", "high", "highest")


class InputError(Exception):
    """Bad command-line input; reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise InputError(message)


def _parse_args(argv):
    p = _Parser(prog="python -m sample.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; '' is unconditional)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line (blank lines are skipped)")
    p.add_argument("--model", choices=MODEL_CHOICES,
                   help="demo: the bundled shapes models in demo/ (default); glide: the released GLIDE "
                        "weights (downloaded once), or converted ones from --checkpoint-dir (which implies it)")
    p.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--guidance", choices=("cfg", "clip"), default="cfg",
                   help="classifier-free guidance (cfg) or noised-CLIP guidance (clip)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (>= 0)")
    p.add_argument("--clip-guidance-scale", type=float,
                   help=f"CLIP guidance scale (>= 0; default {DEFAULT_CLIP_GUIDANCE_SCALE:g}; demo {DEMO_CLIP_GUIDANCE_SCALE:g})")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="base sampling steps (evenly respaced)")
    steps.add_argument("--respacing", help=f"base timestep respacing, e.g. 100, 10,10,10, ddim50, fast27 "
                                           f"(default {DEFAULT_RESPACING}; demo {DEMO_RESPACING})")
    p.add_argument("--sampler", choices=("ddpm", "ddim"),
                   help=f"base sampler (default ddpm; demo {DEMO_SAMPLER})")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (>= 0; 0 is deterministic)")
    up = p.add_mutually_exclusive_group()
    up.add_argument("--upsample", dest="upsample", action="store_true", default=True,
                    help="run the upsampler after the base model (default)")
    up.add_argument("--no-upsample", dest="upsample", action="store_false", help="stop at the base model")
    p.add_argument("--upsample-steps",
                   help=f"upsampler steps or respacing, e.g. 27 or fast27 (default {DEFAULT_UPSAMPLE_RESPACING}; "
                        f"demo {DEMO_UPSAMPLE_RESPACING})")
    p.add_argument("--upsample-temp", type=float, default=0.997, help="upsampler noise temperature (> 0)")
    p.add_argument("--upsample-start", type=int,
                   help="start the upsampler at this original timestep (1-999) from the base image upsampled and "
                        "noised to it, instead of from pure noise (999, the reference's way; default 999, "
                        f"demo {DEMO_UPSAMPLE_START})")
    p.add_argument("--upsample-sampler", choices=("ddpm", "ddim"),
                   help="upsampler sampler (default ddim, ddpm when inpainting, as the reference; "
                        f"demo {DEMO_UPSAMPLE_SAMPLER})")
    p.add_argument("--inpaint-image", help="image to inpaint (needs --inpaint-mask)")
    p.add_argument("--inpaint-mask", help="mask image of the same size: white = keep, black = generate")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute precision")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS,
                   help="float32 matrix products and convolutions on an accelerator: XLA's 'default' is TF32 "
                        "on NVIDIA GPUs (Ampere and later) and bfloat16 passes on TPUs; 'highest' gives the "
                        "reference's float32 numbers (bench/bench_parity.py). Default: JAX's setting "
                        "(JAX_DEFAULT_MATMUL_PRECISION); no effect on the CPU")
    p.add_argument("--checkpoint-dir", help="directory of converted GLIDE models or the reference's .pt files")
    p.add_argument("--vocab-dir", help="tokenizer vocabulary directory (default: the cache, downloaded)")
    p.add_argument("--out", default="samples", help="output directory (default ./samples)")
    return p.parse_args(argv)


# -- input checks (before any model is loaded) ------------------------------------------------------


def _resolve_model(args) -> None:
    """Fills in `--model` and the per-model defaults (steps, sampler); rejects options that do not
    apply to the chosen model rather than ignoring them."""
    if args.model is None:
        args.model = "glide" if args.checkpoint_dir else "demo"
    demo = args.model == "demo"
    if demo and args.checkpoint_dir:
        raise InputError("--checkpoint-dir holds GLIDE models and goes with --model glide; the demo models "
                         f"are read from {DEMO_DIR}")
    if demo and args.vocab_dir:
        raise InputError("--vocab-dir applies to --model glide; each demo model carries its own tokenizer")
    if args.sampler is None:
        args.sampler = DEMO_SAMPLER if demo else "ddpm"
    if args.steps is None and args.respacing is None:
        args.respacing = DEMO_RESPACING if demo else DEFAULT_RESPACING
    if args.upsample_steps is None:
        args.upsample_steps = DEMO_UPSAMPLE_RESPACING if demo else DEFAULT_UPSAMPLE_RESPACING
    if args.upsample_sampler is None and demo:
        args.upsample_sampler = DEMO_UPSAMPLE_SAMPLER
    if args.upsample_start is None:
        args.upsample_start = DEMO_UPSAMPLE_START if demo else FULL_CHAIN_START
    if args.clip_guidance_scale is None:
        args.clip_guidance_scale = DEMO_CLIP_GUIDANCE_SCALE if demo else DEFAULT_CLIP_GUIDANCE_SCALE


def _check_args(args) -> None:
    _resolve_model(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("guidance_scale", "clip_guidance_scale", "eta"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not math.isfinite(args.upsample_temp) or args.upsample_temp <= 0:
        raise InputError(f"--upsample-temp must be a finite number > 0, got {args.upsample_temp}")
    if not 1 <= args.upsample_start <= FULL_CHAIN_START:
        raise InputError(f"--upsample-start must be an original timestep in [1, {FULL_CHAIN_START}], "
                         f"got {args.upsample_start}")
    if args.steps is not None and args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    if not 0 <= args.seed < 2 ** 32:
        # jax.random.key keeps only 32 bits without x64, so larger seeds would collide silently.
        raise InputError(f"--seed must be in [0, 2**32), got {args.seed}")
    if (args.inpaint_image is None) != (args.inpaint_mask is None):
        given, missing = (("--inpaint-image", "--inpaint-mask") if args.inpaint_image
                          else ("--inpaint-mask", "--inpaint-image"))
        raise InputError(f"{given} needs {missing} too")
    if args.sampler == "ddpm" and args.eta:
        raise InputError("--eta applies to --sampler ddim only")
    _check_out(args.out)


def _check_out(out: str) -> None:
    """--out must be creatable and writable, checked before minutes of sampling; nothing is
    created here, so a run refused later leaves no empty directory behind."""
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        target = path
    else:
        target = next((p for p in path.absolute().parents if p.exists()), None)
        if target is None or not target.is_dir():
            raise InputError(f"--out {out} cannot be created: {target} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"--out {out} cannot be written: {target} is not writable")


def _respacings(args) -> tuple[str, str]:
    from glide_jax.diffusion import space_timesteps

    base = str(args.steps) if args.steps is not None else (args.respacing or DEFAULT_RESPACING)
    up = str(args.upsample_steps)
    for option, value, span in (("--steps/--respacing", base, 1000),
                                ("--upsample-steps", up, args.upsample_start + 1)):
        try:
            kept = space_timesteps(span, value)
        except ValueError as err:
            limit = f" (--upsample-start {args.upsample_start} leaves {span} steps)" if span < 1000 else ""
            raise InputError(f"{option}: {err}{limit}") from None
        if len(kept) < 2:
            raise InputError(f"{option} {value!r} keeps {len(kept)} step(s); at least 2 are needed")
    return base, up


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--prompt-file {args.prompt_file}: cannot read it ({err})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt: give --prompt (repeatable, '' for unconditional) or --prompt-file")
    return prompts


# -- models ---------------------------------------------------------------------------------------


# Demo model name -> directory in DEMO_DIR. There is no demo upsample-inpaint model: the demo
# cascade runs the plain upsampler after inpainting (`has_inpaint_upsampler`).
DEMO_MODELS = {"base": "base", "upsample": "upsample", "base-inpaint": "base_inpaint", "clip": "clip"}
SENTENCEPIECE_FILE = "tokenizer.model"


class ModelSource:
    """Where the models and their tokenizers come from.

    `demo`: `demo_dir/<model>/` (config.json, params/, and the tokenizer the model was trained
    with), stored in 16-bit and upcast to float32 on load. `glide`: `checkpoint_dir` when given
    (converted models or .pt files), else the released weights (downloaded once); GLIDE's BPE
    (and CLIP's for the noised CLIP) from `vocab_dir` or the cache.
    """

    def __init__(self, model: str = "demo", checkpoint_dir: str | None = None, vocab_dir: str | None = None,
                 demo_dir: str | Path = DEMO_DIR):
        if model not in MODEL_CHOICES:
            raise InputError(f"unknown model {model!r}; choose one of {', '.join(MODEL_CHOICES)}")
        self.model, self.checkpoint_dir, self.vocab_dir = model, checkpoint_dir, vocab_dir
        self.demo_dir = Path(demo_dir)

    def has_inpaint_upsampler(self) -> bool:
        return self.model != "demo"

    def demo_path(self, name: str) -> Path:
        from glide_jax.weights import WeightsError

        directory = self.demo_dir / DEMO_MODELS.get(name, name)
        if name not in DEMO_MODELS or not (directory / "config.json").is_file() or not (directory / "params").is_dir():
            raise WeightsError(
                f"the bundled demo model {name!r} is missing: expected {directory}/config.json and params/ "
                f"(see demo/REPRODUCE.md to rebuild it); --model glide uses the released GLIDE weights")
        return directory

    def load(self, name: str):
        from glide_jax import weights

        if self.model == "demo":
            # Stored as 16-bit floats to keep the repository small; sampled in float32.
            return weights.load_local(self.demo_path(name), name, dtype=np.float32)
        if self.checkpoint_dir:
            return weights.load_local(self.checkpoint_dir, name)
        return weights.load_released(name)

    def tokenizer(self, name: str):
        from glide_jax import tokenizers

        if self.model == "demo":
            directory = self.demo_path(name)
            if name == "clip":
                # The demo CLIP was trained on CLIP's BPE; its vocabulary is not bundled (vocabularies
                # are never part of the project): it comes from the cache, downloaded once.
                return tokenizers.ClipBPETokenizer()
            path = directory / SENTENCEPIECE_FILE
            if not path.is_file():
                from glide_jax.weights import WeightsError
                raise WeightsError(f"the demo model in {directory} has no {SENTENCEPIECE_FILE} (its tokenizer)")
            return tokenizers.SentencePieceTokenizer(path)
        if name == "clip":
            return tokenizers.ClipBPETokenizer(self.vocab_dir)
        return tokenizers.GlideBPETokenizer(self.vocab_dir)

    def uncond(self, name: str, config):
        """The unconditional prompt for classifier-free guidance: the demo models were trained with
        their tokenizer's empty caption; None keeps the pipeline's (the reference's) default."""
        if self.model != "demo":
            return None, None
        return self.tokenizer(name).pad_and_mask([], config.text_ctx)


def diffusion_for(config, respacing: str, start_step: int | None = None):
    from glide_jax.diffusion import diffusion_for_model

    if start_step is not None and start_step >= config.diffusion_steps - 1:
        start_step = None   # the last step: the full chain from pure noise
    return diffusion_for_model(config, respacing, start_step=start_step)


_diffusion = diffusion_for


def _tokens(tokenizer, prompts, ctx, stage, log):
    if tokenizer is None:   # a model without a text encoder
        return None, None
    tokens, mask, truncated = tokenizer.tokenize_batch(prompts, ctx, return_truncated=True)
    for i in np.flatnonzero(truncated):
        log(f"warning: {stage}: prompt {i + 1} is longer than the model's {ctx}-token text context and "
            f"was truncated: {prompts[i]!r}", err=True)
    return tokens, mask


def _report(log, stage, timing):
    compile_part = "cached program" if timing.cached else f"compiled in {timing.compile_s:.1f} s"
    log(f"{stage}: {timing.batch} image(s) x {timing.steps} steps: {compile_part}, sampled in "
        f"{timing.run_s:.1f} s ({timing.steps_per_s:.2f} steps/s)")


# -- main -----------------------------------------------------------------------------------------


def run(args, log) -> Path:
    import jax

    from glide_jax import parallel, pipeline
    from sample import images as image_io

    _check_args(args)
    base_respacing, up_respacing = _respacings(args)
    prompts = _prompts(args)
    inpainting = args.inpaint_image is not None
    inpaint_files = image_io.load_inpaint_inputs(args.inpaint_image, args.inpaint_mask) if inpainting else None
    out = Path(args.out)

    # Every image is (prompt, repeat); image i = prompt i // batch_size.
    n = len(prompts) * args.batch_size
    image_prompts = [p for p in prompts for _ in range(args.batch_size)]
    mesh = parallel.make_mesh()
    key = jax.random.key(args.seed)
    models = ModelSource(args.model, args.checkpoint_dir, args.vocab_dir)
    log(f"models: {'bundled demo models in ' + str(models.demo_dir) if args.model == 'demo' else 'GLIDE'}")

    base_name = "base-inpaint" if inpainting else "base"
    base_config, base_params = models.load(base_name)
    diffusion = _diffusion(base_config, base_respacing)
    base_params = pipeline.prepare_params(base_params, mesh)
    tokens, mask = _tokens(models.tokenizer(base_name), image_prompts, base_config.text_ctx, "base", log)
    extra = {}
    if inpainting:
        size = base_config.image_size
        base_mask = image_io.mask_to_array(inpaint_files[1], size)
        extra = dict(inpaint_image=np.repeat(image_io.image_to_array(inpaint_files[0], size)[None], n, 0),
                     inpaint_mask=np.repeat(base_mask[None], n, 0))
    common = dict(diffusion=diffusion, sampler=args.sampler, eta=args.eta, dtype=args.dtype, mesh=mesh, **extra)
    timing = pipeline.StageTiming()
    stage = f"base ({args.guidance} guidance, {args.sampler}, {diffusion.num_timesteps} steps)"
    log(f"{stage}: sampling {n} image(s) on {len(mesh.devices.flat)} device(s)...")
    if args.guidance == "clip":
        from glide_jax.clip import ClipConfig

        clip_config, clip_params = models.load("clip")
        if not isinstance(clip_config, ClipConfig):
            raise InputError("the 'clip' checkpoint does not hold a noised CLIP")
        clip_tokens, clip_len = models.tokenizer("clip").batch_padded_and_len(image_prompts, clip_config.max_text_len)
        images = pipeline.sample_clip_guided(
            base_config, base_params, tokens, mask, clip_config, clip_params, clip_tokens, clip_len,
            jax.random.fold_in(key, 0), clip_guidance_scale=args.clip_guidance_scale, timing=timing, **common)
    else:
        uncond_tokens, uncond_mask = models.uncond(base_name, base_config)
        images = pipeline.sample_base(base_config, base_params, tokens, mask, jax.random.fold_in(key, 0),
                                      guidance_scale=args.guidance_scale, uncond_tokens=uncond_tokens,
                                      uncond_mask=uncond_mask, timing=timing, **common)
    _report(log, "base", timing)
    del base_params

    if args.upsample:
        up_name = "upsample-inpaint" if inpainting and models.has_inpaint_upsampler() else "upsample"
        up_config, up_params = models.load(up_name)
        up_diffusion = _diffusion(up_config, up_respacing, args.upsample_start)
        up_params = pipeline.prepare_params(up_params, mesh)
        up_tokens, up_mask = _tokens(models.tokenizer(up_name) if up_config.has_text else None, image_prompts,
                                     up_config.text_ctx, "upsample", log)
        extra = {}
        if inpainting and up_config.inpaint:
            size = up_config.image_size
            extra = dict(inpaint_image=np.repeat(image_io.image_to_array(inpaint_files[0], size)[None], n, 0),
                         inpaint_mask=np.repeat(image_io.upsample_mask(base_mask, size)[None], n, 0))
        sampler = args.upsample_sampler or ("ddpm" if inpainting else "ddim")
        timing = pipeline.StageTiming()
        start = "" if up_diffusion.starts_from_noise else f" from t={args.upsample_start}"
        log(f"upsample ({sampler}, {up_diffusion.num_timesteps} steps{start}, temp {args.upsample_temp}): "
            f"sampling {n} image(s)...")
        # 8-bit quantisation of the 64px images happens inside the stage, as the reference's cascade.
        images = pipeline.sample_upsample(
            up_config, up_params, images, up_tokens, up_mask, jax.random.fold_in(key, 1),
            diffusion=up_diffusion, temp=args.upsample_temp, sampler=sampler, dtype=args.dtype, mesh=mesh,
            timing=timing, **extra)
        _report(log, "upsample", timing)

    pixels = pipeline.to_uint8(images)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(jax.process_index(), n, jax.process_count()):
        image_io.save_png(out / f"{i:04d}.png", pixels[i])
    if parallel.is_primary():
        image_io.save_png(out / "grid.png", image_io.make_grid(pixels, columns=args.batch_size))
    log(f"wrote {n} image(s) and grid.png to {out.resolve()}")
    return out


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the user's input (files, options, weights) is wrong, not the program."""
    from glide_jax.checkpoint import CheckpointError
    from glide_jax.config import ConfigError
    from glide_jax.pipeline import PipelineError
    from glide_jax.weights import WeightsError
    from sample.images import ImageInputError

    return (ConfigError, PipelineError, ImageInputError, WeightsError, CheckpointError, FileNotFoundError)


def bad_input_message(err: Exception) -> str | None:
    """The one-line `error:` report for an error that means the user's input is wrong (which a CLI
    then exits with EXIT_BAD_INPUT), or None for a program error, which should propagate."""
    if isinstance(err, InputError):
        return f"error: {err}"
    if isinstance(err, _bad_input_errors()):
        return f"error: {' '.join(str(err).split())}"
    return None


def _fast_compile_for_demo(args) -> None:
    """The demo models are small enough that XLA's compile time dominates a run: without LLVM's
    optimisation passes the base stage compiles in ~11 s instead of ~19 s on two CPU cores and
    samples ~20% slower, a net win for a single prompt. GLIDE's models keep full optimisation.
    Takes effect only before jax is first imported (a fresh `python -m sample.generate`)."""
    import os

    model = args.model or ("glide" if args.checkpoint_dir else "demo")
    flags = os.environ.get("XLA_FLAGS", "")
    if model == "demo" and "jax" not in sys.modules and "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()


def _matmul_precision(precision: str | None):
    """The scope in which the samplers are traced: XLA fixes a program's matmul precision when it
    is compiled, so this covers every jitted loop of the run."""
    import contextlib

    import jax

    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def main(argv=None) -> int:
    def log(message, err=False):
        import jax

        if err or jax.process_index() == 0:
            print(message, file=sys.stderr if err else sys.stdout, flush=True)

    try:
        args = _parse_args(argv)
        _fast_compile_for_demo(args)
        from glide_jax import parallel
        # Must run before anything touches a device.
        parallel.initialize_distributed()
        with _matmul_precision(args.matmul_precision):
            run(args, log)
    except Exception as err:
        message = bad_input_message(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
