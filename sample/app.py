"""Web app: text-to-image and text-guided inpainting in the browser.

    pip install -e ".[web]"
    python -m sample.app                          # bundled demo models, offline, http://127.0.0.1:7860
    python -m sample.app --model glide --host 0.0.0.0 --port 8080

Two tabs. "Generate": prompt, negative prompt, guidance (classifier-free or CLIP), sampler, steps,
seed, number of images, upsampling. "Edit": upload an image or take a generated one, paint over
what should change, give a prompt, inpaint, and keep painting on the result; the history keeps
every version (undo goes back one).

The models load once at start into one `glide_jax.Pipeline`, which keeps its compiled sampling
programs: a request with the same shapes (number of images, steps, sampler, guidance kind) as an
earlier one reuses its program and pays only the sampling. Requests run one at a time (the
machine's cores or accelerator are the bottleneck, and two samplings at once would only make both
slow), each with a deadline checked at every sampling step.

The editor works at the pipeline's output size (64 px demo, 256 px GLIDE): every image entering it
is resized to that, so the mask is painted at the resolution the result comes back in. The result
keeps the unpainted pixels of the image exactly (pasted back after upsampling, which redraws them
a little), so repeated edits never blur what was kept.
"""

import argparse
import contextvars
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import sys
import tempfile
import time
import types

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_PORT = 7860
# The images are small (32-256 px) and shown enlarged: keep their pixels square instead of blurred.
PAGE_CSS = "#gen-images img, #edit-result img, #edit-mask img, #edit-history img {image-rendering: pixelated}"


class RequestTimeout(Exception):
    """A request ran past its deadline; raised from the progress callback to stop the sampling."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for: keeps a public page from tying the machine up or exhausting
    its memory. Numbers outside these get a message in the page."""
    max_images: int = 4
    max_steps: int = 1000
    max_guidance_scale: float = 50.0
    max_clip_guidance_scale: float = 500.0
    max_prompt_chars: int = 1000
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    timeout_s: float = 600.0


class InputError(ValueError):
    """The request's input is wrong; the message, shown in the page, says how."""


# -- checking a request ----------------------------------------------------------------------------

def _number(value, name: str, low: float, high: float, integer: bool = False):
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{name}: give a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value}")
    if integer:
        if number != int(number):
            raise InputError(f"{name} must be a whole number, got {value}")
        return int(number)
    return number


def _prompt(text, name: str, limits: Limits) -> str:
    text = (text or "").strip()
    if len(text) > limits.max_prompt_chars:
        raise InputError(f"{name} is {len(text)} characters long; at most {limits.max_prompt_chars}")
    return text


def sampling_options(limits: Limits, samplers, *, negative_prompt, guidance, guidance_scale, clip_guidance_scale,
                     sampler, steps, seed) -> dict:
    """The pipeline's keyword arguments for the page's fields, checked."""
    kind = "clip" if guidance == GUIDANCE_CLIP else "cfg"
    options = dict(
        seed=_number(seed, "seed", 0, 2**32 - 1, integer=True),
        guidance=kind,
        guidance_scale=_number(guidance_scale, "guidance scale", 0, limits.max_guidance_scale),
        negative_prompt=_prompt(negative_prompt, "negative prompt", limits) or None,
    )
    if kind == "clip":
        options["clip_guidance_scale"] = _number(clip_guidance_scale, "CLIP guidance scale", 0,
                                                 limits.max_clip_guidance_scale)
    if sampler and sampler != SAMPLER_DEFAULT:
        if sampler not in samplers:
            raise InputError(f"sampler {sampler!r} is not one of {', '.join(samplers)}")
        options["sampler"] = sampler
    steps = _number(steps, "steps", 0, limits.max_steps, integer=True)
    if steps:
        options["steps"] = steps
    return options


def read_upload(path, size: int, min_size: int, limits: Limits) -> np.ndarray:
    """An uploaded file → (size, size, 3) uint8 RGB, or InputError saying what is wrong with it."""
    if not path:
        raise InputError("no file was uploaded")
    name = os.path.basename(str(path))
    if os.path.getsize(path) > limits.max_upload_bytes:
        raise InputError(f"{name} is {os.path.getsize(path) / 2**20:.1f} MiB; at most "
                         f"{limits.max_upload_bytes / 2**20:.0f} MiB")
    try:
        with Image.open(path) as image:
            # Checked before decoding, so a small file that unpacks to a huge image costs nothing.
            width, height = image.size
            if width * height > limits.max_upload_pixels:
                raise InputError(f"{name} is {width}x{height} pixels; at most "
                                 f"{limits.max_upload_pixels} pixels")
            image.load()
            rgb = image.convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{name} is not an image that can be read ({type(err).__name__})") from None
    if width != height:
        raise InputError(f"{name} is {width}x{height}; the models draw square images, so crop it to a square first")
    if width < min_size:
        raise InputError(f"{name} is {width}x{height}; at least {min_size}x{min_size} is needed")
    return to_size(np.asarray(rgb), size)


def to_size(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), resample=Image.BICUBIC))


def editor_inputs(value, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The editor's value → (the image (size, size, 3) uint8, the painted region (size, size) bool)."""
    background = (value or {}).get("background")
    if background is None:
        raise InputError("no image to edit: upload one or send a generated image to the editor")
    image = np.asarray(background)
    if image.shape[:2] != (size, size):
        raise InputError(f"the image being edited is {image.shape[1]}x{image.shape[0]}; the editor works at "
                         f"{size}x{size} (upload it again)")
    painted = np.zeros((size, size), bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.shape[:2] != (size, size) or layer.ndim != 3 or layer.shape[-1] != 4:
            raise InputError(f"the painted layer is {layer.shape[1]}x{layer.shape[0]}, not the image's size")
        painted |= layer[..., 3] > 0
    if not painted.any():
        raise InputError("the mask is empty: paint over the part of the image to regenerate")
    return image[..., :3].copy(), painted


# -- the requests -----------------------------------------------------------------------------------

GUIDANCE_CFG = "classifier-free"
GUIDANCE_CLIP = "CLIP"
SAMPLER_DEFAULT = "model default"


class App:
    """The page's handlers around one pipeline. Handlers raise InputError for bad input; `ui`
    turns it into a message in the page."""

    def __init__(self, pipe, limits: Limits = Limits(), log=print):
        self.pipe = pipe
        self.limits = limits
        self.log = log

    def _progress(self, report, deadline: float):
        """The pipeline's progress callback: forwards to the page and enforces the deadline.

        The pipeline may call it from another thread than the request's (a host callback of
        the compiled loop): the page's progress reporter finds its request through context
        variables, so it runs in a copy of the request's context."""
        context = contextvars.copy_context()

        def progress(stage: str, step: int, total: int):
            if time.monotonic() > deadline:
                raise RequestTimeout(f"the request took longer than {self.limits.timeout_s:g} s and was stopped")
            if report is not None:
                context.run(report, (step, total), desc=stage)

        return progress

    def _run(self, what: str, call, report):
        from glide_jax.pipeline import PipelineError

        start = time.monotonic()
        deadline = start + self.limits.timeout_s
        try:
            out = call(self._progress(report, deadline))
        except PipelineError as err:
            raise InputError(" ".join(str(err).split())) from None
        except Exception as err:
            # Raised inside a compiled loop's host callback, the timeout comes back wrapped in
            # the runtime's error; the deadline tells it apart from a real failure.
            if isinstance(err, RequestTimeout) or time.monotonic() > deadline:
                raise InputError(f"the request took longer than {self.limits.timeout_s:g} s and was stopped "
                                 "(fewer steps or images are faster)") from None
            raise
        seconds = time.monotonic() - start
        self.log(f"{what}: {seconds:.2f} s")
        return out, seconds

    def generate(self, prompt, negative_prompt, guidance, guidance_scale, clip_guidance_scale, sampler, steps,
                 seed, num_images, upsample, report=None) -> tuple[list[np.ndarray], str]:
        prompt = _prompt(prompt, "prompt", self.limits)
        n = _number(num_images, "number of images", 1, self.limits.max_images, integer=True)
        options = sampling_options(self.limits, self.pipe.samplers, negative_prompt=negative_prompt,
                                   guidance=guidance, guidance_scale=guidance_scale,
                                   clip_guidance_scale=clip_guidance_scale, sampler=sampler, steps=steps, seed=seed)
        out, seconds = self._run(
            f"generate {n} image(s)",
            lambda progress: self.pipe([prompt], num_images_per_prompt=n, upsample=bool(upsample),
                                       progress=progress, **options), report)
        return list(out.arrays), f"generated {n} image(s) in {seconds:.1f} s"

    def inpaint(self, editor_value, prompt, negative_prompt, guidance, guidance_scale, clip_guidance_scale, sampler,
                steps, seed, report=None) -> tuple[np.ndarray, np.ndarray, str]:
        """→ (the result, the mask used as an image: white kept, black regenerated, a status line)."""
        size = self.pipe.output_size
        image, painted = editor_inputs(editor_value, size)
        prompt = _prompt(prompt, "prompt", self.limits)
        options = sampling_options(self.limits, self.pipe.samplers, negative_prompt=negative_prompt,
                                   guidance=guidance, guidance_scale=guidance_scale,
                                   clip_guidance_scale=clip_guidance_scale, sampler=sampler, steps=steps, seed=seed)
        keep = np.where(painted, 0, 255).astype(np.uint8)
        out, seconds = self._run(
            "inpaint",
            lambda progress: self.pipe.inpaint([prompt], image, keep, num_images_per_prompt=1, upsample=True,
                                               progress=progress, **options), report)
        result = to_size(out.arrays[0], size)
        result = np.where(painted[..., None], result, image)
        return result, keep, f"inpainted {painted.mean():.0%} of the image in {seconds:.1f} s"


# -- the page ---------------------------------------------------------------------------------------

class PageImages:
    """Writes the images the page shows as PNG files, once each, and hands gradio their paths.

    Handed arrays, gradio encodes each into a file named by its content and rewrites that file in
    place every time the same image is shown again (the result, the history and the editor show
    one image at once): a browser fetching it meanwhile gets a truncated response. A file written
    once, under a temporary name then renamed, is never seen half-written; gradio copies paths it
    is handed the same atomic way and keeps a copy it already has."""

    def __init__(self):
        # Under the system's temporary directory, which gradio serves from; removed at exit.
        self._directory = tempfile.TemporaryDirectory(prefix="glide-jax-app-")
        self.directory = self._directory.name

    def __call__(self, pixels: np.ndarray) -> str:
        pixels = np.ascontiguousarray(pixels, np.uint8)
        digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()[:32]
        path = os.path.join(self.directory, f"{digest}.png")
        if not os.path.exists(path):
            fd, partial = tempfile.mkstemp(dir=self.directory, suffix=".partial")
            with os.fdopen(fd, "wb") as file:
                Image.fromarray(pixels).save(file, format="PNG")
            os.replace(partial, path)
        return path


def editor_value(image: str | np.ndarray) -> dict:
    """A fresh editor holding `image` with nothing painted. `layers` must be None: the editor
    clears its strokes then, where an empty list (or an empty layer) leaves later strokes unsent."""
    return {"background": image, "layers": None, "composite": None}


def _shown(gr, n_outputs: int):
    """Bad input becomes a warning in the page and leaves every output as it was: an error event
    (gr.Error) would blank the outputs, the editor's painting with them."""
    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except InputError as err:
                gr.Warning(str(err))
                return tuple(gr.skip() for _ in range(n_outputs))
        return wrapper
    return wrap


def _sampling_fields(gr, limits: Limits, samplers, prefix: str) -> list:
    with gr.Row():
        negative = gr.Textbox(label="negative prompt", placeholder="what to steer away from (classifier-free "
                              "guidance only)", elem_id=f"{prefix}-negative", scale=3)
        guidance = gr.Radio([GUIDANCE_CFG, GUIDANCE_CLIP], value=GUIDANCE_CFG, label="guidance",
                            elem_id=f"{prefix}-guidance", scale=1)
    with gr.Row():
        scale = gr.Number(value=3.0, label=f"guidance scale (0-{limits.max_guidance_scale:g})",
                          elem_id=f"{prefix}-scale")
        clip_scale = gr.Number(value=20.0, label=f"CLIP guidance scale (0-{limits.max_clip_guidance_scale:g})",
                               elem_id=f"{prefix}-clip-scale", visible=False)
        sampler = gr.Dropdown([SAMPLER_DEFAULT, *samplers], value=SAMPLER_DEFAULT, label="sampler",
                              elem_id=f"{prefix}-sampler")
        steps = gr.Number(value=0, precision=0, label=f"steps (0 = model default, at most {limits.max_steps})",
                          elem_id=f"{prefix}-steps")
        seed = gr.Number(value=0, precision=0, label="seed", elem_id=f"{prefix}-seed")
    guidance.change(lambda g: gr.update(visible=g == GUIDANCE_CLIP), guidance, clip_scale)
    return [negative, guidance, scale, clip_scale, sampler, steps, seed]


def _generate_tab(gr, c, limits: Limits, pipe) -> None:
    with gr.Row():
        c.prompt = gr.Textbox(label="prompt", value="a red circle on a white background", elem_id="gen-prompt",
                              scale=4)
        c.go = gr.Button("Generate", variant="primary", elem_id="gen-run", scale=1)
    c.fields = _sampling_fields(gr, limits, pipe.samplers, "gen")
    with gr.Row():
        c.num_images = gr.Number(value=1, precision=0, label=f"number of images (1-{limits.max_images})",
                                 elem_id="gen-n")
        c.upsample = gr.Checkbox(value=True, label=f"upsample to {pipe.output_size} px", elem_id="gen-upsample")
    c.gallery = gr.Gallery(label="images", columns=4, height=320, format="png", elem_id="gen-images",
                           interactive=False)
    c.gen_status = gr.Markdown(elem_id="gen-status")
    c.to_editor = gr.Button("Edit the selected image", elem_id="gen-to-editor")


def _wire_generate(gr, app: App, c) -> None:
    @_shown(gr, 4)
    def on_generate(prompt, negative, guidance, scale, clip_scale, sampler, steps, seed, n, upsample,
                    progress=gr.Progress()):
        images, status = app.generate(prompt, negative, guidance, scale, clip_scale, sampler, steps, seed, n,
                                      upsample, report=progress)
        return [c.files(image) for image in images], images, 0, status

    c.go.click(on_generate, [c.prompt, *c.fields, c.num_images, c.upsample],
               [c.gallery, c.generated, c.selected, c.gen_status])

    def on_select(evt: gr.SelectData):
        return evt.index

    c.gallery.select(on_select, None, c.selected)


def _wire_inpaint(gr, app: App, c) -> None:
    """The inpaint button, bound to the editor of the moment (made anew with each image)."""
    @_shown(gr, 6)
    def on_inpaint(value, past, prompt, negative, guidance, scale, clip_scale, sampler, steps, seed,
                   progress=gr.Progress()):
        image, keep, status = app.inpaint(value, prompt, negative, guidance, scale, clip_scale, sampler, steps,
                                          seed, report=progress)
        past = [*past, image]
        return (c.edit(image), past, [c.files(p) for p in past], c.files(image), c.files(keep),
                f"version {len(past)}: {status}")

    c.inpaint_go.click(on_inpaint, [c.editor, c.history, c.edit_prompt, *c.edit_fields],
                       [c.editing, c.history, c.history_view, c.result, c.mask_used, c.edit_status])


def _wire_edit(gr, app: App, c) -> None:
    size = app.pipe.output_size
    shown_images = [c.history, c.history_view, c.result, c.mask_used]

    @_shown(gr, 6)
    def on_to_editor(images, index):
        if not images:
            raise InputError("generate an image first")
        image = to_size(np.asarray(images[min(index, len(images) - 1)]), size)
        return c.edit(image), [image], [c.files(image)], None, None, gr.Tabs(selected="edit")

    c.to_editor.click(on_to_editor, [c.generated, c.selected], [c.editing, *shown_images, c.tabs])

    @_shown(gr, 5)
    def on_upload(file):
        image = read_upload(file, size, app.pipe.base_size, app.limits)
        return c.edit(image), [image], [c.files(image)], None, None

    c.upload.upload(on_upload, c.upload, [c.editing, *shown_images])

    @_shown(gr, 6)
    def on_undo(past):
        if len(past) < 2:
            raise InputError("nothing to undo")
        past = past[:-1]
        return (c.edit(past[-1]), past, [c.files(p) for p in past], c.files(past[-1]), None,
                f"back to version {len(past)}")

    c.undo.click(on_undo, c.history, [c.editing, *shown_images, c.edit_status])


def _edit_tab(gr, app: App, c) -> None:
    size = app.pipe.output_size
    gr.Markdown("Paint over what should change, say what should be there, inpaint.")

    # A new editor for every image put in it. Handed a new background, gradio's editor keeps
    # showing it but sends the strokes painted on it only every other time (measured: layers
    # went missing on the 2nd and 4th of five loads); a freshly made editor sends them every
    # time. An image that is not replaced (a refused request) leaves the editor and its painting.
    @gr.render(inputs=c.editing)
    def editor(editing):
        image = None if editing is None else c.files(editing[1])
        c.editor = gr.ImageEditor(
            value=None if image is None else editor_value(image),
            label=f"image being edited ({size}x{size})", type="numpy", image_mode="RGBA", format="png",
            sources=(), transforms=(), layers=False, canvas_size=(size, size), interactive=True,
            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=max(2, size // 8)),
            elem_id="edit-editor", height=360)
        _wire_inpaint(gr, app, c)

    with gr.Row():
        c.result = gr.Image(label="result", format="png", interactive=False, elem_id="edit-result", height=240)
        c.mask_used = gr.Image(label="mask used (white kept, black regenerated)", format="png",
                               interactive=False, elem_id="edit-mask", image_mode="L", height=240)
    with gr.Row():
        c.upload = gr.UploadButton("Upload an image", file_types=["image"], elem_id="edit-upload")
        c.edit_prompt = gr.Textbox(label="prompt for the painted region", value="a blue square",
                                   elem_id="edit-prompt", scale=3)
        c.inpaint_go = gr.Button("Inpaint", variant="primary", elem_id="edit-run")
    c.edit_fields = _sampling_fields(gr, app.limits, app.pipe.samplers, "edit")
    c.edit_status = gr.Markdown(elem_id="edit-status")
    c.undo = gr.Button("Undo last edit", elem_id="edit-undo")
    c.history_view = gr.Gallery(label="history (oldest first)", columns=8, height=200, format="png",
                                elem_id="edit-history", interactive=False)


def build(app: App, title: str):
    """The page: a "Generate" and an "Edit" tab around `app`'s handlers."""
    import gradio as gr

    loads = itertools.count(1)
    # Numbered, so that putting the same image in the editor again still makes a new editor.
    c = types.SimpleNamespace(files=PageImages(), edit=lambda image: (next(loads), image))
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}\nText-to-image and text-guided editing with GLIDE "
                    f"({app.pipe.base_size} px base, {app.pipe.output_size} px upsampled).")
        c.generated, c.selected, c.history = gr.State([]), gr.State(0), gr.State([])
        # (number, image) of the image in the editor; a handler that leaves it (a refused
        # request) leaves the editor and its painting as they were.
        c.editing = gr.State(None)
        with gr.Tabs() as c.tabs:
            with gr.Tab("Generate", id="generate"):
                _generate_tab(gr, c, app.limits, app.pipe)
            with gr.Tab("Edit", id="edit"):
                _edit_tab(gr, app, c)
        _wire_generate(gr, app, c)
        _wire_edit(gr, app, c)
    return page


# -- the command -----------------------------------------------------------------------------------

def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m sample.app", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo",
                   help="'demo' (the bundled demo models, offline), 'glide' (the released models), or a directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute precision")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s,
                   help="seconds a request may sample before it is stopped (checked at every step)")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="most images one request may ask for")
    p.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_bytes / 2**20,
                   help="largest upload accepted, in MiB")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be between 1 and 65535, got {args.port}")
    if args.timeout <= 0 or args.max_images < 1 or args.max_upload_mb <= 0:
        p.error("--timeout, --max-images and --max-upload-mb must be positive")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    # Runs offline by default: no usage reports to gradio's servers.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web app needs gradio: pip install -e \".[web]\"", file=sys.stderr)
        return 2
    from glide_jax import Pipeline

    def log(message):
        print(message, flush=True)

    start = time.monotonic()
    pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype)
    log(f"models ({args.model}) loaded in {time.monotonic() - start:.1f} s")
    limits = Limits(max_images=args.max_images, timeout_s=args.timeout,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    page = build(App(pipe, limits, log), title="glide-jax")
    # One request at a time; a short queue so a flood of requests waits rather than piling up.
    page.queue(default_concurrency_limit=1, max_size=16)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=limits.max_upload_bytes,
                css=PAGE_CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
