"""Sampling stages, the compiled programs under `glide_jax.Pipeline`: tokens → text encoder
(once) → compiled sampling loop → images.

Each stage (`sample_base`, `sample_upsample`, `sample_clip_guided`) is one compiled program:
params, tokens, keys and guidance scales enter as arguments; inside it the text encoder runs once
per example, before the `lax.scan` of the sampler, and every step runs only the U-Net. Changing a
scale, the seed or the prompts reuses the compiled program; changing shapes, the diffusion, the
sampler or the device mesh compiles a new one.

Per-example semantics. The program is written for ONE example and `vmap`ped over the batch, so
image i depends only on its own inputs and on `fold_in(key, index_i)` (x_T, and every step's
noise in ancestral or eta > 0 sampling), where `index_i = first_index + i`. Batch size, padding
and device count therefore do not change image i (up to float reassociation in batched kernels).
With classifier-free guidance each example runs the model on the pair [x | x] with
[its tokens | the empty prompt], so conditional and unconditional rows of one image are never
split across devices, however the batch is sharded: the reference's [cond | uncond] halves are
this same computation with the batch axis laid out the other way round.

Devices. The batch axis is sharded over every device of a `parallel.make_mesh` mesh with
`NamedSharding`, the params replicated, and the program compiled once with `jit`: XLA's
partitioner splits the vmapped work so each device samples its own examples, and the identical
program runs on 1 device, 8, or several hosts. `pmap` would need a per-device leading axis and
per-device param copies managed by hand; `shard_map` buys nothing here since sampling needs no
collective at all. Batches that do not divide the device count are padded by repeating the last
example (same index, so the same image) and the padding is dropped afterwards.

Precision: `dtype="bfloat16"` computes the U-Net (and CLIP) in bfloat16; params stay float32 in
memory and are cast per layer by Flax, and the sampler state, the diffusion maths and the model's
output head stay float32 (the output head runs in float32 inside the U-Net). That keeps the
per-step update as precise as the float32 run; only the network activations are rounded.

Results are numpy arrays (n, H, W, 3) in [-1, 1] on every process; in a multi-host run each
process fills only the input shards of its own devices (`parallel.place`) and gathers the images
at the end, so the CLI can let each host write its own share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from glide_jax import clip as clip_lib
from glide_jax import parallel, xla_options
from glide_jax.config import ModelConfig
from glide_jax.diffusion import GaussianDiffusion
from glide_jax.layers import resize_bilinear
from glide_jax.sampling import (SAMPLERS, classifier_free_guidance, ddim_sample, ddpm_sample,
                                dpm_solver_pp_sample, inpaint_denoised_fn)
from glide_jax.unet import GlideUNet

__all__ = ["SAMPLERS", "DTYPES", "PipelineError", "StageTiming", "prepare_params", "quantize_8bit",
           "sample_base", "sample_upsample", "sample_clip_guided", "to_uint8", "compiled_programs",
           "reporting_progress"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class PipelineError(ValueError):
    """Inputs to a sampling stage are inconsistent; the message names the argument."""


@dataclasses.dataclass
class StageTiming:
    """What a stage cost: compile time (0 when the program was cached), run time, steps."""
    compile_s: float = 0.0
    run_s: float = 0.0
    steps: int = 0
    batch: int = 0
    cached: bool = False

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.run_s if self.run_s > 0 else float("inf")


# -- the per-example program ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a stage: it selects (and keys) the compiled program."""
    config: ModelConfig
    dtype: str
    diffusion: GaussianDiffusion
    sampler: str
    guidance: str  # "none" | "cfg" | "clip"
    stochastic_ddim: bool
    super_res: bool
    inpaint: bool
    clip_config: clip_lib.ClipConfig | None = None
    clip_dtype: str = "float32"
    progress: bool = False


def _program(spec: _Spec, params, batch, scalars, clip_params):
    """The whole stage for the (sharded) batch: vmap of the one-example sampler."""
    model = GlideUNet(spec.config, DTYPES[spec.dtype])
    variables = {"params": params}
    base_key = jax.random.wrap_key_data(scalars["key"])
    size = spec.config.image_size
    shape = (1, size, size, 3)

    def one(example):
        key = jax.random.fold_in(base_key, example["index"])
        noise_key, loop_key = jax.random.split(key)
        if "noise" in example:
            x_T = example["noise"][None]
        else:
            x_T = jax.random.normal(noise_key, shape, jnp.float32) * scalars["temp"]

        rows = 2 if spec.guidance == "cfg" else 1
        x_T, conditioning = _start_and_conditioning(spec, example, x_T, rows)

        text = None
        if spec.config.has_text:
            tokens, mask = example["tokens"][None], example["mask"][None]
            if spec.guidance == "cfg":
                tokens = jnp.concatenate([tokens, example["uncond_tokens"][None]], 0)
                mask = jnp.concatenate([mask, example["uncond_mask"][None]], 0)
            # Once per example, outside the scan: each step reuses these features.
            text = model.apply(variables, tokens, mask, method=GlideUNet.encode_text)

        def model_fn(x_t, timesteps):
            return model.apply(variables, x_t, timesteps, text, method=GlideUNet.denoise, **conditioning)

        if spec.guidance == "cfg":
            paired = classifier_free_guidance(model_fn, scalars["guidance_scale"])

            # The sampler state is only the conditional x: the reference's unconditional half of
            # x_t is never read (the model runs on [half, half]), so it is not carried at all.
            def guided_fn(x_t, timesteps):
                both = paired(jnp.concatenate([x_t, x_t], 0), jnp.concatenate([timesteps, timesteps], 0))
                return both[:1]
        else:
            guided_fn = model_fn
        if spec.progress:
            guided_fn = _reporting_steps(guided_fn)

        denoised_fn = None
        if spec.inpaint:
            denoised_fn = inpaint_denoised_fn(example["inpaint_image"][None], example["inpaint_mask"][None])
        cond_fn = None
        if spec.guidance == "clip":
            # The CLIP text embedding is computed once per example, before the loop.
            text_embedding = clip_lib.encode_text(clip_params, spec.clip_config, example["clip_tokens"][None],
                                                  example["clip_text_len"][None], dtype=spec.clip_dtype)
            cond_fn = clip_lib.clip_cond_fn(clip_params, spec.clip_config, text_embedding,
                                            scalars["clip_guidance_scale"], dtype=spec.clip_dtype)

        x0 = _sample_loop(spec, guided_fn, x_T, loop_key, example, scalars, denoised_fn, cond_fn)
        return x0[0]

    return jax.vmap(one)(batch)  # [B, H, W, 3]


def _start_and_conditioning(spec: _Spec, example, x_T, rows: int):
    """The chain's first state and the model's image inputs, repeated for the `rows` of one
    example (2 under classifier-free guidance)."""
    size = spec.config.image_size
    conditioning = {}
    if spec.super_res:
        low_res = _to_unit_range(example["low_res"])[None]
        conditioning["low_res"] = jnp.repeat(low_res, rows, 0)
        if not spec.diffusion.starts_from_noise:
            # A truncated chain starts from the upsampled input noised to its first step.
            top = spec.diffusion.alphas_cumprod[-1]
            x_T = np.sqrt(top) * resize_bilinear(low_res, size, size) + np.sqrt(1.0 - top) * x_T
    elif not spec.diffusion.starts_from_noise:
        # img2img (SDEdit): the base's truncated chain starts from the given image noised to it.
        top = spec.diffusion.alphas_cumprod[-1]
        x_T = np.sqrt(top) * example["init_image"][None] + np.sqrt(1.0 - top) * x_T
    if spec.inpaint:
        conditioning["inpaint_image"] = jnp.repeat(example["inpaint_image"][None], rows, 0)
        conditioning["inpaint_mask"] = jnp.repeat(example["inpaint_mask"][None], rows, 0)
    return x_T, conditioning


def _sample_loop(spec: _Spec, guided_fn, x_T, loop_key, example, scalars, denoised_fn, cond_fn):
    """The sampler the spec names, as one `lax.scan` from x_T."""
    shape = x_T.shape
    step_noise = example["step_noise"][:, None] if "step_noise" in example else None
    common = dict(noise=x_T, step_noise=step_noise, clip_denoised=True, denoised_fn=denoised_fn, cond_fn=cond_fn)
    if spec.sampler == "ddim":
        eta = scalars["eta"] if spec.stochastic_ddim else 0.0
        return ddim_sample(guided_fn, spec.diffusion, shape, loop_key, eta=eta, **common)
    if spec.sampler == "dpm++2m-sde":
        return dpm_solver_pp_sample(guided_fn, spec.diffusion, shape, loop_key, stochastic=True, **common)
    if spec.sampler in ("dpm++2m", "dpm++2s"):
        # Deterministic: no per-step noise to take.
        return dpm_solver_pp_sample(guided_fn, spec.diffusion, shape, loop_key, noise=x_T, clip_denoised=True,
                                    denoised_fn=denoised_fn, cond_fn=cond_fn, multistep=spec.sampler == "dpm++2m")
    return ddpm_sample(guided_fn, spec.diffusion, shape, loop_key, **common)


def _reporting_steps(model_fn):
    """`model_fn` that tells the host which timestep it is at: every sampler calls the model once
    per step, so this reports progress from inside the compiled loop whatever the sampler. The
    timesteps come from the loop counter alone (never batched under vmap), so the callback fires
    once per step and device rather than once per example."""
    def reporting(x_t, timesteps):
        jax.debug.callback(_step_reached, timesteps[0])
        return model_fn(x_t, timesteps)
    return reporting


# Where `_step_reached` sends the timesteps of the stage now running: set by `reporting_progress`.
# One function object for every program, so a compiled program with progress is reused across calls
# whatever the callback.
_progress_sink: list = []


def _step_reached(timestep) -> None:
    if _progress_sink:
        _progress_sink[-1](int(timestep))


@contextlib.contextmanager
def reporting_progress(on_timestep: Callable[[int], None]) -> Iterator[None]:
    """Within this block, stages sampled with `progress=True` call `on_timestep(t)` with the
    original timestep of each step as the compiled loop reaches it (once per device)."""
    _progress_sink.append(on_timestep)
    try:
        yield
    finally:
        _progress_sink.pop()


def _to_unit_range(low_res):
    """The upsampler's input as the reference's cascade makes it: 8-bit values in [-1, 1]."""
    if jnp.issubdtype(low_res.dtype, jnp.integer):
        return low_res.astype(jnp.float32) / 127.5 - 1
    return quantize_8bit(low_res)


def quantize_8bit(images):
    """Rounds [-1, 1] images to the 256 levels an 8-bit PNG holds, staying in [-1, 1]."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1) * 127.5), 0, 255) / 127.5 - 1


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images → uint8, rounded as the reference's notebooks display them."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


# -- compilation and placement ----------------------------------------------------------------------

# (spec, argument layout) → compiled executable. An explicit cache rather than jit's own so that
# compile time can be reported separately from run time.
_COMPILED: dict[Any, Any] = {}


def compiled_programs() -> int:
    """How many stage programs have been compiled in this process (for tests and diagnostics)."""
    return len(_COMPILED)


def _layout(tree) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((leaf.shape, leaf.dtype, leaf.sharding) for leaf in leaves)


def _run_program(spec: _Spec, args: tuple, mesh: Mesh, timing: StageTiming | None) -> jax.Array:
    cache_key = (spec, _layout(args))
    compiled = _COMPILED.get(cache_key)
    start = time.perf_counter()
    cached = compiled is not None
    if compiled is None:
        fn = jax.jit(lambda *a: _program(spec, *a), out_shardings=parallel.batch_sharding(mesh))
        options = xla_options.compiler_options(mesh.devices.flat)
        compiled = _COMPILED[cache_key] = fn.lower(*args).compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    images = compiled(*args)
    images.block_until_ready()
    if timing is not None:
        timing.compile_s, timing.run_s, timing.cached = (0.0 if cached else compile_s), time.perf_counter() - start, cached
        timing.steps = spec.diffusion.num_timesteps
        timing.batch = int(images.shape[0])
    return images


def prepare_params(params, mesh: Mesh | None = None):
    """Params replicated on every device of `mesh` (all devices when None).

    Do this once and pass the result to every stage call; params already placed so are kept.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    target = parallel.replicated_sharding(mesh)
    leaves = jax.tree.leaves(params)
    if leaves and all(isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(target, leaf.ndim)
                      for leaf in leaves):
        return params
    if jax.process_count() == 1:
        return jax.device_put(params, target)
    return parallel.replicate(params, mesh)


def _host(value, name: str) -> np.ndarray:
    if isinstance(value, jax.Array):
        value = parallel.to_host(value)
    try:
        return np.asarray(value)
    except Exception as err:
        raise PipelineError(f"{name}: not an array ({err})") from None


def _check_rows(batch: Mapping[str, np.ndarray]) -> int:
    sizes = {name: int(v.shape[0]) for name, v in batch.items() if v.ndim}
    if len(set(sizes.values())) != 1:
        raise PipelineError(f"inputs disagree on the batch size: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise PipelineError("the batch is empty (0 examples)")
    return n


def _execute(spec: _Spec, params, batch: dict, scalars: dict, clip_params, key, first_index: int,
             mesh: Mesh | None, timing: StageTiming | None) -> np.ndarray:
    mesh = parallel.make_mesh() if mesh is None else mesh
    n = _check_rows(batch)
    if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise PipelineError(f"first_index must be a non-negative integer, got {first_index!r}")
    batch = dict(batch, index=np.arange(first_index, first_index + n, dtype=np.uint32))
    padded, _ = parallel.pad_batch(batch, parallel.num_batch_shards(mesh))
    sharded = parallel.place(padded, {name: parallel.batch_sharding(mesh) for name in padded})
    key = jnp.asarray(key)
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if key_data.shape != (2,) or key_data.dtype != jnp.uint32:
        raise PipelineError(f"key must be a single jax.random.key / PRNGKey, got shape {key_data.shape} "
                            f"dtype {key_data.dtype}")
    scalars = dict(scalars, key=np.asarray(key_data))
    scalars = parallel.replicate({k: np.asarray(v) for k, v in scalars.items()}, mesh)
    params = prepare_params(params, mesh)
    if clip_params is not None:
        clip_params = prepare_params(clip_params, mesh)
    images = _run_program(spec, (params, sharded, scalars, clip_params), mesh, timing)
    return parallel.to_host(images)[:n]


# -- argument checks -------------------------------------------------------------------------------


def _check_model(config, diffusion, sampler, dtype, *, super_res: bool, init_image=None) -> None:
    if not isinstance(config, ModelConfig):
        raise PipelineError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.super_res != super_res:
        kind = "super-resolution" if config.super_res else "base"
        raise PipelineError(f"this stage needs a {'super-resolution' if super_res else 'base'} model, "
                            f"got a {kind} model config")
    if not isinstance(diffusion, GaussianDiffusion):
        raise PipelineError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")
    if not super_res and (init_image is None) != diffusion.starts_from_noise:
        if init_image is None:
            raise PipelineError(f"the diffusion starts at timestep {diffusion.start_step}, not from pure noise "
                                f"(start_step): pass init_image, the image it starts from (img2img)")
        raise PipelineError("init_image needs a truncated diffusion (GaussianDiffusion.create(..., start_step=t)) "
                            "to say how far to noise it")
    if sampler not in SAMPLERS:
        raise PipelineError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if dtype not in DTYPES:
        raise PipelineError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")


def _check_scalar(name: str, value, *, low: float = 0.0, positive: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(value) or value < low or (positive and value <= 0):
        raise PipelineError(f"{name} must be a finite number {'>' if positive else '>='} {low}, got {value}")
    return value


def _text_inputs(config: ModelConfig, tokens, mask, batch: dict) -> None:
    if not config.has_text:
        if tokens is not None:
            raise PipelineError("this model has no text encoder; pass tokens=None")
        return
    if tokens is None or mask is None:
        raise PipelineError("this model is text-conditional: tokens and mask are required")
    tokens, mask = _host(tokens, "tokens"), _host(mask, "mask")
    if tokens.ndim != 2 or tokens.shape[1] != config.text_ctx or mask.shape != tokens.shape:
        raise PipelineError(f"tokens and mask must both be (B, text_ctx={config.text_ctx}), got "
                            f"{tokens.shape} and {mask.shape}")
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= config.n_vocab:
        raise PipelineError(f"token ids must lie in [0, {config.n_vocab}), got "
                            f"[{tokens.min()}, {tokens.max()}]")
    batch["tokens"], batch["mask"] = tokens.astype(np.int32), mask.astype(bool)


def _inpaint_inputs(config: ModelConfig, inpaint_image, inpaint_mask, batch: dict) -> None:
    if (inpaint_image is None) != (inpaint_mask is None):
        raise PipelineError("inpainting needs both inpaint_image and inpaint_mask")
    if inpaint_image is None:
        if config.inpaint:
            raise PipelineError("this is an inpainting model: pass inpaint_image and inpaint_mask")
        return
    if not config.inpaint:
        raise PipelineError("inpaint_image/inpaint_mask given, but this model is not an inpainting model")
    size = config.image_size
    image, mask = _host(inpaint_image, "inpaint_image"), _host(inpaint_mask, "inpaint_mask")
    if image.ndim != 4 or image.shape[1:] != (size, size, 3):
        raise PipelineError(f"inpaint_image must be (B, {size}, {size}, 3), got {image.shape}")
    if mask.shape != image.shape[:3] + (1,):
        raise PipelineError(f"inpaint_mask must be (B, {size}, {size}, 1) like the image, got {mask.shape}")
    batch["inpaint_image"] = image.astype(np.float32)
    batch["inpaint_mask"] = mask.astype(np.float32)


def _init_inputs(config: ModelConfig, init_image, batch: dict) -> None:
    if init_image is None:
        return
    size = config.image_size
    image = _host(init_image, "init_image")
    if image.ndim != 4 or image.shape[1:] != (size, size, 3):
        raise PipelineError(f"init_image must be (B, {size}, {size}, 3) in [-1, 1], got {image.shape}")
    if not np.isfinite(image).all():
        raise PipelineError("init_image holds NaN or infinite values")
    batch["init_image"] = image.astype(np.float32)


def _noise_inputs(config: ModelConfig, diffusion: GaussianDiffusion, noise, step_noise, batch):
    size = config.image_size
    if noise is not None:
        noise = _host(noise, "noise")
        if noise.ndim != 4 or noise.shape[1:] != (size, size, 3):
            raise PipelineError(f"noise must be (B, {size}, {size}, 3), got {noise.shape}")
        batch["noise"] = noise.astype(np.float32)
    if step_noise is not None:
        step_noise = _host(step_noise, "step_noise")
        expected = (diffusion.num_timesteps,)
        if step_noise.ndim != 5 or step_noise.shape[0] != expected[0] or step_noise.shape[2:] != (size, size, 3):
            raise PipelineError(f"step_noise must be (steps={expected[0]}, B, {size}, {size}, 3), "
                                f"got {step_noise.shape}")
        # Stored per example, (B, S, H, W, C), so the batch axis leads like every other input.
        batch["step_noise"] = np.moveaxis(step_noise, 0, 1).astype(np.float32)


def _uncond_inputs(config: ModelConfig, uncond_tokens, uncond_mask, batch: dict) -> None:
    """The unconditional row of classifier-free guidance, one per example: the empty prompt padded
    (the reference's; pad token = the end token) unless `uncond_tokens`/`uncond_mask` say otherwise,
    as (text_ctx,) for every example or (B, text_ctx) per example (a negative prompt each)."""
    n = batch["tokens"].shape[0]
    if (uncond_tokens is None) != (uncond_mask is None):
        raise PipelineError("uncond_tokens and uncond_mask go together")
    if uncond_tokens is None:
        uncond_tokens = np.full((config.text_ctx,), config.n_vocab - 1, np.int32)
        uncond_mask = np.zeros((config.text_ctx,), bool)
    uncond_tokens, uncond_mask = _host(uncond_tokens, "uncond_tokens"), _host(uncond_mask, "uncond_mask")
    if uncond_tokens.shape[-1:] != (config.text_ctx,) or uncond_tokens.shape not in ((config.text_ctx,), (n, config.text_ctx)) \
            or uncond_mask.shape != uncond_tokens.shape:
        raise PipelineError(f"uncond_tokens/uncond_mask must be ({config.text_ctx},) or ({n}, {config.text_ctx}), "
                            f"got {uncond_tokens.shape} and {uncond_mask.shape}")
    if uncond_tokens.min(initial=0) < 0 or uncond_tokens.max(initial=0) >= config.n_vocab:
        raise PipelineError(f"uncond token ids must lie in [0, {config.n_vocab})")
    shape = (n, config.text_ctx)
    batch["uncond_tokens"] = np.broadcast_to(uncond_tokens.astype(np.int32), shape).copy()
    batch["uncond_mask"] = np.broadcast_to(uncond_mask.astype(bool), shape).copy()


# -- stages --------------------------------------------------------------------------------------


def sample_base(config: ModelConfig, params, tokens, mask, key, *, diffusion: GaussianDiffusion,
                guidance_scale: float | None = 3.0, sampler: str = "ddpm", eta: float = 0.0,
                dtype: str = "float32", mesh: Mesh | None = None, inpaint_image=None, inpaint_mask=None,
                noise=None, step_noise=None, uncond_tokens=None, uncond_mask=None, first_index: int = 0,
                timing: StageTiming | None = None, progress: bool = False, init_image=None) -> np.ndarray:
    """Text → 64×64 images (B, H, W, 3) in [-1, 1] with the base (or base-inpaint) model.

    `tokens`/`mask` (B, text_ctx) are one row per image. `guidance_scale` is the classifier-free
    scale (traced: changing it does not recompile); None samples the conditional model alone.
    The unconditional prompt is the empty prompt padded, unless `uncond_tokens`/`uncond_mask` say
    otherwise. `inpaint_image` (B, H, W, 3) in [-1, 1] and `inpaint_mask`
    (B, H, W, 1), 1 = known, are fed to the model and forced into every x_0 prediction.
    `noise` (B, H, W, 3) replaces x_T and `step_noise` (S, B, H, W, 3) the per-step draws
    (otherwise both come from `fold_in(key, first_index + i)`). `timing`, when given, is filled in.
    `uncond_tokens`/`uncond_mask` may also be (B, text_ctx): a negative prompt per image. With
    `progress`, each step reports itself to `reporting_progress` as the loop runs. `init_image`
    (B, H, W, 3) in [-1, 1] with a truncated `diffusion` (`start_step=t`) is img2img (SDEdit): x_T is
    that image noised to step t, sqrt(abar_t) * image + sqrt(1 - abar_t) * noise.
    """
    _check_model(config, diffusion, sampler, dtype, super_res=False, init_image=init_image)
    batch: dict = {}
    _text_inputs(config, tokens, mask, batch)
    _inpaint_inputs(config, inpaint_image, inpaint_mask, batch)
    _noise_inputs(config, diffusion, noise, step_noise, batch)
    _init_inputs(config, init_image, batch)
    if not batch:
        raise PipelineError("nothing gives the batch size: pass tokens (or noise for a text-free model)")
    scalars = {"temp": np.float32(1.0), "eta": np.float32(_check_scalar("eta", eta))}
    guidance = "none"
    if guidance_scale is not None:
        if not config.has_text:
            raise PipelineError("classifier-free guidance needs a text-conditional model")
        scalars["guidance_scale"] = np.float32(_check_scalar("guidance_scale", guidance_scale))
        _uncond_inputs(config, uncond_tokens, uncond_mask, batch)
        guidance = "cfg"
    spec = _Spec(config, dtype, diffusion, sampler, guidance, stochastic_ddim=float(eta) != 0,
                 super_res=False, inpaint=config.inpaint, progress=bool(progress))
    return _execute(spec, params, batch, scalars, None, key, first_index, mesh, timing)


def sample_upsample(config: ModelConfig, params, low_res, tokens, mask, key, *, diffusion: GaussianDiffusion,
                    temp: float = 0.997, sampler: str = "ddim", eta: float = 0.0, dtype: str = "float32",
                    mesh: Mesh | None = None, inpaint_image=None, inpaint_mask=None, noise=None,
                    step_noise=None, first_index: int = 0, timing: StageTiming | None = None,
                    progress: bool = False) -> np.ndarray:
    """Low-res images → the upsampler's resolution, (B, H, W, 3) in [-1, 1].

    `low_res` (B, h, w, 3) is uint8, or float in [-1, 1] which is first quantised to 8 bits as the
    reference's cascade does. x_T is Gaussian noise times `temp` (the reference's
    `upsample_temp`; a given `noise` is used as is). A truncated `diffusion`
    (`GaussianDiffusion.create(..., start_step=t)`) starts instead from the bilinearly upsampled
    input noised to step t with that noise, sqrt(abar_t) * up(low_res) + sqrt(1 - abar_t) * x_T:
    a small upsampler's predictions at the noisiest steps are its weakest. No guidance, as in the
    reference. Other arguments as `sample_base`.
    """
    _check_model(config, diffusion, sampler, dtype, super_res=True)
    temp = _check_scalar("temp", temp, positive=True)
    low = _host(low_res, "low_res")
    if low.ndim != 4 or low.shape[-1] != 3:
        raise PipelineError(f"low_res must be (B, h, w, 3), got {low.shape}")
    if not (np.issubdtype(low.dtype, np.floating) or low.dtype == np.uint8):
        raise PipelineError(f"low_res must be uint8 or float in [-1, 1], got {low.dtype}")
    batch: dict = {"low_res": low}
    _text_inputs(config, tokens, mask, batch)
    _inpaint_inputs(config, inpaint_image, inpaint_mask, batch)
    _noise_inputs(config, diffusion, noise, step_noise, batch)
    scalars = {"temp": np.float32(temp), "eta": np.float32(_check_scalar("eta", eta))}
    spec = _Spec(config, dtype, diffusion, sampler, "none", stochastic_ddim=float(eta) != 0,
                 super_res=True, inpaint=config.inpaint, progress=bool(progress))
    return _execute(spec, params, batch, scalars, None, key, first_index, mesh, timing)


def sample_clip_guided(config: ModelConfig, params, tokens, mask, clip_config: clip_lib.ClipConfig, clip_params,
                       clip_tokens, clip_text_len, key, *, diffusion: GaussianDiffusion,
                       clip_guidance_scale: float = 3.0, sampler: str = "ddpm", eta: float = 0.0,
                       dtype: str = "float32", mesh: Mesh | None = None, inpaint_image=None,
                       inpaint_mask=None, noise=None, step_noise=None, first_index: int = 0,
                       timing: StageTiming | None = None, progress: bool = False,
                       init_image=None) -> np.ndarray:
    """Text → images with the base model guided by the noised CLIP instead of classifier-free
    guidance. `clip_tokens` (B, max_text_len) and `clip_text_len` (B,) come from
    `ClipBPETokenizer.batch_padded_and_len`; the CLIP text embedding is computed once per example
    inside the program, and each step adds the scaled image-text similarity gradient (to the mean
    for DDPM, to eps for DDIM). Other arguments as `sample_base`.
    """
    _check_model(config, diffusion, sampler, dtype, super_res=False, init_image=init_image)
    if not isinstance(clip_config, clip_lib.ClipConfig):
        raise PipelineError(f"clip_config must be a ClipConfig, got {type(clip_config).__name__}")
    if config.image_size != clip_config.image_size:
        raise PipelineError(f"the CLIP sees {clip_config.image_size}px images but the model makes "
                            f"{config.image_size}px ones")
    if not isinstance(clip_params, Mapping) or not {"image_encoder", "text_encoder"} <= set(clip_params):
        raise PipelineError("clip_params must hold both 'image_encoder' and 'text_encoder'")
    batch: dict = {}
    _text_inputs(config, tokens, mask, batch)
    ctokens, clen = _host(clip_tokens, "clip_tokens"), _host(clip_text_len, "clip_text_len")
    if ctokens.ndim != 2 or ctokens.shape[1] != clip_config.max_text_len or clen.shape != ctokens.shape[:1]:
        raise PipelineError(f"clip_tokens must be (B, {clip_config.max_text_len}) and clip_text_len (B,), got "
                            f"{ctokens.shape} and {clen.shape}")
    if clen.min(initial=2) < 2 or clen.max(initial=2) > clip_config.max_text_len:
        raise PipelineError(f"clip_text_len must lie in [2, {clip_config.max_text_len}]")
    batch["clip_tokens"], batch["clip_text_len"] = ctokens.astype(np.int32), clen.astype(np.int32)
    _inpaint_inputs(config, inpaint_image, inpaint_mask, batch)
    _noise_inputs(config, diffusion, noise, step_noise, batch)
    _init_inputs(config, init_image, batch)
    scalars = {"temp": np.float32(1.0), "eta": np.float32(_check_scalar("eta", eta)),
               "clip_guidance_scale": np.float32(_check_scalar("clip_guidance_scale", clip_guidance_scale))}
    spec = _Spec(config, dtype, diffusion, sampler, "clip", stochastic_ddim=float(eta) != 0,
                 super_res=False, inpaint=config.inpaint, clip_config=clip_config, clip_dtype=dtype,
                 progress=bool(progress))
    return _execute(spec, params, batch, scalars, dict(clip_params), key, first_index, mesh, timing)
