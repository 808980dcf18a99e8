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


@functools.partial(jax.jit, static_argnames=("config", "diffusion", "sampler", "guided"))
def run_sampler(params, tokens, mask, noise, step_noise, extra, guidance_scale, *, config, diffusion,
                sampler, guided):
    """The whole sampling run as one program, params and inputs as arguments."""
    model = GlideUNet(config)
    variables = {"params": params}
    text = model.apply(variables, tokens, mask, method=GlideUNet.encode_text)

    def model_fn(x_t, timesteps):
        return model.apply(variables, x_t, timesteps, text, method=GlideUNet.denoise,
                           low_res=extra.get("low_res"), inpaint_image=extra.get("inpaint_image"),
                           inpaint_mask=extra.get("inpaint_mask"))

    if guided:
        model_fn = classifier_free_guidance(model_fn, guidance_scale)
    denoised_fn = None
    if "inpaint_image" in extra:
        denoised_fn = inpaint_denoised_fn(extra["inpaint_image"], extra["inpaint_mask"])
    cond_fn = extra.get("cond_fn")
    sample = ddim_sample if sampler == "ddim" else ddpm_sample
    kwargs = {} if sampler == "ddim" else {"step_noise": step_noise}
    return sample(model_fn, diffusion, noise.shape, jax.random.key(0), noise=noise, clip_denoised=True,
                  denoised_fn=denoised_fn, cond_fn=cond_fn, return_trajectory=True, **kwargs)


def check(ref, runner, diffusion):
    """Compare a free-running run with the reference, re-synchronising after the first step if needed.

    The first step of a cosine-schedule trace (t = 999) predicts x_0 = 20291·x_t − 20291·eps: a
    pixel whose prediction lands near the ±1 clip turns a 1e-6 float32 difference in eps (the
    README's oneDNN-vs-reference spread) into ~1e-2 there, and later steps carry it along. Such a
    pixel is allowed in the free-running run (at most 0.1% of elements per step beyond ATOL, none
    at 1e-2), and every later step is then checked strictly from the reference's own first-step
    output: the same respaced process without its first index has identical tables.
    """
    expected = jnp.asarray(np.moveaxis(ref["per_step"], 2, -1))
    step_noise = nhwc(ref["step_noise"]) if "step_noise" in ref else None
    x_T = nhwc(ref["noise_times_temp"] if "noise_times_temp" in ref else ref["noise"])
    final, per_step = runner(x_T, step_noise, diffusion)
    assert per_step.shape == expected.shape
    np.testing.assert_allclose(final, np.moveaxis(ref["final"], 1, -1), atol=1e-2, rtol=0)
    err = np.abs(np.asarray(per_step - expected)).reshape(len(expected), -1)
    if err.max() < ATOL:
        return
    assert err.max() < 1e-2, f"per-step max abs error {err.max(axis=1)}"
    assert (err > ATOL).mean(axis=1).max() <= 1e-3, f"elements beyond {ATOL} per step: {(err > ATOL).sum(axis=1)}"
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
