"""Orbax model IO: round trips, atomic saves, overwrite rules, clear errors, sharded restore."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from glide_jax import checkpoint
from glide_jax.checkpoint import CheckpointError, load_model, restore_params, save_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"image_size": 64, "num_channels": 32, "channel_mult": "1,2", "xf_final_ln": True}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "input_blocks_0": {"kernel": rng.standard_normal((3, 3, 3, 8)).astype(np.float32),
                           "bias": rng.standard_normal(8).astype(np.float16)},
        "transformer": {"resblocks_0": {"attn": {"kernel": rng.standard_normal((8, 24)).astype(
            ml_dtypes.bfloat16)}},
            "positional_embedding": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)},
        "step": np.array(7, dtype=np.int32),
    }


def assert_same_tree(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def siblings(path: Path):
    return sorted(p.name for p in path.parent.iterdir())


def test_round_trip_keeps_dtypes_and_values(tmp_path):
    params = make_params()
    target = tmp_path / "models" / "base"
    assert save_model(target, params, CONFIG) == target
    assert json.loads((target / "config.json").read_text()) == CONFIG
    config, loaded = load_model(target)
    assert config == CONFIG
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(loaded))
    assert_same_tree(loaded, params)
    assert siblings(target) == ["base"]  # no staging directory left behind


def test_load_with_dtype_casts_only_floating_leaves(tmp_path):
    params = make_params()
    save_model(tmp_path / "m", params, CONFIG)
    _, loaded = load_model(tmp_path / "m", dtype=jnp.float32)
    assert loaded["step"].dtype == np.int32
    assert loaded["input_blocks_0"]["bias"].dtype == np.float32
    bf16 = loaded["transformer"]["resblocks_0"]["attn"]["kernel"]
    assert bf16.dtype == np.float32
    np.testing.assert_array_equal(bf16, params["transformer"]["resblocks_0"]["attn"]["kernel"]
                                  .astype(np.float32))


def test_existing_directory_is_not_overwritten_by_default(tmp_path):
    target = tmp_path / "m"
    save_model(target, make_params(0), CONFIG)
    with pytest.raises(FileExistsError, match=rf"{target}.*overwrite=True"):
        save_model(target, make_params(1), {"other": 1})
    config, loaded = load_model(target)
    assert config == CONFIG
    assert_same_tree(loaded, make_params(0))


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_overwrite_replaces_the_model(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:  # filesystems without renameat2 exchange take the two-rename path
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    target = tmp_path / "m"
    save_model(target, make_params(0), CONFIG)
    save_model(target, make_params(1), {"version": 2}, overwrite=True)
    config, loaded = load_model(target)
    assert config == {"version": 2}
    assert_same_tree(loaded, make_params(1))
    assert siblings(target) == ["m"]


def test_overwrite_refuses_a_directory_that_is_not_a_model(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes exists but is not a saved model"):
        save_model(target, make_params(), CONFIG, overwrite=True)
    assert (target / "important.txt").read_text() == "keep me"


@pytest.mark.parametrize("after_writing", [False, True])
def test_failure_mid_save_keeps_previous_model(tmp_path, monkeypatch, after_writing):
    target = tmp_path / "m"
    save_model(target, make_params(0), CONFIG)
    original_save = ocp.StandardCheckpointer.save

    def crashing_save(self, directory, state, *args, **kwargs):
        if after_writing:
            original_save(self, directory, state, *args, **kwargs)
            self.wait_until_finished()
        raise RuntimeError("simulated crash during save")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_model(target, make_params(1), {"version": 2}, overwrite=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_model(tmp_path / "fresh", make_params(1), CONFIG)
    monkeypatch.undo()
    config, loaded = load_model(target)
    assert config == CONFIG
    assert_same_tree(loaded, make_params(0))
    assert siblings(target) == ["m"]  # neither a partial "fresh" nor a staging directory


def test_failure_while_moving_into_place_keeps_previous_model(tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_model(target, make_params(0), CONFIG)

    def failing_exchange(a, b):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(checkpoint, "_exchange", failing_exchange)
    with pytest.raises(OSError, match="simulated rename failure"):
        save_model(target, make_params(1), CONFIG, overwrite=True)
    assert_same_tree(load_model(target)[1], make_params(0))
    assert siblings(target) == ["m"]


def test_killed_process_never_leaves_a_partial_model(tmp_path):
    # A hard crash (no exception handling runs) after everything was written, just before the move.
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from glide_jax import checkpoint
        checkpoint._move_into_place = lambda staged, directory: os._exit(3)
        from glide_jax.checkpoint import save_model
        save_model({str(tmp_path / "m")!r}, {{"w": np.ones(3, np.float32)}}, {{"a": 1}})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert not (tmp_path / "m").exists()
    leftovers = [name for name in os.listdir(tmp_path) if name != "m"]
    # Only the staging sibling remains, holding the complete write that never got moved.
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.saving-"), leftovers
    assert (tmp_path / leftovers[0] / "params").is_dir()


def test_missing_pieces_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        load_model(tmp_path / "nowhere")
    target = tmp_path / "m"
    save_model(target, make_params(), CONFIG)
    (target / "config.json").rename(tmp_path / "saved_config.json")
    with pytest.raises(FileNotFoundError, match=rf"{target} has no config\.json"):
        load_model(target)
    (tmp_path / "saved_config.json").rename(target / "config.json")
    (target / "params").rename(tmp_path / "saved_params")
    with pytest.raises(FileNotFoundError, match=rf"{target} has no params/"):
        load_model(target)
    with pytest.raises(FileNotFoundError, match=rf"{target} has no params/"):
        restore_params(target, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_malformed_config_and_params(tmp_path):
    target = tmp_path / "m"
    save_model(target, make_params(), CONFIG)
    (target / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        load_model(target)
    (target / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(target)
    (target / "config.json").write_text("{}")
    for entry in (target / "params").iterdir():
        if entry.is_file():
            entry.unlink()
    with pytest.raises(CheckpointError, match=rf"{target}/params: cannot"):
        load_model(target)


def test_bad_inputs_are_refused_before_writing(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(CheckpointError, match=r"config is not JSON-serialisable"):
        save_model(target, make_params(), {"dtype": np.float32})
    with pytest.raises(CheckpointError, match=r"config must be a dict"):
        save_model(target, make_params(), [("a", 1)])
    with pytest.raises(CheckpointError, match=r"\['block'\]\['scale'\] is a float"):
        save_model(target, {"block": {"scale": 0.5}}, CONFIG)
    with pytest.raises(CheckpointError, match=r"empty tree"):
        save_model(target, {}, CONFIG)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_restore_params_single_device(tmp_path):
    params = make_params()
    save_model(tmp_path / "m", params, CONFIG)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = restore_params(tmp_path / "m", device)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
    assert_same_tree(restored, params)
    cast = restore_params(tmp_path / "m", lambda name, shape, dtype: device, dtype=jnp.bfloat16)
    assert cast["input_blocks_0"]["kernel"].dtype == jnp.bfloat16
    assert cast["step"].dtype == jnp.int32
    with pytest.raises(CheckpointError, match=r"sharding tree does not match"):
        restore_params(tmp_path / "m", {"input_blocks_0": device})
    with pytest.raises(CheckpointError, match=r"\['step'\] is a str"):
        restore_params(tmp_path / "m", lambda name, shape, dtype: "cpu" if "step" in name else device)


def test_sharded_save_and_restore_on_eight_devices(tmp_path):
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from glide_jax.checkpoint import load_model, restore_params, save_model
        assert jax.device_count() == 8
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        w = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
        params = {{"dense": {{"kernel": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
                             "bias": jnp.arange(6, dtype=jnp.bfloat16)}}}}
        save_model({str(tmp_path / "m")!r}, params, {{"n": 1}})
        config, host = load_model({str(tmp_path / "m")!r})
        assert config == {{"n": 1}} and isinstance(host["dense"]["kernel"], np.ndarray)
        np.testing.assert_array_equal(host["dense"]["kernel"], w)
        rows = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        tree = restore_params({str(tmp_path / "m")!r}, {{"dense": {{"kernel": rows, "bias": replicated}}}})
        assert tree["dense"]["kernel"].sharding == rows
        assert {{s.data.shape for s in tree["dense"]["kernel"].addressable_shards}} == {{(4, 6)}}
        np.testing.assert_array_equal(np.asarray(tree["dense"]["kernel"]), w)
        assert tree["dense"]["bias"].dtype == jnp.bfloat16 and tree["dense"]["bias"].sharding == replicated
        by_rule = restore_params({str(tmp_path / "m")!r},
                                 lambda name, shape, dtype: rows if len(shape) == 2 else replicated)
        assert by_rule["dense"]["kernel"].sharding == rows
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
