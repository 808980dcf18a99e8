"""Mesh construction, batch placement, padding and FSDP placement (`glide_jax.parallel`)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from glide_jax import parallel

from conftest import PROJECT_ROOT


def run_with_devices(code: str, devices: int = 8, timeout: int = 300) -> dict:
    """Runs `code` in a fresh interpreter with `devices` simulated CPU devices; returns its JSON."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pad_batch_then_unpad_restores_rows():
    batch = {"x": np.arange(5 * 3).reshape(5, 3), "y": np.arange(5)}
    padded, n = parallel.pad_batch(batch, 4)
    assert n == 5
    assert padded["x"].shape == (8, 3) and padded["y"].shape == (8,)
    np.testing.assert_array_equal(padded["y"], [0, 1, 2, 3, 4, 4, 4, 4])
    back = parallel.unpad(padded, n)
    np.testing.assert_array_equal(back["x"], batch["x"])
    same, n = parallel.pad_batch(batch, 5)
    assert same["x"].shape == (5, 3) and n == 5


def test_pad_batch_rejects_mismatched_leading_sizes():
    with pytest.raises(parallel.ParallelError, match="common leading size"):
        parallel.pad_batch({"x": np.zeros((3, 2)), "y": np.zeros((4,))}, 2)


def test_make_mesh_rejects_fsdp_that_does_not_divide_devices():
    with pytest.raises(parallel.ParallelError, match="fsdp=3"):
        parallel.make_mesh(fsdp=3, devices=[object()] * 4)


def test_initialize_distributed_single_process_is_a_no_op(monkeypatch):
    for name in ("GLIDE_NUM_PROCESSES", "JAX_NUM_PROCESSES", "GLIDE_PROCESS_ID", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False


CLUSTER_VARIABLES = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                     "TPU_WORKER_HOSTNAMES", "JOB_COMPLETION_INDEX", "NUM_PROCESSES")


@pytest.mark.parametrize("variables, launcher", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "Slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, "a Cloud TPU slice"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),          # one task: nothing to join
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),              # a single-host TPU VM
    ({}, None),
])
def test_a_launchers_topology_is_left_to_jax(monkeypatch, variables, launcher):
    """Under a launcher JAX knows, `jax.distributed.initialize()` runs without arguments (JAX reads
    the coordinator and process id itself); the GLIDE_* variables still win where they are set."""
    for name in CLUSTER_VARIABLES + ("GLIDE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "GLIDE_NUM_PROCESSES",
                                     "JAX_NUM_PROCESSES", "GLIDE_PROCESS_ID", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(parallel.jax.config, "update", lambda *args: None)
    assert parallel.detected_cluster() == launcher
    assert parallel.initialize_distributed() is (launcher is not None)
    assert calls == ([{}] if launcher else [])
    if launcher:
        monkeypatch.setenv("GLIDE_COORDINATOR_ADDRESS", "10.0.0.1:1234")
        monkeypatch.setenv("GLIDE_NUM_PROCESSES", "2")
        monkeypatch.setenv("GLIDE_PROCESS_ID", "1")
        assert parallel.initialize_distributed() is True
        assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}


def test_initialize_distributed_names_the_missing_variable(monkeypatch):
    monkeypatch.setenv("GLIDE_NUM_PROCESSES", "2")
    monkeypatch.delenv("GLIDE_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(parallel.ParallelError, match="GLIDE_COORDINATOR_ADDRESS"):
        parallel.initialize_distributed()


def test_placement_on_eight_devices():
    result = run_with_devices("""
        import json
        import jax, jax.numpy as jnp, numpy as np
        from glide_jax import parallel

        out = {}
        mesh = parallel.make_mesh()
        out["mesh"] = dict(mesh.shape)
        batch = {"images": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
                 "tokens": np.arange(16 * 4, dtype=np.int32).reshape(16, 4)}
        g = parallel.shard_batch(batch, mesh)
        out["shape"] = list(g["images"].shape)
        out["devices"] = len(g["images"].sharding.device_set)
        out["shard_rows"] = sorted({s.data.shape[0] for s in g["images"].addressable_shards})
        out["equal"] = bool(np.array_equal(np.asarray(g["tokens"]), batch["tokens"]))
        try:
            parallel.shard_batch({"x": np.zeros((12, 2))}, mesh)
        except parallel.ParallelError as err:
            out["bad_rows_error"] = str(err)

        padded, n = parallel.pad_batch({"x": np.arange(5.0)}, parallel.num_batch_shards(mesh))
        doubled = jax.jit(lambda b: b["x"] * 2)(parallel.shard_batch(padded, mesh))
        out["unpadded"] = parallel.unpad(parallel.to_host(doubled), n).tolist()

        fmesh = parallel.make_mesh(fsdp=4)
        out["fsdp_mesh"] = dict(fmesh.shape)
        tree = {"big": jax.ShapeDtypeStruct((6, 8, 64, 256), jnp.float32),
                "bias": jax.ShapeDtypeStruct((256,), jnp.float32),
                "odd": jax.ShapeDtypeStruct((3, 5, 7, 1000), jnp.float32)}
        sh = parallel.state_shardings(tree, fmesh)
        out["specs"] = {k: list(v.spec) for k, v in sh.items()}
        params = parallel.place({"big": np.ones((6, 8, 64, 256), np.float32)}, {"big": sh["big"]})
        out["big_shard_shape"] = list(params["big"].addressable_shards[0].data.shape)
        rep = parallel.replicate({"w": np.ones((3,))}, mesh)
        out["rep_devices"] = len(rep["w"].sharding.device_set)
        print(json.dumps(out))
    """)
    assert result["mesh"] == {"data": 8, "fsdp": 1}
    assert result["shape"] == [16, 2, 2, 3]
    assert result["devices"] == 8 and result["shard_rows"] == [2]
    assert result["equal"]
    assert "12 rows" in result["bad_rows_error"] and "8 devices" in result["bad_rows_error"]
    assert result["unpadded"] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert result["fsdp_mesh"] == {"data": 2, "fsdp": 4}
    # First axis divisible by 4 is axis 1 (8); small arrays and arrays with no such axis replicate.
    assert result["specs"]["big"] == [None, "fsdp", None, None]
    assert result["specs"]["bias"] == []
    assert result["specs"]["odd"] == [None, None, None, "fsdp"]
    assert result["big_shard_shape"] == [6, 2, 64, 256]
    assert result["rep_devices"] == 8
