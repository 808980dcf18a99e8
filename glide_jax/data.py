"""Image-caption sources and a resumable, sharded, prefetching batch loader for training.

Data path::

    source (folder | tar shards | a registered plugin kind, e.g. the demo's procedural shapes)
      -> per-epoch order (seeded shuffle of records / shards) -> this host's share
      -> seeded shuffle buffer -> decode, resize shorter side, centre crop, [-1, 1]
      -> fixed-size batches {"images": (B, H, W, 3) float32, "captions": list[str]}

Everything up to decoding works on record indices only, so the order of an epoch is a pure
function of `(seed, epoch, host_index, host_count)` and cheap to recompute. The loader's
position is `(epoch, records consumed in this epoch)`; `DataLoader.state()` returns it as a
JSON-able dict and `DataLoader(..., state=...)` / `restore(state)` continues the stream exactly
where it stopped: the batches after a resume are identical to the uninterrupted run's, with or
without the prefetch thread and for any number of worker processes.

Records that cannot be used (a corrupt image, an image without caption, a caption without
image) are skipped, counted in `DataLoader.stats` (and in the saved state) and logged; they never
stop training. Skips are counted each time a record is met, i.e. once per epoch.

Optional per-example extras, deterministic from `(seed, epoch, position)` so that they too are
identical after a resume:
  * `low_res_size` + `degradation`: batch["low_res"], the upsampler's conditioning image made by
    `degrade_low_res` (area downsampling plus optional blur / JPEG / noise);
  * `masks`: batch["inpaint_mask"], inpainting masks (B, H, W, 1), 1 = keep (see
    `glide_jax.masks`); the key and convention are those `glide_jax.training` expects.

Typical use::

    source = make_source({"kind": "folder", "path": "data/train"})
    loader = DataLoader(source, batch_size=32, image_size=64, seed=0,
                        host_index=jax.process_index(), host_count=jax.process_count(),
                        state=saved.get("data"))
    for step, batch in zip(range(start, steps), loader):
        ...
        checkpoint["data"] = loader.state()   # the position after the last batch returned
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import multiprocessing
import queue
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from glide_jax.masks import MaskConfig, sample_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSION = ".txt"
STATE_VERSION = 1


class DataError(ValueError):
    """Bad data configuration or a saved data state that does not fit; the message says which."""


class SkipExample(Exception):
    """Raised by a source for a record that cannot be used; `reason` is the counter's name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):   # keeps both fields when a worker process sends it back
        return SkipExample, (self.reason, self.detail)


# -- image preprocessing -----------------------------------------------------------------------

def resize_and_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """RGB, shorter side resized to `image_size` (bicubic), centre crop; uint8 (S, S, 3)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def to_float(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_image(data: bytes, name: str) -> Image.Image:
    """Fully decodes image bytes; a truncated or unreadable file, or one that would decode to
    more than PIL's `Image.MAX_IMAGE_PIXELS` (a decompression bomb), raises SkipExample."""
    try:
        image = Image.open(io.BytesIO(data))
    # (The warning arrives as an exception when warnings are errors, e.g. python -W error.)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipExample("decompression_bomb", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SkipExample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; the header is read, the pixels are
    # not yet, so refuse before decoding. (Checked here rather than by turning the warning into
    # an error: warning filters are process-wide and the loader decodes in several threads.)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.size[0] * image.size[1] > limit:
        raise SkipExample("decompression_bomb", f"{name}: {image.size[0]}x{image.size[1]} pixels is "
                          f"more than PIL's MAX_IMAGE_PIXELS {limit}")
    try:
        image.load()    # PIL decodes lazily; force it so corrupt files fail here, not later
    except Exception as e:
        raise SkipExample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    return image


def _decode_caption(data: bytes, name: str) -> str:
    """Caption bytes as UTF-8; anything else is skipped rather than trained on as U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipExample("invalid_caption", f"{name}: not valid UTF-8 (byte {e.start}: "
                          f"{data[e.start:e.start + 4]!r})") from None


def _pick_caption(text: str, name: str, rng: np.random.Generator) -> str:
    """A caption file may hold several captions, one per line; one is chosen with `rng`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SkipExample("missing_caption", f"{name}: caption is empty")
    return lines[int(rng.integers(len(lines)))] if len(lines) > 1 else lines[0]


def _example_rng(seed: int, epoch: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index), int(purpose)])


# -- sources -----------------------------------------------------------------------------------

class Source:
    """A finite, indexable collection of records, re-read every epoch.

    Subclasses define `__len__`, `load` and optionally `groups` (contiguous index ranges that
    are read together, e.g. tar shards) and `fingerprint` (identifies the content so that a saved
    position is not applied to different data).
    """

    shuffle = True   # False for sources whose records are already independent draws

    def __len__(self) -> int:
        raise NotImplementedError

    def groups(self) -> list[tuple[int, int]] | None:
        """Contiguous [start, stop) ranges whose order is shuffled per epoch, or None (the
        default) for "each record is its own group": a full permutation per epoch."""
        return None

    def load(self, index: int, epoch: int, image_size: int, rng: np.random.Generator
             ) -> tuple[Image.Image | np.ndarray, str]:
        """(image, caption) of record `index`; raises SkipExample for an unusable record.
        `rng` is private to this record and epoch (used to choose among several captions)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return f"{type(self).__name__}:{len(self)}"

    def negative_caption(self, index: int, epoch: int, rng: np.random.Generator) -> str | None:
        """A caption that the record's image does not match but nearly does (a hard negative for
        `negative_weight` training), phrased with `rng` as `load` phrases the record's own; None
        where the source has none for this record."""
        return None

    def object_boxes(self, index: int, epoch: int) -> list[tuple[float, float, float, float]] | None:
        """(top, left, bottom, right) of each object in record `index`, as fractions of the image
        side, for "object" inpainting masks; None where the source does not know (the default)."""
        return None


def _fingerprint(kind: str, keys: Iterable[str]) -> str:
    digest = hashlib.sha1()
    n = 0
    for key in keys:
        digest.update(key.encode("utf-8", "surrogateescape") + b"\0")
        n += 1
    return f"{kind}:{n}:{digest.hexdigest()[:16]}"


class FolderSource(Source):
    """Images under `root` (recursive; .jpg .jpeg .png .webp, any case) each with a caption in
    the same-name `.txt` next to it (`a/b/cat.png` + `a/b/cat.txt`). Records are sorted by
    relative path, so the record order does not depend on the file system. An image without a
    caption stays a record and is skipped (counted) when met."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"folder source: {self.root} is not a directory")
        self.images = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix())
        if not self.images:
            raise DataError(f"folder source: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index, epoch, image_size, rng):
        path = self.images[index]
        caption_path = path.with_suffix(CAPTION_EXTENSION)
        try:
            text = _decode_caption(caption_path.read_bytes(), str(caption_path))
        except FileNotFoundError:
            raise SkipExample("missing_caption", f"{path}: no {caption_path.name}") from None
        except OSError as e:
            raise SkipExample("unreadable_file", f"{caption_path}: {e}") from None
        caption = _pick_caption(text, str(caption_path), rng)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SkipExample("unreadable_file", f"{path}: {e}") from None
        return decode_image(data, str(path)), caption

    def fingerprint(self) -> str:
        return _fingerprint("folder", (p.relative_to(self.root).as_posix() for p in self.images))


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read as record data, or None for a plain relative file."""
    if member.issym() or member.islnk():
        return f"is a {'symlink' if member.issym() else 'hardlink'} (to {member.linkname!r})"
    if not member.isfile():
        return "is not a regular file"
    if member.name.startswith("/") or ".." in member.name.split("/"):
        return "has an absolute or '..' path"
    return None


@dataclasses.dataclass(frozen=True)
class _TarRecord:
    shard: int
    key: str
    image: tuple[str, int, int] | None     # (member name, data offset, size)
    caption: tuple[str, int, int] | None
    unsafe: str | None = None              # why a member of this record is never read


class TarSource(Source):
    """Webdataset-style uncompressed tar shards: members are grouped into records by key (the
    member path up to the first '.' of its file name: `0001.jpg` + `0001.txt` form record
    `0001`). Shards are indexed once (member offsets), records are then read by seeking, so
    each host reads only its own records. Each shard is one group: an epoch visits shards in a
    shuffled order and the loader's shuffle buffer mixes records across neighbouring shards.
    Records missing the image or the caption are kept and skipped (counted) when met.

    Members are only ever read at their offset inside the shard, never extracted, so nothing is
    written anywhere. A record with a member whose name is absolute or climbs out with `..`, or
    that is a symlink, hardlink or device rather than a regular file, is kept as a record and
    skipped (counted as `unsafe_member`) when met: such a shard was made by something other
    than a dataset writer, and its links are never followed."""

    def __init__(self, shards: Sequence[str | Path]):
        if isinstance(shards, (str, Path)):
            shards = [shards]
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise DataError("tar source: 'shards' is empty")
        self.records: list[_TarRecord] = []
        self._groups: list[tuple[int, int]] = []
        for i, path in enumerate(self.shards):
            start = len(self.records)
            self.records.extend(self._index(i, path))
            self._groups.append((start, len(self.records)))
        if not self.records:
            raise DataError(f"tar source: no records in {len(self.shards)} shard(s)")

    @staticmethod
    def _index(shard: int, path: Path) -> list[_TarRecord]:
        if not path.is_file():
            raise DataError(f"tar source: shard {path} does not exist")
        try:
            # 'r:' (no compression) because records are read by seeking to member offsets.
            with tarfile.open(path, "r:") as tar:
                members = [m for m in tar.getmembers() if not m.isdir()]
        except tarfile.ReadError as e:
            raise DataError(f"tar source: cannot read {path} as an uncompressed tar ({e}); "
                            "compressed shards are not supported, decompress them first") from None
        grouped: dict[str, dict[str, tuple[str, int, int]]] = {}
        unsafe: dict[str, str] = {}
        for m in members:
            directory, _, base = m.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            problem = _unsafe_member(m)
            if problem:
                unsafe.setdefault(key, f"member {m.name!r} {problem}")
                continue
            grouped.setdefault(key, {})["." + ext.lower()] = (m.name, m.offset_data, m.size)
        records = []
        for key in sorted(set(grouped) | set(unsafe)):
            parts = grouped.get(key, {})
            image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
            records.append(_TarRecord(shard, key, image, parts.get(CAPTION_EXTENSION), unsafe.get(key)))
        return records

    def __len__(self) -> int:
        return len(self.records)

    def groups(self):
        return list(self._groups)

    def _read(self, shard: int, member: tuple[str, int, int]) -> bytes:
        _, offset, size = member
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise SkipExample("corrupt_image", f"{self.shards[shard]}:{member[0]}: truncated member")
        return data

    def load(self, index, epoch, image_size, rng):
        rec = self.records[index]
        where = f"{self.shards[rec.shard]}:{rec.key}"
        if rec.unsafe:
            raise SkipExample("unsafe_member", f"{where}: {rec.unsafe}")
        if rec.image is None:
            raise SkipExample("missing_image", f"{where}: no image member")
        if rec.caption is None:
            raise SkipExample("missing_caption", f"{where}: no .txt member")
        text = _decode_caption(self._read(rec.shard, rec.caption), f"{where}{CAPTION_EXTENSION}")
        caption = _pick_caption(text, where, rng)
        return decode_image(self._read(rec.shard, rec.image), where), caption

    def fingerprint(self) -> str:
        return _fingerprint("tar", (f"{r.shard}/{r.key}" for r in self.records))


# -- the registry of source kinds ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SourceKind:
    factory: Callable[[dict[str, Any]], Source]
    keys: frozenset[str]


_SOURCES: dict[str, _SourceKind] = {}


def register_source(kind: str, factory: Callable[[dict[str, Any]], Source], keys: Iterable[str]) -> None:
    """Makes `{"kind": kind, ...}` a source spec for `make_source`: `factory(spec)` builds it, and
    `keys` are the spec keys it takes besides "kind" (any other is an error naming them). A plugin
    module calls this on import; the training CLI imports the modules in `data.plugins` first."""
    entry = _SourceKind(factory, frozenset(keys) | {"kind"})
    if kind in _SOURCES and _SOURCES[kind] != entry:
        raise ValueError(f"data source kind {kind!r} is already registered")
    _SOURCES[kind] = entry


def registered_sources() -> list[str]:
    return sorted(_SOURCES)


def make_source(spec: dict[str, Any]) -> Source:
    """A source from a config dict, by its registered kind:

    * `{"kind": "folder", "path": "data/train"}`
    * `{"kind": "tar", "shards": ["data/00000.tar", ...]}` (a string is a glob pattern)
    * any kind a plugin registered (`register_source`), e.g. the demo's "shapes" (`demo.sources`)
    """
    if not isinstance(spec, dict):
        raise DataError(f"data source spec must be a dict, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in _SOURCES:
        raise DataError(f"data source 'kind' {kind!r} is not registered; registered kinds: {registered_sources()} "
                        "(a plugin module registers more when imported: the run config's data.plugins)")
    unknown = set(spec) - _SOURCES[kind].keys
    if unknown:
        raise DataError(f"unknown key(s) {sorted(unknown)} for a {kind!r} data source; "
                        f"allowed: {sorted(_SOURCES[kind].keys)}")
    return _SOURCES[kind].factory(spec)


def _folder_source(spec: dict[str, Any]) -> FolderSource:
    if "path" not in spec:
        raise DataError("folder data source needs 'path'")
    return FolderSource(spec["path"])


def _tar_source(spec: dict[str, Any]) -> TarSource:
    if "shards" not in spec:
        raise DataError("tar data source needs 'shards' (a list of paths or a glob pattern)")
    shards = spec["shards"]
    if isinstance(shards, str):
        pattern = Path(shards)
        shards = sorted(pattern.parent.glob(pattern.name))
        if not shards:
            raise DataError(f"tar data source: 'shards' pattern {spec['shards']!r} matches no file")
    elif not isinstance(shards, (list, tuple)):
        raise DataError(f"tar data source: 'shards' must be a list or a glob pattern, got "
                        f"{type(shards).__name__}")
    return TarSource(shards)


register_source("folder", _folder_source, keys=("path",))
register_source("tar", _tar_source, keys=("shards",))


# -- upsampler conditioning ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Degradation:
    """Random degradations of the upsampler's low-resolution input.

    GLIDE trains its upsampler on low-resolution images that were lightly corrupted so the
    model learns to remove artifacts instead of copying them (like later cascaded models that
    blur and JPEG-compress their conditioning). Each degradation fires independently with its
    probability; ranges are sampled uniformly. The default does nothing (pure area
    downsampling).

    blur_prob, blur_sigma: Gaussian blur of the high-res image before downsampling, sigma in
        low-res pixels (so the visual effect does not depend on the factor).
    jpeg_prob, jpeg_quality: JPEG re-compression of the low-res image (PIL, quality range).
    noise_prob, noise_std: additive Gaussian noise on the low-res image, std in [-1, 1] units.
    """
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 95)
    noise_prob: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.05)

    def __post_init__(self):
        for name in ("blur_prob", "jpeg_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"Degradation.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("blur_sigma", "jpeg_quality", "noise_std"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise DataError(f"Degradation.{name} must be (lo, hi) with 0 <= lo <= hi, "
                                f"got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise DataError(f"Degradation.jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C), reflect padding."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="reflect")
        n = image.shape[axis]
        out = np.zeros_like(image)
        for i, w in enumerate(k):
            out += w * np.take(padded, np.arange(i, i + n), axis=axis)
        image = out
    return image


def area_downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of (..., H, W, C)."""
    *lead, h, w, c = images.shape
    if h % factor or w % factor:
        raise DataError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}")
    return images.reshape(*lead, h // factor, factor, w // factor, factor, c).mean(axis=(-4, -2))


def degrade_low_res(images_hr: np.ndarray, factor: int, rng: np.random.Generator,
                    degradation: Degradation = Degradation()) -> np.ndarray:
    """The upsampler's low-res input from high-res images.

    images_hr: (B, H, W, 3) or (H, W, 3) float in [-1, 1]; H and W divisible by `factor`.
    Steps per image: optional blur (at high res) -> area downsampling by `factor` -> optional JPEG
    re-compression -> optional noise -> clip to [-1, 1]. Returns float32 with the input's rank.
    All randomness comes from `rng`, consumed in a fixed order per image.
    """
    images_hr = np.asarray(images_hr, dtype=np.float32)
    single = images_hr.ndim == 3
    batch = images_hr[None] if single else images_hr
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise DataError(f"degrade_low_res expects (B, H, W, 3) or (H, W, 3), got {images_hr.shape}")
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise DataError(f"degrade_low_res: factor must be a positive integer, got {factor!r}")
    d = degradation
    out = []
    for image in batch:
        # Draw every decision up front so that the random stream does not depend on which
        # degradations fire.
        u = rng.random(3)
        sigma = rng.uniform(*d.blur_sigma) * factor
        quality = int(rng.integers(d.jpeg_quality[0], d.jpeg_quality[1] + 1))
        std = rng.uniform(*d.noise_std)
        if u[0] < d.blur_prob and sigma > 0:
            image = _gaussian_blur(image, sigma)
        low = area_downsample(image, factor)
        if u[1] < d.jpeg_prob:
            buf = io.BytesIO()
            Image.fromarray(to_uint8(low)).save(buf, format="JPEG", quality=quality)
            low = to_float(np.asarray(Image.open(buf).convert("RGB")))
        if u[2] < d.noise_prob:
            low = low + rng.standard_normal(low.shape).astype(np.float32) * np.float32(std)
        out.append(np.clip(low, -1.0, 1.0).astype(np.float32))
    result = np.stack(out)
    return result[0] if single else result


# -- the loader --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Position:
    epoch: int
    offset: int    # records of this epoch's host order already consumed (used or skipped)


def shuffle_buffer_order(indices: np.ndarray, buffer_size: int, rng: np.random.Generator
                         ) -> np.ndarray:
    """The order in which a streaming shuffle buffer of `buffer_size` emits `indices`: fill the
    buffer, then for each incoming item emit a random slot and put the item there; finally emit
    what is left in random order."""
    if buffer_size <= 1 or len(indices) <= 1:
        return np.asarray(indices)
    n = len(indices)
    out = np.empty(n, dtype=np.int64)
    buf = list(indices[:buffer_size])
    slots = rng.integers(0, len(buf), size=max(0, n - len(buf)))
    k = 0
    for item, j in zip(indices[len(buf):], slots):
        out[k] = buf[j]
        buf[j] = item
        k += 1
    out[k:] = rng.permutation(np.asarray(buf, dtype=np.int64))
    return out


@dataclasses.dataclass(frozen=True)
class _ExampleMaker:
    """Turns a record position into a training example; picklable, so worker processes can
    run it. Everything it draws comes from generators seeded by the position alone, so where
    it runs never changes the example."""

    source: Source
    image_size: int
    seed: int
    low_res_size: int | None
    degradation: Degradation
    mask_config: MaskConfig | None
    negatives: bool = False

    def __call__(self, index: int, epoch: int) -> dict:
        rng = _example_rng(self.seed, epoch, index, 0)
        image, caption = self.source.load(index, epoch, self.image_size, rng)
        if isinstance(image, Image.Image):
            pixels = resize_and_crop(image, self.image_size)
        else:
            pixels = np.asarray(image)
            if pixels.shape != (self.image_size, self.image_size, 3):
                pixels = resize_and_crop(Image.fromarray(pixels), self.image_size)
        example = {"images": to_float(pixels), "captions": caption}
        if self.negatives:
            # The generator `load` phrased the caption with, from the start: the same phrasing.
            negative = self.source.negative_caption(index, epoch, _example_rng(self.seed, epoch, index, 0))
            example["negative_captions"] = negative or ""
        extra_rng = _example_rng(self.seed, epoch, index, 1)
        if self.low_res_size is not None:
            factor = self.image_size // self.low_res_size
            example["low_res"] = degrade_low_res(example["images"], factor, extra_rng, self.degradation)
        if self.mask_config is not None:
            boxes = self.source.object_boxes(index, epoch) if self.mask_config.object_weight > 0 else None
            example["inpaint_mask"] = sample_mask(self.image_size, self.image_size, extra_rng,
                                                  self.mask_config, boxes)
        return example

    def try_make(self, index: int, epoch: int) -> dict | SkipExample:
        try:
            return self(index, epoch)
        except SkipExample as skip:
            return skip


_WORKER_MAKER: _ExampleMaker | None = None


def _worker_init(maker: _ExampleMaker) -> None:
    global _WORKER_MAKER
    _WORKER_MAKER = maker


def _worker_make(chunk: list[tuple[int, int]]) -> list:
    return [_WORKER_MAKER.try_make(index, epoch) for index, epoch in chunk]


class DataLoader:
    """Endless iterator of fixed-size batches from a `Source`; see the module docstring.

    Args:
      source: the records.
      batch_size: examples per batch on this host.
      image_size: output side; images are resized (shorter side) and centre-cropped.
      seed: fixes the per-epoch orders, shuffle buffers, caption choice and extras.
      shuffle_buffer: size of the streaming shuffle buffer applied after the per-epoch group
        order (0 or 1 disables it). Sources with `shuffle = False` are never shuffled.
      host_index, host_count: this host's share is every `host_count`-th record of the epoch
        order starting at `host_index`, so hosts see disjoint records and together all.
      prefetch: batches prepared ahead by a background thread (0: synchronous).
      workers: processes that decode and augment examples (0: the loading thread does it).
        A single thread can feed a few thousand small images a second, fewer large decoded
        ones, which an accelerator outruns. The batches are the same for any number.
      state: a `state()` dict to resume from.
      low_res_size, degradation: add batch["low_res"] (float32 [-1, 1], side `low_res_size`,
        which must divide `image_size`) made by `degrade_low_res`.
      masks: add batch["inpaint_mask"] (B, H, W, 1) float32, 1 = keep, from
        `glide_jax.masks.sample_mask`.
      negatives: add batch["negative_captions"], list[str]: per record the source's
        `negative_caption`, or "" where it has none.

    Batches: {"images": (B, S, S, 3) float32 in [-1, 1], "captions": list[str] of length B,
    plus the optional extras}. `state()` is the position after the last batch returned.
    """

    def __init__(self, source: Source, *, batch_size: int, image_size: int, seed: int = 0,
                 shuffle_buffer: int = 1000, host_index: int = 0, host_count: int = 1,
                 prefetch: int = 2, state: dict | None = None, low_res_size: int | None = None,
                 degradation: Degradation = Degradation(), masks: MaskConfig | None = None,
                 workers: int = 0, negatives: bool = False):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if host_count <= 0 or not 0 <= host_index < host_count:
            raise DataError(f"need 0 <= host_index < host_count, got {host_index} and {host_count}")
        if len(source) < host_count:
            raise DataError(f"source has {len(source)} records, fewer than host_count={host_count}")
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}")
        if low_res_size is not None and (low_res_size <= 0 or image_size % low_res_size):
            raise DataError(f"low_res_size {low_res_size} must divide image_size {image_size}")
        if masks is not None and masks.object_weight > 0 and type(source).object_boxes is Source.object_boxes:
            raise DataError(f"masks.object_weight is {masks.object_weight}, but a {type(source).__name__} "
                            "does not know where its objects are (it defines no object_boxes)")
        self.source = source
        self.batch_size, self.image_size, self.seed = int(batch_size), int(image_size), int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.host_index, self.host_count = int(host_index), int(host_count)
        self.prefetch, self.workers = int(prefetch), int(workers)
        self.low_res_size, self.degradation, self.mask_config = low_res_size, degradation, masks
        if negatives and type(source).negative_caption is Source.negative_caption:
            raise DataError(f"negative captions were asked for, but a {type(source).__name__} has none "
                            "(it defines no negative_caption)")
        self._maker = _ExampleMaker(source, self.image_size, self.seed, low_res_size, degradation, masks, negatives)
        self._pool = None
        self._fingerprint = source.fingerprint()
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._position = _Position(0, 0)              # after the last batch returned
        self._stats = {"examples": 0, "skipped": {}}  # as of the last batch returned
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        if state is not None:
            self.restore(state)

    # -- order ----------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices this host reads in `epoch`, in order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        groups = self.source.groups()
        group_rng = np.random.default_rng([self.seed, epoch, 0])
        if groups is None:
            order = np.arange(len(self.source), dtype=np.int64)
            if self.source.shuffle:
                order = group_rng.permutation(order)
        else:
            if self.source.shuffle:
                groups = [groups[i] for i in group_rng.permutation(len(groups))]
            order = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in groups])
        order = order[self.host_index::self.host_count]
        if self.source.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1, self.host_index])
            order = shuffle_buffer_order(order, self.shuffle_buffer, rng)
        self._order_cache = (epoch, order)
        return order

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-able position after the last batch returned (plus counters and a check that
        it is restored into a loader reading the same data the same way)."""
        return {"version": STATE_VERSION, "epoch": self._position.epoch,
                "offset": self._position.offset, "seed": self.seed,
                "host_index": self.host_index, "host_count": self.host_count,
                "batch_size": self.batch_size, "source": self._fingerprint,
                "stats": {"examples": self._stats["examples"],
                          "skipped": dict(self._stats["skipped"])}}

    def restore(self, state: dict) -> None:
        """Continues from a `state()` dict; the next batch is the one that followed it."""
        if not isinstance(state, dict):
            raise DataError(f"data state must be a dict, got {type(state).__name__}")
        for key in ("version", "epoch", "offset", "seed", "host_index", "host_count", "source"):
            if key not in state:
                raise DataError(f"data state lacks key {key!r}")
        if state["version"] != STATE_VERSION:
            raise DataError(f"data state version {state['version']} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("host_index", self.host_index),
                          ("host_count", self.host_count), ("source", self._fingerprint)):
            if state[key] != mine:
                raise DataError(f"data state was saved with {key}={state[key]!r} but this loader "
                                f"has {key}={mine!r}; resuming would not continue the same stream")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= len(self.epoch_order(epoch)):
            raise DataError(f"data state position epoch={epoch} offset={offset} is out of range")
        self._shutdown()
        self._position = _Position(epoch, offset)
        stats = state.get("stats", {"examples": 0, "skipped": {}})
        self._stats = {"examples": int(stats.get("examples", 0)),
                       "skipped": {k: int(v) for k, v in stats.get("skipped", {}).items()}}

    @property
    def stats(self) -> dict:
        """{"examples": used, "skipped": {reason: count}} up to the last batch returned."""
        return {"examples": self._stats["examples"], "skipped": dict(self._stats["skipped"])}

    # -- production -----------------------------------------------------------------------------

    def _positions(self, position: _Position):
        """(record index, epoch, offset after it) of every record from `position` on."""
        epoch, offset = position.epoch, position.offset
        while True:
            order = self.epoch_order(epoch)
            for at in range(offset, len(order)):
                yield int(order[at]), epoch, at + 1
            epoch, offset = epoch + 1, 0

    def _made(self, position: _Position):
        """Yields (example or SkipExample, record index, epoch, offset after it) in stream order."""
        if self._pool is None:
            for index, epoch, after in self._positions(position):
                yield self._maker.try_make(index, epoch), index, epoch, after
            return
        # Bounded look-ahead: the stream is endless, so never hand the pool more than a few
        # chunks per worker; results are taken in submission order.
        chunk_size, ahead = 8, 4 * self.workers
        positions = self._positions(position)
        pending = collections.deque()
        while True:
            while len(pending) < ahead:
                chunk = [next(positions) for _ in range(chunk_size)]
                pending.append((chunk, self._pool.submit(_worker_make, [(i, e) for i, e, _ in chunk])))
            chunk, future = pending.popleft()
            try:
                made_chunk = future.result()
            except concurrent.futures.process.BrokenProcessPool as err:
                raise DataError(f"a data worker process died ({err}); with workers > 0 the program must be "
                                "importable by a fresh interpreter (run from a file, not stdin), or use "
                                "workers=0") from err
            for (index, epoch, after), made in zip(chunk, made_chunk):
                yield made, index, epoch, after

    def _examples(self, position: _Position, stats: dict):
        """Yields (example dict, position after it) from `position` on; updates `stats`."""
        epoch, used_this_epoch = position.epoch, 0
        whole_epoch = position.offset == 0     # a resumed epoch may have no usable record left
        for made, index, made_epoch, after in self._made(position):
            if made_epoch != epoch:
                if used_this_epoch == 0 and whole_epoch:
                    raise DataError(f"no usable record for host {self.host_index} in epoch {epoch} of "
                                    f"{self._fingerprint}; skipped: {stats['skipped']}")
                epoch, used_this_epoch, whole_epoch = made_epoch, 0, True
            if isinstance(made, SkipExample):
                count = stats["skipped"].get(made.reason, 0) + 1
                stats["skipped"][made.reason] = count
                # A broken data set must not flood the log: every skip up to ten per
                # reason, then every thousandth (the counts stay exact in `stats`).
                level = logging.WARNING if count <= 10 or count % 1000 == 0 else logging.DEBUG
                log.log(level, "skipping record %d of %s (%s #%d): %s", index, self._fingerprint,
                        made.reason, count, made.detail)
                continue
            used_this_epoch += 1
            stats["examples"] += 1
            yield made, _Position(made_epoch, after)

    def _batches(self, position: _Position, stats: dict):
        """Yields (batch, position after it, stats snapshot) forever."""
        examples = self._examples(position, stats)
        while True:
            items = []
            for example, pos in examples:
                items.append(example)
                if len(items) == self.batch_size:
                    break
            batch = {"images": np.stack([e["images"] for e in items]),
                     "captions": [e["captions"] for e in items]}
            if "negative_captions" in items[0]:
                batch["negative_captions"] = [e["negative_captions"] for e in items]
            for key in ("low_res", "inpaint_mask"):
                if key in items[0]:
                    batch[key] = np.stack([e[key] for e in items])
            yield batch, pos, {"examples": stats["examples"], "skipped": dict(stats["skipped"])}

    def _producer(self, q: queue.Queue, stop: threading.Event, position, stats):
        try:
            for item in self._batches(position, stats):
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surfaced to the consumer, never lost in the thread
            q.put(e)

    def _start(self):
        if self.workers > 0:
            # Spawned, not forked, as this process may already run JAX's threads; an executor, as it
            # fails where multiprocessing.Pool would respawn a dying worker forever.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(self._maker,))
        position = _Position(self._position.epoch, self._position.offset)
        stats = {"examples": self._stats["examples"], "skipped": dict(self._stats["skipped"])}
        if self.prefetch <= 0:
            self._sync = self._batches(position, stats)
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._producer, name="glide-data-prefetch",
                                        args=(self._queue, self._stop, position, stats),
                                        daemon=True)
        self._thread.start()

    def _shutdown(self):
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:   # unblock a producer waiting on a full queue
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._queue = None
        self._sync = None

    _sync = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None and self._sync is None:
            self._start()
        if self._sync is not None:
            batch, pos, stats = next(self._sync)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._shutdown()
                raise item
            batch, pos, stats = item
        self._position, self._stats = pos, stats
        return batch

    def close(self) -> None:
        """Stops the prefetch thread; iterating again restarts from `state()`."""
        self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:
            pass
