"""`glide_jax.Pipeline`: models loaded once, called with prompts, compiled programs reused.

Runs the bundled demo models at a few steps; every test shares one pipeline (and so the compiled
programs of its shapes)."""

import numpy as np
import pytest
from PIL import Image

from glide_jax import Pipeline, PipelineError, stages
from glide_jax.clip import ClipConfig
from glide_jax.config import ModelConfig
from glide_jax.convert import convert_checkpoint, convert_clip_checkpoints

FAST = dict(steps=4, upsample_steps=3)
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("demo")


@pytest.fixture(scope="module")
def first(pipe):
    return pipe(PROMPTS, seed=3, **FAST)


def test_call_returns_images_and_reuses_its_programs(pipe, first):
    assert first.arrays.shape == (2, pipe.output_size, pipe.output_size, 3) and first.arrays.dtype == np.uint8
    assert pipe.output_size == 64 and pipe.base_size == 32
    assert [im.size for im in first.images] == [(64, 64)] * 2 and first.images[0].mode == "RGB"
    assert first.base_arrays.shape == (2, 32, 32, 3)
    assert first.prompts == PROMPTS and list(first.indices) == [0, 1]
    assert set(first.timings) == {"base", "upsample"}

    compiled = stages.compiled_programs()
    again = pipe(PROMPTS, seed=3, **FAST)
    np.testing.assert_array_equal(again.arrays, first.arrays)   # the same seed, the same images
    other = pipe(PROMPTS[::-1], seed=4, guidance_scale=5.0, **FAST)
    assert stages.compiled_programs() == compiled, "a call with the same shapes compiled again"
    assert all(t.cached for t in other.timings.values())
    assert not np.array_equal(other.arrays, first.arrays)


def test_an_image_depends_on_its_prompt_and_index_only(pipe, first):
    # Image 1 alone, at its global index, is image 1 of the pair: chunking a run changes nothing.
    alone = pipe(PROMPTS[1:], seed=3, first_index=1, **FAST)
    np.testing.assert_allclose(alone.arrays[0].astype(int), first.arrays[1].astype(int), atol=1)
    assert list(alone.indices) == [1]
    # Several images per prompt: image i is for prompt i // n.
    two = pipe(PROMPTS[:1], seed=3, num_images_per_prompt=2, **FAST)
    assert two.prompts == PROMPTS[:1] * 2
    np.testing.assert_allclose(two.arrays[0].astype(int), first.arrays[0].astype(int), atol=1)
    assert not np.array_equal(two.arrays[0], two.arrays[1])


def test_negative_prompt_conditions_the_other_row(pipe, first):
    empty = pipe(PROMPTS, seed=3, negative_prompt="", **FAST)
    np.testing.assert_array_equal(empty.arrays, first.arrays)   # "" is the unconditional prompt
    negative = pipe(PROMPTS, seed=3, negative_prompt=["a red circle", "a blue square"], **FAST)
    assert not np.array_equal(negative.arrays[0], first.arrays[0])
    assert negative.metadata(0)["negative_prompt"] == "a red circle"
    assert first.metadata(1)["prompt"] == PROMPTS[1] and "negative_prompt" not in first.metadata(1)
    assert first.metadata(0)["steps"] == "4" and first.metadata(0)["model"] == "demo"


def test_progress_follows_every_step_of_each_stage(pipe):
    seen = []
    pipe(PROMPTS, seed=3, progress=lambda stage, step, total: seen.append((stage, step, total)), **FAST)
    assert seen == [("base", i, 4) for i in range(1, 5)] + [("upsample", i, 3) for i in range(1, 4)]


def test_dpm_solver_through_the_pipeline(pipe, first):
    # DPM-Solver++ (2M, and 2M on the SDE) at as many steps as the DDPM run: the same image for the
    # same seed, another than DDPM's.
    out = {}
    for sampler in ("dpm++2m", "dpm++2m-sde"):
        out[sampler] = pipe(PROMPTS, seed=3, sampler=sampler, upsample=False, steps=4)
        assert out[sampler].arrays.shape == (2, 32, 32, 3) and out[sampler].settings["sampler"] == sampler
        np.testing.assert_array_equal(pipe(PROMPTS, seed=3, sampler=sampler, upsample=False, steps=4).arrays,
                                      out[sampler].arrays)
        assert not np.array_equal(out[sampler].arrays, first.base_arrays)
    assert not np.array_equal(out["dpm++2m"].arrays, out["dpm++2m-sde"].arrays)
    assert set(pipe.samplers) >= {"ddpm", "ddim", "dpm++2m", "dpm++2s", "dpm++2m-sde"}


def test_img2img_starts_from_the_given_image(pipe, first):
    image = first.arrays[0]
    close = pipe("a blue square on a black background", init_image=image, strength=0.3, seed=5, **FAST)
    far = pipe("a blue square on a black background", init_image=image, strength=1.0, seed=5, **FAST)
    near_error = np.abs(close.arrays[0].astype(int) - image).mean()
    far_error = np.abs(far.arrays[0].astype(int) - image).mean()
    assert near_error < far_error / 2, (near_error, far_error)   # a light noising keeps the image's layout
    assert close.settings["strength"] == 0.3 and close.metadata(0)["strength"] == "0.3"
    with pytest.raises(PipelineError, match=r"strength must be a number in \(0, 1\]"):
        pipe("x", init_image=image, strength=0.0, **FAST)
    with pytest.raises(PipelineError, match="strength applies to init_image"):
        pipe("x", strength=0.5, **FAST)


def test_no_guidance_at_scale_one_and_no_upsampling(pipe):
    out = pipe(PROMPTS[:1], guidance_scale=1.0, upsample=False, **FAST)
    assert out.arrays.shape == (1, 32, 32, 3) and out.base_arrays is None
    assert "upsample" not in out.timings


def test_inpaint_keeps_the_known_region(pipe, first):
    image = first.arrays[0]
    mask = np.ones((64, 64), np.uint8)
    mask[:, 32:] = 0                                  # regenerate the right half
    edited = pipe.inpaint("a green triangle on a white background", image, mask, seed=1, **FAST)
    out = edited.arrays[0].astype(int)
    kept = np.abs(out[:, :30] - image[:, :30]).mean()
    changed = np.abs(out[:, 34:] - image[:, 34:]).mean()
    assert kept < 2.0 and changed > 5 * max(kept, 1.0), (kept, changed)
    # PIL inputs, one per prompt, and a mask that does not fit its image.
    pil = Image.fromarray(image)
    both = pipe.inpaint(PROMPTS, [pil, pil], [Image.fromarray(mask * 255)] * 2, seed=1, **FAST)
    assert both.arrays.shape == (2, 64, 64, 3)
    with pytest.raises(PipelineError, match="mask 0 is 32x32 but its image is 64x64"):
        pipe.inpaint("x", image, np.ones((32, 32), np.uint8), **FAST)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "non-empty list of strings"),
    (dict(prompts=[3]), "non-empty list of strings"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=2 ** 32), r"seed must be an integer"),
    (dict(sampler="plms"), "sampler must be one of"),
    (dict(guidance="classifier"), "guidance must be one of"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(negative_prompt=["a", "b", "c"]), "one string or one per prompt"),
    (dict(steps="fast28"), "steps 'fast28'"),
    (dict(upsample_start=0), r"upsample_start must be an original timestep in \[1, 999\]"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_are_named(pipe, kwargs, message):
    kwargs = dict(FAST, **kwargs)
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(PipelineError, match=message):
        pipe(prompts, **kwargs)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(PipelineError, match="is not a directory"):
        Pipeline(tmp_path / "nowhere")
    with pytest.raises(PipelineError, match="dtype must be one of"):
        Pipeline("demo", dtype="float16")


def test_a_directory_of_converted_models_or_pt_files(golden, tmp_path, monkeypatch):
    """GLIDE's layout (the golden tiny models): converted copies, or the reference's .pt files as they
    are, with GLIDE's BPE from a vocabulary folder."""
    converted = tmp_path / "converted"
    for name in ("base", "upsample"):
        convert_checkpoint(golden / f"{name}.pt", ModelConfig.from_json(golden / f"{name}.config.json"),
                           converted / name)
    convert_clip_checkpoints(golden / "clip_image_enc.pt", golden / "clip_text_enc.pt",
                             ClipConfig.from_json(golden / "clip.config.json"), converted / "clip")
    pipe = Pipeline.from_pretrained(converted, vocab_dir=golden / "vocab")
    size = ModelConfig.from_json(golden / "upsample.config.json").image_size
    out = pipe("a corgi", steps=2, upsample_steps=2)
    assert out.arrays.shape == (1, size, size, 3) and out.settings["model"] == str(converted)
    assert pipe.defaults.steps == "100"                   # no pipeline.json: the reference's defaults

    # The same models from the reference's files give the same images (the .pt files are read
    # directly, with the configs a released model would have: here the golden ones).
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("base", "upsample"):
        (raw / f"{name}.pt").symlink_to(golden / f"{name}.pt")
    from glide_jax import weights

    configs = {name: ModelConfig.from_json(golden / f"{name}.config.json") for name in ("base", "upsample")}
    original = weights.released_config
    monkeypatch.setattr(weights, "released_config", lambda name: configs.get(name) or original(name))
    from_pt = Pipeline.from_pretrained(raw, vocab_dir=golden / "vocab")
    np.testing.assert_array_equal(from_pt("a corgi", steps=2, upsample_steps=2).arrays, out.arrays)
