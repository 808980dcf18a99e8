"""`python -m sample.generate` beyond one batch: prompt files and chunking, negative prompts, PNG
metadata, the JSON summary, output-directory and bug reports, and the persistent compile cache.

Runs the bundled demo models at 3 steps and without the upsampler, in-process (so compiled
programs are shared), except the compile-cache test, which needs fresh processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sample import generate

from conftest import PROJECT_ROOT

FAST = ["--steps", "3", "--no-upsample", "--quiet"]
PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a white background"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def whole(prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert generate.main(["--prompts-file", str(prompts_file), "--batch-size", "2", "--out", str(out), *FAST]) == 0
    return out


def read(path):
    return np.asarray(Image.open(path))


def test_chunked_run_gives_the_same_images(whole, prompts_file, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "chunked"
    # 6 images in chunks of 4: the second chunk is padded to 4, so one program serves both.
    assert generate.main(["--prompts-file", str(prompts_file), "--batch-size", "2", "--max-batch", "4",
                          "--out", str(out), *FAST]) == 0
    log = capsys.readouterr().out
    assert log.count("4 image(s) x 3 steps") == 2 and "cached program" in log
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:04d}.png" for i in range(6)] + ["grid.png"]
    for i in range(6):
        np.testing.assert_allclose(read(out / f"{i:04d}.png").astype(int),
                                   read(whole / f"{i:04d}.png").astype(int), atol=1)


def test_png_text_chunks_and_json_summary(tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "meta"
    assert generate.main(["--prompt", PROMPTS[0], "--negative-prompt", "a blue square", "--seed", "7",
                          "--json", "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)          # stdout holds the summary alone; the log went to stderr
    assert summary["images"] == [str(out / "0000.png")] and summary["seed"] == 7
    assert summary["settings"]["sampler"] == "ddpm" and summary["settings"]["steps"] == "3"
    assert "wrote 1 image(s)" in captured.err
    text = Image.open(out / "0000.png").text
    assert text["prompt"] == PROMPTS[0] and text["negative_prompt"] == "a blue square"
    assert (text["seed"], text["sampler"], text["steps"], text["guidance_scale"], text["model"]) == (
        "7", "ddpm", "3", "3.0", "demo")


def test_negative_prompt_changes_the_image(whole, tmp_path):
    out = tmp_path / "negative"
    assert generate.main(["--prompt", PROMPTS[0], "--negative-prompt", "a red circle", "--out", str(out), *FAST]) == 0
    assert not np.array_equal(read(out / "0000.png"), read(whole / "0000.png"))
    plain = tmp_path / "plain"
    assert generate.main(["--prompt", PROMPTS[0], "--out", str(plain), *FAST]) == 0
    np.testing.assert_array_equal(read(plain / "0000.png"), read(whole / "0000.png"))


def test_clip_guidance_offline_with_an_empty_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLIDE_JAX_OFFLINE", "1")
    monkeypatch.setenv("GLIDE_JAX_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "clip"
    assert generate.main(["--prompt", "a red circle", "--guidance", "clip", "--out", str(out), *FAST]) == 0
    assert "clip guidance" in capsys.readouterr().out
    assert Image.open(out / "0000.png").text["clip_guidance_scale"] == "20.0"
    assert not (tmp_path / "empty").exists()


def test_the_cli_offers_every_sampler():
    from glide_jax.sampling import SAMPLERS

    assert generate.SAMPLER_CHOICES == SAMPLERS


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert generate.main(["--prompt", "x", "--out", str(blocker / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1 and "Traceback" not in err


def test_a_bug_says_so_and_where_its_traceback_is(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("something internal")
    monkeypatch.setattr(generate, "_sample", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert generate.main(["--prompt", "x", "--out", str(tmp_path / "o"), *FAST]) == generate.EXIT_BUG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a bug in glide-jax" in err and "KeyError" in err
    traces = list(tmp_path.glob("sample.generate-traceback-*.txt"))
    assert len(traces) == 1 and "something internal" in traces[0].read_text()
    assert str(traces[0]) in err


CACHE_PROBE = """
import jax, sys
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
from sample import generate
code = generate.main(["--prompt", "a red circle", "--steps", "3", "--no-upsample", "--quiet", "--out", sys.argv[1]])
print("HITS", hits.count("/jax/compilation_cache/cache_hits"))
sys.exit(code)
"""


def test_persistent_compile_cache_serves_a_second_process(tmp_path):
    env = dict(os.environ, GLIDE_JAX_COMPILE_CACHE=str(tmp_path / "xla"))

    def run(out):
        result = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / out)], cwd=PROJECT_ROOT,
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.rsplit("HITS", 1)[1])

    assert run("first") == 0
    assert any((tmp_path / "xla").iterdir())
    assert run("second") >= 1
    env["GLIDE_JAX_COMPILE_CACHE"] = "0"
    assert run("off") == 0
