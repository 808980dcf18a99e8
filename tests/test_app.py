"""The web app (`python -m sample.app`), in a real headless browser, on the bundled demo models.

The browser test starts the app as a user would (its own process, 127.0.0.1, a free port), drives
the page with Playwright and the system's Chromium: generates an image, sends it to the editor,
paints a mask with mouse drags, inpaints, and reads the images back from the page. Chromium comes
from the system (`apt-get install chromium`; `.ci/run` installs it): Playwright's own browser
download needs a host this machine cannot reach. Without it the test fails in CI (CI=true) and is
skipped locally, saying what to install.
"""

import io
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sample import app as web

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LIMITS = web.Limits()


# -- checking input, without a browser --------------------------------------------------------------

def _png(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return str(path)


def test_upload_is_resized_to_the_editor_size(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    image = web.read_upload(_png(tmp_path / "a.png", pixels), 64, 32, LIMITS)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not an image at all"), "not an image"),
    (lambda p: _png(p, np.zeros((40, 20, 3))), "crop it to a square"),
    (lambda p: _png(p, np.zeros((16, 16, 3))), "at least 32x32"),
    (lambda p: _png(p, np.zeros((5000, 5000, 3))), "pixels; at most"),
    (lambda p: p.write_bytes(b"\x89PNG" + bytes(LIMITS.max_upload_bytes)), "MiB; at most"),
])
def test_bad_uploads_are_refused_with_a_reason(tmp_path, make, message):
    path = tmp_path / "upload.png"
    make(path)
    with pytest.raises(web.InputError, match=message):
        web.read_upload(str(path), 64, 32, LIMITS)


def test_empty_mask_and_missing_image_are_refused():
    image = np.zeros((64, 64, 4), np.uint8)
    with pytest.raises(web.InputError, match="mask is empty"):
        web.editor_inputs({"background": image, "layers": [np.zeros((64, 64, 4), np.uint8)]}, 64)
    with pytest.raises(web.InputError, match="no image to edit"):
        web.editor_inputs({"background": None, "layers": []}, 64)
    with pytest.raises(web.InputError, match="editor works at 64x64"):
        web.editor_inputs({"background": np.zeros((32, 32, 4), np.uint8), "layers": []}, 64)


def test_painted_alpha_is_the_region_to_regenerate():
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[10:20, 30:40, 3] = 255
    image = np.full((64, 64, 4), 7, np.uint8)
    rgb, painted = web.editor_inputs({"background": image, "layers": [layer]}, 64)
    assert rgb.shape == (64, 64, 3) and painted.sum() == 100 and painted[15, 35] and not painted[0, 0]


@pytest.mark.parametrize("field, value, message", [
    ("steps", 5000, "steps must be between 0 and 1000"),
    ("steps", 2.5, "steps must be a whole number"),
    ("seed", -1, "seed must be between"),
    ("guidance_scale", float("nan"), "guidance scale must be between"),
    ("guidance_scale", 1e9, "guidance scale must be between"),
    ("guidance_scale", None, "guidance scale: give a number"),
    ("sampler", "euler", "sampler 'euler' is not one of"),
])
def test_out_of_range_numbers_are_refused(field, value, message):
    options = dict(negative_prompt="", guidance=web.GUIDANCE_CFG, guidance_scale=3.0, clip_guidance_scale=20.0,
                   sampler=web.SAMPLER_DEFAULT, steps=0, seed=0)
    options[field] = value
    with pytest.raises(web.InputError, match=message):
        web.sampling_options(LIMITS, ("ddpm", "ddim"), **options)


def test_default_fields_leave_sampler_and_steps_to_the_model():
    options = web.sampling_options(LIMITS, ("ddpm", "ddim"), negative_prompt=" ", guidance=web.GUIDANCE_CLIP,
                                   guidance_scale=3.0, clip_guidance_scale=20.0, sampler=web.SAMPLER_DEFAULT,
                                   steps=0, seed=7)
    assert options == dict(seed=7, guidance="clip", guidance_scale=3.0, negative_prompt=None,
                           clip_guidance_scale=20.0)


def test_page_images_are_written_once_and_whole():
    files = web.PageImages()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = files(image)
    first_write = os.stat(path).st_mtime_ns, os.stat(path).st_ino
    assert files(image.copy()) == path and (os.stat(path).st_mtime_ns, os.stat(path).st_ino) == first_write
    assert np.array_equal(np.asarray(Image.open(path)), image)
    mask = np.full((64, 64), 255, np.uint8)
    assert files(mask) != path and np.array_equal(np.asarray(Image.open(files(mask))), mask)
    assert sorted(os.listdir(files.directory)) == sorted({os.path.basename(path), os.path.basename(files(mask))})


# -- the page, in a browser -------------------------------------------------------------------------

def _needed(what: str, how: str):
    """A missing browser dependency: a failure in CI, where `.ci/run` installs it; locally a skip
    that says what to install."""
    message = f"the browser test needs {what}: {how}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI installs it in .ci/run; it is missing here)", pytrace=False)
    pytest.skip(message)


def _chromium() -> str:
    for candidate in (os.environ.get("GLIDE_JAX_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    _needed("Chromium from the system", "apt-get install -y chromium (or set GLIDE_JAX_CHROMIUM)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    try:
        import gradio  # noqa: F401
    except ImportError:
        _needed("gradio", 'pip install -e ".[test]"')
    port = _free_port()
    # Half a MiB: the oversized-upload check then needs no big file.
    command = [sys.executable, "-m", "sample.app", "--port", str(port), "--max-upload-mb", "0.5", "--max-images", "2"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def read():
        for line in process.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line and url.rstrip("/") in line:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the app did not start:\n" + "".join(log), pytrace=False)
    yield url, log
    print("the app's output:\n" + "".join(log))  # shown when a test failed
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def page(app_url):
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _needed("playwright", 'pip install -e ".[test]"')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(90_000)
        page.goto(app_url[0])
        page.locator("#gen-run").wait_for()
        yield page
        browser.close()


def _image(page, selector: str, index: int = 0) -> np.ndarray:
    """The image a component shows, as the browser downloads it."""
    image = page.locator(f"{selector} img").nth(index)
    image.wait_for()
    response = page.request.get(image.get_attribute("src"))
    assert response.ok, response.status
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _warning(page, text: str):
    """A message in the page (a toast) containing `text`; closed afterwards."""
    toast = page.locator(".toast-body", has_text=text)
    toast.first.wait_for(timeout=30_000)
    for close in page.locator(".toast-close").all():
        try:
            close.click(timeout=2_000)
        except Exception:  # noqa: BLE001 -- a toast that closed itself meanwhile is closed enough
            pass


def _wait_for_text(page, selector: str, text: str):
    """Waits until the element says `text`: the event that writes it has finished (while it runs,
    the element shows the event's progress instead)."""
    page.locator(selector, has_text=text).wait_for(timeout=300_000)


def _src(page, selector: str) -> str | None:
    images = page.locator(f"{selector} img")
    return images.first.get_attribute("src") if images.count() else None


def _wait_for_new_image(page, selector: str, old: str | None):
    deadline = time.monotonic() + 30
    while _src(page, selector) in (None, old):
        assert time.monotonic() < deadline, f"{selector} shows no new image"
        time.sleep(0.1)


def _paint(page, dx0: float, dx1: float, dy: float):
    """Drags the brush across the editor's canvas, at fractions of the shown image's width from
    its centre (the editor centres the image in its canvas)."""
    page.locator("#edit-editor button[aria-label='Brush']").click()
    canvas = page.locator("#edit-editor canvas").first.bounding_box()
    # The zoom the editor shows ("450%") gives the image's size on screen.
    zoom = float(page.locator("#edit-editor .zoom-number").inner_text().strip().strip("%")) / 100
    side = 64 * zoom
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(cx + dx0 * side, cy + dy * side)
    page.mouse.down()
    for t in np.linspace(0, 1, 12):
        page.mouse.move(cx + (dx0 + t * (dx1 - dx0)) * side, cy + dy * side, steps=2)
    page.mouse.up()


def _inpaint(page, seed: int, version: int) -> tuple[np.ndarray, np.ndarray]:
    old = _src(page, "#edit-result")
    page.locator("#edit-seed input").fill(str(seed))
    page.locator("#edit-run").click()
    _wait_for_text(page, "#edit-status", f"version {version}:")
    _wait_for_new_image(page, "#edit-result", old)
    return _image(page, "#edit-result"), _image(page, "#edit-mask")[..., 0] > 127


def _wait_for_editor(page):
    """Waits for the editor made for a new image: its canvas is up and nothing loads in it."""
    deadline = time.monotonic() + 60
    editor = page.locator("#edit-editor")
    while not (editor.locator("canvas").count() and editor.locator(".zoom-number").count()
               and not any(word in editor.inner_text() for word in ("processing", "queue"))):
        assert time.monotonic() < deadline, "the editor did not load the image"
        time.sleep(0.2)
    time.sleep(0.5)


def _edit(page, dy: float, seed: int, version: int, before: np.ndarray) -> np.ndarray:
    """Paints a stroke across the editor at height `dy`, inpaints, and checks the result against
    the image it was painted on: the kept region unchanged, the painted one changed."""
    _wait_for_editor(page)
    _paint(page, -0.3, 0.3, dy)
    after, keep = _inpaint(page, seed=seed, version=version)
    assert after.shape == before.shape
    row = int(32 + dy * 64)
    assert not keep[row, 32] and keep[:4, :4].all() and keep[-4:, -4:].all() and 0.03 < (~keep).mean() < 0.5
    assert np.array_equal(after[keep], before[keep]), f"edit {version - 1}: the kept region changed"
    assert np.abs(after[~keep].astype(int) - before[~keep]).mean() > 5, \
        f"edit {version - 1}: the painted region did not change"
    assert page.locator("#edit-history img").count() == version
    return after


def test_generate_paint_inpaint_edit_again_undo(page, app_url, tmp_path):
    page.locator("#gen-steps input").fill("10")
    page.locator("#gen-run").click()
    # Progress while sampling: the pipeline's steps, as the page shows them.
    page.locator("#gen-images .progress-text, #gen-images .progress-level").first.wait_for(timeout=90_000)
    _wait_for_text(page, "#gen-status", "generated 1 image(s)")
    generated = _image(page, "#gen-images")
    assert generated.shape == (64, 64, 3)

    page.locator("#gen-to-editor").click()
    _wait_for_editor(page)
    page.locator("#edit-steps input").fill("10")
    page.locator("#edit-run").click()
    _warning(page, "the mask is empty")

    first = _edit(page, 0.0, seed=1, version=2, before=generated)
    # The result is in the editor: a stroke painted on it now edits it, not the generated image.
    second = _edit(page, -0.3, seed=2, version=3, before=first)

    page.locator("#edit-undo").click()
    _wait_for_text(page, "#edit-status", "back to version 2")
    assert np.array_equal(_image(page, "#edit-result"), first)
    assert page.locator("#edit-history img").count() == 2
    assert not np.array_equal(second, first)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)


def _upload(page, path):
    with page.expect_file_chooser() as chooser:
        page.locator("#edit-upload").click()
    chooser.value.set_files(str(path))


def test_bad_input_gets_a_message_in_the_page(page, app_url, tmp_path):
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-steps input").fill("5000")
    page.locator("#gen-run").click()
    _warning(page, "steps must be between 0 and 1000")
    page.locator("#gen-steps input").fill("10")
    page.locator("#gen-n input").fill("3")
    page.locator("#gen-run").click()
    _warning(page, "number of images must be between 1 and 2")
    page.locator("#gen-n input").fill("1")

    page.get_by_role("tab", name="Edit").click()
    (tmp_path / "notes.png").write_text("not an image")
    _upload(page, tmp_path / "notes.png")
    _warning(page, "is not an image")
    _upload(page, _png(tmp_path / "wide.png", np.zeros((40, 80, 3))))
    _warning(page, "crop it to a square")
    big = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)  # ~0.8 MiB as PNG
    _upload(page, _png(tmp_path / "big.png", big))
    _warning(page, "exceed the maximum allowed size")
    # Still serving: a good upload goes into the editor.
    good = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    old = _src(page, "#edit-history")
    _upload(page, _png(tmp_path / "good.png", good))
    _wait_for_new_image(page, "#edit-history", old)
    assert np.array_equal(_image(page, "#edit-history"), web.to_size(good, 64))
    assert "Traceback" not in "".join(app_url[1])
