"""End-to-end sampling parity with the reference: golden `.pt` -> converter -> orbax save -> load ->
model -> compiled sampler, compared per step with the original PyTorch GLIDE's traces."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import clip
from glide_jax.checkpoint import load_model
from glide_jax.config import ModelConfig
from glide_jax.convert import convert_checkpoint
from glide_jax.diffusion import GaussianDiffusion
from glide_jax.sampling import classifier_free_guidance, ddim_sample, ddpm_sample, inpaint_denoised_fn
from glide_jax.unet import GlideUNet

# The golden README's bound for per-step traces; a 1e-2 mismatch is a bug.
ATOL = 1e-3


def nhwc(array):
    return jnp.asarray(np.moveaxis(np.asarray(array), -3, -1))


@pytest.fixture(scope="module")
def load(golden, tmp_path_factory):
    """Converted, saved and reloaded params per golden model name (each converted once)."""
    cache = {}

    def get(name):
        if name not in cache:
            config = ModelConfig.from_json(golden / f"{name}.config.json")
            out = tmp_path_factory.mktemp("models") / name
            convert_checkpoint(golden / f"{name}.pt", config, out)
            saved_config, params = load_model(out)
            cache[name] = ModelConfig.from_dict(saved_config), params
        return cache[name]

    return get


def trace(golden, name):
    data = np.load(golden / f"trace_{name}.npz")
    return {k: data[k] for k in data.files}


def guided_model_fn(params, tokens, mask, extra, guidance_scale, config, guided):
    model = GlideUNet(config)
    variables = {"params": params}
    text = model.apply(variables, tokens, mask, method=GlideUNet.encode_text)

    def model_fn(x_t, timesteps):
        return model.apply(variables, x_t, timesteps, text, method=GlideUNet.denoise,
                           low_res=extra.get("low_res"), inpaint_image=extra.get("inpaint_image"),
                           inpaint_mask=extra.get("inpaint_mask"))

    return classifier_free_guidance(model_fn, guidance_scale) if guided else model_fn


def denoised_fn_of(extra):
    if "inpaint_image" in extra:
        return inpaint_denoised_fn(extra["inpaint_image"], extra["inpaint_mask"])
    return None


@functools.partial(jax.jit, static_argnames=("config", "diffusion", "sampler", "guided"))
def run_sampler(params, tokens, mask, noise, step_noise, extra, guidance_scale, *, config, diffusion,
                sampler, guided):
    """The whole sampling run as one program, params and inputs as arguments."""
    model_fn = guided_model_fn(params, tokens, mask, extra, guidance_scale, config, guided)
    sample = ddim_sample if sampler == "ddim" else ddpm_sample
    kwargs = {} if sampler == "ddim" else {"step_noise": step_noise}
    return sample(model_fn, diffusion, noise.shape, jax.random.key(0), noise=noise, clip_denoised=True,
                  denoised_fn=denoised_fn_of(extra), cond_fn=extra.get("cond_fn"), return_trajectory=True,
                  **kwargs)


@functools.partial(jax.jit, static_argnames=("config", "diffusion", "guided"))
def first_unclipped_xstart(params, tokens, mask, noise, extra, guidance_scale, *, config, diffusion, guided):
    """Our x_0 prediction at the first step before clipping, and where it depends on eps at all
    (everywhere, except the known region that inpainting overwrites)."""
    model_fn = guided_model_fn(params, tokens, mask, extra, guidance_scale, config, guided)
    t = diffusion.num_timesteps - 1
    timesteps = jnp.full(noise.shape[:1], diffusion.original_timesteps(t), jnp.int32)
    out = diffusion.p_mean_variance(model_fn(noise, timesteps), noise, t, clip_denoised=False)
    depends_on_eps = jnp.ones_like(noise, bool)
    if "inpaint_mask" in extra:
        depends_on_eps = jnp.broadcast_to(extra["inpaint_mask"] == 0, noise.shape)
    return out.pred_xstart, depends_on_eps


# The golden README's float32 bound on model outputs.
MODEL_ATOL = 1e-4


def check(ref, runner, diffusion):
    """Every step within ATOL of the reference, except where the first step provably amplifies
    float32 noise.

    At the first step of a cosine trace (t = 999) x_0 = x_t/sqrt(abar) - sqrt(1/abar - 1)·eps with
    sqrt(1/abar - 1) ~ 2e4. Where that prediction is clipped to ±1 the step does not depend on eps
    at all; where it is not (a handful of pixels near the clip), the README's 1e-4 model tolerance
    becomes up to ~2 in x_0 and ~0.3 in x_{t-1}, so no float32 implementation can promise 1e-3
    there. So: step 0 must match at ATOL outside that analytically sensitive set, the set must be
    tiny, and every later step is checked at ATOL from the reference's own step-0 output (the same
    respaced process minus its first index has identical tables): the rest of the run is compared
    strictly, step by step.
    """
    expected = jnp.asarray(np.moveaxis(ref["per_step"], 2, -1))
    step_noise = nhwc(ref["step_noise"]) if "step_noise" in ref else None
    x_T = nhwc(ref["noise_times_temp"] if "noise_times_temp" in ref else ref["noise"])
    _, per_step = runner(x_T, step_noise, diffusion)
    assert per_step.shape == expected.shape

    first_err = np.abs(np.asarray(per_step[0] - expected[0]))
    t = diffusion.num_timesteps - 1
    xstart_gain = float(np.sqrt(1.0 / diffusion.alphas_cumprod[t] - 1.0))
    step_gain = float(max(abs(diffusion.posterior_mean_coef1[t]), np.sqrt(diffusion.alphas_cumprod_prev[t])))
    xstart, depends_on_eps = (np.asarray(a) for a in runner.first_xstart(x_T, diffusion))
    sensitive = depends_on_eps & (np.abs(xstart) < 1.0 + xstart_gain * MODEL_ATOL)
    amplified = step_gain * xstart_gain * MODEL_ATOL
    bound = ATOL + np.where(sensitive, amplified, 0.0)
    assert (first_err < bound).all(), (
        f"first step: max error {first_err.max()} (bound {ATOL} where x_0 is clipped, {ATOL + amplified} where"
        f" it is not); {(first_err >= bound).sum()} elements beyond")
    if amplified > ATOL:  # a loose bound may only cover the few pixels near the clip
        assert sensitive.mean() <= 1e-3, f"{sensitive.sum()} elements of the first step are ill-conditioned"

    rest = GaussianDiffusion(betas=diffusion.betas[:-1], timestep_map=diffusion.timestep_map[:-1],
                             original_num_steps=diffusion.original_num_steps)
    _, resynced = runner(expected[0], None if step_noise is None else step_noise[1:], rest)
    resync_err = np.abs(np.asarray(resynced - expected[1:])).reshape(len(expected) - 1, -1).max(axis=1)
    assert resync_err.max() < ATOL, f"per-step max abs error after step 0: {resync_err}"


def diffusion_of(ref):
    return GaussianDiffusion.create(str(ref["schedule"]), 1000, str(ref["respacing"]))


def runner_for(ref, config, params, extra, *, sampler, guided):
    tokens, mask = jnp.asarray(ref["tokens"], jnp.int32), jnp.asarray(ref["mask"])
    scale = jnp.float32(ref["guidance_scale"]) if guided else jnp.float32(0)

    def run(x_T, step_noise, diffusion):
        return run_sampler(params, tokens, mask, x_T, step_noise, extra, scale, config=config,
                           diffusion=diffusion, sampler=sampler, guided=guided)

    def first_xstart(x_T, diffusion):
        return first_unclipped_xstart(params, tokens, mask, x_T, extra, scale, config=config,
                                      diffusion=diffusion, guided=guided)

    run.first_xstart = first_xstart
    return run


@pytest.mark.parametrize("name, sampler", [("ddim_cfg", "ddim"), ("ancestral_cfg", "ddpm")])
def test_base_guided_traces(golden, load, name, sampler):
    ref = trace(golden, name)
    config, params = load("base")
    check(ref, runner_for(ref, config, params, {}, sampler=sampler, guided=True), diffusion_of(ref))


def test_upsample_ddim_trace(golden, load):
    ref = trace(golden, "upsample_ddim")
    config, params = load("upsample")
    assert config.super_res and diffusion_of(ref).num_timesteps == 27
    check(ref, runner_for(ref, config, params, {"low_res": nhwc(ref["low_res"])}, sampler="ddim", guided=False),
          diffusion_of(ref))


def test_inpaint_ancestral_guided_trace(golden, load):
    ref = trace(golden, "inpaint_ancestral_cfg")
    config, params = load("base_inpaint")
    assert config.inpaint
    extra = {"inpaint_image": nhwc(ref["inpaint_image"]), "inpaint_mask": nhwc(ref["inpaint_mask"])}
    check(ref, runner_for(ref, config, params, extra, sampler="ddpm", guided=True), diffusion_of(ref))


def test_clip_guided_trace(golden, load):
    ref = trace(golden, "clip_guided")
    config, params = load("base")
    clip_config = clip.ClipConfig.from_json(golden / "clip.config.json")
    clip_params = clip.load_clip_checkpoints(golden / "clip_image_enc.pt", golden / "clip_text_enc.pt", clip_config)
    text_embeddings = clip.encode_text(clip_params, clip_config, jnp.asarray(ref["clip_tokens"], jnp.int32),
                                       jnp.asarray(ref["clip_text_len"], jnp.int32))
    cond_fn = clip.clip_cond_fn(clip_params, clip_config, text_embeddings, ref["clip_guidance_scale"])
    check(ref, runner_for(ref, config, params, {"cond_fn": cond_fn}, sampler="ddpm", guided=False),
          diffusion_of(ref))
