"""Diffusion maths against the reference's golden tables and against numpy written from the formulas."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.config import ConfigError
from glide_jax.diffusion import (DiffusionConfigError, GaussianDiffusion, get_named_beta_schedule,
                                 space_timesteps)

TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_tables_match_reference(golden, schedule):
    ref = np.load(golden / "diffusion.npz")
    # The step count and the respacings from the golden file itself.
    steps = len(ref[f"{schedule}/betas"])
    prefix = f"{schedule}/respaced_"
    respacings = sorted({k[len(prefix):].rsplit("/", 1)[0] for k in ref.files if k.startswith(prefix)})
    assert respacings, "the golden file has no respaced schedules"
    diffusion = GaussianDiffusion.create(schedule, steps)
    for name in TABLES:
        np.testing.assert_allclose(getattr(diffusion, name), ref[f"{schedule}/{name}"], rtol=1e-13, atol=0,
                                   err_msg=f"{schedule}/{name}")
    np.testing.assert_array_equal(diffusion.timestep_map, np.arange(steps))
    for respacing in respacings:
        spaced = GaussianDiffusion.create(schedule, steps, respacing)
        np.testing.assert_allclose(spaced.betas, ref[f"{schedule}/respaced_{respacing}/betas"], rtol=1e-13,
                                   atol=0, err_msg=f"{schedule} respaced {respacing}")
        np.testing.assert_array_equal(spaced.timestep_map, ref[f"{schedule}/respaced_{respacing}/timestep_map"])
        assert spaced.num_timesteps == len(spaced.timestep_map)


def test_respacing_matches_reference(golden):
    ref = json.loads((golden / "respacing.json").read_text())
    assert set(ref) >= {"27", "fast27", "100", "ddim50", "10,10,10", "10"}
    for spec, kept in ref.items():
        assert space_timesteps(1000, spec) == set(kept), spec


def test_respacing_accepts_lists_and_ints():
    assert space_timesteps(1000, [10, 10, 10]) == space_timesteps(1000, "10,10,10")
    assert space_timesteps(1000, 27) == space_timesteps(1000, "27")
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert len(space_timesteps(300, "10,15,20")) == 45


@pytest.mark.parametrize("spec, fragment", [
    ("fast", "'fast'"),
    ("10,x", "'10,x'"),
    ("ddimfoo", "'ddimfoo'"),
    ("ddim999", "exactly 999"),
    ("1001", "cannot keep 1001"),
])
def test_respacing_errors_name_the_bad_value(spec, fragment):
    with pytest.raises(DiffusionConfigError, match=fragment):
        space_timesteps(1000, spec)
    with pytest.raises(ValueError):
        GaussianDiffusion.create("squaredcos_cap_v2", 1000, spec)


def test_schedule_errors():
    with pytest.raises(DiffusionConfigError, match="'cosine'"):
        get_named_beta_schedule("cosine", 1000)
    with pytest.raises(ConfigError, match="positive integer"):
        get_named_beta_schedule("linear", 0)
    with pytest.raises(DiffusionConfigError, match="at least 2 steps"):
        GaussianDiffusion.create("linear", 1000, "1")


def test_equality_and_hash_follow_tables():
    a = GaussianDiffusion.create("linear", 1000, "10")
    b = GaussianDiffusion.create("linear", 1000, "10")
    c = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    assert a == b and hash(a) == hash(b) and a != c
    with pytest.raises(ValueError):
        a.betas[0] = 0.5  # tables are read-only


# -- per-example maths against numpy float64 ------------------------------------------------------

def _batch(seed, shape=(3, 4, 5, 3)):
    rng = np.random.default_rng(seed)
    x0 = np.clip(rng.normal(size=shape) * 0.6, -1, 1).astype(np.float32)
    x0[0, 0, 0] = [-1.0, 1.0, 0.0]  # edge bins of the decoder likelihood
    noise = rng.normal(size=shape).astype(np.float32)
    out = rng.normal(size=shape[:-1] + (6,)).astype(np.float32)
    out[..., 3:] = np.tanh(out[..., 3:])
    return x0, noise, out


def _col(table, t):
    return np.asarray(table, np.float64)[t][:, None, None, None]


def _np_posterior_log_variance(d, t):
    # Posterior variance beta·(1-ᾱ_{t-1})/(1-ᾱ_t) is 0 at t=0; the log uses t=1's value there.
    acp = np.cumprod(1 - d.betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = d.betas * (1 - acp_prev) / (1 - acp)
    return np.log(np.where(np.arange(len(post_var)) == 0, post_var[1], post_var))[t][:, None, None, None]


def _np_p_mean_variance(d, out, x_t, t, clip):
    eps, v = out[..., :3].astype(np.float64), out[..., 3:].astype(np.float64)
    acp = _col(d.alphas_cumprod, t)
    pred_x0 = (x_t - np.sqrt(1 - acp) * eps) / np.sqrt(acp)
    if clip:
        pred_x0 = np.clip(pred_x0, -1, 1)
    acp_prev = _col(d.alphas_cumprod_prev, t)
    beta = _col(d.betas, t)
    mean = (np.sqrt(acp_prev) * beta * pred_x0 + np.sqrt(1 - beta) * (1 - acp_prev) * x_t) / (1 - acp)
    min_log = _np_posterior_log_variance(d, t)
    logvar = (v + 1) / 2 * np.log(beta) + (1 - v) / 2 * min_log
    return mean, logvar, pred_x0


def test_q_sample_and_p_mean_variance_match_numpy():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "27")
    x0, noise, out = _batch(0)
    t = np.array([0, 13, 26])
    acp = _col(d.alphas_cumprod, t)
    x_t_np = np.sqrt(acp) * x0 + np.sqrt(1 - acp) * noise
    x_t = d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    np.testing.assert_allclose(x_t, x_t_np, rtol=1e-5, atol=1e-5)

    x_t = np.asarray(x_t)
    for clip in (True, False):
        res = d.p_mean_variance(jnp.asarray(out), jnp.asarray(x_t), jnp.asarray(t), clip_denoised=clip)
        mean, logvar, pred_x0 = _np_p_mean_variance(d, out, x_t.astype(np.float64), t, clip)
        np.testing.assert_allclose(res.pred_xstart, pred_x0, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(res.mean, mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(res.log_variance, logvar, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.variance, np.exp(logvar), rtol=1e-4, atol=1e-8)
    # Without clipping the re-derived eps is the model's eps.
    np.testing.assert_allclose(res.eps, out[..., :3], rtol=1e-3, atol=2e-3)


def test_denoised_fn_applies_before_clipping():
    d = GaussianDiffusion.create("linear", 1000, "10")
    x0, noise, out = _batch(1)
    t = jnp.array([9, 9, 9])
    res = d.p_mean_variance(jnp.asarray(out), jnp.asarray(noise), t, denoised_fn=lambda x: x * 0 + 5.0)
    np.testing.assert_array_equal(res.pred_xstart, 1.0)


def test_eps_xstart_round_trip():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000)
    x0, noise, _ = _batch(2)
    t = jnp.array([1, 500, 998])
    x_t = d.q_sample(jnp.asarray(x0), t, jnp.asarray(noise))
    np.testing.assert_allclose(d.predict_eps_from_xstart(x_t, t, jnp.asarray(x0)), noise, atol=2e-3)
    np.testing.assert_allclose(d.predict_xstart_from_eps(x_t, t, jnp.asarray(noise)), x0, atol=2e-3)


def test_condition_mean_and_score_match_numpy():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    x0, noise, out = _batch(3)
    t = np.array([2, 5, 9])
    x_t = np.asarray(d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    grad = (np.random.default_rng(4).normal(size=x0.shape) * 0.1).astype(np.float32)
    res = d.p_mean_variance(jnp.asarray(out), jnp.asarray(x_t), jnp.asarray(t))
    mean, logvar, pred_x0 = _np_p_mean_variance(d, out, x_t.astype(np.float64), t, True)
    np.testing.assert_allclose(d.condition_mean(res, jnp.asarray(grad)), mean + np.exp(logvar) * grad,
                               rtol=1e-4, atol=1e-4)

    acp, acp_prev, beta = _col(d.alphas_cumprod, t), _col(d.alphas_cumprod_prev, t), _col(d.betas, t)
    eps = (x_t - np.sqrt(acp) * pred_x0) / np.sqrt(1 - acp) - np.sqrt(1 - acp) * grad
    new_x0 = (x_t - np.sqrt(1 - acp) * eps) / np.sqrt(acp)
    new_mean = (np.sqrt(acp_prev) * beta * new_x0 + np.sqrt(1 - beta) * (1 - acp_prev) * x_t) / (1 - acp)
    scored = d.condition_score(res, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(grad))
    np.testing.assert_allclose(scored.pred_xstart, new_x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored.mean, new_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored.eps, eps, rtol=1e-3, atol=1e-3)


# -- hybrid loss ----------------------------------------------------------------------------------

def _np_normal_cdf_approx(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_hybrid_loss(d, out, x0, x_t, t, noise):
    """Nichol & Dhariwal's L_hybrid in float64: eps MSE + (T/1000) · L_vb (bits/dim)."""
    x0, x_t = x0.astype(np.float64), x_t.astype(np.float64)
    mse = ((noise - out[..., :3]) ** 2).mean(axis=(1, 2, 3))
    mean, logvar, _ = _np_p_mean_variance(d, out, x_t, t, clip=False)
    acp, acp_prev, beta = _col(d.alphas_cumprod, t), _col(d.alphas_cumprod_prev, t), _col(d.betas, t)
    true_mean = (np.sqrt(acp_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - acp_prev) * x_t) / (1 - acp)
    true_logvar = _np_posterior_log_variance(d, t)
    # KL of two diagonal Gaussians, nats -> bits.
    kl = 0.5 * (logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 / np.exp(logvar) - 1)
    kl = kl.mean(axis=(1, 2, 3)) / np.log(2)
    # Decoder: probability mass of the 8-bit bin around x0, open-ended at the edges.
    std = np.exp(0.5 * logvar)
    upper = _np_normal_cdf_approx((x0 - mean + 1 / 255) / std)
    lower = _np_normal_cdf_approx((x0 - mean - 1 / 255) / std)
    mass = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1 - lower, upper - lower))
    nll = -np.log(np.maximum(mass, 1e-12)).mean(axis=(1, 2, 3)) / np.log(2)
    vb = np.where(t == 0, nll, kl) * d.num_timesteps / 1000
    return mse + vb, mse, vb


@pytest.mark.parametrize("respacing", ["", "100"])
def test_training_losses_match_numpy(respacing):
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, respacing)
    x0, noise, out = _batch(5)
    # A plausible model (eps near the truth) keeps the t=0 decoder's bin masses out of the far
    # tails, where float32 rounds them to the 1e-12 floor and float64 does not.
    out[..., :3] = noise + 0.5 * out[..., :3]
    t = np.array([0, 1, d.num_timesteps // 2])
    x_t = np.asarray(d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    losses = d.training_losses(jnp.asarray(out), jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(noise))
    loss, mse, vb = _np_hybrid_loss(d, out, x0, x_t, t, noise)
    for name, expected in (("mse", mse), ("vb", vb), ("loss", loss)):
        assert losses[name].shape == (3,)
        # float32 cancellation in the t=0 decoder term (bin mass of a ~0.006-wide Gaussian) costs ~5e-4.
        np.testing.assert_allclose(losses[name], expected, rtol=1e-3, atol=1e-5, err_msg=name)
    assert np.all(vb > 0)


def test_training_losses_gradients_are_split():
    """mse trains only the eps channels; vb only the variance channels (mean under stop_gradient)."""
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000)
    x0, noise, out = _batch(6)
    t = jnp.array([0, 10, 700])
    x_t = d.q_sample(jnp.asarray(x0), t, jnp.asarray(noise))

    def term(name):
        return jax.grad(lambda o: d.training_losses(o, jnp.asarray(x0), x_t, t, jnp.asarray(noise))[name].sum())(
            jnp.asarray(out))

    g_mse, g_vb = term("mse"), term("vb")
    assert np.all(np.asarray(g_mse[..., 3:]) == 0) and np.abs(g_mse[..., :3]).max() > 0
    assert np.all(np.asarray(g_vb[..., :3]) == 0) and np.abs(g_vb[..., 3:]).max() > 0


def test_shape_errors_are_specific():
    d = GaussianDiffusion.create("linear", 1000, "10")
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"model output has shape \(2, 4, 4, 3\), expected \(2, 4, 4, 6\)"):
        d.p_mean_variance(x, x, jnp.array([1, 1]))
    with pytest.raises(ValueError, match="noise has shape"):
        d.q_sample(x, jnp.array([1, 1]), jnp.zeros((2, 4, 4, 1)))


def test_start_step_truncates_the_chain_on_the_original_schedule():
    full = GaussianDiffusion.create("linear", 1000)
    assert full.starts_from_noise and GaussianDiffusion.create("linear", 1000, "25").starts_from_noise
    # Respacings that end below the last step still start from pure noise, as in the reference.
    assert GaussianDiffusion.create("linear", 1000, "fast27").timestep_map[-1] == 997
    assert GaussianDiffusion.create("linear", 1000, "fast27").starts_from_noise
    short = GaussianDiffusion.create("linear", 1000, "25", start_step=400)
    assert not short.starts_from_noise
    assert short.num_timesteps == 25 and short.timestep_map[0] == 0 and short.timestep_map[-1] == 400
    np.testing.assert_allclose(short.alphas_cumprod, full.alphas_cumprod[short.timestep_map], rtol=1e-12)
    assert short != GaussianDiffusion(betas=short.betas, timestep_map=short.timestep_map, original_num_steps=1000)
    every = GaussianDiffusion.create("linear", 1000, start_step=9)
    np.testing.assert_array_equal(every.timestep_map, np.arange(10))
    np.testing.assert_allclose(every.betas, full.betas[:10], rtol=1e-12)
    for bad in (0, 1000, -3, 2.5):
        with pytest.raises(DiffusionConfigError, match=r"start_step must be an integer in \[1, 999\]"):
            GaussianDiffusion.create("linear", 1000, "25", start_step=bad)


# -- v-prediction ---------------------------------------------------------------------------------

def test_v_prediction_reads_x0_straight_from_v_even_at_the_last_step():
    eps_d = GaussianDiffusion.create("squaredcos_cap_v2", 1000)
    v_d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, prediction="v")
    assert v_d != eps_d and hash(v_d) != hash(eps_d)
    x0, noise, _ = _batch(7)
    t = jnp.array([0, 500, 999])
    x_t = v_d.q_sample(jnp.asarray(x0), t, jnp.asarray(noise))
    v = v_d.v_target(jnp.asarray(x0), t, jnp.asarray(noise))
    np.testing.assert_allclose(v_d.predict_xstart(x_t, t, v), x0, atol=1e-5)
    # The same x_0 through eps at t=999 divides float32 rounding by sqrt(alpha_bar) ~ 5e-5.
    sigma = np.sqrt(1 - eps_d.alphas_cumprod[999])
    alpha = np.sqrt(eps_d.alphas_cumprod[999])
    v_last = np.float32(alpha) * noise[2] - np.float32(sigma) * x0[2]
    np.testing.assert_allclose(v_d.predict_xstart(x_t[2:], t[2:], jnp.asarray(v_last[None])), x0[2:], atol=1e-5)


def test_v_and_eps_models_with_equivalent_outputs_give_the_same_step_and_guidance():
    """An eps output and the v output it implies give the same p(x_{t-1}|x_t); classifier-free
    guidance on either (an affine mix with weights summing to one) gives the same guided step."""
    from glide_jax.sampling import classifier_free_guidance

    eps_d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    v_d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10", prediction="v")
    _, x_t, out = _batch(8, shape=(4, 4, 5, 3))
    x_t = np.concatenate([x_t[:2], x_t[:2]])        # [conditional | unconditional] halves share x_t
    t = jnp.array([3, 7, 3, 7])
    alpha = np.sqrt(eps_d.alphas_cumprod[[3, 7, 3, 7]])[:, None, None, None]
    sigma = np.sqrt(1 - eps_d.alphas_cumprod[[3, 7, 3, 7]])[:, None, None, None]
    eps_out = out
    v_out = out.copy()
    v_out[..., :3] = (out[..., :3] - sigma * x_t) / alpha     # v = (eps - sigma x_t) / alpha
    for scale in (1.0, 3.0):
        guided = [classifier_free_guidance(lambda x, ts, o=o: jnp.asarray(o, jnp.float32), scale)(jnp.asarray(x_t), t)
                  for o in (eps_out, v_out)]
        a = eps_d.p_mean_variance(guided[0], jnp.asarray(x_t), t)
        b = v_d.p_mean_variance(guided[1], jnp.asarray(x_t), t)
        for field in ("mean", "pred_xstart", "eps", "log_variance"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=2e-4, err_msg=f"{field} at {scale}")


def test_v_training_loss_targets_v_and_an_unknown_prediction_is_refused():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, prediction="v")
    x0, noise, out = _batch(9)
    t = jnp.array([0, 400, 999])
    x_t = d.q_sample(jnp.asarray(x0), t, jnp.asarray(noise))
    v = np.asarray(d.v_target(jnp.asarray(x0), t, jnp.asarray(noise)))
    out[..., :3] = v + 0.1 * out[..., :3]
    losses = d.training_losses(jnp.asarray(out), jnp.asarray(x0), x_t, t, jnp.asarray(noise))
    np.testing.assert_allclose(losses["mse"], np.mean((0.1 * _batch(9)[2][..., :3]) ** 2, axis=(1, 2, 3)), rtol=1e-4)
    # v = sqrt(alpha_bar)·eps - sqrt(1 - alpha_bar)·x_0: mostly eps at t=0, mostly -x_0 at t=999.
    np.testing.assert_allclose(v[0], noise[0], atol=0.03)
    np.testing.assert_allclose(v[2], -x0[2], atol=1e-3)
    with pytest.raises(DiffusionConfigError, match=r"prediction must be one of \['eps', 'v'\], got 'x0'"):
        GaussianDiffusion.create("linear", 1000, prediction="x0")
    from glide_jax.config import ModelConfig
    with pytest.raises(ConfigError, match=r"prediction must be one of \['eps', 'v'\], got 'V'"):
        ModelConfig(prediction="V")
    # The Pipeline (and with it the CLIs) builds its diffusions from the model's config.
    from glide_jax.diffusion import diffusion_for_model
    assert diffusion_for_model(ModelConfig(image_size=64, prediction="v"), "10").prediction == "v"
    assert diffusion_for_model(ModelConfig(image_size=64), "10").prediction == "eps"


def test_diffusion_for_model_follows_the_model_config():
    """One place turns a model config into its diffusion: schedule (GLIDE's by model kind unless
    the config names one), step count and prediction all come from the config."""
    from glide_jax.config import ModelConfig
    from glide_jax.diffusion import default_schedule, diffusion_for_model

    base, upsampler = ModelConfig(image_size=64), ModelConfig(image_size=256, super_res=True)
    assert (default_schedule(base), default_schedule(upsampler)) == ("squaredcos_cap_v2", "linear")
    assert default_schedule(ModelConfig(image_size=64, noise_schedule="linear")) == "linear"
    for config in (base, upsampler):
        made = diffusion_for_model(config, "27")
        expected = GaussianDiffusion.create(default_schedule(config), 1000, "27")
        assert made == expected and made.num_timesteps == 27
    v = ModelConfig(image_size=64, prediction="v", diffusion_steps=500)
    made = diffusion_for_model(v, start_step=200, schedule="linear")
    assert (made.prediction, made.original_num_steps, made.num_timesteps) == ("v", 500, 201)
    assert made == GaussianDiffusion.create("linear", 500, start_step=200, prediction="v")
