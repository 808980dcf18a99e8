"""Data pipeline: sources, preprocessing, skipping, determinism over worker and process counts,
exact resume from grain's state, low-res degradation and inpainting masks."""

import io
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT_ROOT
from glide_jax import data as D
from glide_jax import masks as M
import demo  # noqa: F401  (registers the "shapes" source kind)
from demo import shapes as S
from demo.sources import ShapesSource


def _png_bytes(colour, size=(24, 16), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """13 good records (png/jpg/webp, some nested, one grayscale), one corrupt image with a
    caption, one image without caption."""
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(13):
        ext = ("png", "jpg", "webp")[i % 3]
        where = root if i < 6 else (root / "sub" if i < 10 else root / "sub" / "deeper")
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
        img = Image.new("L" if i == 4 else "RGB", (20 + i, 16), (i * 10) if i == 4 else (i * 10, 0, 0))
        img.save(where / f"img{i:02d}.{ext}", format=fmt)
        (where / f"img{i:02d}.txt").write_text(f"caption {i}\n")
    (root / "broken.png").write_bytes(_png_bytes((0, 255, 0))[:40])   # truncated file
    (root / "broken.txt").write_text("never used")
    (root / "sub" / "nocap.png").write_bytes(_png_bytes((0, 0, 255)))
    (root / "notes.md").write_text("not an image")
    return root


def _captions(batches):
    return [c for b in batches for c in b["captions"]]


def test_resize_and_crop_keeps_the_centre():
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 255, 0), (20, 0, 40, 30))
    out = D.resize_and_crop(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert tuple(out[8, 8]) == (0, 255, 0)
    # The crop spans original columns 15..45: red only in the outer ~2.7 output columns.
    assert out[8, 0, 0] > 200 and out[8, 15, 0] > 200
    rgba = Image.new("RGBA", (10, 20), (0, 0, 255, 128))
    assert D.resize_and_crop(rgba, 8).shape == (8, 8, 3)
    floats = D.to_float(out)
    assert floats.dtype == np.float32 and floats.min() == -1.0 and floats.max() == 1.0
    assert np.array_equal(D.to_uint8(floats), out)


def test_folder_source_skips_and_counts_bad_records(folder, caplog):
    source = D.make_source({"kind": "folder", "path": str(folder)})
    assert len(source) == 15
    with caplog.at_level(logging.WARNING, logger="glide_jax.data"):
        loader = D.DataLoader(source, batch_size=15, image_size=8, seed=0, prefetch=0)
        batch = next(loader)   # one epoch: every record's slot, the two bad ones refilled
    assert batch["images"].shape == (15, 8, 8, 3) and batch["images"].dtype == np.float32
    assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert set(batch["captions"]) == {f"caption {i}" for i in range(13)}
    skipped = loader.stats["skipped"]
    assert set(skipped) == {"corrupt_image", "missing_caption"} and min(skipped.values()) >= 1
    assert loader.stats["examples"] == 15 and loader.state()["stats"]["skipped"] == skipped
    assert "broken.png" in caplog.text and "nocap.png" in caplog.text
    # Skips are counted per encounter: a second epoch counts them again.
    next(loader)
    assert all(loader.stats["skipped"][reason] >= count + 1 for reason, count in skipped.items())


def test_multi_line_captions_choose_one_deterministically(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first\n\nsecond\nthird\n")
    source = D.FolderSource(tmp_path)
    loader = D.DataLoader(source, batch_size=40, image_size=8, seed=3, prefetch=0)
    captions = next(loader)["captions"]
    assert set(captions) == {"first", "second", "third"}
    assert captions == next(D.DataLoader(source, batch_size=40, image_size=8, seed=3))["captions"]


def _make_shard(path, items):
    with tarfile.open(path, "w") as tar:
        for name, payload in items:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_tar_shards_group_members_by_key(tmp_path):
    _make_shard(tmp_path / "s0.tar", [
        ("000.jpg", _png_bytes((255, 0, 0), fmt="JPEG")), ("000.txt", b"red"),
        ("001.png", _png_bytes((0, 255, 0))), ("001.txt", b"green"),
        ("002.png", _png_bytes((0, 0, 255))),                     # caption missing
    ])
    _make_shard(tmp_path / "s1.tar", [
        ("dir/003.txt", b"white"), ("dir/003.webp", _png_bytes((255, 255, 255), fmt="WEBP")),
        ("004.txt", b"orphan caption"),                           # image missing
        ("005.png", b"\x89PNG garbage"), ("005.txt", b"corrupt"),
        ("006.seg.png", _png_bytes((1, 2, 3))), ("006.TXT", b"yellow"), ("006.JPEG", _png_bytes((255, 255, 0), fmt="JPEG")),
    ])
    source = D.make_source({"kind": "tar", "shards": str(tmp_path / "s*.tar")})
    assert len(source) == 7 and [r.key for r in source.records] == ["000", "001", "002", "004", "005", "006",
                                                                    "dir/003"]
    loader = D.DataLoader(source, batch_size=7, image_size=8, seed=1, prefetch=2)
    batch = next(loader)   # one epoch
    by_caption = dict(zip(batch["captions"], D.to_uint8(batch["images"])[:, 4, 4]))
    assert set(by_caption) == {"red", "green", "white", "yellow"}
    assert by_caption["green"].tolist() == [0, 255, 0]
    assert by_caption["red"][0] > 230 and by_caption["white"].min() > 240
    assert by_caption["yellow"][0] > 230 and by_caption["yellow"][2] < 30
    # Each epoch tries each bad record at least once (in its own slot), and a refilled slot
    # may try another bad one first: the counts only ever grow, and cover every reason.
    counts = []
    for _ in range(3):
        counts.append(loader.stats["skipped"])
        assert set(counts[-1]) == {"missing_caption", "missing_image", "corrupt_image"}
        assert all(n >= len(counts) for n in counts[-1].values())
        next(loader)
    assert loader.stats["examples"] == 4 * 7
    loader.close()

    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "s0.tar", arcname="x.tar")
    with pytest.raises(D.DataError, match="uncompressed"):
        D.TarSource([tmp_path / "z.tar.gz"])
    with pytest.raises(D.DataError, match="does not exist"):
        D.TarSource([tmp_path / "missing.tar"])


def test_jsonl_lines_name_images_beside_them_or_in_a_tar(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "shards").mkdir()
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "images" / "red.png")
    Image.new("RGB", (12, 10), (0, 0, 255)).save(tmp_path / "images" / "blue.jpg")
    _make_shard(tmp_path / "shards" / "s0.tar", [("g/000.png", _png_bytes((0, 255, 0)))])
    lines = [
        {"image": "images/red.png", "caption": "red", "width": 12},   # other keys ride along
        {"image": "g/000.png", "tar": "shards/s0.tar", "caption": ["green", "a green one"]},
        {"image": "images/blue.jpg", "caption": " blue "},
        {"image": "images/missing.png", "caption": "gone"},
        {"image": "nope.png", "tar": "shards/s0.tar", "caption": "no such member"},
        {"image": "images/red.png", "caption": ["", "  "]},
        {"image": "images/red.png"},
        ["not", "an", "object"],
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n{broken json\n")
    source = D.make_source({"kind": "jsonl", "path": str(tmp_path / "*.jsonl")})
    assert len(source) == 9   # the blank line is no record
    expected = {3: ("missing_image", r"train\.jsonl:4: .*missing\.png: no image file"),
                4: ("missing_image", r"train\.jsonl:5: .*s0\.tar has no member 'nope\.png'"),
                5: ("missing_caption", r"train\.jsonl:6: caption is empty"),
                6: ("invalid_record", r"train\.jsonl:7: 'caption' must be a string or a non-empty list"),
                7: ("invalid_record", r"train\.jsonl:8: a line must be a JSON object, got list"),
                8: ("invalid_record", r"train\.jsonl:10: not a JSON line")}
    for index, (reason, message) in expected.items():
        with pytest.raises(D.SkipExample, match=message) as info:
            source.load(index, 0, 8, np.random.default_rng(0))
        assert info.value.reason == reason
    batch = next(D.DataLoader(source, batch_size=9, image_size=8, seed=0, prefetch=0))   # one epoch
    colours = {caption: tuple(D.to_uint8(image)[4, 4]) for caption, image in zip(batch["captions"], batch["images"])}
    assert {"red", "blue"} <= set(colours) <= {"red", "blue", "green", "a green one"}
    assert colours["red"][0] > 240 and colours["blue"][2] > 240
    assert all(colours[c] == (0, 255, 0) for c in ("green", "a green one") if c in colours)
    assert set(colours) & {"green", "a green one"}

    with pytest.raises(D.DataError, match="needs 'path'"):
        D.make_source({"kind": "jsonl"})
    with pytest.raises(D.DataError, match="nope.jsonl does not exist"):
        D.make_source({"kind": "jsonl", "path": [str(tmp_path / "nope.jsonl")]})
    (tmp_path / "bad.jsonl").write_text('{"img": "a.png", "text": "x"}\n')
    with pytest.raises(D.DataError, match="no valid line in .*bad.jsonl; the first: .*bad.jsonl:1: 'image' must be"):
        D.JsonlSource([tmp_path / "bad.jsonl"])
    (tmp_path / "lost.jsonl").write_text('{"image": "a.png", "tar": "gone.tar", "caption": "x"}\n')
    with pytest.raises(D.DataError, match="lost.jsonl:1.*shard .*gone.tar does not exist"):
        D.JsonlSource([tmp_path / "lost.jsonl"])


def test_make_source_errors_name_the_bad_key(tmp_path):
    with pytest.raises(D.DataError, match="'kind'"):
        D.make_source({"kind": "lmdb"})
    with pytest.raises(D.DataError, match="pth"):
        D.make_source({"kind": "folder", "pth": "x"})
    with pytest.raises(D.DataError, match="needs 'path'"):
        D.make_source({"kind": "folder"})
    with pytest.raises(D.DataError, match="not a directory"):
        D.make_source({"kind": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(D.DataError, match="matches no file"):
        D.make_source({"kind": "tar", "shards": str(tmp_path / "*.tar")})
    with pytest.raises(D.DataError, match="'split'"):
        D.make_source({"kind": "shapes", "split": "validation"})
    with pytest.raises(D.DataError, match="no images"):
        D.make_source({"kind": "folder", "path": str(tmp_path)})


def test_source_kinds_come_from_a_registry_that_plugins_extend(tmp_path):
    assert {"folder", "tar", "jsonl", "shapes"} <= set(D.registered_sources())
    with pytest.raises(D.DataError, match="data source 'kind' 'webdataset' is not registered; registered kinds: "
                                          "\\[.*'folder', 'jsonl', 'shapes', 'tar'.*\\] \\(a plugin module registers more"):
        D.make_source({"kind": "webdataset"})

    class Constant(D.Source):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def load(self, index, epoch, image_size, rng):
            return np.zeros((image_size, image_size, 3), np.uint8), f"record {index}"

    D.register_source("constant_test", lambda spec: Constant(spec.get("n", 3)), keys=("n",))
    loader = D.DataLoader(D.make_source({"kind": "constant_test", "n": 4}), batch_size=4, image_size=8,
                          prefetch=0)
    assert sorted(next(loader)["captions"]) == [f"record {i}" for i in range(4)]
    with pytest.raises(D.DataError, match="unknown key\\(s\\) \\['size'\\] for a 'constant_test' data source; "
                                          "allowed: \\['kind', 'n'\\]"):
        D.make_source({"kind": "constant_test", "size": 2})
    with pytest.raises(ValueError, match="'constant_test' is already registered"):
        D.register_source("constant_test", lambda spec: Constant(1), keys=())


def test_shapes_source_renders_at_the_loader_size_and_matches_the_stream():
    source = D.make_source({"kind": "shapes", "seed": 4, "epoch_size": 10})
    loader = D.DataLoader(source, batch_size=12, image_size=32, seed=0, prefetch=0)
    batch = next(loader)
    scenes = [S.scene_at(4, i) for i in range(12)]   # epoch 1 continues the stream at 10
    for position, (img, cap, sc) in enumerate(zip(batch["images"], batch["captions"], scenes)):
        assert np.array_equal(D.to_uint8(img), sc.render(32))
        # The phrasing drawn as the loader before grain drew it, keyed (seed, epoch, record, 0): an
        # unshuffled source gives the stream it gave then, so the demo's recorded runs still hold.
        options = S.captions_for(sc.spec)
        epoch, record = divmod(position, 10)
        assert cap == options[int(np.random.default_rng([0, epoch, record, 0]).integers(len(options)))]


def test_shapes_negative_captions_swap_colours_or_kinds_in_the_same_words(folder):
    source = D.make_source({"kind": "shapes", "seed": 4, "epoch_size": 300})
    loader = D.DataLoader(source, batch_size=300, image_size=8, seed=0, prefetch=0, negatives=True)
    batch = next(loader)
    words = {"colour": set(S.SHAPE_COLOURS), "kind": set(S.KINDS)}
    counts = {"colour": 0, "kind": 0, "held out": 0, "none": 0}
    for index, (caption, negative) in enumerate(zip(batch["captions"], batch["negative_captions"])):
        scene = S.scene_at(4, index)
        allowed = {attribute: other for attribute in ("colour", "kind")
                   if (other := S.swapped(scene, attribute)) is not None
                   and set(other.spec.objects) <= set(S.TRAIN_COMBINATIONS)}
        if not allowed:
            assert negative == ""      # nothing to swap, or it would name a held-out colour-shape pair
            counts["none" if S.swapped(scene, "colour") is None and S.swapped(scene, "kind") is None
                   else "held out"] += 1
            continue
        attribute = next(a for a, other in allowed.items() if negative in other.captions())
        counts[attribute] += 1
        # The same phrasing: only the two colour (or shape) words change places.
        own, other = caption.replace(",", " ").split(), negative.replace(",", " ").split()
        changed = [i for i, (a, b) in enumerate(zip(own, other)) if a != b]
        assert len(own) == len(other) and len(changed) == 2, (caption, negative)
        assert {own[i] for i in changed} <= words[attribute]
        assert [own[i] for i in changed] == [other[i] for i in reversed(changed)]
    assert min(counts.values()) > 0, counts
    # A held-out stream may name held-out pairs in its negatives too.
    heldout = D.DataLoader(D.make_source({"kind": "shapes", "seed": 4, "split": "heldout", "epoch_size": 50}),
                           batch_size=50, image_size=8, seed=0, prefetch=0, negatives=True)
    held = next(heldout)
    assert all((S.swapped(scene, "colour") is None and S.swapped(scene, "kind") is None) == (negative == "")
               for scene, negative in zip((S.scene_at(4, i, "heldout") for i in range(50)), held["negative_captions"]))
    assert "negative_captions" not in next(D.DataLoader(source, batch_size=2, image_size=8, prefetch=0))
    with pytest.raises(D.DataError, match="negative captions were asked for, but a FolderSource has none"):
        D.DataLoader(D.FolderSource(folder), batch_size=2, image_size=8, prefetch=0, negatives=True)


def test_shapes_extra_kinds_reach_the_images_and_change_the_fingerprint():
    spec = {"kind": "shapes", "seed": 4, "epoch_size": 300, "extra_shape_kinds": ["diamond", "cross"]}
    source = D.make_source(spec)
    batch = next(D.DataLoader(source, batch_size=300, image_size=8, seed=0, prefetch=0))
    scenes = [S.scene_at(4, i, "train", (), ("diamond", "cross")) for i in range(300)]
    assert all(caption in scene.captions() for caption, scene in zip(batch["captions"], scenes))
    assert {s.kind for sc in scenes for s in sc.shapes} == {"circle", "square", "triangle", "diamond", "cross"}
    assert source.fingerprint() != D.make_source({"kind": "shapes", "seed": 4, "epoch_size": 300}).fingerprint()
    for bad, message in ((["star"], "extra shape kind 'star'"), ("cross", "must be a list of shape kind names")):
        with pytest.raises(D.DataError, match=message):
            D.make_source({**spec, "extra_shape_kinds": bad})
    with pytest.raises(D.DataError, match="'extra_shape_kinds' apply to the train split only"):
        D.make_source({**spec, "split": "heldout"})


def test_shapes_relation_negatives_name_another_relation_for_a_share_of_two_shape_records():
    spec = {"kind": "shapes", "seed": 4, "epoch_size": 200}
    swaps = next(D.DataLoader(D.make_source(spec), batch_size=400, image_size=8, seed=0, prefetch=0, negatives=True))
    source = D.make_source({**spec, "relation_negatives": 0.5})
    batch = next(D.DataLoader(source, batch_size=400, image_size=8, seed=0, prefetch=0, negatives=True))
    assert np.array_equal(batch["images"], swaps["images"]) and batch["captions"] == swaps["captions"]
    counts = {"inverse": 0, "across": 0, "kept": 0}
    for i, (caption, negative) in enumerate(zip(batch["captions"], batch["negative_captions"])):
        scene = S.scene_at(4, i)
        if negative == swaps["negative_captions"][i]:
            counts["kept"] += 1
            continue
        assert len(scene.shapes) == 2, (caption, negative)   # a one-shape record has no relation to change
        inverse, *across = S.other_relations(scene.spec)
        if negative in S.captions_for(inverse):
            counts["inverse"] += 1
        else:
            assert any(negative in S.captions_for(other) for other in across), (caption, negative)
            counts["across"] += 1
    two_shape = sum(len(S.scene_at(4, i).shapes) == 2 for i in range(400))
    changed = counts["inverse"] + counts["across"]
    assert 0.35 * two_shape <= changed <= 0.65 * two_shape and min(counts.values()) > 0.3 * changed, counts
    again = next(D.DataLoader(source, batch_size=400, image_size=8, seed=0, prefetch=0, negatives=True))
    assert again["negative_captions"] == batch["negative_captions"]
    # Only across the axis where asked: all two-shape records then name the other axis.
    across_only = D.make_source({**spec, "relation_negatives": 1, "relation_negative_kinds": ["across"]})
    across = next(D.DataLoader(across_only, batch_size=400, image_size=8, seed=0, prefetch=0, negatives=True))
    for i, negative in enumerate(across["negative_captions"]):
        scene = S.scene_at(4, i)
        if len(scene.shapes) == 2:
            assert any(negative in S.captions_for(other) for other in S.other_relations(scene.spec)[1:]), negative
        else:
            assert negative == swaps["negative_captions"][i]
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(D.DataError, match="'relation_negatives' must be a fraction in \\[0, 1\\]"):
            D.make_source({**spec, "relation_negatives": bad})
    kinds_error = "'relation_negative_kinds' must be a non-empty list of \\['inverted', 'across'\\]"
    for bad in ([], "across", ["across", "diagonal"]):
        with pytest.raises(D.DataError, match=kinds_error):
            D.make_source({**spec, "relation_negative_kinds": bad})


def test_same_seed_same_batches_other_seed_other_order(folder):
    source = D.FolderSource(folder)
    def run(seed, prefetch):
        loader = D.DataLoader(source, batch_size=5, image_size=8, seed=seed, prefetch=prefetch)
        return [next(loader) for _ in range(6)]
    a, b, c = run(0, 2), run(0, 0), run(1, 2)
    assert _captions(a) == _captions(b)
    assert all(np.array_equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert _captions(a) != _captions(c)
    # Each epoch (15 slots) holds every usable record, in a different order per epoch.
    caps = _captions(a)
    assert set(caps[:15]) == set(caps[15:30]) == {f"caption {i}" for i in range(13)}
    assert caps[:15] != caps[15:30]


def _same_batches(got, want):
    assert got["captions"] == want["captions"]
    for key in ("images", "low_res", "inpaint_mask"):
        assert (key in got) == (key in want) and np.array_equal(got.get(key), want.get(key)), key


def _concatenated(parts):
    return {"captions": [c for p in parts for c in p["captions"]],
            **{key: np.concatenate([p[key] for p in parts]) for key in ("images", "low_res", "inpaint_mask")}}


def test_the_global_batch_is_the_same_for_any_process_count_and_worker_count(folder):
    source = D.FolderSource(folder)   # holds unusable records: refilled slots must agree too
    extras = dict(image_size=8, seed=5, low_res_size=4, masks=M.MaskConfig(),
                  degradation=D.Degradation(blur_prob=0.5, jpeg_prob=0.5, noise_prob=0.5))
    one = D.DataLoader(source, batch_size=6, prefetch=2, **extras)
    want = [next(one) for _ in range(6)]   # spans epochs of 15
    for count, workers in ((2, 0), (3, 0), (2, 1)):
        processes = [D.DataLoader(source, batch_size=6 // count, host_index=i, host_count=count, prefetch=1,
                                  workers=workers if i == 0 else 0, **extras) for i in range(count)]
        for step, batch in enumerate(want):
            _same_batches(_concatenated([next(p) for p in processes]), batch)
        for p in processes:
            p.close()
    assert sum(one.stats["skipped"].values()) > 0
    with pytest.raises(D.DataError, match="host_index"):
        D.DataLoader(source, batch_size=1, image_size=8, host_index=3, host_count=3)


@pytest.mark.parametrize("stop_at,workers,resume_workers", [(1, 0, 0), (4, 0, 0), (7, 0, 0), (4, 2, 2), (5, 1, 0)])
def test_resume_yields_exactly_the_uninterrupted_batches(folder, stop_at, workers, resume_workers):
    source = D.FolderSource(folder)
    kwargs = dict(batch_size=3, image_size=8, seed=9, prefetch=3, low_res_size=4, masks=M.MaskConfig(),
                  degradation=D.Degradation(blur_prob=0.5, jpeg_prob=0.5, noise_prob=0.5))
    reference = D.DataLoader(source, **kwargs)
    expected = [next(reference) for _ in range(12)]   # spans several epochs of 15 records
    reference.close()

    first = D.DataLoader(source, workers=workers, **kwargs)
    for _ in range(stop_at):
        next(first)
    saved = json.loads(json.dumps(first.state()))
    assert saved["grain"] is not None   # grain's own iterator state, JSON-able
    stats = first.stats
    next(first)   # the interrupted run went on a little before dying
    first.close()

    # With another worker count grain's state does not fit; the stream goes on at the same batch.
    resumed = D.DataLoader(source, state=saved, workers=resume_workers, **kwargs)
    assert resumed.stats == stats
    for want in expected[stop_at:]:
        _same_batches(next(resumed), want)
    assert resumed.stats == reference.stats
    # restore() on a running loader rewinds it too.
    resumed.restore(saved)
    assert next(resumed)["captions"] == expected[stop_at]["captions"]
    resumed.close()


def test_restore_rejects_a_state_from_another_stream(folder):
    source = D.FolderSource(folder)
    state = D.DataLoader(source, batch_size=2, image_size=8, seed=1).state()
    with pytest.raises(D.DataError, match="seed"):
        D.DataLoader(source, batch_size=2, image_size=8, seed=2, state=state)
    with pytest.raises(D.DataError, match="host_count"):
        D.DataLoader(source, batch_size=2, image_size=8, seed=1, host_count=2, state=state)
    with pytest.raises(D.DataError, match="batch_size=2 but this loader has batch_size=3"):
        D.DataLoader(source, batch_size=3, image_size=8, seed=1, state=state)
    other = D.make_source({"kind": "shapes"})
    with pytest.raises(D.DataError, match="source"):
        D.DataLoader(other, batch_size=2, image_size=8, seed=1, state=state)
    with pytest.raises(D.DataError, match="'batches'"):
        D.DataLoader(source, batch_size=2, image_size=8, seed=1,
                     state={k: v for k, v in state.items() if k != "batches"})
    with pytest.raises(D.DataError, match="version 1 is the epoch and offset of the loader before grain"):
        D.DataLoader(source, batch_size=2, image_size=8, seed=1, state={"version": 1, "epoch": 0, "offset": 4})
    with pytest.raises(D.DataError, match="grain cannot restore its iterator state"):
        next(D.DataLoader(source, batch_size=2, image_size=8, seed=1, prefetch=0,
                          state=dict(state, grain={"next": 3})))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_source_with_no_usable_record_fails_clearly(tmp_path, workers):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "a.txt").write_text("x")
    loader = D.DataLoader(D.FolderSource(tmp_path), batch_size=1, image_size=8, prefetch=2, workers=workers)
    with pytest.raises(D.DataError, match="no usable record in epoch 0 .*all 1 records are skipped"):
        next(loader)
    loader.close()


def test_worker_processes_give_the_same_batches_and_skips(folder):
    source = D.FolderSource(folder)   # holds unusable records, so skips cross the processes too
    kwargs = dict(batch_size=4, image_size=8, seed=5, prefetch=2, low_res_size=4,
                  masks=M.MaskConfig(), degradation=D.Degradation(blur_prob=0.5, jpeg_prob=0.5, noise_prob=0.5))
    inline, pooled = D.DataLoader(source, **kwargs), D.DataLoader(source, workers=2, **kwargs)
    shapes = [D.DataLoader(ShapesSource(seed=2, epoch_size=7), batch_size=3, image_size=8, seed=1, workers=w,
                           masks=M.MaskConfig(object_weight=1.0)) for w in (0, 1)]
    for _ in range(10):   # several epochs of 15 and of 7 records
        _same_batches(next(pooled), next(inline))
        assert pooled.stats == inline.stats and pooled.state()["batches"] == inline.state()["batches"]
        want, got = next(shapes[0]), next(shapes[1])
        assert got["captions"] == want["captions"]
        assert np.array_equal(got["images"], want["images"]) and np.array_equal(got["inpaint_mask"], want["inpaint_mask"])
        assert type(got["images"]) is np.ndarray   # a plain copy, not grain's shared memory
    assert sum(pooled.stats["skipped"].values()) > 0
    for loader in (inline, pooled, *shapes):
        loader.close()
    with pytest.raises(D.DataError, match="workers must be >= 0"):
        D.DataLoader(source, batch_size=2, image_size=8, workers=-1)


def test_workers_that_cannot_start_give_an_error_not_a_hang():
    # A program read from stdin cannot be re-imported by a spawned worker, so every worker dies.
    program = ("from glide_jax.data import DataLoader, DataError\nfrom demo.sources import ShapesSource\n"
               "loader = DataLoader(ShapesSource(), batch_size=2, image_size=8, workers=1)\n"
               "try:\n    next(loader)\nexcept DataError as err:\n    print('refused:', err)\n")
    done = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=120)
    assert "refused: a data worker process died" in done.stdout, done.stdout + done.stderr[-2000:]


_WORKERS_PROGRAM = """
import time
from glide_jax.data import DataLoader
from demo.sources import ShapesSource

if __name__ == "__main__":
    loader = DataLoader(ShapesSource(), batch_size=2, image_size=8, workers=1)
    next(loader)
    print("ready", flush=True)
    time.sleep(300)
"""


def _children(pid):
    """Pids of the processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _running(pid):
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_worker_processes_end_when_the_training_process_is_killed(tmp_path):
    program = tmp_path / "train_like.py"
    program.write_text(_WORKERS_PROGRAM)
    child = subprocess.Popen([sys.executable, str(program)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=PROJECT_ROOT, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    try:
        assert child.stdout.readline().strip() == "ready"
        workers = _children(child.pid)
        assert workers, "no worker process found"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.time() + 30
    while any(map(_running, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(_running, workers)), "a worker outlived the process it worked for"


def test_degrade_low_res():
    rng = np.random.default_rng(0)
    hr = rng.uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
    clean = D.degrade_low_res(hr, 4, np.random.default_rng(1))
    assert clean.shape == (3, 4, 4, 3) and clean.dtype == np.float32
    np.testing.assert_allclose(clean, hr.reshape(3, 4, 4, 4, 4, 3).mean(axis=(2, 4)), atol=1e-6)
    assert D.degrade_low_res(hr[0], 4, np.random.default_rng(1)).shape == (4, 4, 3)

    smooth = np.tile(np.linspace(-0.8, 0.8, 32, dtype=np.float32)[None, :, None], (32, 1, 3))[None]
    cfg = D.Degradation(blur_prob=1, jpeg_prob=1, noise_prob=1, noise_std=(0.02, 0.02))
    a = D.degrade_low_res(smooth, 2, np.random.default_rng(7), cfg)
    b = D.degrade_low_res(smooth, 2, np.random.default_rng(7), cfg)
    c = D.degrade_low_res(smooth, 2, np.random.default_rng(8), cfg)
    base = D.degrade_low_res(smooth, 2, np.random.default_rng(7))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    diff = np.abs(a - base)
    assert 0.005 < diff.mean() < 0.1     # degraded, but still the same picture
    assert a.min() >= -1 and a.max() <= 1
    # Blur alone keeps a constant image constant and softens a step edge.
    step = np.where(np.arange(16) < 8, -1.0, 1.0).astype(np.float32)[None, :, None]
    step = np.tile(step, (16, 1, 3))
    blurred = D.degrade_low_res(step, 2, np.random.default_rng(0), D.Degradation(blur_prob=1))
    assert -1 < blurred[4, 3, 0] < 0 < blurred[4, 4, 0] < 1
    with pytest.raises(D.DataError, match="divisible"):
        D.degrade_low_res(hr, 5, rng)
    with pytest.raises(D.DataError, match="jpeg_prob"):
        D.Degradation(jpeg_prob=2)


def test_mask_statistics_and_determinism():
    cfg = M.MaskConfig(rect_weight=0.5, brush_weight=0.3, outpaint_weight=0.2)
    rng = np.random.default_rng(0)
    kinds, keep = [], {k: [] for k in M.MASK_KINDS}
    for _ in range(1500):
        mask, kind = M.sample_mask_and_kind(32, 48, rng, cfg)
        assert mask.shape == (32, 48, 1) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        kinds.append(kind)
        keep[kind].append(mask.mean())
    for kind, weight in zip(M.MASK_KINDS, cfg.weights):
        assert abs(kinds.count(kind) / len(kinds) - weight) < 0.04, kind
    assert keep["object"] == []   # weight 0
    for kind in ("rect", "brush", "outpaint"):   # every mask has something to keep and something to fill
        assert 0 < min(keep[kind]) and max(keep[kind]) < 1, kind
    lo, hi = cfg.keep_size
    assert lo**2 * 0.8 < min(keep["outpaint"]) and max(keep["outpaint"]) < hi**2 * 1.2
    assert 0.3 < np.mean(keep["rect"]) < 0.95 and 0.3 < np.mean(keep["brush"]) < 0.95

    a = M.sample_masks(6, 16, 16, np.random.default_rng(3))
    assert np.array_equal(a, M.sample_masks(6, 16, 16, np.random.default_rng(3)))
    assert not np.array_equal(a, M.sample_masks(6, 16, 16, np.random.default_rng(4)))
    only_brush = M.MaskConfig(rect_weight=0, brush_weight=1, outpaint_weight=0)
    assert {M.sample_mask_and_kind(8, 8, rng, only_brush)[1] for _ in range(20)} == {"brush"}
    images = np.ones((6, 16, 16, 3), np.float32)
    assert np.array_equal(M.apply_mask(images, a, fill=-1.0)[..., :1], 2 * a - 1)
    with pytest.raises(ValueError, match="weights"):
        M.MaskConfig(rect_weight=0, brush_weight=0, outpaint_weight=0)
    with pytest.raises(ValueError, match="do not fit"):
        M.apply_mask(images, a[:, :8])


def test_object_masks_hide_one_whole_object_of_a_shapes_scene():
    source = ShapesSource(seed=5)
    cfg = M.MaskConfig(rect_weight=0, brush_weight=0, outpaint_weight=0, object_weight=1,
                       object_margin=(0.0, 0.2))
    loader = D.DataLoader(source, batch_size=8, image_size=32, seed=1, prefetch=0, masks=cfg)
    batch = next(loader)
    loader.close()
    pixel = (np.arange(32) + 0.5) / 32
    for i, hole in enumerate(batch["inpaint_mask"][..., 0] == 0):
        inside = []
        for top, left, bottom, right in source.object_boxes(i, 0):
            box = ((pixel[:, None] >= top) & (pixel[:, None] <= bottom)
                   & (pixel[None, :] >= left) & (pixel[None, :] <= right))
            reach = 0.2 + 1 / 32   # the margin, plus the pixels the box only touches
            grown = ((pixel[:, None] >= top - reach) & (pixel[:, None] <= bottom + reach)
                     & (pixel[None, :] >= left - reach) & (pixel[None, :] <= right + reach))
            inside.append(bool(hole[box].all() and not hole[~grown].any()))
        assert any(inside), i   # the hole is one object's box plus at most the margin
        assert not hole.all()
    # The objects' boxes are where the renderer draws: a pixel that does not touch any box is
    # background, and the hole of an object mask with no margin covers exactly the pixels touching it.
    no_margin = dataclasses.replace(cfg, object_margin=(0.0, 0.0))
    for index in range(20):
        image = source.scene(index, 0).render(32)
        boxes = source.object_boxes(index, 0)
        touched = np.zeros((32, 32), bool)
        for top, left, bottom, right in boxes:
            touched |= ((pixel[:, None] + 0.5 / 32 > top) & (pixel[:, None] - 0.5 / 32 < bottom)
                        & (pixel[None, :] + 0.5 / 32 > left) & (pixel[None, :] - 0.5 / 32 < right))
        background = image[~touched]
        assert (background == background[0]).all(), index
        holes = [M.sample_mask(32, 32, np.random.default_rng(k), no_margin, boxes)[..., 0] == 0 for k in range(6)]
        assert (np.any(holes, axis=0) == touched).all(), index

    with pytest.raises(ValueError, match="needs the objects' boxes"):
        M.sample_mask(8, 8, np.random.default_rng(0), cfg)
    with pytest.raises(ValueError, match="object_margin"):
        M.MaskConfig(object_margin=(0.3, 0.1))


def test_object_masks_are_refused_for_sources_without_objects(folder):
    cfg = M.MaskConfig(object_weight=0.5)
    with pytest.raises(D.DataError, match="object_weight is 0.5, but a FolderSource"):
        D.DataLoader(D.FolderSource(folder), batch_size=2, image_size=8, masks=cfg)
