"""Compiled samplers (ancestral DDPM, DDIM, DPM-Solver++), classifier-free guidance and inpainting.

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
import numpy as np

from glide_jax.diffusion import GaussianDiffusion

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

# The names a caller picks a sampler by ("dpm++2m": DPM-Solver++ multistep, "dpm++2s": single-step,
# "dpm++2m-sde": multistep on the reverse SDE, which draws fresh noise each step as DDPM does; all
# second order).
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2s", "dpm++2m-sde")


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


def _dpm_solver_pp_coefficients(diffusion: GaussianDiffusion, order: int, multistep: bool,
                                lower_order_final: bool, stochastic: bool = False) -> np.ndarray:
    """Per step i (sampling order, from index t = S-1-i), the weights (a, a_prev, b, b_prev, c) of
    x_next = a·x + a_prev·x_prev + b·x0 + b_prev·x0_prev + c·z, where x, x0 are this step's point
    and data prediction, x_prev, x0_prev the previous step's, z a fresh standard normal draw.
    Float64, shape (S, 5).

    Every DPM-Solver++ update (Lu et al. 2022, algorithms 1 and 2) is such a combination, so one
    scan body serves all variants and the log-SNR arithmetic happens here, in float64, once.
    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), the
    first-order step from s to t is x_t = sigma_t/sigma_s·x_s - alpha_t·expm1(-h)·x0_s
    (h = lambda_t - lambda_s): DDIM. Second order replaces x0_s by a combination of two
    predictions, r = ratio of the log-SNR spans:
    - 2M: D = (1 + 1/(2r))·x0_s - 1/(2r)·x0_{s+1}, r = (lambda_s - lambda_{s+1}) / h;
    - 2S: from anchor s over the kept index s-1 to s-2, the first step is first order to s-1 and
      the second uses D = (1 - 1/(2r))·x0_s + 1/(2r)·x0_{s-1}, r = (lambda_{s-1} - lambda_s) / h,
      applied to the anchor's x (x_prev there). Its midpoints are kept timesteps, because the
      model may only be called at the timesteps the diffusion keeps; with an odd number of spans
      the first one is a first-order step.
    The step from index 0 goes to the clean image (lambda = inf), where every order reduces to
    x_next = x0. With `lower_order_final`, 2M's step from index 1 to 0 is first order too (see
    `dpm_solver_pp_sample`).

    `stochastic` (2M only) solves the reverse SDE instead (Lu et al. 2022's SDE-DPM-Solver++,
    noise at the full DDPM level): the first-order step keeps e^-h of the ODE step's weight on
    x_s, gives x0_s the weight alpha_t·(1 - e^-2h) and adds sigma_t·sqrt(1 - e^-2h)·z, the exact
    solution for a constant x_0 prediction; 2M's correction is the same finite difference of the
    two x_0 predictions, with the SDE's weight. Only c depends on z, so z = 0 gives a valid (but
    not the ODE's) update.
    """
    if stochastic and not (multistep and order == 2):
        raise ValueError("the SDE variant of DPM-Solver++ is second order multistep (2M) only")
    alpha_bar = np.asarray(diffusion.alphas_cumprod, np.float64)
    alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    lam = np.log(alpha) - np.log(sigma)
    num_steps = diffusion.num_timesteps
    coefficients = np.zeros((num_steps, 5), np.float64)
    # 2S: with spans S-1 .. 0 grouped in pairs ending at index 0, index t starts a pair when t is
    # even, and is a pair's midpoint when t is odd and its pair's anchor t+1 exists.
    for i in range(num_steps):
        t = num_steps - 1 - i
        if t == 0:
            coefficients[i, 2] = 1.0
            continue
        h = lam[t - 1] - lam[t]
        # The first-order step's weights on x_s and x0_s, and the noise it adds (see above).
        if stochastic:
            keep, phi, c = np.exp(-h), -alpha[t - 1] * np.expm1(-2 * h), sigma[t - 1] * np.sqrt(-np.expm1(-2 * h))
        else:
            keep, phi, c = 1.0, -alpha[t - 1] * np.expm1(-h), 0.0
        a = sigma[t - 1] / sigma[t] * keep
        if order == 1 or i == 0 or (multistep and lower_order_final and t == 1):
            coefficients[i] = (a, 0.0, phi, 0.0, c)
        elif multistep:
            r = (lam[t] - lam[t + 1]) / h
            coefficients[i] = (a, 0.0, phi * (1 + 0.5 / r), -phi * 0.5 / r, c)
        elif t % 2 == 1:
            anchor = t + 1
            h = lam[t - 1] - lam[anchor]
            r = (lam[t] - lam[anchor]) / h
            phi = -alpha[t - 1] * np.expm1(-h)
            coefficients[i, :4] = (0.0, sigma[t - 1] / sigma[anchor], phi * 0.5 / r, phi * (1 - 0.5 / r))
        else:
            coefficients[i] = (a, 0.0, phi, 0.0, c)
    return coefficients


def dpm_solver_pp_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, shape, key, *, noise=None,
                         clip_denoised: bool = True, denoised_fn=None, cond_fn=None, order: int = 2,
                         multistep: bool = True, lower_order_final: bool = True, stochastic: bool = False,
                         step_noise=None, return_trajectory: bool = False):
    """DPM-Solver++ (Lu et al. 2022): the probability-flow ODE solved in the data prediction,
    second order (`order=2`) multistep ("2M", `multistep=True`) or single-step ("2S"); `order=1`
    is DDIM with eta 0.

    One model call per kept timestep of `diffusion` (the same cost as DDIM on it), each at the
    timestep's original value; the log-SNR lambda comes from the respaced alphas_cumprod, so the
    solver's step sizes are those of the kept timesteps. The last step returns the x_0 prediction
    at index 0. Deterministic: `key` only draws x_T when `noise` is None, as in `ddim_sample`.
    A truncated diffusion (`create(..., start_step=...)`) starts at its first kept timestep from
    `noise`, which must then be the image already noised to that step.

    Each x_0 prediction is formed as: the model's x_0 (from eps or v, as the diffusion's
    `prediction` says), shifted by `cond_fn`'s gradient g = ∇log p(y|x_t) as Song et al.'s score
    conditioning does to eps (eps - sqrt(1 - alpha_bar)·g), then `denoised_fn`, then clipping
    (`clip_denoised`). Unlike `ddim_sample`, which follows the reference and re-derives an
    unclipped x_0 after conditioning, the shift comes first: the solver integrates x_0 itself,
    so what it integrates must satisfy the clip and the inpainting constraint.

    `lower_order_final` makes 2M's last span (index 1 to 0) a first-order step. On GLIDE's
    respacings, uniform in the timestep, that span is the widest in log-SNR (cosine, 20 steps:
    lambda 2.3 to 5.1, the one before 1.7 to 2.3) and shrinks only logarithmically with the step
    count, so 2M's linear extrapolation of x_0 over it overshoots wherever x_0's prediction has
    already settled: on Gaussian data with per-element std s in [0.4, 1] (tests/test_dpm_solver.py)
    it leaves 2M no better than DDIM at 20 steps, while the first-order last span makes it ~15x
    better, and no worse than DDIM for small s. 2S's last pair has its midpoint inside, so it needs
    no such step.

    `stochastic` solves the reverse SDE instead (2M only, "dpm++2m-sde"): fresh noise each step,
    drawn from `key` as `ddpm_sample` draws it, or `step_noise` (S, B, H, W, C) in sampling order.
    On the demo models it keeps DDPM's accuracy at few steps, which the ODE does not (bench/README).

    Returns the sample, and with `return_trajectory` also the point after every step, (S, B, H, W, C).
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order!r}")
    num_steps = diffusion.num_timesteps
    shape = _check_shapes(shape, noise, step_noise, num_steps)
    if step_noise is not None and not stochastic:
        raise ValueError("step_noise is for the stochastic (SDE) DPM-Solver++; the ODE draws no noise")
    coefficients = jnp.asarray(_dpm_solver_pp_coefficients(diffusion, order, multistep, lower_order_final,
                                                           stochastic), jnp.float32)
    init_key, loop_key = jax.random.split(key)  # the split `_run` makes: a key gives every sampler the same x_T
    x = jax.random.normal(init_key, shape, jnp.float32) if noise is None else jnp.asarray(noise, jnp.float32)

    def data_prediction(x, t):
        model_output, timesteps = _model_at(model_fn, diffusion, x, t)
        prediction, _ = diffusion.split_model_output(model_output, x)
        x0 = diffusion.predict_xstart(x, t, prediction)
        if cond_fn is not None:
            # (x - sigma·(eps - sigma·g)) / alpha: the shifted eps's x_0, without the round trip
            # through eps (whose 1/sqrt(1 - alpha_bar) is large at the last steps).
            alpha_bar = diffusion.extract(diffusion.alphas_cumprod, t, x.ndim)
            x0 = x0 + (1 - alpha_bar) / jnp.sqrt(alpha_bar) * cond_fn(x, timesteps).astype(jnp.float32)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        return x0

    def body(carry, inputs):
        x, x_prev, x0_prev = carry
        i, (a, a_prev, b, b_prev, c), injected = inputs
        x0 = data_prediction(x, num_steps - 1 - i)
        x_next = a * x + a_prev * x_prev + b * x0 + b_prev * x0_prev
        if stochastic:
            z = (injected.astype(jnp.float32) if injected is not None
                 else jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32))
            x_next = x_next + c * z
        return (x_next, x, x0), (x_next if return_trajectory else None)

    # Step 0's weights on the previous point are 0, so any finite start value serves.
    (x, _, _), trajectory = jax.lax.scan(
        body, (x, x, jnp.zeros_like(x)),
        (jnp.arange(num_steps, dtype=jnp.int32), tuple(coefficients.T), step_noise))
    return (x, trajectory) if return_trajectory else x


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
