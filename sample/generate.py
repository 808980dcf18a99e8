"""Generate images from text: base model, then the upsampler (the bundled demo models or GLIDE).

    python -m sample.generate --prompt "a red circle on a white background"
    python -m sample.generate --model glide --prompt "an oil painting of a corgi" --batch-size 4 --out out/
    python -m sample.generate --prompts-file prompts.txt --max-batch 8 --respacing 100 --upsample-steps fast27
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

A progress bar per stage follows the compiled loop step by step (a host callback per step;
`--quiet` turns it off), then each stage reports its compile time, sampling time and steps/s.
Each PNG carries its prompt, negative prompt, seed, sampler, steps, guidance and model as PNG
text chunks; `--json` prints a machine-readable summary on stdout.

Multi-process: start one copy per host with GLIDE_COORDINATOR_ADDRESS, GLIDE_NUM_PROCESSES and
GLIDE_PROCESS_ID set; all hosts sample together and each writes its share of the images
(image i on process i mod process count); process 0 writes the grid.

Exit codes: 0 done, 2 bad input (one `error:` line on stderr: a flag, a file, missing or
unconvertible weights, a download), 1 a bug (one line saying where its traceback was written).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

EXIT_BAD_INPUT = 2
EXIT_BUG = 1   # glide_jax.errors.EXIT_BUG, without importing the package before XLA_FLAGS is set

# What the help text quotes; the values in force come from the chosen models' Pipeline defaults
# (glide_jax.pipeline.SamplingDefaults: the reference's, or demo/pipeline.json for the demo).
DEFAULTS = "(default: the model family's; GLIDE: %s, demo: %s)"
MODEL_CHOICES = ("demo", "glide")
MATMUL_PRECISIONS = ("default", "high", "highest")
SAMPLER_CHOICES = ("ddpm", "ddim", "dpm++2m", "dpm++2s", "dpm++2m-sde")   # glide_jax.sampling.SAMPLERS, without importing jax
FULL_CHAIN_START = 999


class InputError(Exception):
    """Bad command-line input; reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise InputError(message)


def _parse_args(argv):
    p = _Parser(prog="python -m sample.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; '' is unconditional)")
    p.add_argument("--prompts-file", "--prompt-file", dest="prompt_file",
                   help="a text file with one prompt per line (blank lines are skipped)")
    p.add_argument("--negative-prompt", help="condition classifier-free guidance's other row on this text "
                                             "instead of the empty prompt")
    p.add_argument("--model", choices=MODEL_CHOICES,
                   help="demo: the bundled shapes models in demo/ (default); glide: the released GLIDE "
                        "weights (downloaded once), or converted ones from --checkpoint-dir (which implies it)")
    p.add_argument("--batch-size", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--max-batch", type=int, help="sample at most this many images at once, in equal chunks "
                                                 "(one compiled program; the images do not change)")
    p.add_argument("--guidance", choices=("cfg", "clip"), default="cfg",
                   help="classifier-free guidance (cfg) or noised-CLIP guidance (clip)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (>= 0) " + DEFAULTS % (3, 3))
    p.add_argument("--clip-guidance-scale", type=float, help="CLIP guidance scale (>= 0) " + DEFAULTS % (3, 20))
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="base sampling steps (evenly respaced)")
    steps.add_argument("--respacing", help="base timestep respacing, e.g. 100, 10,10,10, ddim50, fast27 "
                                           + DEFAULTS % (100, 50))
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, help="base sampler " + DEFAULTS % ("ddpm", "ddpm"))
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (>= 0; 0 is deterministic)")
    up = p.add_mutually_exclusive_group()
    up.add_argument("--upsample", dest="upsample", action="store_true", default=True,
                    help="run the upsampler after the base model (default)")
    up.add_argument("--no-upsample", dest="upsample", action="store_false", help="stop at the base model")
    p.add_argument("--upsample-steps", help="upsampler steps or respacing, e.g. 27 or fast27 "
                                            + DEFAULTS % ("fast27", 25))
    p.add_argument("--upsample-temp", type=float, default=0.997, help="upsampler noise temperature (> 0)")
    p.add_argument("--upsample-start", type=int,
                   help="start the upsampler at this original timestep (1-999) from the base image upsampled and "
                        "noised to it, instead of from pure noise (999, the reference's way) " + DEFAULTS % (999, 500))
    p.add_argument("--upsample-sampler", choices=SAMPLER_CHOICES,
                   help="upsampler sampler " + DEFAULTS % ("ddim, ddpm when inpainting", "ddim"))
    p.add_argument("--inpaint-image", help="image to inpaint (needs --inpaint-mask)")
    p.add_argument("--inpaint-mask", help="mask image of the same size: white = keep, black = generate")
    p.add_argument("--init-image", help="img2img (SDEdit): start the base model from this image, noised to "
                                         "--strength of the chain")
    p.add_argument("--strength", type=float, help="with --init-image: how far to noise it, in (0, 1] "
                                                  "(default 0.8; 1 ignores the image)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute precision")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS,
                   help="float32 matrix products and convolutions on an accelerator: XLA's 'default' is TF32 "
                        "on NVIDIA GPUs (Ampere and later) and bfloat16 passes on TPUs; 'highest' gives the "
                        "reference's float32 numbers (bench/bench_parity.py). Default: JAX's setting "
                        "(JAX_DEFAULT_MATMUL_PRECISION); no effect on the CPU")
    p.add_argument("--checkpoint-dir", help="directory of converted GLIDE models or the reference's .pt files")
    p.add_argument("--vocab-dir", help="tokenizer vocabulary directory (default: the cache, downloaded)")
    p.add_argument("--out", default="samples", help="output directory, local or e.g. gs://bucket/dir (default ./samples)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not keep compiled programs on disk for later runs (default: kept under the cache "
                        "directory; also GLIDE_JAX_COMPILE_CACHE=0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the run on stdout (logs go to stderr)")
    return p.parse_args(argv)


# -- input checks (before any model is loaded) ------------------------------------------------------


def _check_model_choice(args) -> None:
    """Fills in `--model`; rejects options that do not apply to the chosen model rather than
    ignoring them."""
    if args.model is None:
        args.model = "glide" if args.checkpoint_dir else "demo"
    if args.model == "demo" and args.checkpoint_dir:
        raise InputError("--checkpoint-dir holds GLIDE models and goes with --model glide; the demo models "
                         "are read from demo/")
    if args.model == "demo" and args.vocab_dir:
        raise InputError("--vocab-dir applies to --model glide; each demo model carries its own tokenizer")


def _check_args(args) -> None:
    _check_model_choice(args)
    for name, minimum in (("batch_size", 1), ("max_batch", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    for name in ("guidance_scale", "clip_guidance_scale", "eta"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not math.isfinite(args.upsample_temp) or args.upsample_temp <= 0:
        raise InputError(f"--upsample-temp must be a finite number > 0, got {args.upsample_temp}")
    if args.upsample_start is not None and not 1 <= args.upsample_start <= FULL_CHAIN_START:
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
    if args.init_image is not None and args.inpaint_image is not None:
        raise InputError("--init-image (img2img) and --inpaint-image do not go together")
    if args.strength is not None and args.init_image is None:
        raise InputError("--strength applies to --init-image only")
    if args.strength is not None and not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise InputError(f"--strength must be a number in (0, 1], got {args.strength}")
    if args.sampler not in (None, "ddim") and args.eta:
        raise InputError("--eta applies to --sampler ddim only")
    _check_out(args.out)


def _check_out(out: str) -> None:
    """--out must be creatable and writable, checked before minutes of sampling; nothing is
    created here, so a run refused later leaves no empty directory behind."""
    from glide_jax import paths

    try:
        remote = not paths.is_local(out)
    except ValueError as err:
        raise InputError(f"--out {err}") from None
    if remote:
        return   # an object store's permissions show only when writing: `_writable` tries that
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


def _apply_defaults(args, defaults) -> None:
    """The model family's sampling defaults for every option left unset."""
    if args.steps is None and args.respacing is None:
        args.respacing = defaults.steps
    args.sampler = args.sampler or defaults.sampler
    args.upsample_steps = args.upsample_steps or defaults.upsample_steps
    if args.upsample_start is None:
        args.upsample_start = defaults.upsample_start
    if args.guidance_scale is None:
        args.guidance_scale = defaults.guidance_scale
    if args.clip_guidance_scale is None:
        args.clip_guidance_scale = defaults.clip_guidance_scale


def _respacings(args) -> tuple[str, str]:
    from glide_jax.diffusion import space_timesteps

    base = str(args.steps) if args.steps is not None else args.respacing
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
            raise InputError(f"--prompts-file {args.prompt_file}: cannot read it ({err})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt: give --prompt (repeatable, '' for unconditional) or --prompts-file")
    return prompts


def _writable(out) -> None:
    """Creates `out` once the models are loaded (`_check_out` refused what it could up front) and
    proves it writable with a real file, before any sampling time is spent."""
    import tempfile
    import uuid

    from glide_jax import paths

    try:
        out.mkdir(parents=True, exist_ok=True)
        if paths.is_local(out):
            tempfile.TemporaryFile(dir=out).close()
        else:
            probe = out / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as err:
        raise InputError(f"--out {out}: cannot write there ({err.strerror or err})") from None


# -- running --------------------------------------------------------------------------------------


def _progress_bars(quiet: bool):
    """(callback, close): one tqdm bar per stage on stderr, following the compiled loop."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict = {}

    def update(stage: str, step: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None or bar.total != total or step < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=False, file=sys.stderr)
        bar.update(step - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()
    return update, close


def _report(log, stage, timing, detail):
    compile_part = "cached program" if timing.cached else f"compiled in {timing.compile_s:.1f} s"
    log(f"{stage} ({detail}): {timing.batch} image(s) x {timing.steps} steps: {compile_part}, sampled in "
        f"{timing.run_s:.1f} s ({timing.steps_per_s:.2f} steps/s)")


def _chunks(n: int, max_batch: int | None):
    """Equal-size chunks of image indices: the last one is padded (by repeating its last image,
    dropped afterwards) so every chunk runs the same compiled program."""
    size = n if max_batch is None else min(max_batch, n)
    for start in range(0, n, size):
        rows = list(range(start, min(start + size, n)))
        yield start, rows + [rows[-1]] * (size - len(rows)), len(rows)


def _sample(pipe, args, prompts, inpaint_files, init, out, log) -> dict:
    """Samples chunk by chunk, writing each chunk's PNGs as soon as it is done."""
    import jax

    from sample import images as image_io

    rows = [p for p in prompts for _ in range(args.batch_size)]
    progress, close_bars = _progress_bars(args.quiet or jax.process_index() != 0)
    options = dict(seed=args.seed, guidance=args.guidance, guidance_scale=args.guidance_scale,
                   clip_guidance_scale=args.clip_guidance_scale, sampler=args.sampler,
                   steps=args.steps if args.steps is not None else args.respacing, eta=args.eta,
                   upsample=args.upsample, upsample_steps=args.upsample_steps, upsample_sampler=args.upsample_sampler,
                   upsample_start=args.upsample_start, upsample_temp=args.upsample_temp,
                   negative_prompt=args.negative_prompt, progress=progress,
                   **({} if init is None else dict(init_image=init, strength=args.strength)),
                   warn=lambda message: log(f"warning: {message}", err=True))
    pixels, files = [], []
    for start, chunk, kept in _chunks(len(rows), args.max_batch):
        texts = [rows[i] for i in chunk]
        if inpaint_files is not None:
            result = pipe.inpaint(texts, inpaint_files[0], inpaint_files[1], first_index=start, **options)
        else:
            result = pipe(texts, first_index=start, **options)
        close_bars()
        for stage, timing in result.timings.items():
            _report(log, stage, timing, _stage_detail(stage, result.settings))
        for i in range(kept):
            if (start + i) % jax.process_count() == jax.process_index():
                path = out / f"{start + i:04d}.png"
                image_io.save_png(path, result.arrays[i], metadata=result.metadata(i))
                files.append(str(path))
        pixels.append(result.arrays[:kept])
    pixels = np.concatenate(pixels)
    if _is_primary():
        image_io.save_png(out / "grid.png", image_io.make_grid(pixels, columns=args.batch_size))
    return {"images": files, "grid": str(out / "grid.png"), "settings": result.settings,
            "prompts": prompts, "images_per_prompt": args.batch_size, "seed": args.seed}


def _stage_detail(stage: str, settings: dict) -> str:
    if stage == "base":
        return f"{settings['guidance']} guidance, {settings['sampler']}, steps {settings['steps']}"
    return (f"{settings['upsample_sampler']}, steps {settings['upsample_steps']} from t={settings['upsample_start']}, "
            f"temp {settings['upsample_temp']}")


def _is_primary() -> bool:
    from glide_jax import parallel

    return parallel.is_primary()


def run(args, log):
    from glide_jax import paths
    from glide_jax.pipeline import Pipeline
    from sample import images as image_io

    _check_args(args)
    prompts = _prompts(args)
    inpainting = args.inpaint_image is not None
    inpaint_files = image_io.load_inpaint_inputs(args.inpaint_image, args.inpaint_mask) if inpainting else None
    init = image_io.open_image(args.init_image, "--init-image") if args.init_image else None
    source = args.checkpoint_dir or args.model
    pipe = Pipeline(source, dtype=args.dtype, vocab_dir=args.vocab_dir, compile_cache=args.compile_cache)
    _apply_defaults(args, pipe.defaults)
    _respacings(args)
    log(f"models: {'bundled demo models in ' + str(pipe.directory) if args.model == 'demo' else 'GLIDE'}; "
        f"{len(pipe.mesh.devices.flat)} device(s)")
    # Loaded before the output directory is made, so missing weights leave nothing behind.
    pipe.model("base-inpaint" if inpainting else "base")
    if args.upsample:
        pipe.model("upsample-inpaint" if inpainting and pipe.has_model("upsample-inpaint") else "upsample")
    if args.guidance == "clip":
        pipe.model("clip")
    out = paths.absolute(args.out)
    _writable(out)
    summary = _sample(pipe, args, prompts, inpaint_files, init, out, log)
    log(f"wrote {len(prompts) * args.batch_size} image(s) and grid.png to {out}")
    if args.json:
        import json

        print(json.dumps(summary, default=str))
    return out


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the user's input (files, options, weights) is wrong, not the program."""
    from glide_jax.checkpoint import CheckpointError
    from glide_jax.config import ConfigError
    from glide_jax.download import DownloadError
    from glide_jax.images import ImageInputError
    from glide_jax.pipeline import PipelineError
    from glide_jax.pt_reader import PtFormatError
    from glide_jax.weights import WeightsError

    return (ConfigError, PipelineError, ImageInputError, WeightsError, CheckpointError, DownloadError,
            PtFormatError, FileNotFoundError)


def bad_input_message(err: Exception) -> str | None:
    """The one-line `error:` report for an error that means the user's input is wrong (which a CLI
    then exits with EXIT_BAD_INPUT), or None for a program error."""
    if isinstance(err, InputError):
        return f"error: {err}"
    if isinstance(err, _bad_input_errors()):
        return f"error: {' '.join(str(err).split())}"
    return None


def handle_error(err: Exception, program: str) -> int:
    """The exit code for an error that reached a CLI's top level, after its one line on stderr."""
    from glide_jax.errors import report_bug

    message = bad_input_message(err)
    if message is None:
        return report_bug(err, program)
    print(message, file=sys.stderr)
    return EXIT_BAD_INPUT


def _fast_compile_for_demo(args) -> None:
    """For a single demo image, XLA's compile time dominates the run: without LLVM's optimisation
    passes the stages compile in about half the time, and the ~2x slower steps cost less than that
    over one image's steps. Beyond one image the trade turns: at level 0 every step costs about twice
    the CPU time per image at every batch size (bench/bench_batching.py), so a batch runs with full
    optimisation (and the compile cache pays its compile once). GLIDE's models keep it always.
    Takes effect only before jax is first imported (a fresh `python -m sample.generate`)."""
    import os

    model = args.model or ("glide" if args.checkpoint_dir else "demo")
    flags = os.environ.get("XLA_FLAGS", "")
    try:
        images = len(_prompts(args)) * args.batch_size
    except InputError:
        return   # run() reports it
    if model == "demo" and images == 1 and "jax" not in sys.modules and "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()


def _matmul_precision(precision: str | None):
    """The scope in which the samplers are traced: XLA fixes a program's matmul precision when it
    is compiled, so this covers every jitted loop of the run."""
    import contextlib

    import jax

    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def main(argv=None) -> int:
    json_output = False

    def log(message, err=False):
        import jax

        if err or jax.process_index() == 0:
            print(message, file=sys.stderr if (err or json_output) else sys.stdout, flush=True)

    try:
        args = _parse_args(argv)
        json_output = args.json
        _fast_compile_for_demo(args)
        from glide_jax import parallel
        # Must run before anything touches a device.
        parallel.initialize_distributed()
        with _matmul_precision(args.matmul_precision):
            run(args, log)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- the one place every error of a run is reported
        return handle_error(err, "sample.generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
