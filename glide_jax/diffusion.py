"""Gaussian diffusion maths: beta schedules, timestep respacing, posterior and model
distributions, and GLIDE's hybrid training objective.

The schedule tables are computed once in float64 numpy, exactly as the reference does, and held
by a frozen `GaussianDiffusion`. Everything that touches images is a pure `jnp` function of its
arguments, so it traces into a compiled sampler or training step without hidden state.

Conventions:
- Images are NHWC. The model's output has 6 channels on the last axis: the mean's prediction
  (0:3) and the variance interpolation value (3:6), in [-1, 1] mapping log-variance from the
  clipped posterior log-variance (-1) to log(beta) (1).
- The mean's prediction is eps (`prediction="eps"`, every released GLIDE model) or
  v = sqrt(alpha_bar)·eps - sqrt(1 - alpha_bar)·x_0 (`prediction="v"`, Salimans & Ho 2022).
  Both give the same x_0 in exact arithmetic, but x_0 = (x_t - sqrt(1-alpha_bar)·eps) /
  sqrt(alpha_bar) divides the network's error by sqrt(alpha_bar), ~5e-5 at the last cosine step:
  an eps model's picture of the image at high noise is barely trained, while v's target there is
  -x_0 itself. Guidance that mixes outputs linearly (classifier-free) means the same for both,
  since at fixed x_t and t each is an affine function of the other with weights summing to one.
- `t` is always an index into *this* diffusion (0 .. num_timesteps - 1), which after respacing
  is not the timestep the network was trained with; `timestep_map[t]` is. Samplers do that
  mapping when they call the model (see `glide_jax.sampling`).
- Tables are indexed in float32, which is what the reference does (float64 table, `.float()`
  on extraction), so per-step arithmetic matches it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.config import PREDICTIONS, ConfigError, ModelConfig

SCHEDULES = ("squaredcos_cap_v2", "linear")


class DiffusionConfigError(ConfigError):
    """A noise schedule name, step count or respacing string is invalid; the message names it."""


# -- schedules and respacing ---------------------------------------------------------------------


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas (float64, shape `(num_steps,)`) of the named schedule.

    `linear` is Ho et al.'s 1e-4 .. 0.02 for 1000 steps, rescaled so other step counts describe
    the same process; `squaredcos_cap_v2` discretises alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2)
    with betas capped at 0.999 (the cap makes the last step of the cosine schedule finite).
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps <= 0:
        raise DiffusionConfigError(f"diffusion steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                         for i in range(num_steps)], dtype=np.float64)
    raise DiffusionConfigError(f"unknown noise schedule {name!r}; expected one of {list(SCHEDULES)}")


def _parse_section_counts(num_timesteps: int, section_counts) -> list[int]:
    if isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        return [int(section_counts)]
    if isinstance(section_counts, str):
        try:
            counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise DiffusionConfigError(
                f"timestep respacing {section_counts!r} is not understood; expected comma-separated "
                f"step counts (e.g. '100' or '10,10,10'), 'ddimN' or 'fast27'") from None
        return counts
    try:
        return [int(c) for c in section_counts]
    except (TypeError, ValueError):
        raise DiffusionConfigError(
            f"timestep respacing must be a string or a list of step counts, got {section_counts!r}") from None


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The original timesteps kept when respacing a `num_timesteps`-step process.

    `section_counts` is what the reference's `timestep_respacing` accepts: step counts per
    equal-length section (`"100"`, `"10,10,10"`, or a list), `"ddimN"` (the DDIM paper's
    uniform integer stride giving exactly N steps), or `"fast27"` (GLIDE's upsampler spacing,
    denser early, with the noisiest step replaced by T-3 to reduce DDIM artefacts).
    Within a section of `size` steps, `count` steps are taken at fractional stride
    (size-1)/(count-1), each rounded with Python's `round` (as the reference does).
    """
    original = section_counts
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise DiffusionConfigError(
                    f"timestep respacing {original!r}: 'ddim' must be followed by a step count, e.g. 'ddim50'"
                ) from None
            for stride in range(1, num_timesteps):
                kept = range(0, num_timesteps, stride)
                if len(kept) == desired:
                    return set(kept)
            raise DiffusionConfigError(
                f"timestep respacing {original!r}: no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps")
        if section_counts == "fast27":
            steps = space_timesteps(num_timesteps, "10,10,3,2,2")
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
    counts = _parse_section_counts(num_timesteps, section_counts)
    if not counts:
        raise DiffusionConfigError(f"timestep respacing {original!r} names no sections")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise DiffusionConfigError(
                f"timestep respacing {original!r}: section {i} has {size} of the {num_timesteps} "
                f"steps and cannot keep {count} of them")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


# -- the diffusion process -----------------------------------------------------------------------


class MeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) as predicted by the model, plus its x_0 and eps predictions."""
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array
    eps: jax.Array  # re-derived from pred_xstart, so it reflects clipping and denoised_fn


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array)
    array.setflags(write=False)
    return array


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    # The tanh approximation improved-diffusion trained with; kept so losses are comparable.
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood (nats, elementwise) of 8-bit images `x` in [-1, 1] under a Gaussian
    discretised to bins of width 2/255; the edge bins extend to ±infinity."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process.

    Build it with `GaussianDiffusion.create(schedule, steps, respacing)`. `betas` are the betas
    of this process (after respacing: 1 - alpha_bar[kept_i] / alpha_bar[kept_{i-1}]), and
    `timestep_map[i]` the original timestep of index i. Equality and hashing follow the tables,
    so a diffusion can be a static argument of `jax.jit`.
    """
    betas: np.ndarray
    timestep_map: np.ndarray
    original_num_steps: int
    # Set by `create(..., start_step=...)`: the chain starts from a noised image at this original
    # timestep. None: from pure noise, whatever the respacing's last kept step (fast27 ends at 997).
    start_step: int | None = None
    prediction: str = "eps"   # what the model output's mean channels are (see the module docstring)
    alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = dataclasses.field(init=False, repr=False)
    alphas_cumprod_next: np.ndarray = dataclasses.field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
    log_one_minus_alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
    posterior_variance: np.ndarray = dataclasses.field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = dataclasses.field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = dataclasses.field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = dataclasses.field(init=False, repr=False)
    log_betas: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            # The clipped posterior log-variance at t=0 borrows t=1's value, so one step is not
            # a usable process (the reference fails on it too).
            raise DiffusionConfigError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise DiffusionConfigError(
                f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}")
        if self.prediction not in PREDICTIONS:
            raise DiffusionConfigError(f"prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        timestep_map = np.asarray(self.timestep_map, dtype=np.int64)
        if timestep_map.shape != betas.shape:
            raise DiffusionConfigError(
                f"timestep_map has shape {timestep_map.shape}, expected {betas.shape} (one per beta)")
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        tables = dict(
            betas=betas,
            timestep_map=timestep_map,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            alphas_cumprod_next=np.append(acp[1:], 0.0),
            sqrt_alphas_cumprod=np.sqrt(acp),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            log_one_minus_alphas_cumprod=np.log(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
            posterior_variance=posterior_variance,
            # The posterior variance is 0 at t=0; its log borrows the t=1 value so it stays finite.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
            log_betas=np.log(betas),
        )
        for name, value in tables.items():
            object.__setattr__(self, name, _readonly(value))
        object.__setattr__(self, "original_num_steps", int(self.original_num_steps))

    @classmethod
    def create(cls, schedule: str = "squaredcos_cap_v2", steps: int = 1000,
               respacing: str | Sequence[int] = "", start_step: int | None = None,
               prediction: str = "eps") -> "GaussianDiffusion":
        """The reference's `create_gaussian_diffusion`: schedule over `steps`, then respaced
        (`""` keeps every step).

        `start_step` truncates the chain: the respacing is spread over original timesteps
        0..start_step instead of 0..steps-1, so sampling starts at `start_step` from a noised image
        rather than from pure noise (see `starts_from_noise`; the pipeline's upsamplers start from
        their upsampled low-res input). Not in the reference.

        `prediction` is what the model's mean channels predict, "eps" or "v" (the model config's).
        """
        base_betas = get_named_beta_schedule(schedule, steps)
        if start_step is not None and not (isinstance(start_step, (int, np.integer)) and 0 < start_step < steps):
            raise DiffusionConfigError(f"start_step must be an integer in [1, {steps - 1}] (an original timestep), "
                                       f"got {start_step!r}")
        span = steps if start_step is None else int(start_step) + 1
        if respacing in ("", None) or (not isinstance(respacing, str) and len(respacing) == 0):
            if span == steps:
                return cls(betas=base_betas, timestep_map=np.arange(steps), original_num_steps=steps,
                           prediction=prediction)
            kept = set(range(span))
        else:
            kept = space_timesteps(span, respacing)
        if not kept:
            raise DiffusionConfigError(f"timestep respacing {respacing!r} keeps no steps")
        base_acp = np.cumprod(1.0 - base_betas)
        timestep_map = np.array(sorted(kept), dtype=np.int64)
        kept_acp = base_acp[timestep_map]
        betas = 1.0 - kept_acp / np.append(1.0, kept_acp[:-1])
        return cls(betas=betas, timestep_map=timestep_map, original_num_steps=steps,
                   start_step=None if start_step is None else int(start_step), prediction=prediction)

    @property
    def starts_from_noise(self) -> bool:
        """Whether sampling starts from pure noise (x_T), as the reference always does; False after
        `create(..., start_step=...)`."""
        return self.start_step is None

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def _key(self):
        return (self.original_num_steps, self.betas.tobytes(), self.timestep_map.tobytes(), self.start_step,
                self.prediction)

    def __eq__(self, other):
        return isinstance(other, GaussianDiffusion) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # -- table lookup ------------------------------------------------------------------------

    def extract(self, table: np.ndarray, t, ndim: int) -> jax.Array:
        """`table[t]` in float32, shaped to broadcast against an NHWC batch of rank `ndim`."""
        values = jnp.asarray(np.asarray(table, dtype=np.float32))[jnp.asarray(t)]
        return values.reshape(values.shape + (1,) * (ndim - values.ndim))

    def original_timesteps(self, t) -> jax.Array:
        """The timesteps the network was trained with for indices `t` of this diffusion (int32)."""
        return jnp.asarray(self.timestep_map.astype(np.int32))[jnp.asarray(t)]

    # -- forward process ---------------------------------------------------------------------

    def q_sample(self, x0, t, noise):
        """A draw from q(x_t | x_0) with the given standard-normal `noise`."""
        _check_same_shape("noise", noise, "x0", x0)
        return (self.extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        _check_same_shape("x0", x0, "x_t", x_t)
        mean = (self.extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + self.extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        variance = self.extract(self.posterior_variance, t, x_t.ndim)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, variance, log_variance

    # -- model distribution ------------------------------------------------------------------

    def predict_xstart_from_eps(self, x_t, t, eps):
        _check_same_shape("eps", eps, "x_t", x_t)
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        _check_same_shape("pred_xstart", pred_xstart, "x_t", x_t)
        return ((self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def predict_xstart_from_v(self, x_t, t, v):
        _check_same_shape("v", v, "x_t", x_t)
        return (self.extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
                - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)

    def v_target(self, x0, t, noise):
        """What a v-prediction model is trained to output for `q_sample(x0, t, noise)`."""
        _check_same_shape("noise", noise, "x0", x0)
        return (self.extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def predict_xstart(self, x_t, t, mean_output):
        """x_0 from the mean channels of the model's output, as `prediction` says to read them."""
        if self.prediction == "v":
            return self.predict_xstart_from_v(x_t, t, mean_output)
        return self.predict_xstart_from_eps(x_t, t, mean_output)

    def split_model_output(self, model_output, x_t):
        """(mean prediction, variance values) from the model's output, whose last axis must be
        twice x_t's channels."""
        channels = x_t.shape[-1]
        expected = x_t.shape[:-1] + (2 * channels,)
        if tuple(model_output.shape) != tuple(expected):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {expected} "
                f"(NHWC, {self.prediction} then variance values on the last axis)")
        model_output = model_output.astype(jnp.float32)
        return model_output[..., :channels], model_output[..., channels:]

    def model_log_variance(self, var_values, t):
        """Learned-range log-variance: v = -1 is the clipped posterior log-variance, v = 1 is log(beta)."""
        min_log = self.extract(self.posterior_log_variance_clipped, t, var_values.ndim)
        max_log = self.extract(self.log_betas, t, var_values.ndim)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model_output, x_t, t, *, clip_denoised: bool = True,
                        denoised_fn: Callable | None = None) -> MeanVariance:
        """p(x_{t-1} | x_t) from the model's 6-channel output at index `t`.

        x_0 is predicted from the output (`predict_xstart`), passed through `denoised_fn` (if any)
        and then clipped to [-1, 1] (if `clip_denoised`); the mean is the posterior mean given that x_0.
        """
        prediction, var_values = self.split_model_output(model_output, x_t)
        log_variance = self.model_log_variance(var_values, t)
        pred_xstart = self.predict_xstart(x_t, t, prediction)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return MeanVariance(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance,
                            pred_xstart=pred_xstart, eps=self.predict_eps_from_xstart(x_t, t, pred_xstart))

    def condition_mean(self, out: MeanVariance, gradient) -> jax.Array:
        """Sohl-Dickstein et al.'s guidance for ancestral sampling: mean + variance · ∇log p(y|x_t)."""
        return out.mean + out.variance * gradient.astype(jnp.float32)

    def condition_score(self, out: MeanVariance, x_t, t, gradient) -> MeanVariance:
        """Song et al.'s guidance for DDIM: eps shifted by -sqrt(1 - alpha_bar) · ∇log p(y|x_t),
        then x_0 and the mean re-derived from it (without clipping again)."""
        alpha_bar = self.extract(self.alphas_cumprod, t, x_t.ndim)
        eps = out.eps - jnp.sqrt(1 - alpha_bar) * gradient.astype(jnp.float32)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return out._replace(mean=mean, pred_xstart=pred_xstart,
                            eps=self.predict_eps_from_xstart(x_t, t, pred_xstart))

    # -- training objective ------------------------------------------------------------------

    def training_losses(self, model_output, x0, x_t, t, noise) -> dict[str, jax.Array]:
        """GLIDE's hybrid objective per example: `loss = mse + vb`, each of shape (B,).

        - `mse`: mean squared error between the predicted and the true eps (or v, `v_target`).
        - `vb`: the variational bound term in bits per dimension, KL(q(x_{t-1}|x_t,x_0) ||
          p(x_{t-1}|x_t)) for t > 0 and the discretised Gaussian decoder NLL at t = 0. It is
          computed with the model's mean prediction under `stop_gradient`, so it trains only the
          variance channels while the mean is trained by `mse` alone (Nichol & Dhariwal's L_hybrid); no
          clipping of x_0 here, as in training the bound must stay a bound of the actual model.
        - vb is multiplied by `num_timesteps / 1000`: improved-diffusion's "rescaled" hybrid
          setting (`rescale_learned_sigmas`), which GLIDE's models were trained with; it keeps
          vb's weight against mse independent of the step count (λ = 0.001 per step at T=1000).

        `x_t` must be `q_sample(x0, t, noise)`; it is passed in so the caller's forward pass and
        this loss see the same array.
        """
        _check_same_shape("x_t", x_t, "x0", x0)
        _check_same_shape("noise", noise, "x0", x0)
        prediction, var_values = self.split_model_output(model_output, x_t)
        frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
        out = self.p_mean_variance(frozen, x_t, t, clip_denoised=False)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out.mean, log_scales=0.5 * out.log_variance)) / math.log(2.0)
        t = jnp.broadcast_to(jnp.asarray(t), kl.shape)
        vb = jnp.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)
        noise = noise.astype(jnp.float32)
        target = self.v_target(x0.astype(jnp.float32), t, noise) if self.prediction == "v" else noise
        mse = mean_flat(jnp.square(target - prediction))
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def default_schedule(config: ModelConfig) -> str:
    """The model config's noise schedule, else GLIDE's: cosine for the base and inpainting models,
    linear for the upsamplers."""
    return config.noise_schedule or ("linear" if config.super_res else "squaredcos_cap_v2")


def diffusion_for_model(config: ModelConfig, respacing: str | Sequence[int] = "", *,
                        start_step: int | None = None, schedule: str | None = None,
                        steps: int | None = None) -> GaussianDiffusion:
    """The diffusion a model was trained with (or is sampled with, respaced): its schedule
    (`default_schedule` unless `schedule` is given), its number of steps and its prediction.
    Every sampler and trainer builds its diffusion here, so a model config's `prediction` cannot
    be dropped on the way (a v model read as eps gives garbage, silently)."""
    return GaussianDiffusion.create(schedule or default_schedule(config), steps or config.diffusion_steps,
                                    respacing, start_step=start_step, prediction=config.prediction)


def _check_same_shape(name_a, a, name_b, b):
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")
