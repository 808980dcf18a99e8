"""Image-caption sources and the training batch pipeline, built on grain.

Data path::

    source (folder | tar shards | jsonl | a registered plugin kind, e.g. the demo's shapes)
      -> grain: record indices, shuffled per epoch (index_shuffle), repeated forever
      -> example at global position p: decode, resize shorter side, centre crop, [-1, 1], extras
      -> grain: global batch k = positions [k*G, (k+1)*G); process i takes its contiguous slice
      -> grain: thread prefetch, optional worker processes (mp_prefetch)
      -> {"images": (B, H, W, 3) float32, "captions": list[str], extras}

Everything random about the example at global position p (which record, which caption line, the
degradations, the mask) is a function of the seed and p alone, so the global batch at step k is the
same for any number of processes, worker processes or prefetch threads; each process gets rows
`[i*B, (i+1)*B)` of it (B = the per-process batch). `DataLoader.state()` is a JSON-able dict
holding grain's own iterator state (`get_state()`), and `DataLoader(..., state=...)` continues
the stream exactly where it stopped, with the same or another number of worker processes: the
batches after a resume are the uninterrupted run's.

A record that cannot be used (a corrupt image, an image without caption, a caption without
image, an unsafe tar member or path) is skipped, counted in `DataLoader.stats` (and in the saved
state) and logged; it never stops training. Its slot is filled with the next usable record of a
second seeded permutation of the epoch, so that positions, and with them the batches of every
process, do not shift. Skips are counted each time a record is tried. An epoch with no usable
record at all is a DataError.

Optional per-example extras:
  * `low_res_size` + `degradation`: batch["low_res"], the upsampler's conditioning image made by
    `degrade_low_res` (area downsampling plus optional blur / JPEG / noise);
  * `masks`: batch["inpaint_mask"], inpainting masks (B, H, W, 1), 1 = keep (see
    `glide_jax.masks`); the key and convention are those `glide_jax.training` expects;
  * `negatives`: batch["negative_captions"], the source's hard-negative captions ("" = none).

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
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np
from PIL import Image

from glide_jax.masks import MaskConfig, sample_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSION = ".txt"
# 2: grain's iterator state (1 was the hand-written loader's epoch and offset).
STATE_VERSION = 2


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


# -- sources -----------------------------------------------------------------------------------

class Source:
    """A finite, indexable collection of records, re-read every epoch.

    Subclasses define `__len__`, `load` and optionally `fingerprint` (identifies the content so
    that a saved position is not applied to different data). `load` runs in the loader's threads
    and worker processes, so it must be thread-safe and the source picklable.
    """

    shuffle = True   # False for sources whose records are already independent draws

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, epoch: int, image_size: int, rng: np.random.Generator
             ) -> tuple[Image.Image | np.ndarray, str]:
        """(image, caption) of record `index`; raises SkipExample for an unusable record.
        `rng` is private to this example (used to choose among several captions)."""
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


def _read_file(path: Path, missing_reason: str, what: str, context: str = "") -> bytes:
    """A file's bytes; `context` prefixes the messages (e.g. the jsonl line naming the file)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SkipExample(missing_reason, f"{context}{path}: no {what} file") from None
    except OSError as e:
        raise SkipExample("unreadable_file", f"{context}{path}: {e}") from None


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
        return decode_image(_read_file(path, "missing_image", "image"), str(path)), caption

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


def _tar_members(path: Path, what: str) -> list[tarfile.TarInfo]:
    """The members (directories left out) of an uncompressed tar; `what` names the source."""
    if not path.is_file():
        raise DataError(f"{what}: shard {path} does not exist")
    try:
        # 'r:' (no compression) because members are read by seeking to their offsets.
        with tarfile.open(path, "r:") as tar:
            return [m for m in tar.getmembers() if not m.isdir()]
    except tarfile.ReadError as e:
        raise DataError(f"{what}: cannot read {path} as an uncompressed tar ({e}); "
                        "compressed shards are not supported, decompress them first") from None


def _read_member(shard: Path, member: tuple[str, int, int], context: str = "") -> bytes:
    """A member's bytes, read at its offset: tar members are never extracted or followed."""
    name, offset, size = member
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise SkipExample("unreadable_file", f"{context}{shard}:{name}: {e}") from None
    if len(data) != size:
        raise SkipExample("corrupt_image", f"{context}{shard}:{name}: truncated member")
    return data


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
    each process reads only its own records, in any order. Records missing the image or the
    caption are kept and skipped (counted) when met.

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
        for i, path in enumerate(self.shards):
            self.records.extend(self._index(i, path))
        if not self.records:
            raise DataError(f"tar source: no records in {len(self.shards)} shard(s)")

    @staticmethod
    def _index(shard: int, path: Path) -> list[_TarRecord]:
        grouped: dict[str, dict[str, tuple[str, int, int]]] = {}
        unsafe: dict[str, str] = {}
        for m in _tar_members(path, "tar source"):
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

    def load(self, index, epoch, image_size, rng):
        rec = self.records[index]
        shard = self.shards[rec.shard]
        where = f"{shard}:{rec.key}"
        if rec.unsafe:
            raise SkipExample("unsafe_member", f"{where}: {rec.unsafe}")
        if rec.image is None:
            raise SkipExample("missing_image", f"{where}: no image member")
        if rec.caption is None:
            raise SkipExample("missing_caption", f"{where}: no .txt member")
        text = _decode_caption(_read_member(shard, rec.caption), f"{where}{CAPTION_EXTENSION}")
        caption = _pick_caption(text, where, rng)
        return decode_image(_read_member(shard, rec.image), where), caption

    def fingerprint(self) -> str:
        return _fingerprint("tar", (f"{r.shard}/{r.key}" for r in self.records))


@dataclasses.dataclass(frozen=True)
class _JsonlRecord:
    where: str                                      # "<file>:<line>", for messages
    image: Path | tuple[str, int, int] | None = None   # a file, or (member, offset, size) in `tar`
    tar: Path | None = None
    captions: tuple[str, ...] = ()
    problem: tuple[str, str] | None = None          # (reason, detail): the line is never usable


class JsonlSource(Source):
    """Records listed in JSON-lines files, one JSON object per line::

        {"image": "images/cat.jpg", "caption": "a cat on a mat"}
        {"image": "000017.jpg", "tar": "shards/00000.tar", "caption": ["a cat", "a tabby cat"]}

    `image` is a path relative to the directory holding the jsonl file, or, with `tar` (a shard
    path relative to that directory), the name of a member of that uncompressed tar. `caption` is
    a string or a list of strings (one is chosen per example). Other keys are ignored, so
    metadata can ride along; blank lines are skipped.

    A line that is not such an object, names an absolute or `..` path, or a tar member that is
    missing or unsafe (see `TarSource`), stays a record and is a counted skip when met; a
    missing image file likewise. A tar that does not exist, or files without a single valid line,
    are a DataError. Paths are checked as written (a symlink inside the tree is followed, as the
    folder source follows them); tar members are only ever read at their offsets."""

    def __init__(self, paths: Sequence[str | Path]):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("jsonl source: 'path' names no file")
        self._tars: dict[Path, dict[str, tarfile.TarInfo]] = {}
        self.records: list[_JsonlRecord] = []
        for path in self.paths:
            self.records.extend(self._read(path))
        if not self.records:
            raise DataError(f"jsonl source: no records in {', '.join(map(str, self.paths))}")
        if all(r.problem for r in self.records):
            raise DataError(f"jsonl source: no valid line in {', '.join(map(str, self.paths))}; the first: "
                            f"{self.records[0].problem[1]} (expected objects like "
                            '{"image": "a.jpg", "caption": "..."})')
        del self._tars   # only needed while indexing; keeps the pickled source small

    def _read(self, path: Path) -> list[_JsonlRecord]:
        if not path.is_file():
            raise DataError(f"jsonl source: {path} does not exist")
        records = []
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    records.append(self._record(path, number, line))
        return records

    def _record(self, path: Path, number: int, line: bytes) -> _JsonlRecord:
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _JsonlRecord(where, problem=("invalid_record", f"{where}: not a JSON line ({e})"))
        problem = _jsonl_entry_problem(entry)
        if problem:
            return _JsonlRecord(where, problem=("invalid_record", f"{where}: {problem}"))
        captions = (entry["caption"],) if isinstance(entry["caption"], str) else tuple(entry["caption"])
        for name in ("image", "tar"):
            if name in entry and _unsafe_path(entry[name]):
                return _JsonlRecord(where, problem=("unsafe_path", f"{where}: {name} {entry[name]!r} is an "
                                                                   "absolute or '..' path"))
        if "tar" not in entry:
            return _JsonlRecord(where, path.parent / entry["image"], None, captions)
        shard = path.parent / entry["tar"]
        if shard not in self._tars:
            self._tars[shard] = {m.name: m for m in _tar_members(shard, f"jsonl source ({where})")}
        member = self._tars[shard].get(entry["image"])
        if member is None:
            return _JsonlRecord(where, problem=("missing_image", f"{where}: {shard} has no member "
                                                                 f"{entry['image']!r}"))
        unsafe = _unsafe_member(member)
        if unsafe:
            return _JsonlRecord(where, problem=("unsafe_member", f"{where}: {shard} member {member.name!r} "
                                                                 f"{unsafe}"))
        return _JsonlRecord(where, (member.name, member.offset_data, member.size), shard, captions)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index, epoch, image_size, rng):
        rec = self.records[index]
        if rec.problem:
            raise SkipExample(*rec.problem)
        captions = [c.strip() for c in rec.captions if c.strip()]
        if not captions:
            raise SkipExample("missing_caption", f"{rec.where}: caption is empty")
        caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        if rec.tar is None:
            data = _read_file(rec.image, "missing_image", "image", f"{rec.where}: ")
            name = f"{rec.where}: {rec.image}"
        else:
            data = _read_member(rec.tar, rec.image, f"{rec.where}: ")
            name = f"{rec.where}: {rec.tar}:{rec.image[0]}"
        return decode_image(data, name), caption

    def fingerprint(self) -> str:
        return _fingerprint("jsonl", (f"{r.where}:{r.image}" for r in self.records))


def _jsonl_entry_problem(entry: Any) -> str | None:
    """What is wrong with a parsed jsonl line, or None."""
    if not isinstance(entry, dict):
        return f"a line must be a JSON object, got {type(entry).__name__}"
    if not isinstance(entry.get("image"), str) or not entry["image"]:
        return "'image' must be a non-empty string (a path, or a member name with 'tar')"
    if "tar" in entry and (not isinstance(entry["tar"], str) or not entry["tar"]):
        return "'tar' must be a non-empty string (a shard path)"
    caption = entry.get("caption")
    if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                         and all(isinstance(c, str) for c in caption))):
        return "'caption' must be a string or a non-empty list of strings"
    return None


def _unsafe_path(name: str) -> bool:
    return Path(name).is_absolute() or ".." in Path(name).parts


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
    * `{"kind": "jsonl", "path": "data/train.jsonl"}` (a list, or a glob pattern; see JsonlSource)
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


def _paths(spec: dict[str, Any], key: str, kind: str) -> list[Path]:
    """spec[key] as a list of paths: a list as given, a string as a glob pattern."""
    value = spec[key]
    if isinstance(value, str):
        paths = sorted(Path(p) for p in glob.glob(value))
        if not paths:
            raise DataError(f"{kind} data source: {key!r} pattern {value!r} matches no file")
        return paths
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise DataError(f"{kind} data source: {key!r} must be a list of paths or a glob pattern, got {value!r}")
    return [Path(p) for p in value]


def _folder_source(spec: dict[str, Any]) -> FolderSource:
    if "path" not in spec:
        raise DataError("folder data source needs 'path'")
    return FolderSource(spec["path"])


def _tar_source(spec: dict[str, Any]) -> TarSource:
    if "shards" not in spec:
        raise DataError("tar data source needs 'shards' (a list of paths or a glob pattern)")
    return TarSource(_paths(spec, "shards", "tar"))


def _jsonl_source(spec: dict[str, Any]) -> JsonlSource:
    if "path" not in spec:
        raise DataError("jsonl data source needs 'path' (a .jsonl file, a list of them or a glob pattern)")
    return JsonlSource(_paths(spec, "path", "jsonl"))


register_source("folder", _folder_source, keys=("path",))
register_source("tar", _tar_source, keys=("shards",))
register_source("jsonl", _jsonl_source, keys=("path",))


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


# -- the grain pipeline ----------------------------------------------------------------------------

# Derived seed streams: the records' order in each epoch, and the order in which a skipped
# record's slot looks for a usable one.
_ORDER_STREAM, _REPLACEMENT_STREAM = 0, 1


def _grain_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for grain's index shuffle, hashed from the loader's seed: grain adds the
    epoch to its seed, so seed s + 1 would otherwise replay seed s's orders one epoch later."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _example_rng(seed: int, epoch: int, index: int, purpose: int, refill_at: int | None = None
                 ) -> np.random.Generator:
    """The generator of one example's draws. A record in its own slot is keyed as the loader
    before grain keyed it, so an unshuffled source (the demo's shapes) gives the same stream; a
    record refilling another slot (`refill_at`, that slot's position) draws afresh there."""
    key = [seed, epoch, index, purpose] + ([] if refill_at is None else [refill_at])
    return np.random.default_rng(key)


@dataclasses.dataclass(frozen=True)
class _ExampleMaker(grain.transforms.MapWithIndex):
    """grain transform: (global position, record index) -> one training example. It is pickled
    into grain's worker processes; everything it draws comes from generators seeded by the seed
    and the position, so where and when it runs never changes the example."""

    source: Source
    image_size: int
    seed: int
    low_res_size: int | None
    degradation: Degradation
    mask_config: MaskConfig | None
    negatives: bool = False
    replacement_seed: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "replacement_seed", _grain_seed(self.seed, _REPLACEMENT_STREAM))

    def map_with_index(self, position: int, record: int) -> dict:
        n = len(self.source)
        epoch, slot = divmod(position, n)
        seed = (self.replacement_seed + epoch) % 2**32
        skipped = []
        # Attempts 1..n walk a second permutation of the epoch from this slot on: they reach
        # every record, and a bad record's slot does not just repeat its neighbour's record.
        for attempt in range(n + 1):
            index = record if attempt == 0 else grain.experimental.index_shuffle(
                (slot + attempt) % n, max_index=n - 1, seed=seed, rounds=4)
            try:
                example = self.make(int(index), epoch, position, attempt)
            except SkipExample as skip:
                skipped.append((skip.reason, int(index), skip.detail))
                continue
            example["_skipped"] = skipped
            return example
        reasons = dict(collections.Counter(reason for reason, _, _ in skipped))
        raise DataError(f"no usable record in epoch {epoch} of {self.source.fingerprint()}: all {n} records "
                        f"are skipped ({reasons}); the first: {skipped[0][2]}")

    def make(self, index: int, epoch: int, position: int, attempt: int) -> dict:
        """The example of record `index` at `position`; SkipExample if the record is unusable."""
        size = self.image_size
        refill_at = position if attempt else None
        image, caption = self.source.load(index, epoch, size, _example_rng(self.seed, epoch, index, 0, refill_at))
        if isinstance(image, Image.Image):
            pixels = resize_and_crop(image, size)
        else:
            pixels = np.asarray(image)
            if pixels.shape != (size, size, 3):
                pixels = resize_and_crop(Image.fromarray(pixels), size)
        example = {"images": to_float(pixels), "captions": caption}
        if self.negatives:
            # The generator `load` phrased the caption with, from the start: the same phrasing.
            negative = self.source.negative_caption(index, epoch, _example_rng(self.seed, epoch, index, 0, refill_at))
            example["negative_captions"] = negative or ""
        extra_rng = _example_rng(self.seed, epoch, index, 1, refill_at)
        if self.low_res_size is not None:
            example["low_res"] = degrade_low_res(example["images"], size // self.low_res_size, extra_rng,
                                                 self.degradation)
        if self.mask_config is not None:
            boxes = self.source.object_boxes(index, epoch) if self.mask_config.object_weight > 0 else None
            example["inpaint_mask"] = sample_mask(size, size, extra_rng, self.mask_config, boxes)
        return example


def _collate(examples: Sequence[dict]) -> dict:
    """grain batch_fn: arrays stacked, captions as lists of str, the examples' skips joined."""
    first = examples[0]
    batch = {key: np.stack([e[key] for e in examples])
             for key in ("images", "low_res", "inpaint_mask") if key in first}
    for key in ("captions", "negative_captions"):
        if key in first:
            batch[key] = [e[key] for e in examples]
    batch["_skipped"] = [skip for e in examples for skip in e["_skipped"]]
    return batch


def batch_dataset(source: Source, maker: _ExampleMaker, batch_size: int, seed: int,
                  host_index: int = 0, host_count: int = 1) -> grain.MapDataset:
    """This process's batches as an endless grain MapDataset: element k is rows
    [host_index * batch_size, (host_index + 1) * batch_size) of global batch k."""
    records = grain.MapDataset.range(len(source))
    if source.shuffle:
        # Before repeat(): grain then draws another permutation for every epoch.
        records = records.shuffle(seed=_grain_seed(seed, _ORDER_STREAM))
    examples = records.repeat().map_with_index(maker)
    # Chunks of batch_size consecutive positions; process i of P takes chunks i, i + P, ...: its
    # k-th batch is its slice of global batch k, whatever P is. (drop_remainder: the endless
    # stream's length is sys.maxsize, and grain sizes a batched dataset in floats otherwise.)
    return examples.batch(batch_size, drop_remainder=True, batch_fn=_collate)[host_index::host_count]


def _check_loader_args(source: Source, batch_size, image_size, seed, host_index, host_count, prefetch,
                       workers, low_res_size, masks, negatives) -> None:
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if image_size <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    if seed < 0:
        raise DataError(f"the data seed must be >= 0, got {seed}")
    if host_count <= 0 or not 0 <= host_index < host_count:
        raise DataError(f"need 0 <= host_index < host_count, got {host_index} and {host_count}")
    if len(source) <= 0:
        raise DataError(f"a {type(source).__name__} with no records cannot be read")
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    if prefetch < 0:
        raise DataError(f"prefetch must be >= 0, got {prefetch}")
    if low_res_size is not None and (low_res_size <= 0 or image_size % low_res_size):
        raise DataError(f"low_res_size {low_res_size} must divide image_size {image_size}")
    if masks is not None and masks.object_weight > 0 and type(source).object_boxes is Source.object_boxes:
        raise DataError(f"masks.object_weight is {masks.object_weight}, but a {type(source).__name__} "
                        "does not know where its objects are (it defines no object_boxes)")
    if negatives and type(source).negative_caption is Source.negative_caption:
        raise DataError(f"negative captions were asked for, but a {type(source).__name__} has none "
                        "(it defines no negative_caption)")


def _absl_flags_parsed() -> None:
    """grain 0.2.18 reads one of its absl flags when it starts worker processes without checking
    that absl has parsed its flags, which a program not run through absl.app never does
    (google/grain#1355): absl is told to use its defaults, unless the program parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker init: a worker whose training process was killed (SIGKILL, the OOM killer)
    would otherwise live on, waiting forever to hand over its next batch; it ends once orphaned."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="glide-data-orphan-watch", daemon=True).start()


_STATE_KEYS = ("version", "batches", "start", "grain", "workers", "seed", "host_index", "host_count",
               "batch_size", "source")


def _check_state(state: Any, mine: dict) -> None:
    """Refuses a data state that does not continue this loader's stream, naming why."""
    if not isinstance(state, dict):
        raise DataError(f"data state must be a dict, got {type(state).__name__}")
    if state.get("version") != STATE_VERSION:
        raise DataError(f"data state version {state.get('version')!r} is not {STATE_VERSION}"
                        + (" (version 1 is the epoch and offset of the loader before grain; its position "
                           "cannot be carried over)" if state.get("version") == 1 else ""))
    for key in _STATE_KEYS:
        if key not in state:
            raise DataError(f"data state lacks key {key!r}")
    for key, value in mine.items():
        if state[key] != value:
            raise DataError(f"data state was saved with {key}={state[key]!r} but this loader "
                            f"has {key}={value!r}; resuming would not continue the same stream")
    start, batches = state["start"], state["batches"]
    if not (isinstance(start, int) and isinstance(batches, int) and 0 <= start <= batches):
        raise DataError(f"data state position start={start!r} batches={batches!r} is out of range")


class DataLoader:
    """Endless iterator of fixed-size batches from a `Source` through a grain pipeline (see the
    module docstring).

    Args:
      source: the records.
      batch_size: examples per batch on this process (the global batch is host_count times it).
      image_size: output side; images are resized (shorter side) and centre-cropped.
      seed: fixes the epoch orders, caption choices and extras (>= 0).
      host_index, host_count: this process's place among the processes: it gets rows
        [host_index * batch_size, (host_index + 1) * batch_size) of every global batch.
      prefetch: batches made ahead, each by a thread of its own (grain's ReadOptions), in this
        process or, with workers, in each worker; 0: made on demand by the calling thread.
      workers: grain worker processes (mp_prefetch), each making whole batches (0: none). One
        process decodes a few thousand small images a second, fewer large ones, which an
        accelerator outruns. The batches are the same for any number.
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
                 host_index: int = 0, host_count: int = 1, prefetch: int = 2, state: dict | None = None,
                 low_res_size: int | None = None, degradation: Degradation = Degradation(),
                 masks: MaskConfig | None = None, workers: int = 0, negatives: bool = False):
        _check_loader_args(source, batch_size, image_size, seed, host_index, host_count, prefetch, workers,
                           low_res_size, masks, negatives)
        self.source = source
        self.batch_size, self.image_size, self.seed = int(batch_size), int(image_size), int(seed)
        self.host_index, self.host_count = int(host_index), int(host_count)
        self.prefetch, self.workers = int(prefetch), int(workers)
        self.low_res_size, self.degradation, self.mask_config = low_res_size, degradation, masks
        maker = _ExampleMaker(source, self.image_size, self.seed, low_res_size, degradation, masks, negatives)
        self.dataset = batch_dataset(source, maker, self.batch_size, self.seed, self.host_index, self.host_count)
        self._fingerprint = source.fingerprint()
        self._iterator: grain.DatasetIterator | None = None
        # The next iterator reads self.dataset[start:] and, if given, continues from grain's state.
        self._start, self._pending = 0, None
        self._batches = 0                              # batches of the stream returned so far
        self._stats = {"examples": 0, "skipped": {}}   # as of the last batch returned
        if state is not None:
            self.restore(state)

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-able position after the last batch returned: grain's iterator state, the counters,
        and what it takes to check that it is restored into a loader reading the same stream."""
        grain_state = self._iterator.get_state() if self._iterator is not None else self._pending
        return {"version": STATE_VERSION, "batches": self._batches, "start": self._start,
                "grain": json.loads(json.dumps(grain_state)), "workers": self.workers,
                "seed": self.seed, "host_index": self.host_index, "host_count": self.host_count,
                "batch_size": self.batch_size, "source": self._fingerprint,
                "stats": {"examples": self._stats["examples"], "skipped": dict(self._stats["skipped"])}}

    def restore(self, state: dict) -> None:
        """Continues from a `state()` dict; the next batch is the one that followed it."""
        _check_state(state, {"seed": self.seed, "host_index": self.host_index, "host_count": self.host_count,
                             "batch_size": self.batch_size, "source": self._fingerprint})
        self._close_iterator()
        # grain's state of a pipeline with worker processes is laid out per worker: with another
        # number of them, a fresh iterator starts at the batch the saved one had reached.
        same_layout = state["grain"] is not None and state["workers"] == self.workers
        self._start = state["start"] if same_layout else state["batches"]
        self._pending = state["grain"] if same_layout else None
        self._batches = state["batches"]
        stats = state.get("stats", {"examples": 0, "skipped": {}})
        self._stats = {"examples": int(stats.get("examples", 0)),
                       "skipped": {k: int(v) for k, v in stats.get("skipped", {}).items()}}

    @property
    def stats(self) -> dict:
        """{"examples": used, "skipped": {reason: count}} up to the last batch returned."""
        return {"examples": self._stats["examples"], "skipped": dict(self._stats["skipped"])}

    # -- iteration --------------------------------------------------------------------------------

    def _open(self) -> None:
        ds = self.dataset[self._start:] if self._start else self.dataset
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.prefetch, prefetch_buffer_size=self.prefetch))
        if self.workers:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers),
                                worker_init_fn=_exit_with_parent)
        iterator = iter(ds)
        if self._pending is not None:
            try:
                iterator.set_state(self._pending)
            except (KeyError, IndexError, TypeError, ValueError) as err:
                iterator.close()
                raise DataError(f"data state: grain cannot restore its iterator state "
                                f"({type(err).__name__}: {err})") from None
        self._iterator, self._pending = iterator, None

    def _close_iterator(self) -> None:
        """Stops grain's threads and workers; a new iterator would start at the batch reached."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
            self._start, self._pending = self._batches, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._open()
        try:
            batch = next(self._iterator)
        except BaseException as err:
            # grain's iterator is spent after an error; the next call starts a new one here.
            self._close_iterator()
            if isinstance(err, RuntimeError) and self.workers:   # grain's word for a dead worker
                raise DataError(f"a data worker process died or failed (workers={self.workers}: {err}); grain "
                                "spawns them, so the main program must be a file that a fresh interpreter can "
                                "import without running it (its work under `if __name__ == '__main__':`), or "
                                "use workers=0") from err
            raise
        self._count_skips(batch.pop("_skipped"))
        for key, value in batch.items():
            # A worker's arrays arrive in grain's shared memory (an ndarray subclass); a plain copy
            # frees it now, not whenever the batch is collected (at exit, freeing it fails).
            if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
                batch[key] = np.array(value)
        self._stats["examples"] += len(batch["captions"])
        self._batches += 1
        return batch

    def _count_skips(self, skipped: list) -> None:
        for reason, index, detail in skipped:
            count = self._stats["skipped"].get(reason, 0) + 1
            self._stats["skipped"][reason] = count
            # A broken data set must not flood the log: every skip up to ten per reason, then
            # every thousandth (the counts stay exact in `stats`).
            level = logging.WARNING if count <= 10 or count % 1000 == 0 else logging.DEBUG
            log.log(level, "skipping record %d of %s (%s #%d): %s", index, self._fingerprint, reason,
                    count, detail)

    def close(self) -> None:
        """Stops grain's threads and worker processes; iterating again goes on from `state()`."""
        self._close_iterator()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._close_iterator()
        except Exception:
            pass
