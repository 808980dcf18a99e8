"""Exchange formats: converted models as safetensors (params plus their config), and model
directories from the Hugging Face Hub's local cache (offline, as `HF_HUB_OFFLINE=1` asks)."""

import shutil

import jax
import numpy as np
import pytest

from glide_jax import Pipeline, weights
from glide_jax.checkpoint import SAFETENSORS_FILE, CheckpointError, load_model, restore_params, save_model
from glide_jax.convert import main as convert_main

STEPS = dict(steps=2, upsample_steps=2)


def _same(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    """The golden base and upsampler converted twice: orbax and safetensors."""
    root = tmp_path_factory.mktemp("exchange")
    for fmt in ("orbax", "safetensors"):
        for name in ("base", "upsample"):
            code = convert_main(["--checkpoint", str(golden / f"{name}.pt"), "--config",
                                 str(golden / f"{name}.config.json"), "--out", str(root / fmt / name),
                                 "--format", fmt])
            assert code == 0
    return root


def test_safetensors_round_trip(converted, tmp_path):
    base = converted / "safetensors" / "base"
    assert sorted(p.name for p in base.iterdir()) == ["config.json", SAFETENSORS_FILE]
    config, params = load_model(base)
    orbax_config, orbax_params = load_model(converted / "orbax" / "base")
    assert config == orbax_config
    _same(params, orbax_params)
    # Placed directly with a sharding, as restore_params does for orbax.
    placed = restore_params(base, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    _same(placed, params)
    # bfloat16 params are stored widened (exactly) and come back as asked.
    half = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params)
    save_model(tmp_path / "bf16", half, config, format="safetensors")
    back = load_model(tmp_path / "bf16", dtype=jax.numpy.bfloat16)[1]
    _same(back, half)
    # A model directory written again in the other format, by the CLI.
    assert convert_main(["--model-dir", str(tmp_path / "bf16"), "--format", "orbax", "--out",
                         str(tmp_path / "again")]) == 0
    _same(load_model(tmp_path / "again", dtype=jax.numpy.bfloat16)[1], half)


def test_bad_safetensors_and_format_are_named(converted, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(converted / "safetensors" / "base", broken)
    (broken / SAFETENSORS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 8)
    with pytest.raises(CheckpointError, match=f"{broken / SAFETENSORS_FILE}: not a readable safetensors file"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="format must be one of"):
        save_model(tmp_path / "x", {"a": np.zeros(2)}, {}, format="npz")
    assert convert_main(["--model-dir", str(broken), "--out", str(tmp_path / "y"), "--format", "orbax"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_pipeline_reads_safetensors_like_orbax(converted, golden):
    vocab = golden / "vocab"
    from_orbax = Pipeline.from_pretrained(converted / "orbax", vocab_dir=vocab)("a corgi", **STEPS)
    from_safetensors = Pipeline.from_pretrained(converted / "safetensors", vocab_dir=vocab)("a corgi", **STEPS)
    np.testing.assert_array_equal(from_safetensors.arrays, from_orbax.arrays)


def _hub_cache(root, repo_id, files_from):
    """The layout huggingface_hub keeps on disk for a downloaded model repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_repository_from_the_local_cache_offline(converted, golden, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    snapshot = _hub_cache(tmp_path / "hub", "glide-jax/tiny", converted / "safetensors")
    assert weights.is_hub_id("glide-jax/tiny") and not weights.is_hub_id(str(converted))
    pipe = Pipeline.from_pretrained("glide-jax/tiny", vocab_dir=golden / "vocab")
    assert pipe.directory == snapshot
    expected = Pipeline.from_pretrained(converted / "safetensors", vocab_dir=golden / "vocab")("a corgi", **STEPS)
    np.testing.assert_array_equal(pipe("a corgi", **STEPS).arrays, expected.arrays)
    with pytest.raises(weights.WeightsError, match="'glide-jax/missing' is not in the local Hugging Face cache"):
        Pipeline.from_pretrained("glide-jax/missing")
