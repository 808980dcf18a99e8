"""`Pipeline`: GLIDE's models loaded once, then called with prompts.

    >>> from glide_jax import Pipeline
    >>> pipe = Pipeline.from_pretrained("demo")        # or "glide", or a directory of models
    >>> out = pipe(["a red circle on a white background"], seed=0, guidance_scale=3.0)
    >>> out.images[0].save("circle.png")                # PIL images; out.arrays is uint8 NHWC
    >>> edited = pipe.inpaint("a blue square", image, mask)   # mask: white / 1 = keep

The path of data is prompt → tokenizer → text encoder (once) → one compiled sampling loop per
stage (`glide_jax.stages`) → images. The pipeline owns what does not change between calls: the
models (each loaded on first use and placed on the device mesh once), their tokenizers, the
diffusions of each respacing, and, through `glide_jax.stages`, the compiled programs, so a second
call with the same shapes runs without compiling.

Sampling defaults (steps, samplers, guidance scales, where the upsampler starts) are the
reference's notebooks' unless the model directory says otherwise in `pipeline.json`
(`SamplingDefaults`): the bundled demo models carry their own.

Randomness: image i of a call is drawn from `fold_in(fold_in(key(seed), stage), first_index + i)`
(stage 0 the base, 1 the upsampler), so the same seed gives the same images whatever the batch,
the padding or the number of devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from glide_jax import images as image_lib
from glide_jax import stages
from glide_jax.stages import PipelineError, StageTiming

__all__ = ["Pipeline", "PipelineError", "PipelineOutput", "SamplingDefaults", "DEFAULTS_FILE"]

DEFAULTS_FILE = "pipeline.json"
SENTENCEPIECE_FILE = "tokenizer.model"   # a model's own tokenizer, beside its config.json
CLIP_TABLE_FILE = "clip_bpe_subset.json"  # a noised CLIP's own cut of CLIP's BPE (the demo's)
GUIDANCES = ("cfg", "clip")
FULL_CHAIN_START = 999   # the schedule's last step: the upsampler starts from pure noise
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """What `Pipeline.__call__` uses for an argument left as None: the reference's notebooks'
    (100 base steps with classifier-free guidance 3, the upsampler's fast27 from pure noise at
    temperature 0.997), or a model directory's `pipeline.json`."""
    guidance_scale: float = 3.0
    clip_guidance_scale: float = 3.0
    sampler: str = "ddpm"
    steps: str = "100"
    upsample_sampler: str = "ddim"
    # The reference's inpainting notebook upsamples with ancestral steps.
    upsample_inpaint_sampler: str = "ddpm"
    upsample_steps: str = "fast27"
    upsample_start: int = FULL_CHAIN_START
    upsample_temp: float = 0.997

    @classmethod
    def from_json(cls, path: Path) -> "SamplingDefaults":
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PipelineError(f"{path}: not a readable JSON object of sampling defaults ({err})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            unknown = sorted(set(values) - known) if isinstance(values, dict) else values
            raise PipelineError(f"{path}: unknown sampling default(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: (str(v) if k in ("steps", "upsample_steps") else v) for k, v in values.items()})


@dataclasses.dataclass
class PipelineOutput:
    """What one call made: `arrays` (N, H, W, 3) uint8, image i for `prompts[i]`."""
    arrays: np.ndarray
    prompts: list[str]
    negative_prompts: list[str | None]
    seed: int
    indices: np.ndarray                      # each image's global index (its noise)
    settings: dict[str, Any]                 # sampler, steps, guidance... as used
    timings: dict[str, StageTiming]          # per stage
    base_arrays: np.ndarray | None = None    # the base stage's images, before upsampling

    @property
    def images(self) -> list:
        from PIL import Image

        return [Image.fromarray(a) for a in self.arrays]

    def metadata(self, i: int) -> dict[str, str]:
        """Image i's settings as strings, for PNG text chunks."""
        info = {"prompt": self.prompts[i], "seed": str(self.seed), "index": str(int(self.indices[i]))}
        if self.negative_prompts[i] is not None:
            info["negative_prompt"] = self.negative_prompts[i]
        info.update({k: str(v) for k, v in self.settings.items() if v is not None})
        return info


@dataclasses.dataclass
class _Model:
    config: Any
    params: Any
    tokenizer: Any


class Pipeline:
    """The GLIDE cascade (base → upsampler, inpainting variants, noised-CLIP guidance) of one
    model family. Build it with `from_pretrained`; see the module docstring."""

    def __init__(self, source: str | os.PathLike = "demo", *, dtype: str = "float32", mesh=None,
                 vocab_dir: str | os.PathLike | None = None, defaults: SamplingDefaults | None = None,
                 compile_cache: bool = True, **released_options):
        from glide_jax import compile_cache as xla_cache
        from glide_jax import parallel, weights

        if dtype not in stages.DTYPES:
            raise PipelineError(f"dtype must be one of {tuple(stages.DTYPES)}, got {dtype!r}")
        self.source = str(source)
        if self.source == "glide":
            self.directory = None
        elif self.source == "demo":
            self.directory = weights.DEMO_DIR
        else:
            # A Hub repository id is resolved once, to its local snapshot, which is then a directory.
            self.directory = weights.hub_snapshot(self.source) if weights.is_hub_id(source) else Path(source).expanduser()
        if self.directory is not None and not self.directory.is_dir():
            raise PipelineError(f"model source {self.source!r}: expected 'demo', 'glide' or a directory of "
                                f"models, and {self.directory} is not a directory")
        self.dtype, self.vocab_dir = dtype, vocab_dir
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        self.defaults = defaults or self._directory_defaults()
        self._released_options = released_options
        self._models: dict[str, _Model] = {}
        self._diffusions: dict[tuple, Any] = {}
        # Compiling a stage costs seconds (demo) to a minute (GLIDE); a later process reuses it.
        self.compile_cache = xla_cache.enable() if compile_cache else None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "demo", *, dtype: str = "float32", mesh=None,
                        vocab_dir: str | os.PathLike | None = None, compile_cache: bool = True,
                        preload: Sequence[str] = ("base", "upsample"), **released_options) -> "Pipeline":
        """The pipeline of `source`: "demo" (the bundled demo models, offline), "glide" (the
        released GLIDE weights, downloaded and converted once; `released_options` such as
        `cache=`/`offline=` go to `weights.load_released`), or a directory of converted models
        (`base/`, `upsample/`, `base_inpaint/`, `upsample_inpaint/`, `clip/`) or of the reference's
        `.pt` files, or a Hugging Face Hub repository id ("owner/name") holding such a directory
        (through huggingface_hub's cache; `HF_HUB_OFFLINE=1` is respected). `preload` loads those
        models now; the others load on first use.
        `compile_cache` keeps compiled programs on disk for later processes (`glide_jax.compile_cache`)."""
        pipe = cls(source, dtype=dtype, mesh=mesh, vocab_dir=vocab_dir, compile_cache=compile_cache,
                   **released_options)
        for name in preload:
            pipe.model(name)
        return pipe

    def _directory_defaults(self) -> SamplingDefaults:
        path = None if self.directory is None else self.directory / DEFAULTS_FILE
        return SamplingDefaults.from_json(path) if path is not None and path.is_file() else SamplingDefaults()

    # -- models ---------------------------------------------------------------------------------------

    def model(self, name: str) -> _Model:
        """Model `name` (base, upsample, base-inpaint, upsample-inpaint, clip), loaded once."""
        if name not in self._models:
            from glide_jax import weights

            where = "glide" if self.directory is None else ("demo" if self.source == "demo" else self.directory)
            config, params = weights.load(where, name, dtype=np.float32, **self._released_options)
            # A model without a text encoder (the demo upsampler) needs no vocabulary at all.
            tokenizer = self._tokenizer(name) if name == "clip" or config.has_text else None
            self._models[name] = _Model(config, stages.prepare_params(params, self.mesh), tokenizer)
        return self._models[name]

    def _tokenizer(self, name: str):
        """The tokenizer a model was trained with: a `tokenizer.model` (sentencepiece) or, for a
        noised CLIP, a `clip_bpe_subset.json` beside it (both need no download), else GLIDE's BPE
        (CLIP's for the noised CLIP) from `vocab_dir` or the cache."""
        from glide_jax import tokenizers, weights

        here = None if self.directory is None else weights.find_converted(self.directory, name)
        if here is not None and (here / SENTENCEPIECE_FILE).is_file():
            return tokenizers.SentencePieceTokenizer(here / SENTENCEPIECE_FILE)
        if name == "clip" and here is not None and (here / CLIP_TABLE_FILE).is_file():
            return tokenizers.ClipBPETokenizer.from_table(here / CLIP_TABLE_FILE)
        if name == "clip":
            return tokenizers.ClipBPETokenizer(self.vocab_dir)
        return tokenizers.GlideBPETokenizer(self.vocab_dir)

    def has_model(self, name: str) -> bool:
        """Whether `source` provides model `name` (the demo family has no upsample-inpaint model)."""
        from glide_jax import weights

        if self.directory is None or name in self._models:
            return True
        model = weights.RELEASED[name]
        return weights.find_converted(self.directory, name) is not None or all(
            (self.directory / f).is_file() for f in model.files)

    @property
    def samplers(self) -> tuple[str, ...]:
        return stages.SAMPLERS

    @property
    def base_size(self) -> int:
        return self.model("base").config.image_size

    @property
    def output_size(self) -> int:
        return self.model("upsample").config.image_size

    def _diffusion(self, config, respacing, start_step: int | None = None):
        from glide_jax.diffusion import DiffusionConfigError, diffusion_for_model

        if start_step is not None and start_step >= config.diffusion_steps - 1:
            start_step = None   # the last step: the full chain from pure noise
        key = (config, str(respacing), start_step)
        if key not in self._diffusions:
            try:
                self._diffusions[key] = diffusion_for_model(config, str(respacing), start_step=start_step)
            except (DiffusionConfigError, ValueError) as err:
                raise PipelineError(f"steps {respacing!r}: {err}") from None
        return self._diffusions[key]

    def _text(self, model: _Model, texts: Sequence[str], stage: str, warn):
        if not model.config.has_text:
            return None, None
        tokens, mask, truncated = model.tokenizer.tokenize_batch(list(texts), model.config.text_ctx,
                                                                  return_truncated=True)
        distinct = list(dict.fromkeys(texts))   # one warning per prompt, not per image of it
        for text in dict.fromkeys(texts[i] for i in np.flatnonzero(truncated)):
            warn(f"{stage}: prompt {distinct.index(text) + 1} is longer than the model's "
                 f"{model.config.text_ctx}-token context and was truncated: {text!r}")
        return tokens, mask

    # -- calls ----------------------------------------------------------------------------------------

    def __call__(self, prompts: str | Sequence[str], *, seed: int = 0, num_images_per_prompt: int = 1,
                 negative_prompt: str | Sequence[str] | None = None, guidance: str = "cfg",
                 guidance_scale: float | None = None, clip_guidance_scale: float | None = None,
                 sampler: str | None = None, steps: int | str | None = None, eta: float = 0.0,
                 upsample: bool = True, upsample_steps: int | str | None = None,
                 upsample_sampler: str | None = None, upsample_start: int | None = None,
                 upsample_temp: float | None = None, init_image=None, strength: float | None = None,
                 noise=None, first_index: int = 0,
                 progress: ProgressFn | None = None, warn: Callable[[str], None] | None = None,
                 _inpaint: tuple | None = None) -> PipelineOutput:
        """Text → images. `prompts` one or many; `num_images_per_prompt` images of each, image i
        for prompt i // num_images_per_prompt. `guidance` "cfg" (classifier-free, `guidance_scale`;
        1 samples the conditional model alone) or "clip" (the noised CLIP, `clip_guidance_scale`).
        `negative_prompt` (one, or one per prompt) conditions classifier-free guidance's other row
        instead of the empty prompt. `steps` an int or a respacing string ("100", "fast27",
        "ddim50", "10,10,10"). `init_image` (a PIL image or (H, W, 3) uint8 array, or one per
        prompt) is img2img (SDEdit): the image is noised to `strength` (0 < s <= 1, default 0.8)
        of the chain, and `steps` are spread over that part. `noise` (N, s, s, 3) replaces the
        base stage's x_T (for img2img, the noise added to the image). `progress(stage,
        step, total)` is called as each step of the compiled loop runs. Arguments left None take
        `self.defaults`."""
        rows = _expand(prompts, num_images_per_prompt, "prompts")
        negatives = self._negatives(negative_prompt, len(rows) // num_images_per_prompt, num_images_per_prompt)
        seed = _check_seed(seed)
        warn = warn or (lambda message: None)
        import jax

        key = jax.random.key(seed)
        timings: dict[str, StageTiming] = {}
        settings = self._settings(guidance, guidance_scale, clip_guidance_scale, sampler, steps, eta)
        init = None
        if init_image is not None:
            if _inpaint is not None:
                raise PipelineError("init_image (img2img) and inpainting do not go together")
            settings["strength"] = _check_strength(0.8 if strength is None else strength)
            init = np.repeat(np.stack([image_lib.image_to_array(i, self.base_size) for i in _per_prompt(
                init_image, len(rows) // num_images_per_prompt, "init_image")]), num_images_per_prompt, 0)
        elif strength is not None:
            raise PipelineError("strength applies to init_image (img2img) only")
        base = self._sample_base(rows, negatives, settings, jax.random.fold_in(key, 0), noise, first_index,
                                 progress, warn, timings, _inpaint, init)
        out = base
        if upsample:
            up = self._upsample_settings(upsample_steps, upsample_sampler, upsample_start, upsample_temp,
                                         inpainting=_inpaint is not None)
            settings.update(up)
            out = self._sample_upsample(base, rows, up, jax.random.fold_in(key, 1), first_index, progress, warn,
                                        timings, _inpaint)
        settings["model"] = self.source
        return PipelineOutput(stages.to_uint8(out), rows, negatives, seed,
                              np.arange(first_index, first_index + len(rows)), settings, timings,
                              base_arrays=stages.to_uint8(base) if upsample else None)

    def inpaint(self, prompts: str | Sequence[str], image, mask, **kwargs) -> PipelineOutput:
        """Regenerates where `mask` is black / 0 and keeps where it is white / 1, as the prompt says.

        `image`: a PIL image or an (H, W, 3) uint8 array, or one per prompt; `mask`: a PIL image or
        an (H, W) / (H, W, 1) array of the image's size, or one per prompt. Both are resized to each
        stage's size (the mask area-averaged, then thresholded). Other arguments as `__call__`; the
        base stage runs the inpainting base model, the upsampler the inpainting upsampler where the
        family has one (else the plain upsampler, on the inpainted image)."""
        n_prompts = 1 if isinstance(prompts, str) else len(prompts)
        images = _per_prompt(image, n_prompts, "image")
        masks = _per_prompt(mask, n_prompts, "mask")
        for i, (img, msk) in enumerate(zip(images, masks)):
            if img.size != msk.size:
                raise PipelineError(f"mask {i} is {msk.size[0]}x{msk.size[1]} but its image is "
                                    f"{img.size[0]}x{img.size[1]}; they must be the same size")
        return self(prompts, _inpaint=(images, masks), **kwargs)

    def upsample(self, low_res, prompts: str | Sequence[str] | None = None, *, seed: int = 0,
                 steps: int | str | None = None, sampler: str | None = None, start: int | None = None,
                 temp: float | None = None, first_index: int = 0, progress: ProgressFn | None = None,
                 warn: Callable[[str], None] | None = None) -> PipelineOutput:
        """Low-resolution images (N, s, s, 3), uint8 or float in [-1, 1], → the upsampler's size."""
        import jax

        low = np.asarray(low_res)
        n = low.shape[0] if low.ndim == 4 else 0
        rows = [""] * n if prompts is None else _expand(prompts, 1, "prompts")
        if n == 0 or len(rows) != n:
            raise PipelineError(f"low_res must be (N, s, s, 3) with one prompt per image, got {low.shape} "
                                f"and {len(rows)} prompt(s)")
        up = self._upsample_settings(steps, sampler, start, temp, inpainting=False)
        timings: dict[str, StageTiming] = {}
        out = self._sample_upsample(low, rows, up, jax.random.fold_in(jax.random.key(_check_seed(seed)), 1),
                                    first_index, progress, warn or (lambda m: None), timings, None)
        return PipelineOutput(stages.to_uint8(out), rows, [None] * n, seed, np.arange(first_index, first_index + n),
                              dict(up, model=self.source), timings)

    # -- the stages -----------------------------------------------------------------------------------

    def _negatives(self, negative_prompt, n_prompts: int, repeats: int) -> list[str | None]:
        if negative_prompt is None:
            return [None] * (n_prompts * repeats)
        given = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(given) != n_prompts or not all(isinstance(p, str) for p in given):
            raise PipelineError(f"negative_prompt must be one string or one per prompt ({n_prompts}), "
                                f"got {negative_prompt!r}")
        return [p for p in given for _ in range(repeats)]

    def _settings(self, guidance, guidance_scale, clip_guidance_scale, sampler, steps, eta) -> dict:
        if guidance not in GUIDANCES:
            raise PipelineError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
        d = self.defaults
        settings = {"guidance": guidance, "sampler": sampler or d.sampler,
                    "steps": str(steps) if steps is not None else d.steps, "eta": eta}
        if settings["sampler"] not in stages.SAMPLERS:
            raise PipelineError(f"sampler must be one of {stages.SAMPLERS}, got {settings['sampler']!r}")
        if guidance == "cfg":
            settings["guidance_scale"] = d.guidance_scale if guidance_scale is None else guidance_scale
        else:
            settings["clip_guidance_scale"] = d.clip_guidance_scale if clip_guidance_scale is None \
                else clip_guidance_scale
        return settings

    def _upsample_settings(self, steps, sampler, start, temp, *, inpainting: bool) -> dict:
        d = self.defaults
        start = d.upsample_start if start is None else start
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 1 <= start <= FULL_CHAIN_START:
            raise PipelineError(f"upsample_start must be an original timestep in [1, {FULL_CHAIN_START}], "
                                f"got {start!r}")
        sampler = sampler or (d.upsample_inpaint_sampler if inpainting else d.upsample_sampler)
        if sampler not in stages.SAMPLERS:
            raise PipelineError(f"upsample_sampler must be one of {stages.SAMPLERS}, got {sampler!r}")
        return {"upsample_steps": str(steps) if steps is not None else d.upsample_steps,
                "upsample_sampler": sampler, "upsample_start": int(start),
                "upsample_temp": d.upsample_temp if temp is None else temp}

    def _sample_base(self, rows, negatives, settings, key, noise, first_index, progress, warn, timings, inpaint,
                     init):
        name = "base-inpaint" if inpaint is not None else "base"
        model = self.model(name)
        config = model.config
        start = None if init is None else max(1, round(settings["strength"] * config.diffusion_steps) - 1)
        diffusion = self._diffusion(config, settings["steps"], start)
        tokens, mask = self._text(model, rows, "base", warn)
        common = dict(diffusion=diffusion, sampler=settings["sampler"], eta=settings["eta"], dtype=self.dtype,
                      mesh=self.mesh, noise=noise, first_index=first_index, progress=progress is not None,
                      # At strength 1 the chain starts from pure noise: the image has no say.
                      init_image=None if diffusion.starts_from_noise else init)
        if inpaint is not None:
            common.update(self._inpaint_inputs(inpaint, config.image_size, config.image_size, len(rows)))
        timing = timings["base"] = StageTiming()
        with self._progress("base", diffusion, progress):
            if settings["guidance"] == "clip":
                clip = self.model("clip")
                for word in dict.fromkeys(w for row in rows for w in clip.tokenizer.uncovered_words(row)):
                    warn(f"clip: {word!r} is outside the words this CLIP's tokenizer table covers; it is "
                         f"split into smaller pieces than CLIP's BPE would give")
                clip_tokens, clip_len = clip.tokenizer.batch_padded_and_len(rows, clip.config.max_text_len)
                return stages.sample_clip_guided(
                    config, model.params, tokens, mask, clip.config, clip.params, clip_tokens, clip_len, key,
                    clip_guidance_scale=settings["clip_guidance_scale"], timing=timing, **common)
            scale = settings["guidance_scale"]
            uncond = self._uncond(model, negatives, warn) if scale != 1 else (None, None)
            return stages.sample_base(config, model.params, tokens, mask, key,
                                      guidance_scale=None if scale == 1 else scale, uncond_tokens=uncond[0],
                                      uncond_mask=uncond[1], timing=timing, **common)

    def _uncond(self, model: _Model, negatives, warn):
        """Classifier-free guidance's other row: the tokenizer's empty prompt (for GLIDE's BPE, the
        reference's), or each image's negative prompt."""
        if all(n is None for n in negatives):
            return model.tokenizer.pad_and_mask([], model.config.text_ctx)
        return self._text(model, [n or "" for n in negatives], "negative prompt", warn)

    def _sample_upsample(self, low, rows, up, key, first_index, progress, warn, timings, inpaint):
        name = "upsample-inpaint" if inpaint is not None and self.has_model("upsample-inpaint") else "upsample"
        model = self.model(name)
        diffusion = self._diffusion(model.config, up["upsample_steps"], up["upsample_start"])
        tokens, mask = self._text(model, rows, "upsample", warn)
        extra = {}
        if inpaint is not None and model.config.inpaint:
            extra = self._inpaint_inputs(inpaint, model.config.image_size, self.base_size, len(rows))
        timing = timings["upsample"] = StageTiming()
        with self._progress("upsample", diffusion, progress):
            images = stages.sample_upsample(
                model.config, model.params, low, tokens, mask, key, diffusion=diffusion, temp=up["upsample_temp"],
                sampler=up["upsample_sampler"], dtype=self.dtype, mesh=self.mesh, first_index=first_index,
                timing=timing, progress=progress is not None, **extra)
        if inpaint is not None and not model.config.inpaint:
            # A plain upsampler redraws the whole image; the kept region is the user's, so it is
            # put back (an inpainting upsampler keeps it itself, forcing it into every step).
            known = self._inpaint_inputs(inpaint, model.config.image_size, self.base_size, len(rows))
            images = known["inpaint_mask"] * known["inpaint_image"] + (1 - known["inpaint_mask"]) * images
        return images

    @staticmethod
    def _inpaint_inputs(inpaint, size: int, base_size: int, n: int) -> dict:
        """Each prompt's image at `size` and its mask: made at the base model's size, then (for an
        upsampler) enlarged nearest-neighbour, as the reference's cascade enlarges its 64px mask."""
        images, masks = inpaint
        repeats = n // len(images)
        masks = [image_lib.mask_to_array(m, base_size) for m in masks]
        if size != base_size:
            masks = [image_lib.upsample_mask(m, size) for m in masks]
        return dict(
            inpaint_image=np.repeat(np.stack([image_lib.image_to_array(i, size) for i in images]), repeats, 0),
            inpaint_mask=np.repeat(np.stack(masks), repeats, 0))

    @staticmethod
    def _progress(stage: str, diffusion, progress: ProgressFn | None):
        """Turns the loop's timestep reports into (stage, step, total) calls, once per step even
        when every device reports it."""
        import contextlib

        if progress is None:
            return contextlib.nullcontext()
        order = {int(t): i + 1 for i, t in enumerate(sorted(diffusion.timestep_map, reverse=True))}
        total, reached = len(order), [0]

        def on_timestep(t: int) -> None:
            step = order.get(t, 0)
            if step > reached[0]:
                reached[0] = step
                progress(stage, step, total)
        return stages.reporting_progress(on_timestep)


# -- argument checks -----------------------------------------------------------------------------------


def _expand(prompts, repeats, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise PipelineError(f"num_images_per_prompt must be a positive integer, got {repeats!r}")
    return [p for p in prompts for _ in range(repeats)]


def _check_seed(seed) -> int:
    # jax.random.key keeps only 32 bits without x64, so larger seeds would collide silently.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise PipelineError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _check_strength(strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise PipelineError(f"strength must be a number in (0, 1], got {strength!r}") from None
    if not 0 < value <= 1:
        raise PipelineError(f"strength must be a number in (0, 1], got {strength!r}")
    return value


def _per_prompt(value, n: int, what: str) -> list:
    """One PIL image per prompt from a PIL image, an array, or a sequence of either."""
    single = not isinstance(value, (list, tuple)) and not (isinstance(value, np.ndarray) and (
        value.ndim == 4 or (what == "mask" and value.ndim == 3 and value.shape[-1] != 1)))
    values = [value] * n if single else list(value)
    if len(values) != n:
        raise PipelineError(f"{what}: {len(values)} given for {n} prompt(s); pass one, or one per prompt")
    return [image_lib.as_pil(v, what) for v in values]
