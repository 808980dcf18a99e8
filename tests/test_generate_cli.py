"""`python -m sample.generate` end to end on the golden tiny models (base → upsampler).

Sizes and the text context come from the golden configs, so any golden set made the same way
passes.

The CLI runs in-process through `main(argv)` so the compiled stage programs are shared between
runs (a rerun with the same shapes reuses them); one test runs it as a real subprocess."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from glide_jax.clip import ClipConfig
from glide_jax.config import ModelConfig
from glide_jax.convert import convert_checkpoint, convert_clip_checkpoints
from sample import generate

from conftest import PROJECT_ROOT



@pytest.fixture(scope="module")
def sizes(golden):
    """(base image size, upsampler image size, base text_ctx) of the golden models."""
    base = json.loads((golden / "base.config.json").read_text())
    upsample = json.loads((golden / "upsample.config.json").read_text())
    return base["image_size"], upsample["image_size"], base["text_ctx"]


def long_prompt(text_ctx):
    """A prompt with more words than text_ctx, so more tokens: it must be truncated."""
    words = "a very detailed oil painting of a small red cube on a wooden table in the morning light".split()
    return " ".join(words * (text_ctx // len(words) + 1))


@pytest.fixture(scope="module")
def checkpoints(golden, tmp_path_factory):
    """The golden tiny models converted into one --checkpoint-dir, as a user would lay it out."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name in ("base", "upsample", "base_inpaint", "upsample_inpaint"):
        convert_checkpoint(golden / f"{name}.pt", ModelConfig.from_json(golden / f"{name}.config.json"), root / name)
    convert_clip_checkpoints(golden / "clip_image_enc.pt", golden / "clip_text_enc.pt",
                             ClipConfig.from_json(golden / "clip.config.json"), root / "clip")
    return root


def cli(golden, checkpoints, out, *extra):
    return ["--checkpoint-dir", str(checkpoints), "--vocab-dir", str(golden / "vocab"), "--out", str(out), *extra]


def read(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def cascade(golden, checkpoints, sizes, tmp_path_factory):
    """One base → upsampler run: two prompts (one too long, one empty) × 2 images."""
    out = tmp_path_factory.mktemp("cascade")
    args = cli(golden, checkpoints, out, "--prompt", long_prompt(sizes[2]), "--prompt", "", "--batch-size", "2",
               "--steps", "3", "--upsample-steps", "3", "--seed", "5")
    return out, args


def test_cascade_writes_images_and_grid(cascade, sizes, capsys):
    out, args = cascade
    size = sizes[1]
    assert generate.main(args) == 0
    captured = capsys.readouterr()
    assert "truncated" in captured.err and "prompt 1" in captured.err  # longer than text_ctx
    assert "prompt 3" not in captured.err  # the empty prompt is valid as is
    assert "steps/s" in captured.out and "upsample" in captured.out and str(out.resolve()) in captured.out
    images = [read(out / f"{i:04d}.png") for i in range(4)]
    assert all(image.shape == (size, size, 3) and image.dtype == np.uint8 for image in images)
    assert not (out / "0004.png").exists()
    assert len({image.tobytes() for image in images}) == 4  # every image has its own noise
    grid = read(out / "grid.png")
    assert grid.shape == (2 * size + 2, 2 * size + 2, 3)  # one row per prompt, one column per image
    np.testing.assert_array_equal(grid[size + 2:, size + 2:], images[3])


def test_same_seed_same_bytes_other_seed_other_images(cascade, tmp_path, capsys):
    out, args = cascade
    if not (out / "0000.png").exists():
        assert generate.main(args) == 0
    again = tmp_path / "again"
    assert generate.main([a if a != str(out) else str(again) for a in args]) == 0
    assert "cached program" in capsys.readouterr().out  # same shapes: no recompilation
    for name in ("0000.png", "0003.png", "grid.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    seed_args = [a if a != str(out) else str(other) for a in args]
    seed_args[seed_args.index("--seed") + 1] = "6"
    assert generate.main(seed_args) == 0
    assert (other / "0000.png").read_bytes() != (out / "0000.png").read_bytes()


def test_inpainting_keeps_the_known_region(golden, checkpoints, sizes, tmp_path):
    base_size, size, _ = sizes
    # At the final size, with the kept columns on whole base-sized pixels, nothing is resampled
    # across the mask's edge.
    keep = 3 * base_size // 8 * (size // base_size)
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "image.png")
    mask = np.zeros((size, size), np.uint8)
    mask[:, :keep] = 255  # keep the left 3/8 of the columns
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = cli(golden, checkpoints, out, "--prompt", "a red cube", "--steps", "3", "--upsample-steps", "3",
               "--inpaint-image", str(tmp_path / "image.png"), "--inpaint-mask", str(tmp_path / "mask.png"))
    assert generate.main(args) == 0
    image = read(out / "0000.png").astype(int)
    # Both stages force the known region into every x_0 prediction and the last ancestral step
    # returns that x_0, so kept pixels come back exactly (to PNG rounding) through the cascade.
    assert np.abs(image[:, :keep] - source[:, :keep]).max() <= 1
    assert np.abs(image[:, keep:] - source[:, keep:]).mean() > 20


def test_clip_guidance_runs_as_a_subprocess(golden, checkpoints, sizes, tmp_path):
    out = tmp_path / "out"
    args = cli(golden, checkpoints, out, "--prompt", "a red cube", "--guidance", "clip", "--sampler", "ddim",
               "--steps", "2", "--no-upsample", "--clip-guidance-scale", "2")
    result = subprocess.run([sys.executable, "-m", "sample.generate", *args], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "clip guidance" in result.stdout and "steps/s" in result.stdout
    assert read(out / "0000.png").shape == (sizes[0], sizes[0], 3) and (out / "grid.png").is_file()


# -- bad input: one line on stderr, exit code 2, no traceback --------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(root / "image.png")
    Image.new("L", (64, 64), 255).save(root / "mask.png")
    Image.new("L", (32, 32), 255).save(root / "small_mask.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(noisy, "PNG")
    (root / "cut.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (root / "bomb.png").write_bytes(_bomb_png(50_000, 50_000))
    return root


def _bomb_png(width, height):
    """A few bytes whose header claims width x height pixels (2.5 G here): a decompression bomb."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


BAD_INPUTS = [
    (["--inpaint-image", "{d}/image.png"], "--inpaint-image needs --inpaint-mask"),
    (["--inpaint-mask", "{d}/mask.png"], "--inpaint-mask needs --inpaint-image"),
    (["--inpaint-image", "{d}/image.png", "--inpaint-mask", "{d}/small_mask.png"], "must be the same size"),
    (["--inpaint-image", "{d}/missing.png", "--inpaint-mask", "{d}/mask.png"], "missing.png: no such file"),
    (["--inpaint-image", "{d}/broken.png", "--inpaint-mask", "{d}/mask.png"], "cannot read it as an image"),
    (["--inpaint-image", "{d}/cut.png", "--inpaint-mask", "{d}/mask.png"], "cut.png: cannot read it as an image"),
    (["--inpaint-image", "{d}/image.png", "--inpaint-mask", "{d}/bomb.png"],
     "bomb.png: refusing to decode a possible decompression bomb"),
    (["--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0"),
    (["--clip-guidance-scale", "inf"], "--clip-guidance-scale must be a finite number >= 0"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number >= 0"),
    (["--guidance-scale=-inf"], "--guidance-scale must be a finite number >= 0"),
    (["--clip-guidance-scale", "-0.5"], "--clip-guidance-scale must be a finite number >= 0"),
    (["--clip-guidance-scale", "nan"], "--clip-guidance-scale must be a finite number >= 0"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number >= 0"),
    (["--sampler", "ddim", "--eta", "-0.1"], "--eta must be a finite number >= 0"),
    (["--upsample-temp", "nan"], "--upsample-temp must be a finite number > 0"),
    (["--upsample-temp", "inf"], "--upsample-temp must be a finite number > 0"),
    (["--upsample-temp", "-1"], "--upsample-temp must be a finite number > 0"),
    (["--batch-size", "-3"], "--batch-size must be at least 1"),
    (["--steps", "-5"], "--steps must be at least 2"),
    (["--seed", str(2 ** 32)], "--seed must be in [0, 2**32)"),
    (["--steps", "nan"], "invalid int value"),
    (["--steps", "0"], "--steps must be at least 2"),
    (["--steps", "5000"], "cannot keep 5000"),
    (["--steps", "ten"], "invalid int value"),
    (["--respacing", "fast28"], "timestep respacing 'fast28' is not understood"),
    (["--upsample-steps", "ddimx"], "--upsample-steps"),
    (["--upsample-temp", "0"], "--upsample-temp must be a finite number > 0"),
    (["--upsample-start", "0"], "--upsample-start must be an original timestep in [1, 999]"),
    (["--upsample-start", "10", "--upsample-steps", "25"], "cannot keep 25 of them (--upsample-start 10 leaves 11 steps)"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--steps", "10", "--respacing", "10"], "not allowed with argument"),
    (["--sampler", "plms"], "invalid choice"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--matmul-precision", "tf32"], "invalid choice"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(golden, checkpoints, inputs, tmp_path, capsys, extra, message):
    extra = [e.format(d=inputs) for e in extra]
    out = tmp_path / "out"
    code = generate.main(cli(golden, checkpoints, out, "--prompt", "a cube", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and not out.exists()


def _one_error_line(capsys, code, message):
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_out_that_cannot_be_created_is_refused_before_sampling(golden, checkpoints, tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, message in ((tmp_path / "a_file" / "out", "is not a directory"),
                         (tmp_path / "a_file", "exists and is not a directory")):
        code = generate.main(["--checkpoint-dir", str(checkpoints), "--vocab-dir", str(golden / "vocab"),
                              "--out", str(out), "--prompt", "a cube"])
        _one_error_line(capsys, code, f"--out {out}")
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permission bits do not stop root (the file-in-the-way case above runs as root)")
def test_out_under_a_read_only_directory_is_refused(golden, checkpoints, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = generate.main(["--checkpoint-dir", str(checkpoints), "--vocab-dir", str(golden / "vocab"),
                              "--out", str(locked / "out"), "--prompt", "a cube"])
        _one_error_line(capsys, code, "is not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_save_png_never_leaves_half_a_file(tmp_path):
    from sample import images as image_io

    pixels = np.zeros((4, 4, 3), np.uint8)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(image_io.ImageOutputError, match=r"cannot write .*a_file/0000\.png"):
        image_io.save_png(tmp_path / "a_file" / "0000.png", pixels)
    (tmp_path / "taken.png").mkdir()  # the final name is held by a directory: the rename fails
    with pytest.raises(image_io.ImageOutputError, match=r"cannot write .*taken\.png"):
        image_io.save_png(tmp_path / "taken.png", pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "taken.png"]  # no .partial left
    image_io.save_png(tmp_path / "ok.png", pixels)
    assert read(tmp_path / "ok.png").shape == (4, 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ok.png", "taken.png"]


def test_missing_prompt_and_missing_weights(golden, tmp_path, capsys):
    assert generate.main(["--out", str(tmp_path / "a")]) == 2
    assert "no prompt" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = generate.main(["--prompt", "x", "--checkpoint-dir", str(empty), "--vocab-dir", str(golden / "vocab"),
                          "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no 'base' weights" in err, err


def test_matmul_precision_holds_for_the_whole_run_and_only_for_it(monkeypatch, tmp_path):
    """On a GPU the default precision is TF32 (bench/bench_parity.py); the flag must reach every
    program the run compiles, and must not leak into the caller's process."""
    import jax

    before = jax.config.jax_default_matmul_precision
    seen = []
    monkeypatch.setattr(generate, "run", lambda args, log: seen.append(jax.config.jax_default_matmul_precision))
    assert generate.main(["--prompt", "x", "--matmul-precision", "highest", "--out", str(tmp_path)]) == 0
    assert generate.main(["--prompt", "x", "--out", str(tmp_path)]) == 0
    assert seen == ["highest", before]
    assert jax.config.jax_default_matmul_precision == before
