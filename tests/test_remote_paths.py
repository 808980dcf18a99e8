"""Saved models, a training run and sampled images on an object store (a fake `gs://`, see
tests/fake_gcs.py), with every local-only call rigged to fail on its paths: file locks, fsync,
`Path.absolute`/`abspath`/`resolve` (which would turn `gs://b/x` into `<cwd>/gs:/b/x`), renames
and the rename exchange. One process only: with several, `save_model` stages under a fixed name
(otherwise the same code) and the trainer's other processes write only their orbax checkpoint
shards.
"""

import itertools
import json
import logging
import os
import pathlib
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from etils import epath

import fake_gcs
from test_checkpoint import CONFIG, assert_same_tree, make_params
from test_training import run_config

from glide_jax import checkpoint, paths


def _touches(root: pathlib.Path, text: str) -> bool:
    """A gs:// URI (or one mangled into a local path), or a file of the fake store's folder."""
    return "gs:/" in text or text.startswith(str(root))


def _fd_path(fd) -> str:
    fd = fd if isinstance(fd, int) else fd.fileno()
    return os.readlink(f"/proc/self/fd/{fd}")


def _rig_local_only_calls(monkeypatch, root: pathlib.Path) -> None:
    def guard(name, real, describe, touches=lambda text: _touches(root, text)):
        def guarded(*args, **kwargs):
            for described in describe(*args):
                if touches(described):
                    raise AssertionError(f"{name} called on {described}: a local-only call on an object store")
            return real(*args, **kwargs)
        return guarded

    import fcntl
    from etils.epath import gpath

    by_fd = lambda fd, *rest: [_fd_path(fd)]
    by_paths = lambda *args: [os.fspath(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
    monkeypatch.setattr(fcntl, "flock", guard("fcntl.flock", fcntl.flock, by_fd))
    monkeypatch.setattr(os, "fsync", guard("os.fsync", os.fsync, by_fd))
    monkeypatch.setattr(os, "rename", guard("os.rename", os.rename, by_paths))
    monkeypatch.setattr(os, "replace", guard("os.replace", os.replace, by_paths))
    # Making a path absolute is wrong only for a URI (the fake's folder is a local path to it).
    uri = lambda text: "gs:/" in text
    monkeypatch.setattr(os.path, "abspath", guard("os.path.abspath", os.path.abspath, by_paths, uri))
    monkeypatch.setattr(pathlib.Path, "absolute", guard("Path.absolute", pathlib.Path.absolute, by_paths, uri))
    monkeypatch.setattr(gpath._GPath, "resolve", guard("epath resolve", gpath._GPath.resolve, by_paths, uri))
    monkeypatch.setattr(checkpoint, "_exchange", guard("checkpoint._exchange", checkpoint._exchange, by_paths))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    root = tmp_path / "store"
    fake = fake_gcs.install(monkeypatch, root)
    # The fake's own calls reach the folder through os functions, which is the object store's
    # side; everything else must not.
    _rig_local_only_calls(monkeypatch, root)
    fake.root = root
    return fake


def test_the_rigged_calls_do_fail_on_the_store(gcs):
    (gcs.root / "bucket").mkdir()
    with pytest.raises(AssertionError, match="Path.absolute"):
        pathlib.Path("gs://bucket/x").absolute()
    with open(gcs.root / "bucket" / "f", "w") as f, pytest.raises(AssertionError, match="os.fsync"):
        os.fsync(f.fileno())
    with pytest.raises(AssertionError, match="epath resolve"):
        epath.Path("gs://bucket/x").absolute()


def test_paths_tell_local_from_remote_and_refuse_unknown_schemes(tmp_path):
    assert paths.is_local(tmp_path) and paths.is_local("relative/dir") and paths.is_local("/gcs/mounted")
    assert not paths.is_local("gs://bucket/run") and not paths.is_local(epath.Path("s3://b/k"))
    assert os.fspath(paths.absolute("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(paths.absolute("rel")) == os.path.join(os.getcwd(), "rel")
    with pytest.raises(ValueError, match="etils.epath cannot open ftp:// paths"):
        paths.as_path("ftp://host/x")


@pytest.mark.parametrize("format", ["orbax", "safetensors"])
def test_saved_models_round_trip_and_are_replaced_whole(gcs, format):
    target = "gs://bucket/models/base"
    params = make_params(0)
    if format == "safetensors":     # it stores bfloat16 as float32
        params = jax.tree.map(lambda a: np.asarray(a, np.float32 if a.dtype == ml_dtypes.bfloat16 else a.dtype), params)
    assert os.fspath(checkpoint.save_model(target, params, CONFIG, format=format)) == target
    assert checkpoint.is_saved_model(target)
    config, loaded = checkpoint.load_model(target)
    assert config == CONFIG
    assert_same_tree(loaded, params)
    restored = checkpoint.restore_params(target, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert_same_tree(restored, params)

    with pytest.raises(FileExistsError, match="gs://bucket/models/base already exists"):
        checkpoint.save_model(target, params, CONFIG, format=format)
    other = make_params(1)
    if format == "safetensors":
        other = jax.tree.map(lambda a, b: np.asarray(a, b.dtype), other, params)
    checkpoint.save_model(target, other, {"version": 2}, overwrite=True, format=format)
    config, loaded = checkpoint.load_model(target)
    assert config == {"version": 2}
    assert_same_tree(loaded, other)
    assert sorted(os.listdir(gcs.root / "bucket" / "models")) == ["base"]   # no staging copy left
    assert not any(mode.startswith("a") for _, mode in gcs.opened)


def test_a_failure_while_publishing_leaves_the_complete_model_staged_and_nothing_loadable(gcs, monkeypatch):
    target = "gs://bucket/m"
    checkpoint.save_model(target, make_params(0), CONFIG)
    real_copy = epath.Path.copy
    copied = []

    def failing_copy(self, dst, overwrite=False):
        if len(copied) == 3:
            raise OSError("simulated network failure")
        copied.append(dst)
        return real_copy(self, dst, overwrite=overwrite)

    monkeypatch.setattr(type(epath.Path(target)), "copy", failing_copy)
    with pytest.raises(checkpoint.CheckpointError, match=r"gs://bucket/m: moving the saved model into place failed "
                                                          r".*the complete model is in gs://bucket/\.m\.saving-"):
        checkpoint.save_model(target, make_params(1), {"version": 2}, overwrite=True)
    monkeypatch.setattr(type(epath.Path(target)), "copy", real_copy)
    assert not checkpoint.is_saved_model(target)        # its config goes last: never half a model
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        checkpoint.load_model(target)
    staged = [name for name in os.listdir(gcs.root / "bucket") if name.startswith(".m.saving-")]
    assert len(staged) == 1
    config, loaded = checkpoint.load_model(f"gs://bucket/{staged[0]}")
    assert config == {"version": 2}
    assert_same_tree(loaded, make_params(1))


def test_sampled_pngs_go_to_the_store(gcs):
    from PIL import Image

    from sample import generate
    from sample import images as image_io

    # The CLI's --out checks: nothing is made up front, a probe object proves it writable later.
    generate._check_out("gs://bucket/out")
    assert not (gcs.root / "bucket").exists()
    generate._writable(paths.absolute("gs://bucket/out"))
    assert os.listdir(gcs.root / "bucket" / "out") == []
    with pytest.raises(generate.InputError, match="--out ftp://host/x: etils.epath cannot open ftp:// paths"):
        generate._check_out("ftp://host/x")

    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    image_io.save_png("gs://bucket/out/0000.png", pixels, metadata={"prompt": "a cube"})
    with Image.open(gcs.root / "bucket" / "out" / "0000.png") as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)
        assert image.text["prompt"] == "a cube"
    assert os.listdir(gcs.root / "bucket" / "out") == ["0000.png"]


def test_no_lock_on_a_run_directory_in_the_store_and_a_warning_says_so(gcs, caplog):
    from train.train import lock_run_dir

    with caplog.at_level(logging.WARNING, logger="glide_jax.train"):
        assert lock_run_dir("gs://bucket/run") is None
    assert "gs://bucket/run is on an object store, where no lock guards it" in caplog.text


def read_events(directory: pathlib.Path) -> list:
    """Every event of the TensorBoard event files in `directory` (TFRecord framing, CRCs checked)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            header = data[at:at + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header), path
            body = data[at + 12:at + 12 + length]
            assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(body), path
            events.append(event_pb2.Event.FromString(body))
            at += 16 + length
    return events


def scalars(events) -> dict:
    """{(tag, step): value} of the scalar summaries."""
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def test_a_run_in_the_store_trains_checkpoints_logs_and_resumes(gcs, tmp_path, caplog):
    from demo import shapes
    from glide_jax import tokenizers
    from train.run_config import load_run_config
    from train.train import Trainer

    captions = [c for scene in itertools.islice(shapes.iter_scenes(0), 300) for c in scene.captions()]
    spm = tmp_path / "shapes.model"
    tokenizers.SentencePieceTokenizer.train(captions, spm, 40)
    config = run_config(spm, "gs://bucket/run", train_steps=4, checkpoint__every=2, log__every=2,
                        sample={"every": 4, "count": 2, "respacing": "4"})
    (tmp_path / "run.json").write_text(json.dumps(config))
    for steps in (4, 6):
        with caplog.at_level(logging.INFO, logger="glide_jax.train"):
            trainer = Trainer(*load_run_config(tmp_path / "run.json", [f"train_steps={steps}"]))
            try:
                trainer.run()
            finally:
                trainer.close()
    assert "resumed from gs://bucket/run at step 4" in caplog.text

    run = gcs.root / "bucket" / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.isdigit()) == ["4", "6"]   # keep=2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 4, 6, 6]        # both sessions' lines, done records too
    assert [r.get("event") for r in records] == [None, None, "done", None, "done"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["prompts.json", "step_00000004.png",
                                                                   "step_00000006.png"]
    values = scalars(read_events(run / "tensorboard"))
    for record in records:
        if record.get("event") is None:
            assert values[("loss", record["step"])] == pytest.approx(record["loss"], rel=1e-6)
    assert not any(mode.startswith("a") for _, mode in gcs.opened)
