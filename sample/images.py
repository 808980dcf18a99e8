"""Image files for the sampling CLI: PNG and grid writing, inpainting image and mask files
(conversion to model inputs is `glide_jax.images`)."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from glide_jax import paths
from glide_jax.images import ImageInputError


class ImageOutputError(ImageInputError):
    """An output image cannot be written where the user asked (the CLI reports it as bad input)."""


def open_image(path: str | Path, what: str) -> Image.Image:
    """The image at `path`, fully decoded (so a truncated file fails here, not later).

    An image that would decode to more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (a
    decompression bomb: a small file that expands to gigabytes) is refused before decoding;
    PIL itself only warns up to twice that limit.
    """
    try:
        with warnings.catch_warnings():  # the CLI reads its inputs on one thread
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageInputError(f"{what} {path}: refusing to decode a possible decompression bomb "
                              f"({err})") from None
    except FileNotFoundError:
        raise ImageInputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ImageInputError(f"{what} {path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageInputError(f"{what} {path}: cannot read it as an image ({err})") from None
    return image


def load_inpaint_inputs(image_path, mask_path) -> tuple[Image.Image, Image.Image]:
    """Reads the inpainting image and mask; they must be the same size."""
    image = open_image(image_path, "--inpaint-image")
    mask = open_image(mask_path, "--inpaint-mask")
    if image.size != mask.size:
        raise ImageInputError(f"--inpaint-mask {mask_path} is {mask.size[0]}x{mask.size[1]} but --inpaint-image "
                              f"{image_path} is {image.size[0]}x{image.size[1]}; they must be the same size")
    return image, mask


def save_png(path: str | os.PathLike, image: np.ndarray, metadata: dict[str, str] | None = None) -> None:
    """Writes an (H, W, 3) uint8 image with `metadata` as PNG text chunks (iTXt, so any Unicode);
    no timestamp or other varying metadata, so equal images and settings give equal bytes. `path`
    may be on an object store (`gs://...`)."""
    from PIL import PngImagePlugin

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"save_png expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    info = None
    if metadata:
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG", pnginfo=info)
    # A failed write (disk full, permissions) never leaves a half PNG under the final name.
    try:
        paths.write_bytes(path, png.getvalue())
    except OSError as err:
        raise ImageOutputError(f"cannot write {path}: {err.strerror or err}") from None


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 → one image, row-major, `columns` per row (about square when None), white gaps."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid expects a non-empty (N, H, W, C) batch, got {images.shape}")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, c), 255, images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = image
    return grid
