"""DPM-Solver++ against a float64 numpy transcription of the paper's algorithms, against the exact
ODE solution for Gaussian data (convergence order), and the constraints it must keep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.config import ModelConfig
from glide_jax.diffusion import GaussianDiffusion
from glide_jax.sampling import (SAMPLERS, classifier_free_guidance, ddim_sample, ddpm_sample, dpm_solver_pp_sample,
                                inpaint_denoised_fn)
from glide_jax.unet import GlideUNet, param_shapes

SHAPE = (4, 3, 5, 3)
COND = np.array([1.0, 1.0, 0.0, 0.0])[:, None, None, None]  # first half "conditional", as in CFG


def analytic_model(x, timesteps):
    """Nonlinear in x and in the original timestep; read as eps or v by the diffusion."""
    t = timesteps.astype(jnp.float32)[:, None, None, None] / 1000
    mean = 0.7 * jnp.tanh(1.5 * x) + 0.3 * (1 - t) * jnp.sin(3 * t + x) + 0.2 * jnp.asarray(COND, x.dtype) - 0.1
    return jnp.concatenate([mean, 0.5 * jnp.tanh(x)], axis=-1)


def np_analytic_model(x, orig_t):
    t = orig_t / 1000
    return 0.7 * np.tanh(1.5 * x) + 0.3 * (1 - t) * np.sin(3 * t + x) + 0.2 * COND - 0.1


def analytic_grad(x, timesteps):
    t = timesteps.astype(jnp.float32)[:, None, None, None] / 1000
    return -0.05 * x + 0.1 * t * jnp.cos(x)


def np_analytic_grad(x, orig_t):
    return -0.05 * x + 0.1 * (orig_t / 1000) * np.cos(x)


def np_data_prediction(d, model, *, guidance=None, cond=False, inpaint=None, clip=True):
    """x_0 at index t of `d` from `model(x, original_t)`'s mean channels, in float64."""
    acp = np.cumprod(1 - np.asarray(d.betas, np.float64))

    def predict(x, t):
        orig = float(d.timestep_map[t])
        if guidance is None:
            out = model(x, orig)
        else:
            half = x[: len(x) // 2]
            c, u = np.split(model(np.concatenate([half, half]), orig), 2)
            out = np.concatenate([u + guidance * (c - u)] * 2)
        if d.prediction == "v":
            x0 = np.sqrt(acp[t]) * x - np.sqrt(1 - acp[t]) * out
        else:
            x0 = (x - np.sqrt(1 - acp[t]) * out) / np.sqrt(acp[t])
        if cond:
            # Song et al.'s score conditioning, literally on eps.
            eps = (x - np.sqrt(acp[t]) * x0) / np.sqrt(1 - acp[t])
            eps = eps - np.sqrt(1 - acp[t]) * np_analytic_grad(x, orig)
            x0 = (x - np.sqrt(1 - acp[t]) * eps) / np.sqrt(acp[t])
        if inpaint is not None:
            image, mask = inpaint
            x0 = x0 * (1 - mask) + image * mask
        if clip:
            x0 = np.clip(x0, -1, 1)
        return x0

    return predict


def np_dpm_solver_pp(d, x_T, predict, *, multistep, lower_order_final=True):
    """Lu et al. (2022) DPM-Solver++ algorithm 2 (2M) or algorithm 1 (2S, with the kept timestep
    in between as the intermediate point), over the kept timesteps, then the x_0 prediction at
    index 0. `lower_order_final`: 2M's span from index 1 to 0 is a DDIM step. Returns the point
    after every model call."""
    acp = np.cumprod(1 - np.asarray(d.betas, np.float64))
    alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
    lam = np.log(alpha / sigma)
    x = np.asarray(x_T, np.float64)
    out = []
    if multistep:
        x0_before = None
        for t in range(len(acp) - 1, 0, -1):
            x0 = predict(x, t)
            h = lam[t - 1] - lam[t]
            if x0_before is None or (lower_order_final and t == 1):
                D = x0
            else:
                r = (lam[t] - lam[t + 1]) / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
            x = sigma[t - 1] / sigma[t] * x - alpha[t - 1] * (np.exp(-h) - 1) * D
            x0_before = x0
            out.append(x)
    else:
        t = len(acp) - 1
        if t % 2:  # an odd number of spans: the first is a DDIM step
            h = lam[t - 1] - lam[t]
            x = sigma[t - 1] / sigma[t] * x - alpha[t - 1] * (np.exp(-h) - 1) * predict(x, t)
            out.append(x)
            t -= 1
        while t > 0:
            s, e = t - 1, t - 2
            h = lam[e] - lam[t]
            r = (lam[s] - lam[t]) / h
            x0_t = predict(x, t)
            u = sigma[s] / sigma[t] * x - alpha[s] * (np.exp(-r * h) - 1) * x0_t
            out.append(u)
            D = (1 - 1 / (2 * r)) * x0_t + 1 / (2 * r) * predict(u, s)
            x = sigma[e] / sigma[t] * x - alpha[e] * (np.exp(-h) - 1) * D
            out.append(x)
            t = e
    out.append(predict(x, 0))
    return np.stack(out)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=SHAPE).astype(np.float32)
    image = np.clip(rng.normal(size=SHAPE) * 0.5, -1, 1).astype(np.float32)
    mask = (rng.uniform(size=SHAPE[:3] + (1,)) > 0.5).astype(np.float32)
    return noise, image, mask


COSINE = dict(schedule="squaredcos_cap_v2", steps=1000)
CASES = {
    # 10 kept steps: 9 spans, so 2S starts with a DDIM step; 9 and 27 steps: pairs only.
    "eps": dict(diffusion=dict(COSINE, respacing="10")),
    "v": dict(diffusion=dict(COSINE, respacing="10", prediction="v")),
    "eps_guided_inpaint": dict(diffusion=dict(COSINE, respacing="9"), guidance=3.0, inpaint=True),
    "eps_cond_fn": dict(diffusion=dict(COSINE, respacing="10"), cond=True),
    "v_cond_fn_inpaint": dict(diffusion=dict(COSINE, respacing="9", prediction="v"), cond=True, inpaint=True),
    "eps_unclipped": dict(diffusion=dict(COSINE, respacing="10"), clip=False),
    "v_unclipped": dict(diffusion=dict(COSINE, respacing="9", prediction="v"), clip=False),
    "eps_2m_to_the_end": dict(diffusion=dict(COSINE, respacing="10"), lower_order_final=False),
    "fast27_linear": dict(diffusion=dict(schedule="linear", steps=1000, respacing="fast27")),
    "truncated_linear": dict(diffusion=dict(schedule="linear", steps=1000, respacing="9", start_step=600)),
}


@pytest.mark.parametrize("multistep", [True, False], ids=["2m", "2s"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_matches_numpy(case, multistep):
    opts = CASES[case]
    d = GaussianDiffusion.create(**opts["diffusion"])
    noise, image, mask = _inputs(0)
    if d.start_step is not None:
        # Truncated: the chain starts from an image noised to its first kept step.
        top = d.alphas_cumprod[-1]
        noise = (np.sqrt(top) * image + np.sqrt(1 - top) * noise).astype(np.float32)
    model_fn = analytic_model
    if "guidance" in opts:
        model_fn = classifier_free_guidance(analytic_model, opts["guidance"])
    lower_order_final = opts.get("lower_order_final", True)
    kwargs = dict(noise=jnp.asarray(noise), clip_denoised=opts.get("clip", True), multistep=multistep,
                  lower_order_final=lower_order_final,
                  cond_fn=analytic_grad if opts.get("cond") else None, return_trajectory=True)
    inpaint = None
    if opts.get("inpaint"):
        kwargs["denoised_fn"] = inpaint_denoised_fn(jnp.asarray(image), jnp.asarray(mask))
        inpaint = (image.astype(np.float64), mask.astype(np.float64))
    final, traj = dpm_solver_pp_sample(model_fn, d, SHAPE, jax.random.key(0), **kwargs)
    predict = np_data_prediction(d, np_analytic_model, guidance=opts.get("guidance"), cond=opts.get("cond", False),
                                 inpaint=inpaint, clip=opts.get("clip", True))
    expected = np_dpm_solver_pp(d, noise, predict, multistep=multistep, lower_order_final=lower_order_final)
    assert traj.shape == (d.num_timesteps,) + SHAPE
    # Relative: an unclipped eps model's x_0 at the noisiest cosine step is x / sqrt(alpha_bar) ~ 2e4·x.
    scale = np.abs(expected).max(axis=tuple(range(1, expected.ndim)), keepdims=True)
    error = np.abs(np.asarray(traj, np.float64) - expected) / np.maximum(scale, 1.0)
    # fast27 keeps 800 and 799: 2M's next step weighs their x_0's by 10.75 and -10.63 (a finite
    # difference), which multiplies float32 rounding by ~20.
    assert error.max() < (1e-4 if case == "fast27_linear" else 1e-5), (case, float(error.max()))
    np.testing.assert_array_equal(final, traj[-1])
    assert not np.allclose(expected[0], expected[-1])


# A tiny text-conditional U-Net with random weights, so every output is a nonlinear function of
# x_t, the timestep and the tokens.
TINY = ModelConfig(image_size=8, num_channels=16, norm_groups=8, num_res_blocks=1, channel_mult="1,2",
                   attention_resolutions="4", num_head_channels=8, text_ctx=6, xf_width=32, xf_layers=1, xf_heads=2,
                   n_vocab=300)


@pytest.fixture(scope="module")
def tiny_unet():
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda leaf: (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32),
                                    param_shapes(TINY))
    model = GlideUNet(TINY)
    tokens = jnp.asarray([[5, 6, 7, 0, 0, 0]] * 2 + [[0] * 6] * 2, jnp.int32)  # [conditional | empty]
    mask = tokens > 0

    def model_fn(params, x, timesteps):
        return model.apply({"params": params}, x, timesteps, tokens, mask)

    # One compiled model call for the numpy reference's steps, shared by the tests.
    return params, model_fn, jax.jit(model_fn)


@pytest.mark.parametrize("multistep, prediction, guidance", [(True, "eps", 3.0), (False, "v", None)],
                         ids=["2m_eps_cfg", "2s_v"])
def test_tiny_unet_matches_numpy(tiny_unet, multistep, prediction, guidance):
    params, unet_fn, one_call = tiny_unet
    shape = (4, TINY.image_size, TINY.image_size, 3)
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "12", prediction=prediction)
    noise = np.random.default_rng(1).normal(size=shape).astype(np.float32)

    @jax.jit
    def sample(params, noise):
        model_fn = lambda x, t: unet_fn(params, x, t)  # noqa: E731
        if guidance is not None:
            model_fn = classifier_free_guidance(model_fn, guidance)
        return dpm_solver_pp_sample(model_fn, d, shape, jax.random.key(0), noise=noise, multistep=multistep,
                                    return_trajectory=True)[1]

    def np_model(x, orig_t):
        out = one_call(params, jnp.asarray(x, jnp.float32), jnp.full((len(x),), int(orig_t), jnp.int32))
        return np.asarray(out, np.float64)[..., :3]

    expected = np_dpm_solver_pp(d, noise, np_data_prediction(d, np_model, guidance=guidance), multistep=multistep)
    traj = np.asarray(sample(params, jnp.asarray(noise)), np.float64)
    # Matters only if the model's output varies, and the guided rows really are mixed.
    assert np.abs(expected[-1] - expected[-1].mean()).max() > 0.1
    np.testing.assert_allclose(traj, expected, atol=1e-5, rtol=1e-5)


def np_dpm_solver_pp_sde(d, x_T, predict, step_noise, *, lower_order_final=True):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, the SDE form at the DDPM noise level), with the
    per-step draws given: from lambda_s to lambda_t = lambda_s + h, x_t = sigma_t/sigma_s·e^-h·x_s
    + alpha_t·(1 - e^-2h)·D + sigma_t·sqrt(1 - e^-2h)·z, D the 2M combination of x_0 predictions."""
    acp = np.cumprod(1 - np.asarray(d.betas, np.float64))
    alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
    lam = np.log(alpha / sigma)
    x = np.asarray(x_T, np.float64)
    out, x0_before = [], None
    for i, t in enumerate(range(len(acp) - 1, 0, -1)):
        x0 = predict(x, t)
        h = lam[t - 1] - lam[t]
        if x0_before is None or (lower_order_final and t == 1):
            D = x0
        else:
            r = (lam[t] - lam[t + 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_before
        x = (sigma[t - 1] / sigma[t] * np.exp(-h) * x + alpha[t - 1] * (1 - np.exp(-2 * h)) * D
             + sigma[t - 1] * np.sqrt(1 - np.exp(-2 * h)) * step_noise[i])
        x0_before = x0
        out.append(x)
    out.append(predict(x, 0))
    return np.stack(out)


@pytest.mark.parametrize("case", ["eps", "v", "eps_guided_inpaint", "v_cond_fn_inpaint", "eps_2m_to_the_end"])
def test_sde_trajectory_matches_numpy(case):
    opts = CASES[case]
    d = GaussianDiffusion.create(**opts["diffusion"])
    noise, image, mask = _inputs(0)
    step_noise = np.random.default_rng(5).normal(size=(d.num_timesteps,) + SHAPE).astype(np.float32)
    model_fn = analytic_model
    if "guidance" in opts:
        model_fn = classifier_free_guidance(analytic_model, opts["guidance"])
    lower_order_final = opts.get("lower_order_final", True)
    kwargs = dict(noise=jnp.asarray(noise), step_noise=jnp.asarray(step_noise), stochastic=True,
                  lower_order_final=lower_order_final, cond_fn=analytic_grad if opts.get("cond") else None,
                  return_trajectory=True)
    inpaint = None
    if opts.get("inpaint"):
        kwargs["denoised_fn"] = inpaint_denoised_fn(jnp.asarray(image), jnp.asarray(mask))
        inpaint = (image.astype(np.float64), mask.astype(np.float64))
    final, traj = dpm_solver_pp_sample(model_fn, d, SHAPE, jax.random.key(0), **kwargs)
    predict = np_data_prediction(d, np_analytic_model, guidance=opts.get("guidance"), cond=opts.get("cond", False),
                                 inpaint=inpaint)
    expected = np_dpm_solver_pp_sde(d, noise, predict, step_noise, lower_order_final=lower_order_final)
    scale = np.abs(expected).max(axis=tuple(range(1, expected.ndim)), keepdims=True)
    error = np.abs(np.asarray(traj, np.float64) - expected) / np.maximum(scale, 1.0)
    assert error.max() < 1e-5, (case, float(error.max()))
    np.testing.assert_array_equal(final, traj[-1])
    # The draws matter: the same x_T with other draws ends elsewhere.
    other = dpm_solver_pp_sample(model_fn, d, SHAPE, jax.random.key(0), **{**kwargs, "step_noise": -kwargs["step_noise"],
                                                                          "return_trajectory": False})
    assert np.abs(np.asarray(other) - np.asarray(final)).max() > 1e-2


def test_sde_draws_its_noise_from_the_key_and_is_reproducible():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    noise = jnp.asarray(_inputs(0)[0])
    run = jax.jit(lambda key: dpm_solver_pp_sample(analytic_model, d, SHAPE, key, noise=noise, stochastic=True))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    with pytest.raises(ValueError, match=r"\(2M\) only"):
        dpm_solver_pp_sample(analytic_model, d, SHAPE, jax.random.key(0), stochastic=True, multistep=False)
    with pytest.raises(ValueError, match="step_noise is for the stochastic"):
        dpm_solver_pp_sample(analytic_model, d, SHAPE, jax.random.key(0),
                             step_noise=jnp.zeros((d.num_timesteps,) + SHAPE))


def test_sde_samples_the_data_distribution_better_than_ddpm_at_few_steps():
    """Gaussian data with the exact model: the SDE's samples, from many x_T and draws, have the
    data's mean and std per element (an SDE forgets x_T, so only the distribution can be checked),
    and at 15 steps they are closer to it than DDPM's at the same steps."""
    base = GaussianDiffusion.create("squaredcos_cap_v2", 1000)
    s = np.linspace(0.2, 1.0, 8).reshape(1, 2, 4, 1)
    n = 4000
    # One mean and std per element, broadcast over the n samples.
    model_fn, _, _ = _gaussian_problem(np.asarray(base.alphas_cumprod), s, "eps")
    mu = np.random.default_rng(7).uniform(-0.5, 0.5, s.shape)[0]  # what _gaussian_problem drew

    def std_ratio(sampler, steps, **kwargs):
        d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, str(steps))
        final = np.asarray(sampler(model_fn, d, (n, 2, 4, 1), jax.random.key(3), clip_denoised=False, **kwargs))
        np.testing.assert_allclose(final.mean(0), mu, atol=0.06)  # standard error: 1.6% of s
        return (final.std(0) / s[0]).ravel()

    # Measured: 15 steps SDE 0.83 at s = 0.2 (the ODE 0.86, DDPM 0.87), within 4% for s >= 0.4
    # (DDPM 7-11% low); 50 steps within 2.5% everywhere (DDPM 3-6% low).
    sde15, ddpm15 = std_ratio(dpm_solver_pp_sample, 15, stochastic=True), std_ratio(ddpm_sample, 15)
    assert np.abs(sde15[2:] - 1).max() < 0.06
    assert np.abs(sde15 - 1).mean() < 0.7 * np.abs(ddpm15 - 1).mean()
    np.testing.assert_allclose(std_ratio(dpm_solver_pp_sample, 50, stochastic=True), 1.0, atol=0.04)


# -- convergence to the exact ODE solution ------------------------------------------------------


def _gaussian_problem(acp, s, prediction, seed=7):
    """Data x_0 ~ N(mu, s²) per element, noised by the process with alphas_cumprod `acp` (indexed by
    original timestep). The posterior mean of x_0 given x_t is affine, so eps and v are known in
    closed form, and the probability-flow ODE does not move x_t's quantile z = (x_t - alpha·mu) /
    sqrt(alpha²s² + sigma²). Returns the exact model, x_T at the last timestep, and the exact ODE
    solution at timestep 0 followed by its x_0 prediction (what the samplers' last step returns)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-0.5, 0.5, s.shape)
    table = jnp.asarray(acp, jnp.float32)
    mu32, s32 = jnp.asarray(mu, jnp.float32), jnp.asarray(s, jnp.float32)

    def model_fn(x, timesteps):
        # Indexed by the original timesteps: a respacing bug shows here.
        abar = table[timesteps][:, None, None, None]
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        var = abar * s32 ** 2 + 1 - abar
        eps = sigma * (x - alpha * mu32) / var
        x0 = mu32 + alpha * s32 ** 2 * (x - alpha * mu32) / var
        out = alpha * eps - sigma * x0 if prediction == "v" else eps
        return jnp.concatenate([out, jnp.zeros_like(out)], axis=-1)

    x_T = rng.normal(size=s.shape)
    abar_T, abar_0 = acp[-1], acp[0]
    z = (x_T - np.sqrt(abar_T) * mu) / np.sqrt(abar_T * s ** 2 + 1 - abar_T)
    exact = mu + np.sqrt(abar_0) * s ** 2 * z / np.sqrt(abar_0 * s ** 2 + 1 - abar_0)
    return model_fn, jnp.asarray(x_T, jnp.float32), exact


VARIANTS = {"ddim": dict(order=1), "2m": {}, "2m_to_the_end": dict(lower_order_final=False),
            "2s": dict(multistep=False)}


def _errors(model_fn, diffusions, x_T, exact, variants):
    """Max |error| per batch element, per (variant, step count)."""
    errors = {}
    for steps, d in diffusions.items():
        for name in variants:
            final = dpm_solver_pp_sample(model_fn, d, x_T.shape, jax.random.key(0), noise=x_T, clip_denoised=False,
                                         **VARIANTS[name])
            errors[name, steps] = np.abs(np.asarray(final, np.float64) - exact).max(axis=(1, 2, 3))
    return errors


def test_second_order_on_a_grid_uniform_in_log_snr():
    """The solver's order, apart from the grid: kept steps equally spaced in lambda over [-10, 5]."""
    num_original = 1025
    acp = 1 / (1 + np.exp(-2 * np.linspace(5.0, -10.0, num_original)))  # alpha²/sigma² = e^(2 lambda)
    diffusions = {}
    for steps in (33, 65, 129):  # the step in lambda halves each time
        kept = np.arange(steps) * ((num_original - 1) // (steps - 1))
        diffusions[steps] = GaussianDiffusion(betas=1 - acp[kept] / np.append(1.0, acp[kept][:-1]),
                                              timestep_map=kept, original_num_steps=num_original, prediction="v")
    s = np.random.default_rng(8).uniform(0.05, 1.0, (1, 4, 4, 3))
    model_fn, x_T, exact = _gaussian_problem(acp, s, "v")
    errors = {key: float(value[0]) for key, value in _errors(model_fn, diffusions, x_T, exact,
                                                             ("ddim", "2m", "2s")).items()}
    print({f"{n}@{k}": f"{e:.2e}" for (n, k), e in errors.items()})
    for steps in (33, 65):
        assert 1.7 < errors["ddim", steps] / errors["ddim", 2 * steps - 1] < 2.3
        assert errors["2m", steps] / errors["2m", 2 * steps - 1] > 3.3
        assert errors["2s", steps] / errors["2s", 2 * steps - 1] > 3.3


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_beats_ddim_on_glide_respacing(prediction):
    """GLIDE's cosine schedule respaced to 10/20/40 steps (uniform in t). Batch element 0 has data
    stds s in [0.4, 1] (the bulk of an image), element 1 in [0.05, 0.2] (fine detail, whose x_0
    prediction settles only in the last, widest log-SNR span)."""
    base = GaussianDiffusion.create("squaredcos_cap_v2", 1000)
    rng = np.random.default_rng(9)
    s = np.concatenate([rng.uniform(0.4, 1.0, (1, 4, 4, 3)), rng.uniform(0.05, 0.2, (1, 4, 4, 3))])
    model_fn, x_T, exact = _gaussian_problem(np.asarray(base.alphas_cumprod), s, prediction)
    diffusions = {steps: GaussianDiffusion.create("squaredcos_cap_v2", 1000, str(steps), prediction=prediction)
                  for steps in (10, 20, 40)}
    errors = _errors(model_fn, diffusions, x_T, exact, VARIANTS)
    print(prediction, {f"{n}@{k}": [f"{e:.2e}" for e in v] for (n, k), v in errors.items()})
    bulk = {key: value[0] for key, value in errors.items()}
    detail = {key: value[1] for key, value in errors.items()}
    # Measured (max |error|, bulk): DDIM 0.24 / 0.12 / 0.059 at 10 / 20 / 40 steps, 2M 0.082 /
    # 0.0082 / 0.0019, 2S 0.087 / 0.016 / 0.0064.
    for steps in (10, 20, 40):
        assert bulk["2m", steps] < bulk["ddim", steps] / 2.5
        assert bulk["2s", steps] < bulk["ddim", steps] / 2.5
        assert detail["2m", steps] < detail["ddim", steps]
        assert detail["2s", steps] < detail["ddim", steps] / 2
    for steps in (20, 40):
        assert bulk["2m", steps] < bulk["ddim", steps] / 10
        assert bulk["2s", steps] < bulk["ddim", steps] / 5
    # Why the last span is first order by default: extrapolating x_0 over it undoes the gain.
    assert bulk["2m_to_the_end", 20] > 5 * bulk["2m", 20]


# -- the constraints, and the interface --------------------------------------------------------


@pytest.mark.parametrize("multistep", [True, False], ids=["2m", "2s"])
def test_inpainting_keeps_known_region_exactly_and_clip_and_cond_fn_act(multistep):
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    noise, image, mask = _inputs(2)
    sample = jax.jit(lambda noise, clip, cond, inpaint: dpm_solver_pp_sample(
        analytic_model, d, SHAPE, jax.random.key(0), noise=noise, clip_denoised=clip, multistep=multistep,
        cond_fn=analytic_grad if cond else None,
        denoised_fn=inpaint_denoised_fn(jnp.asarray(image), jnp.asarray(mask)) if inpaint else None),
        static_argnums=(1, 2, 3))
    noise = jnp.asarray(noise)
    inpainted = np.asarray(sample(noise, True, True, True))
    known = np.broadcast_to(mask > 0, SHAPE)
    np.testing.assert_array_equal(inpainted[known], image[known])
    plain = np.asarray(sample(noise, True, False, False))
    assert np.abs(inpainted[~known] - plain[~known]).max() > 1e-2
    assert np.abs(plain).max() <= 1.0
    unclipped = np.asarray(sample(noise, False, False, False))
    assert np.abs(unclipped).max() > 1.5
    conditioned = np.asarray(sample(noise, True, True, False))
    assert np.abs(conditioned - plain).max() > 1e-2


def test_truncated_chain_starts_at_start_step_from_the_given_image():
    d = GaussianDiffusion.create("linear", 1000, "6", start_step=400)
    seen = []

    def model_fn(x, timesteps):
        jax.debug.callback(lambda ts: seen.append(np.asarray(ts)), timesteps)
        return analytic_model(x, timesteps)

    noise, image, _ = _inputs(3)
    jax.block_until_ready(dpm_solver_pp_sample(model_fn, d, SHAPE, jax.random.key(0), noise=jnp.asarray(image)))
    np.testing.assert_array_equal(np.stack(seen)[:, 0], d.timestep_map[::-1])
    assert seen[0][0] == 400 and seen[-1][0] == 0


def test_order_one_is_ddim_and_key_draws_the_same_x_T():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    key = jax.random.key(5)
    ddim = ddim_sample(analytic_model, d, SHAPE, key)
    first_order = dpm_solver_pp_sample(analytic_model, d, SHAPE, key, order=1)
    np.testing.assert_allclose(first_order, ddim, atol=1e-5)
    # Deterministic given x_T: with noise given, the key does nothing.
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    a = dpm_solver_pp_sample(analytic_model, d, SHAPE, jax.random.key(1), noise=noise)
    b = dpm_solver_pp_sample(analytic_model, d, SHAPE, jax.random.key(2), noise=noise)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(first_order)).max() > 1e-2


def test_whole_loop_is_one_program_and_model_traced_once():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "25")
    traces = []

    def model_fn(x, timesteps):
        traces.append(1)
        return analytic_model(x, timesteps)

    @jax.jit
    def generate(key, guidance_scale):
        return dpm_solver_pp_sample(classifier_free_guidance(model_fn, guidance_scale), d, SHAPE, key)

    assert "stablehlo.while" in generate.lower(jax.random.key(0), 3.0).as_text()
    assert len(traces) == 1


def test_bad_arguments_are_reported():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    key = jax.random.key(0)
    for order in (0, 3, True, 2.5):
        with pytest.raises(ValueError, match="DPM-Solver\\+\\+ order must be 1 or 2"):
            dpm_solver_pp_sample(analytic_model, d, SHAPE, key, order=order)
    with pytest.raises(ValueError, match=r"sample shape must be \(B, H, W, C\)"):
        dpm_solver_pp_sample(analytic_model, d, SHAPE[1:], key)
    with pytest.raises(ValueError, match="noise has shape"):
        dpm_solver_pp_sample(analytic_model, d, SHAPE, key, noise=jnp.zeros((1,) + SHAPE[1:]))
    with pytest.raises(ValueError, match="model output has shape"):
        dpm_solver_pp_sample(lambda x, t: x, d, SHAPE, key)


def test_sampler_names():
    assert {"dpm++2m", "dpm++2s"} <= set(SAMPLERS) and {"ddpm", "ddim"} <= set(SAMPLERS)
