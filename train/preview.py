"""Sample grids during training: the EMA (or raw) params, classifier-free guided, on fixed inputs.

The preview inputs are fixed for the whole run (and across resumes): the configured prompts, or
the captions of the first `sample.count` examples of a separately seeded loader, whose images
also give the upsampler's low-res input and the inpainting models' known region.
"""

from __future__ import annotations

import io
import json

import numpy as np

from glide_jax import paths

# Any seed offset works; it only has to keep the preview loader's stream apart from training's.
_PREVIEW_SEED_OFFSET = 7919


class PreviewSampler:
    def __init__(self, trainer):
        import jax

        from glide_jax import data, parallel, sampling
        from glide_jax.config import ConfigError
        from glide_jax.diffusion import diffusion_for_model
        from glide_jax.unet import GlideUNet

        cfg = trainer.cfg
        if cfg.model_kind == "clip":
            raise ConfigError("sample.every: sample grids are for the diffusion models, not model_kind 'clip'")
        self.trainer = trainer
        self.section = cfg.sample
        self.out_dir = paths.as_path(cfg.sample.dir) if cfg.sample.dir else trainer.run_dir / "samples"
        mc = trainer.model_config
        n = cfg.sample.count
        loader = data.DataLoader(
            data.make_source(dict(cfg.data.source)), batch_size=n, image_size=mc.image_size,
            seed=cfg.seed + _PREVIEW_SEED_OFFSET, prefetch=0,
            low_res_size=trainer.low_res_size, degradation=data.Degradation(),
            masks=trainer.loader.mask_config)
        with loader:
            batch = next(loader)
        prompts = list(cfg.sample.prompts) or list(batch["captions"])
        prompts = (prompts * n)[:n]
        self.prompts = prompts
        inputs = {"x_known": batch["images"]}
        if mc.has_text:
            tokens, mask = trainer.tokenizer.tokenize_batch(prompts, mc.text_ctx)
            empty_tokens, empty_mask = trainer.tokenizer.pad_and_mask([], mc.text_ctx)
            inputs["tokens"], inputs["mask"] = tokens, mask
            inputs["uncond_tokens"] = np.repeat(empty_tokens[None], n, 0)
            inputs["uncond_mask"] = np.repeat(empty_mask[None], n, 0)
        for key in ("low_res", "inpaint_mask"):
            if key in batch:
                inputs[key] = batch[key]
        # Every process builds the same inputs, so they can be placed as one global batch.
        padded, self.count = parallel.pad_batch(inputs, parallel.num_batch_shards(trainer.mesh))
        sharding = parallel.batch_sharding(trainer.mesh)
        self.inputs = parallel.place(padded, {k: sharding for k in padded})
        self.known = batch["images"]

        model = GlideUNet(mc, jax.numpy.float32)
        diffusion = diffusion_for_model(mc, cfg.sample.respacing, schedule=trainer.schedule,
                                        steps=cfg.diffusion.steps)
        sampler = sampling.ddim_sample if cfg.sample.sampler == "ddim" else sampling.ddpm_sample
        size = mc.image_size
        jnp = jax.numpy

        def generate(params, inputs, key, guidance_scale):
            double = lambda a, b: jnp.concatenate([a, b], axis=0)
            kwargs = {}
            tokens = mask = None
            if mc.has_text:
                tokens = double(inputs["tokens"], inputs["uncond_tokens"])
                mask = double(inputs["mask"], inputs["uncond_mask"])
            if "low_res" in inputs:
                kwargs["low_res"] = double(inputs["low_res"], inputs["low_res"])
            denoised_fn = None
            if "inpaint_mask" in inputs:
                image = double(inputs["x_known"], inputs["x_known"])
                keep = double(inputs["inpaint_mask"], inputs["inpaint_mask"])
                kwargs["inpaint_image"], kwargs["inpaint_mask"] = image * keep, keep
                denoised_fn = sampling.inpaint_denoised_fn(image, keep)

            def model_fn(x_t, timesteps):
                return model.apply({"params": params}, x_t, timesteps, tokens, mask, **kwargs)

            guided = sampling.classifier_free_guidance(model_fn, guidance_scale)
            batch_size = inputs["x_known"].shape[0]
            out = sampler(guided, diffusion, (2 * batch_size, size, size, 3), key, denoised_fn=denoised_fn)
            return out[:batch_size]

        self.generate = jax.jit(generate, out_shardings=parallel.replicated_sharding(trainer.mesh))

    def write(self, step: int, metrics=None):
        """Samples a grid at `step` and writes it as `step_<step>.png` (and to `metrics`, a
        `train.metrics.MetricsWriter`, when given); returns its path on the primary process."""
        import jax

        from glide_jax import data, parallel

        state = self.trainer.state
        params = state.ema_params if self.section.use_ema else state.params
        key = jax.random.fold_in(jax.random.key(self.trainer.cfg.seed), step)
        images = self.generate(params, self.inputs, key, self.section.guidance_scale)
        images = parallel.unpad(parallel.to_host(images), self.count)
        if not parallel.is_primary():
            return None
        rows = [data.to_uint8(images)]
        if "low_res" in self.inputs or "inpaint_mask" in self.inputs:
            rows.append(data.to_uint8(self.known[:self.count]))   # what the model was conditioned on
        grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:08d}.png"
        from PIL import Image
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        paths.write_bytes(path, png.getvalue())
        paths.write_bytes(self.out_dir / "prompts.json", (json.dumps(self.prompts, indent=1) + "\n").encode())
        if metrics is not None:
            metrics.image("samples", step, grid, caption=" | ".join(self.prompts))
        return path

