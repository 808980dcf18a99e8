"""Compiled samplers (ancestral DDPM and DDIM), classifier-free guidance and inpainting.

Each sampler is the whole reverse process as one `lax.scan`, so under `jax.jit` the model is
traced once and XLA sees a single while loop instead of one dispatch per step. Randomness comes
from an explicit key: the initial x_T from one half of `key`, and step i's noise from
`fold_in(other half, i)`, so a run is reproducible from its key alone.

The model is a function `model_fn(x_t, timesteps) -> (B, H, W, 6)` that receives the
*original* timesteps (int32, shape (B,)) of the respaced process, as the reference's
`_WrappedModel` passes them (GLIDE does not rescale timesteps to [0, 1000)).

Parameters must reach the compiled program as arguments, never as constants baked into it
(a 385M-parameter model would otherwise be embedded in the executable). Build `model_fn` as a
closure over params *inside* the jitted function:

    >>> @functools.partial(jax.jit, static_argnames=("diffusion",))
    ... def generate(params, tokens, mask, key, guidance_scale, diffusion):
    ...     def model_fn(x_t, timesteps):
    ...         return model.apply({"params": params}, x_t, timesteps, tokens, mask)
    ...     guided = classifier_free_guidance(model_fn, guidance_scale)
    ...     return ddim_sample(guided, diffusion, (tokens.shape[0], 64, 64, 3), key)
    >>> # tokens: [cond prompts | empty prompts]; the first half of the result are the images.
    >>> images = generate(params, tokens, mask, jax.random.key(0), 3.0, diffusion)

`guidance_scale` is traced there, so changing it does not recompile.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from glide_jax.diffusion import GaussianDiffusion

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_shapes(shape, noise, step_noise, num_steps):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"sample shape must be (B, H, W, C), got {shape}")
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected the sample shape {shape}")
    if step_noise is not None and tuple(step_noise.shape) != (num_steps,) + shape:
        raise ValueError(
            f"step_noise has shape {tuple(step_noise.shape)}, expected {(num_steps,) + shape} "
            f"(one draw per step of the {num_steps}-step diffusion, in sampling order)")
    return shape


def _run(step, diffusion, shape, key, noise, step_noise, return_trajectory, needs_noise):
    """Scan `step(x, t, noise) -> x` over t = T-1 .. 0 starting from x_T."""
    num_steps = diffusion.num_timesteps
    shape = _check_shapes(shape, noise, step_noise, num_steps)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, jnp.float32) if noise is None else jnp.asarray(noise, jnp.float32)

    def body(x, inputs):
        i, injected = inputs
        t = num_steps - 1 - i
        if injected is not None:
            z = injected.astype(jnp.float32)
        elif needs_noise:
            z = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
        else:
            z = None
        x = step(x, t, z)
        return x, (x if return_trajectory else None)

    x, trajectory = jax.lax.scan(body, x, (jnp.arange(num_steps, dtype=jnp.int32), step_noise))
    return (x, trajectory) if return_trajectory else x


def _model_at(model_fn, diffusion, x, t):
    timesteps = jnp.full((x.shape[0],), diffusion.original_timesteps(t), jnp.int32)
    return model_fn(x, timesteps), timesteps


def ddpm_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, shape, key, *, noise=None,
                step_noise=None, clip_denoised: bool = True, denoised_fn=None, cond_fn=None,
                return_trajectory: bool = False):
    """Ancestral sampling: x_{t-1} = mean + exp(log_variance / 2) · z, no noise at t = 0.

    `noise` is x_T (else drawn from `key`); `step_noise` (S, B, H, W, C) replaces the per-step
    draws, step i (sampling order, t = S-1-i) using `step_noise[i]`. `denoised_fn` acts on each
    x_0 prediction before clipping; `cond_fn(x_t, original_timesteps)` returns ∇log p(y|x_t),
    which shifts the mean by variance · gradient. Returns the final sample, and with
    `return_trajectory` also the sample after every step, (S, B, H, W, C).
    """
    def step(x, t, z):
        model_output, timesteps = _model_at(model_fn, diffusion, x, t)
        out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised,
                                        denoised_fn=denoised_fn)
        mean = out.mean
        if cond_fn is not None:
            mean = diffusion.condition_mean(out, cond_fn(x, timesteps))
        return mean + jnp.where(t > 0, 1.0, 0.0) * jnp.exp(0.5 * out.log_variance) * z

    return _run(step, diffusion, shape, key, noise, step_noise, return_trajectory, needs_noise=True)


def ddim_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, shape, key, *, noise=None,
                step_noise=None, clip_denoised: bool = True, denoised_fn=None, cond_fn=None,
                eta=0.0, return_trajectory: bool = False):
    """DDIM sampling (Song et al., eq. 12), deterministic for `eta = 0`.

    Arguments as `ddpm_sample`; `cond_fn`'s gradient shifts the predicted eps (score
    conditioning) instead of the mean. `eta` may be traced; when it is the Python number 0 no
    per-step noise is drawn, since it would be multiplied by zero.
    """
    needs_noise = not (isinstance(eta, (int, float)) and eta == 0)

    def step(x, t, z):
        model_output, timesteps = _model_at(model_fn, diffusion, x, t)
        out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised,
                                        denoised_fn=denoised_fn)
        if cond_fn is not None:
            out = diffusion.condition_score(out, x, t, cond_fn(x, timesteps))
        alpha_bar = diffusion.extract(diffusion.alphas_cumprod, t, x.ndim)
        alpha_bar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x.ndim)
        sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
        x_prev = out.pred_xstart * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * out.eps
        if z is not None:
            x_prev = x_prev + jnp.where(t > 0, 1.0, 0.0) * sigma * z
        return x_prev

    return _run(step, diffusion, shape, key, noise, step_noise, return_trajectory, needs_noise)


def classifier_free_guidance(model_fn: ModelFn, guidance_scale) -> ModelFn:
    """Wrap `model_fn` for classifier-free guidance over a [conditional | unconditional] batch.

    The caller's conditioning (tokens, mask) covers the whole batch: the first half
    conditional, the second half unconditional (e.g. the empty prompt). Both halves of x_t are
    kept equal: the model runs on [x_half, x_half], the guided mean prediction
    uncond + s · (cond − uncond) is returned for both halves, and the variance channels pass
    through unchanged. The mix means the same for eps and v models (see glide_jax.diffusion).
    `guidance_scale` may be a traced scalar.
    """
    def guided(x_t, timesteps):
        batch = x_t.shape[0]
        if batch % 2:
            raise ValueError(
                f"classifier-free guidance needs an even batch ([conditional | unconditional]), got {batch}")
        half = x_t[: batch // 2]
        output = model_fn(jnp.concatenate([half, half], axis=0), timesteps)
        channels = x_t.shape[-1]
        prediction, rest = output[..., :channels], output[..., channels:]
        cond, uncond = jnp.split(prediction, 2, axis=0)
        guided_half = uncond + jnp.asarray(guidance_scale, prediction.dtype) * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([guided_half, guided_half], axis=0), rest], axis=-1)

    return guided


def inpaint_denoised_fn(image, mask) -> Callable[[jax.Array], jax.Array]:
    """A `denoised_fn` that forces the known region into each x_0 prediction.

    `image` (B, H, W, C) in [-1, 1] and `mask` (B, H, W, 1), 1 where the image is known:
    x_0 ← x_0 · (1 − mask) + image · mask.
    """
    if image.ndim != 4 or mask.ndim != 4 or mask.shape[-1] != 1 or mask.shape[:3] != image.shape[:3]:
        raise ValueError(
            f"inpainting expects image (B, H, W, C) and mask (B, H, W, 1) with matching B, H, W; "
            f"got image {tuple(image.shape)} and mask {tuple(mask.shape)}")

    def denoised_fn(pred_xstart):
        return pred_xstart * (1 - mask) + image * mask

    return denoised_fn
