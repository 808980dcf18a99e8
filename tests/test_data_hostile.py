"""Hostile training data: tar shards that try to escape or link out, decompression bombs, corrupt
images and captions that are not UTF-8. Each is a counted skip naming the file; nothing is run,
followed, written or lost (the good records around it still arrive)."""

import io
import json
import os
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from glide_jax import data as D


def _png(colour=(0, 255, 0), size=(12, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height over a few bytes of pixel data: PIL takes the size
    from the header, so this is the cheapest decompression bomb (a real one is a few MB of
    zlib-compressed zeros)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _add(tar, name, payload=None, *, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(payload) if payload is not None else 0
    tar.addfile(info, io.BytesIO(payload) if payload is not None else None)


def _skips(source):
    """(captions of the usable records, {reason: count} of the rest) over one pass of `source`,
    checked against what the loader counts over a full epoch."""
    captions, reasons = [], {}
    for index in range(len(source)):
        try:
            captions.append(source.load(index, 0, 8, np.random.default_rng(index))[1])
        except D.SkipExample as skip:
            reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    # A batch of len(source) is one epoch: every record in its own slot, the skipped ones refilled
    # with usable records, so exactly the usable captions arrive and every bad record is counted.
    loader = D.DataLoader(source, batch_size=len(source), image_size=8, seed=0, prefetch=0)
    seen = next(loader)["captions"]
    assert set(seen) == set(captions) and len(seen) == len(source)
    assert all(loader.stats["skipped"][r] >= n for r, n in reasons.items())
    assert set(loader.stats["skipped"]) == set(reasons)
    return sorted(captions), reasons


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def hostile_shard(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("never read me")
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "good.png", _png())
        _add(tar, "good.txt", b"the good one")
        _add(tar, "../escape.png", _png((255, 0, 0)))
        _add(tar, "../escape.txt", b"climbs out")
        _add(tar, "/abs/rooted.png", _png((255, 0, 0)))
        _add(tar, "/abs/rooted.txt", b"absolute")
        _add(tar, "sym.png", kind=tarfile.SYMTYPE, link=str(secret))
        _add(tar, "sym.txt", b"a symlink")
        _add(tar, "hard.png", kind=tarfile.LNKTYPE, link="good.png")
        _add(tar, "hard.txt", b"a hardlink")
        _add(tar, "fifo.png", kind=tarfile.FIFOTYPE)
        _add(tar, "fifo.txt", b"a fifo")
        _add(tar, "caption_link.png", _png((0, 0, 255)))
        _add(tar, "caption_link.txt", kind=tarfile.SYMTYPE, link=str(secret))
    return shard


def test_tar_members_that_escape_or_link_are_counted_skips(hostile_shard, tmp_path):
    before = _listing(tmp_path)
    source = D.TarSource([hostile_shard])
    names = {r.key for r in source.records}
    # The member names are kept verbatim (the tar module reads them so): none is dropped unseen.
    assert {"good", "../escape", "/abs/rooted", "sym", "hard", "fifo", "caption_link"} <= names
    assert _skips(source) == (["the good one"], {"unsafe_member": 6})
    assert _listing(tmp_path) == before  # nothing extracted or written anywhere near the shard


@pytest.mark.parametrize("key, problem", [
    ("../escape", r"'\.\./escape\.png' has an absolute or '\.\.' path"),
    ("/abs/rooted", r"'/abs/rooted\.png' has an absolute or '\.\.' path"),
    ("sym", r"'sym\.png' is a symlink"),
    ("hard", r"'hard\.png' is a hardlink \(to 'good\.png'\)"),
    ("fifo", r"'fifo\.png' is not a regular file"),
    ("caption_link", r"'caption_link\.txt' is a symlink"),
])
def test_each_unsafe_member_is_named(hostile_shard, key, problem):
    source = D.TarSource([hostile_shard])
    index = next(i for i, r in enumerate(source.records) if r.key == key)
    with pytest.raises(D.SkipExample, match=rf"evil\.tar:{key}: member {problem}") as info:
        source.load(index, 0, 8, np.random.default_rng(0))
    assert info.value.reason == "unsafe_member"


def test_decompression_bomb_is_a_counted_skip_before_decoding(tmp_path):
    # Far past PIL's hard limit (an error at open) and just past its soft one (only a warning
    # from PIL, which would decode ~100 MPixel): both are skipped, neither is decoded.
    limit = Image.MAX_IMAGE_PIXELS
    side = int((limit * 1.5) ** 0.5)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "huge.png").write_bytes(_png_header_only(100_000, 100_000))
    (tmp_path / "huge.txt").write_text("a bomb")
    (tmp_path / "soft.png").write_bytes(_png_header_only(side, side))
    (tmp_path / "soft.txt").write_text("a smaller bomb")
    source = D.FolderSource(tmp_path)
    for name in ("huge.png", "soft.png"):
        index = next(i for i, p in enumerate(source.images) if p.name == name)
        with pytest.raises(D.SkipExample, match=rf"{name}: .*pixels") as info:
            source.load(index, 0, 8, np.random.default_rng(0))
        assert info.value.reason == "decompression_bomb"
    assert _skips(source) == (["fine"], {"decompression_bomb": 2})


def test_corrupt_and_truncated_images_in_a_shard(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(jpeg, "JPEG")
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.png", _png())
        _add(tar, "a.txt", b"good")
        _add(tar, "b.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # cut mid-scan
        _add(tar, "b.txt", b"cut jpeg")
        noisy = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)).save(noisy, "PNG")
        _add(tar, "c.png", noisy.getvalue()[:1000])  # cut inside IDAT
        _add(tar, "c.txt", b"cut png")
        _add(tar, "d.webp", b"RIFF\x00\x00\x00\x00WEBPjunk")
        _add(tar, "d.txt", b"junk")
    source = D.TarSource([shard])
    for index, name in ((1, "b"), (2, "c"), (3, "d")):
        with pytest.raises(D.SkipExample, match=rf"s\.tar:{name}: ") as info:
            source.load(index, 0, 8, np.random.default_rng(0))
        assert info.value.reason == "corrupt_image"
    assert _skips(source) == (["good"], {"corrupt_image": 3})


def test_captions_that_are_not_utf8_are_counted_skips_naming_the_file(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for stem, caption in (("a", "café ☕".encode()), ("b", b"caf\xe9 latin-1"), ("c", b"\xff\xfe")):
        Image.new("RGB", (8, 8)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_bytes(caption)
    source = D.FolderSource(folder)
    with pytest.raises(D.SkipExample, match=r"b\.txt: not valid UTF-8 \(byte 3: b'\\xe9 la'\)") as info:
        source.load(1, 0, 8, np.random.default_rng(0))
    assert info.value.reason == "invalid_caption"
    assert _skips(source) == (["café ☕"], {"invalid_caption": 2})

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "x.png", _png())
        _add(tar, "x.txt", b"\x80bad start")
        _add(tar, "y.png", _png())
        _add(tar, "y.txt", b"fine")
    source = D.TarSource([shard])
    with pytest.raises(D.SkipExample, match=r"s\.tar:x\.txt: not valid UTF-8 \(byte 0") as info:
        source.load(0, 0, 8, np.random.default_rng(0))
    assert info.value.reason == "invalid_caption"
    assert _skips(source) == (["fine"], {"invalid_caption": 1})


def test_unreadable_caption_file_is_a_counted_skip(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").mkdir()  # a directory where the caption should be
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("ok")
    source = D.FolderSource(tmp_path)
    assert _skips(source) == (["ok"], {"unreadable_file": 1})
    assert os.path.isdir(tmp_path / "a.txt")


def test_jsonl_paths_that_escape_and_tar_members_that_link_are_counted_skips(hostile_shard, tmp_path):
    before = _listing(tmp_path)
    root = tmp_path / "listing"
    root.mkdir()
    (root / "ok.png").write_bytes(_png())
    shutil.copy(hostile_shard, root / "evil.tar")
    lines = [{"image": "ok.png", "caption": "beside the list"},
             {"image": "good.png", "tar": "evil.tar", "caption": "a plain member"},
             {"image": "../secret.txt", "caption": "climbs out"},
             {"image": str(tmp_path / "secret.txt"), "caption": "absolute"},
             {"image": "good.png", "tar": "../evil.tar", "caption": "a shard outside"},
             {"image": "sym.png", "tar": "evil.tar", "caption": "a symlink member"},
             {"image": "hard.png", "tar": "evil.tar", "caption": "a hardlink member"},
             {"image": "../escape.png", "tar": "evil.tar", "caption": "a member that climbs out"}]
    (root / "list.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    source = D.JsonlSource([root / "list.jsonl"])
    for index, message in ((2, r"list\.jsonl:3: image '\.\./secret\.txt' is an absolute or '\.\.' path"),
                           (4, r"list\.jsonl:5: tar '\.\./evil\.tar' is an absolute or '\.\.' path")):
        with pytest.raises(D.SkipExample, match=message) as info:
            source.load(index, 0, 8, np.random.default_rng(0))
        assert info.value.reason == "unsafe_path"
    with pytest.raises(D.SkipExample, match=r"list\.jsonl:6: .*evil\.tar member 'sym\.png' is a symlink"):
        source.load(5, 0, 8, np.random.default_rng(0))
    assert _skips(source) == (["a plain member", "beside the list"], {"unsafe_path": 4, "unsafe_member": 2})
    assert _listing(tmp_path) == sorted(before + ["listing", "listing/evil.tar", "listing/list.jsonl",
                                                  "listing/ok.png"])
