"""Samplers against a hand-written numpy reverse process, determinism, and compilation shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.diffusion import GaussianDiffusion
from glide_jax.sampling import classifier_free_guidance, ddim_sample, ddpm_sample, inpaint_denoised_fn

SHAPE = (4, 5, 6, 3)
# First half of the batch "conditional": the fake model's eps depends on it, as a real one's
# depends on the tokens.
COND = np.array([1.0, 1.0, 0.0, 0.0])[:, None, None, None]


def fake_model(x, timesteps):
    """Linear in x and in the original timestep; v stays inside [-1, 1]."""
    t = timesteps.astype(jnp.float32)[:, None, None, None]
    eps = 0.8 * x + 0.0004 * t + 0.3 * jnp.asarray(COND, x.dtype) - 0.1
    v = 0.5 * jnp.tanh(x) + 0.0006 * t - 0.4
    return jnp.concatenate([eps, v], axis=-1)


def np_fake_model(x, orig_t):
    eps = 0.8 * x + 0.0004 * orig_t + 0.3 * COND - 0.1
    v = 0.5 * np.tanh(x) + 0.0006 * orig_t - 0.4
    return eps, v


def fake_grad(x, timesteps):
    return -0.05 * x + 0.0001 * timesteps.astype(jnp.float32)[:, None, None, None]


def np_fake_grad(x, orig_t):
    return -0.05 * x + 0.0001 * orig_t


def _inputs(seed, steps):
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=SHAPE).astype(np.float32)
    step_noise = rng.normal(size=(steps,) + SHAPE).astype(np.float32)
    image = np.clip(rng.normal(size=SHAPE) * 0.5, -1, 1).astype(np.float32)
    mask = (rng.uniform(size=SHAPE[:3] + (1,)) > 0.5).astype(np.float32)
    return noise, step_noise, image, mask


def np_reverse_process(d, noise, step_noise, *, ddim, eta=0.0, guidance=None, cond=False,
                       inpaint=None, clip=True):
    """The reverse process in float64, step by step, from the DDPM/DDIM formulas."""
    betas = np.asarray(d.betas, np.float64)
    acp = np.cumprod(1 - betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    x = noise.astype(np.float64)
    trajectory = []
    for i, t in enumerate(range(len(betas) - 1, -1, -1)):
        orig = float(d.timestep_map[t])
        if guidance is None:
            eps, v = np_fake_model(x, orig)
        else:
            half = x[: len(x) // 2]
            eps, v = np_fake_model(np.concatenate([half, half]), orig)
            c, u = np.split(eps, 2)
            eps = np.concatenate([u + guidance * (c - u)] * 2)
        x0 = (x - np.sqrt(1 - acp[t]) * eps) / np.sqrt(acp[t])
        if inpaint is not None:
            image, mask = inpaint
            x0 = x0 * (1 - mask) + image * mask
        if clip:
            x0 = np.clip(x0, -1, 1)
        if ddim:
            eps = (x - np.sqrt(acp[t]) * x0) / np.sqrt(1 - acp[t])
            if cond:
                eps = eps - np.sqrt(1 - acp[t]) * np_fake_grad(x, orig)
                x0 = (x - np.sqrt(1 - acp[t]) * eps) / np.sqrt(acp[t])
            sigma = eta * np.sqrt((1 - acp_prev[t]) / (1 - acp[t]) * (1 - acp[t] / acp_prev[t]))
            x = x0 * np.sqrt(acp_prev[t]) + np.sqrt(1 - acp_prev[t] - sigma ** 2) * eps
            if t > 0:
                x = x + sigma * step_noise[i]
        else:
            mean = (betas[t] * np.sqrt(acp_prev[t]) * x0
                    + (1 - acp_prev[t]) * np.sqrt(1 - betas[t]) * x) / (1 - acp[t])
            logvar = (v + 1) / 2 * np.log(betas[t]) + (1 - v) / 2 * post_logvar[t]
            if cond:
                mean = mean + np.exp(logvar) * np_fake_grad(x, orig)
            x = mean + (np.exp(0.5 * logvar) * step_noise[i] if t > 0 else 0.0)
        trajectory.append(x)
    return np.stack(trajectory)


CASES = {
    "plain": {},
    "guided": dict(guidance=3.0),
    "cond_fn": dict(cond=True),
    "inpaint_guided": dict(guidance=2.0, inpaint=True),
    "unclipped": dict(clip=False),
}


@pytest.mark.parametrize("sampler, case", [
    ("ddpm", "plain"), ("ddpm", "guided"), ("ddpm", "cond_fn"), ("ddpm", "inpaint_guided"), ("ddpm", "unclipped"),
    ("ddim", "plain"), ("ddim", "cond_fn"), ("ddim", "inpaint_guided"), ("ddim_eta", "guided"),
    ("ddim_eta", "cond_fn"),
])
def test_trajectory_matches_numpy(sampler, case):
    opts = dict(CASES[case])
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    noise, step_noise, image, mask = _inputs(0, d.num_timesteps)
    model_fn = fake_model
    if "guidance" in opts:
        model_fn = classifier_free_guidance(fake_model, opts["guidance"])
    kwargs = dict(noise=jnp.asarray(noise), step_noise=jnp.asarray(step_noise),
                  clip_denoised=opts.get("clip", True), return_trajectory=True,
                  cond_fn=fake_grad if opts.get("cond") else None)
    if opts.pop("inpaint", False):
        kwargs["denoised_fn"] = inpaint_denoised_fn(jnp.asarray(image), jnp.asarray(mask))
        opts["inpaint"] = (image.astype(np.float64), mask.astype(np.float64))
    eta = {"ddpm": 0.0, "ddim": 0.0, "ddim_eta": 0.7}[sampler]
    if sampler == "ddpm":
        final, traj = ddpm_sample(model_fn, d, SHAPE, jax.random.key(0), **kwargs)
    else:
        final, traj = ddim_sample(model_fn, d, SHAPE, jax.random.key(0), eta=eta, **kwargs)
    expected = np_reverse_process(d, noise, step_noise, ddim=sampler != "ddpm", eta=eta, **opts)
    assert traj.shape == (d.num_timesteps,) + SHAPE
    # DDIM score conditioning re-derives an unclipped x_0 = x_0 + (1-ᾱ)/sqrt(ᾱ)·g, ~300 at the
    # first step of the cosine schedule: float32 rounding there leaves ~1e-3 on later steps.
    atol = 2e-3 if sampler != "ddpm" and opts.get("cond") else 2e-4
    np.testing.assert_allclose(traj, expected, atol=atol, rtol=1e-4)
    np.testing.assert_array_equal(final, traj[-1])
    assert not np.allclose(expected[0], expected[-1])


def test_model_gets_original_timesteps():
    d = GaussianDiffusion.create("linear", 1000, "fast27")
    seen = []

    def model_fn(x, timesteps):
        jax.debug.callback(lambda ts: seen.append(np.asarray(ts)), timesteps)
        assert timesteps.dtype == jnp.int32 and timesteps.shape == (x.shape[0],)
        return jnp.zeros(x.shape[:-1] + (6,), x.dtype)

    jax.block_until_ready(ddim_sample(model_fn, d, (2, 2, 2, 3), jax.random.key(1)))
    np.testing.assert_array_equal(np.stack(seen), np.repeat(d.timestep_map[::-1, None], 2, axis=1))


def test_same_key_same_images_and_keys_matter():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    sample = jax.jit(lambda key: ddpm_sample(fake_model, d, SHAPE, key))
    a, b, c = sample(jax.random.key(7)), sample(jax.random.key(7)), sample(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).mean() > 1e-2
    # Same initial noise, different keys: only the per-step draws differ.
    noise = jax.random.normal(jax.random.key(0), SHAPE)
    ddpm = jax.jit(lambda key: ddpm_sample(fake_model, d, SHAPE, key, noise=noise))
    x1, x2 = ddpm(jax.random.key(1)), ddpm(jax.random.key(2))
    assert np.abs(np.asarray(x1) - np.asarray(x2)).mean() > 1e-2
    # DDIM with eta 0 is deterministic given x_T.
    ddim = jax.jit(lambda key: ddim_sample(fake_model, d, SHAPE, key, noise=noise))
    y1, y2 = ddim(jax.random.key(1)), ddim(jax.random.key(2))
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_whole_loop_is_one_program_and_model_traced_once(sampler):
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "100")
    traces = []

    def model_fn(x, timesteps):
        traces.append(1)
        return fake_model(x, timesteps)

    @jax.jit
    def generate(key, guidance_scale):
        return sampler(classifier_free_guidance(model_fn, guidance_scale), d, SHAPE, key)

    text = generate.lower(jax.random.key(0), 3.0).as_text()
    assert "stablehlo.while" in text
    assert len(traces) == 1  # 100 steps, one trace of the model
    generate(jax.random.key(0), 3.0)
    generate(jax.random.key(0), 5.0)  # a new guidance scale is an argument, not a recompile
    assert len(traces) == 1  # both calls reuse the lowering's trace


def test_params_are_arguments_not_constants():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    weights = jnp.full((3, 6), 0.123456, jnp.float32)

    def make_model(w):
        return lambda x, timesteps: jnp.tanh(x @ w)

    @jax.jit
    def generate(params, key):
        return ddim_sample(make_model(params), d, SHAPE, key)

    @jax.jit
    def generate_baked(key):
        return ddim_sample(make_model(weights), d, SHAPE, key)

    assert "1.234560e-01" not in generate.lower(weights, jax.random.key(0)).as_text()
    assert "1.234560e-01" in generate_baked.lower(jax.random.key(0)).as_text()  # the check can fail


def test_classifier_free_guidance_combines_halves():
    calls = []

    def model_fn(x, timesteps):
        calls.append(np.asarray(x))
        return fake_model(x, timesteps)

    x = jax.random.normal(jax.random.key(3), SHAPE)
    ts = jnp.full((4,), 500, jnp.int32)
    out = classifier_free_guidance(model_fn, 4.0)(x, ts)
    seen = calls[0]
    np.testing.assert_array_equal(seen[:2], seen[2:])
    np.testing.assert_array_equal(seen[:2], np.asarray(x)[:2])
    raw = np.asarray(fake_model(jnp.asarray(seen), ts))
    guided = raw[2:, ..., :3] + 4.0 * (raw[:2, ..., :3] - raw[2:, ..., :3])
    np.testing.assert_allclose(out[..., :3], np.concatenate([guided, guided]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[..., 3:], raw[..., 3:])
    with pytest.raises(ValueError, match="even batch"):
        classifier_free_guidance(fake_model, 3.0)(x[:3], ts[:3])


def test_inpaint_denoised_fn():
    _, _, image, mask = _inputs(4, 1)
    x0 = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
    forced = inpaint_denoised_fn(jnp.asarray(image), jnp.asarray(mask))(jnp.asarray(x0))
    np.testing.assert_array_equal(forced, np.where(mask > 0, image, x0))
    with pytest.raises(ValueError, match=r"mask \(B, H, W, 1\)"):
        inpaint_denoised_fn(jnp.asarray(image), jnp.asarray(image))


def test_bad_shapes_are_reported():
    d = GaussianDiffusion.create("squaredcos_cap_v2", 1000, "10")
    with pytest.raises(ValueError, match=r"step_noise has shape \(9, 4, 5, 6, 3\), expected \(10, 4, 5, 6, 3\)"):
        ddpm_sample(fake_model, d, SHAPE, jax.random.key(0), step_noise=jnp.zeros((9,) + SHAPE))
    with pytest.raises(ValueError, match="noise has shape"):
        ddim_sample(fake_model, d, SHAPE, jax.random.key(0), noise=jnp.zeros((1, 5, 6, 3)))
    with pytest.raises(ValueError, match="model output has shape"):
        ddim_sample(lambda x, t: x, d, SHAPE, jax.random.key(0))
