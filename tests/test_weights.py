"""Released weights: download -> convert -> cache, against a local HTTP server on 127.0.0.1.

The server hands out the golden tiny checkpoints under the released file names; a matching tiny
config is passed as `config`, so the converter's full key/shape check passes exactly as it would
for the real files with the released configs.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from glide_jax import weights
from glide_jax.clip import ClipConfig, load_clip_checkpoints
from glide_jax.config import ModelConfig
from glide_jax.convert import convert_state_dict
from glide_jax.pt_reader import load_state_dict
from glide_jax.unet import count_params, param_shapes
from glide_jax.weights import WeightsError, load_local, load_released

from local_http import serving


@pytest.fixture
def server(monkeypatch, tmp_path):
    with serving({}) as srv:
        srv.violations = []
        srv.weights_dir, srv.converted = None, None  # set by a test: where final names would appear

        def watch(request_path):
            # Before each chunk the client cannot have the whole file, so nothing may sit under
            # its final name (after the last chunk it legitimately may).
            if srv.weights_dir is None:
                return
            for name in (request_path.rsplit("/", 1)[-1], srv.converted):
                if (srv.weights_dir / name).exists():
                    srv.violations.append(name)

        srv.before_chunk = watch
        srv.url = f"{srv.base_url}/weights"
        monkeypatch.setenv(weights.WEIGHTS_URL_ENV, srv.url)
        monkeypatch.delenv("GLIDE_JAX_OFFLINE", raising=False)
        monkeypatch.setenv("GLIDE_JAX_CACHE", str(tmp_path / "unused-default-cache"))
        yield srv


@pytest.fixture(scope="module")
def tiny_base(golden):
    """The golden base model saved as the released files are (fp16 weights), and its config."""
    config = ModelConfig.from_json(golden / "base.config.json")
    data = (golden / "base_fp16.pt").read_bytes()
    expected = convert_state_dict(load_state_dict(golden / "base_fp16.pt"), config)
    return config, data, expected


def _serve_base(server, tiny_base, cache):
    server.files["/weights/base.pt"] = tiny_base[1]
    server.weights_dir, server.converted = cache / "weights", "base"


def _assert_same(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leftovers(cache):
    """Everything in the weights dir except the lock files."""
    root = cache / "weights"
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_download_convert_then_reuse_offline(server, tiny_base, tmp_path):
    config, _, expected = tiny_base
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)
    got_config, params = load_released("base", cache=cache, config=config, progress=False)
    assert got_config == config
    _assert_same(params, expected)
    assert server.violations == []
    assert [r["path"] for r in server.requests] == ["/weights/base.pt"]
    # The converted copy replaces the download.
    assert _leftovers(cache) == ["base"]
    assert json.loads((cache / "weights" / "base" / "config.json").read_text()) == config.to_dict()

    # Second time: from the converted copy, no network (offline would refuse any download).
    again_config, again = load_released("base", cache=cache, config=config, offline=True, progress=False)
    assert again_config == config
    _assert_same(again, expected)
    assert len(server.requests) == 1
    # A key that does not shape the network changed in configs/: the converted copy still serves.
    renamed = dataclasses.replace(config, kind="renamed", noise_schedule="linear")
    assert load_released("base", cache=cache, config=renamed, offline=True)[0] == renamed

    bf16 = load_released("base", cache=cache, config=config, offline=True, dtype=jax.numpy.bfloat16)[1]
    assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(bf16)} == {np.dtype(jax.numpy.bfloat16)}


def test_keep_checkpoint_and_default_cache(server, tiny_base, tmp_path, monkeypatch):
    config, data, expected = tiny_base
    cache = tmp_path / "from-env"
    monkeypatch.setenv("GLIDE_JAX_CACHE", str(cache))
    _serve_base(server, tiny_base, cache)
    _, params = load_released("base", config=config, progress=False, keep_checkpoint=True)
    _assert_same(params, expected)
    assert _leftovers(cache) == ["base", "base.pt"]
    assert (cache / "weights" / "base.pt").read_bytes() == data


def test_interrupted_download_resumes(server, tiny_base, tmp_path):
    config, data, expected = tiny_base
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)
    cut = 3 * (1 << 20) + 12345
    server.cuts = [cut]
    with pytest.raises(WeightsError) as info:
        load_released("base", cache=cache, config=config, progress=False, retries=0)
    message = str(info.value)
    assert "connection" in message and "base.pt" in message and "--checkpoint-dir" in message
    assert _leftovers(cache) == ["base.pt.partial"]
    assert (cache / "weights" / "base.pt.partial").stat().st_size == cut

    _, params = load_released("base", cache=cache, config=config, progress=False, retries=0)
    assert server.requests[-1]["range"] == f"bytes={cut}-"
    _assert_same(params, expected)
    assert server.violations == []
    assert _leftovers(cache) == ["base"]


def test_interrupted_download_restarts_when_server_ignores_ranges(server, tiny_base, tmp_path):
    config, _, expected = tiny_base
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)
    server.support_range = False
    server.cuts = [1 << 20]  # first try cut, the retry is answered from byte 0
    _, params = load_released("base", cache=cache, config=config, progress=False, retry_wait=0.0)
    assert len(server.requests) == 2 and server.requests[1]["range"] == f"bytes={1 << 20}-"
    _assert_same(params, expected)
    assert server.violations == []


def test_wrong_size_is_rejected(server, tiny_base, tmp_path, monkeypatch):
    config, data, _ = tiny_base
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)
    pinned = dataclasses.replace(weights.RELEASED["base"], sizes=(len(data) + 1,))
    monkeypatch.setitem(weights.RELEASED, "base", pinned)
    with pytest.raises(WeightsError, match=f"expected {len(data) + 1}"):
        load_released("base", cache=cache, config=config, progress=False, retries=0)
    assert server.violations == []
    assert _leftovers(cache) == []


def test_server_error(server, tiny_base, tmp_path):
    config, _, expected = tiny_base
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)
    server.statuses = [500, 500]
    with pytest.raises(WeightsError) as info:
        load_released("base", cache=cache, config=config, progress=False, retries=1, retry_wait=0.0)
    assert "HTTP 500" in str(info.value) and f"{server.url}/base.pt" in str(info.value)
    assert len(server.requests) == 2
    assert not (cache / "weights" / "base.pt").exists() and not (cache / "weights" / "base").exists()

    server.statuses = [503]  # a transient error, then the file: the retry succeeds
    _, params = load_released("base", cache=cache, config=config, progress=False, retries=1, retry_wait=0.0)
    _assert_same(params, expected)


def test_offline_with_empty_cache_names_the_file(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as info:
        load_released("base-inpaint", cache=cache, offline=True)
    message = str(info.value)
    expected_at = cache / "weights" / "base_inpaint.pt"
    assert "base_inpaint.pt" in message
    assert str(expected_at) in message
    assert f"{server.url}/base_inpaint.pt" in message
    assert "--checkpoint-dir" in message and "offline" in message
    assert str(cache / "weights" / "base_inpaint") in message  # where a converted copy would go
    assert server.requests == []
    assert not (cache / "weights").exists()


def test_file_that_does_not_convert_is_kept(server, tiny_base, tmp_path):
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)
    # The tiny checkpoint against the released (full-size) config: the key/shape check rejects it.
    with pytest.raises(WeightsError) as info:
        load_released("base", cache=cache, progress=False)
    assert "does not match the model config" in str(info.value) and "expected shape" in str(info.value)
    kept = cache / "weights" / "base.pt"
    assert f"kept at {kept}" in str(info.value)
    assert _leftovers(cache) == ["base.pt"] and kept.read_bytes() == tiny_base[1]

    # The next call converts the kept file (with the right config this time) without downloading.
    requests = len(server.requests)
    _, params = load_released("base", cache=cache, config=tiny_base[0], progress=False)
    _assert_same(params, tiny_base[2])
    assert len(server.requests) == requests

    server.files["/weights/base.pt"] = b"not a zip file at all" * 100
    cache = tmp_path / "other-cache"
    with pytest.raises(WeightsError, match="cannot be converted"):
        load_released("base", cache=cache, config=tiny_base[0], progress=False)
    assert _leftovers(cache) == ["base.pt"]


def test_failed_save_leaves_no_converted_dir(server, tiny_base, tmp_path, monkeypatch):
    from glide_jax import checkpoint

    config, _, expected = tiny_base
    cache = tmp_path / "cache"
    _serve_base(server, tiny_base, cache)

    def crash(staged, directory):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(checkpoint, "_move_into_place", crash)
    with pytest.raises(WeightsError, match="disk full"):
        load_released("base", cache=cache, config=config, progress=False)
    assert _leftovers(cache) == ["base.pt"]  # no staging dir, no converted dir; the download stays

    monkeypatch.undo()
    _, params = load_released("base", cache=cache, config=config, offline=True, progress=False)
    _assert_same(params, expected)
    assert len(server.requests) == 1


def test_clip_pair(server, golden, tmp_path):
    config = ClipConfig.from_json(golden / "clip.config.json")
    cache = tmp_path / "cache"
    for file in ("clip_image_enc.pt", "clip_text_enc.pt"):
        server.files[f"/weights/{file}"] = (golden / file).read_bytes()
    server.weights_dir, server.converted = cache / "weights", "clip"
    got_config, params = load_released("clip", cache=cache, config=config, progress=False)
    expected = load_clip_checkpoints(golden / "clip_image_enc.pt", golden / "clip_text_enc.pt", config)
    assert got_config == config
    _assert_same(params, expected)
    assert server.violations == []
    assert _leftovers(cache) == ["clip"]
    _assert_same(load_released("clip", cache=cache, config=config, offline=True)[1], expected)


def test_load_local(golden, tiny_base, tmp_path):
    config, _, expected = tiny_base
    local = tmp_path / "ckpt"
    local.mkdir()
    with pytest.raises(WeightsError) as info:
        load_local(local, "base", config=config)
    assert str(local / "base.pt") in str(info.value) and str(local / "base") in str(info.value)

    shutil.copyfile(golden / "base_fp16.pt", local / "base.pt")
    got_config, params = load_local(local, "base", config=config)
    assert got_config == config
    _assert_same(params, expected)
    assert sorted(p.name for p in local.iterdir()) == ["base.pt"]  # nothing written there

    # A converted copy wins and brings its own config; the directory itself may be that copy.
    cache = tmp_path / "cache"
    weights_root = cache / "weights"
    weights_root.mkdir(parents=True)
    shutil.copyfile(golden / "base_fp16.pt", weights_root / "base.pt")  # a file put in the cache by hand
    load_released("base", cache=cache, config=config, offline=True, progress=False)
    (local / "base.pt").unlink()
    shutil.copytree(weights_root / "base", local / "base")
    for where in (local, local / "base"):
        got_config, params = load_local(where, "base")
        assert got_config == config
        _assert_same(params, expected)

    # A base model in the upsampler's slot is refused.
    shutil.copytree(weights_root / "base", local / "upsample")
    with pytest.raises(WeightsError, match="super_res"):
        load_local(local, "upsample")
    with pytest.raises(WeightsError, match="does not exist"):
        load_local(tmp_path / "nowhere", "base")


def test_registry(golden, monkeypatch):
    manifests = json.loads((golden / "manifests_full_size.json").read_text())
    assert weights.released_config("clip") == ClipConfig.from_dict(manifests["clip/image-enc"]["config"])
    for name in ("base", "upsample", "base-inpaint", "upsample-inpaint"):
        config = weights.released_config(name)
        assert count_params(param_shapes(config)) == manifests[name]["n_params"]
    monkeypatch.delenv(weights.WEIGHTS_URL_ENV, raising=False)
    assert weights.weights_url("base_inpaint.pt") == \
        "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/base_inpaint.pt"
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, "http://mirror.example/glide/")
    assert weights.weights_url("base.pt") == "http://mirror.example/glide/base.pt"
    with pytest.raises(WeightsError, match="base-inpaint"):
        load_released("base_inpaint")
