"""Devices, meshes and the placement of batches and train state across them.

Why `jit` + `NamedSharding` rather than `pmap` or `shard_map`: the step function is written once,
for the *global* batch, as if on one device. Sharding annotations on its inputs and outputs tell
XLA's partitioner where each array lives, and it inserts the collectives itself: the gradient
all-reduce for data parallelism, the parameter all-gathers and gradient reduce-scatters when the
state is sharded FSDP-style. So the same program runs unchanged on 1 device, 8 devices of one host
or many hosts, and its result does not depend on the device count (up to the order of float
reductions). `pmap` needs a leading device axis on every input, per-device copies of the state and
hand-written `pmean`s, and since JAX 0.8 it is itself a thin layer over jit + shard_map in
maintenance mode. `shard_map` is the right tool for hand-scheduled per-device code; a diffusion
U-Net step has nothing that needs it.

The mesh has two axes. `data` splits the batch. `fsdp` also splits the batch (the batch is
spread over every device) and, in addition, splits each large parameter, its EMA copy and its
Adam moments along their first axis that the `fsdp` size divides. For the 3.5B-parameter GLIDE
(about 14 GB of float32 params, 56 GB with EMA and two Adam moments) that is what makes the state
fit: with `fsdp=8` each device holds an eighth of it, and XLA gathers a layer's weights just
before use. Small tensors (norm scales, biases) stay replicated, since sharding them saves almost
nothing and costs a collective each.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Parameters with fewer elements than this stay replicated under FSDP (see module docstring).
DEFAULT_FSDP_MIN_SIZE = 2 ** 16


class ParallelError(ValueError):
    """Bad device, mesh or batch layout; the message says which value and what was expected."""


# -- processes ------------------------------------------------------------------------------------

_ENV_COORDINATOR = ("GLIDE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_ENV_NUM_PROCESSES = ("GLIDE_NUM_PROCESSES", "JAX_NUM_PROCESSES")
_ENV_PROCESS_ID = ("GLIDE_PROCESS_ID", "JAX_PROCESS_ID")


def _env(names: Sequence[str]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


# Where a launcher already says how many processes there are, `jax.distributed.initialize()` reads
# the rest (coordinator, process id) itself: name -> (variable that marks it, variable of its size).
_CLUSTER_MARKERS = {
    "Slurm": ("SLURM_JOB_ID", ("SLURM_NTASKS", "SLURM_NPROCS")),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_SIZE",)),
    "MPICH": ("PMI_SIZE", ("PMI_SIZE",)),
    "a Cloud TPU slice": ("TPU_WORKER_HOSTNAMES", ()),
    "GKE": ("JOB_COMPLETION_INDEX", ("NUM_PROCESSES",)),
}


def detected_cluster() -> str | None:
    """The launcher of a multi-process run whose topology JAX reads by itself, if any."""
    for name, (marker, sizes) in _CLUSTER_MARKERS.items():
        if not os.environ.get(marker):
            continue
        if name == "a Cloud TPU slice":
            if len([h for h in os.environ["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]) > 1:
                return name
            continue
        size = next((os.environ[v] for v in sizes if os.environ.get(v)), "1")
        if size.isdigit() and int(size) > 1:
            return name
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Joins a multi-process run; must be called before anything touches a device.

    Arguments left out are read from `GLIDE_COORDINATOR_ADDRESS` (host:port), `GLIDE_NUM_PROCESSES`
    and `GLIDE_PROCESS_ID` (the `JAX_*` spellings also work). Without them, a run started by a
    launcher JAX knows (Slurm, Open MPI, MPICH, a multi-host Cloud TPU slice, GKE; see
    `detected_cluster`) calls `jax.distributed.initialize()` with no arguments and lets JAX read
    the topology. With one process this does nothing and returns False. On CPU the collectives go
    through gloo, the only CPU backend that crosses process boundaries.
    """
    coordinator_address = coordinator_address or _env(_ENV_COORDINATOR)
    raw_num = num_processes if num_processes is not None else _env(_ENV_NUM_PROCESSES)
    raw_id = process_id if process_id is not None else _env(_ENV_PROCESS_ID)
    if coordinator_address is None and raw_num is None and raw_id is None:
        if detected_cluster() is None:
            return False
        _cpu_collectives()
        jax.distributed.initialize()
        return True
    try:
        num = int(raw_num) if raw_num is not None else 1
        pid = int(raw_id) if raw_id is not None else None
    except ValueError:
        raise ParallelError(
            f"GLIDE_NUM_PROCESSES / GLIDE_PROCESS_ID must be integers, got {raw_num!r} / {raw_id!r}") from None
    if num <= 1:
        return False
    if not coordinator_address:
        raise ParallelError(f"{num} processes requested but no coordinator address "
                            f"(set GLIDE_COORDINATOR_ADDRESS=host:port)")
    if pid is None or not 0 <= pid < num:
        raise ParallelError(f"process id must be in [0, {num}) for a {num}-process run, got {raw_id!r} "
                            f"(set GLIDE_PROCESS_ID)")
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num, process_id=pid)
    return True


def _cpu_collectives() -> None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu") or platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    """The process that writes logs and single-copy files."""
    return jax.process_index() == 0


# -- mesh -------------------------------------------------------------------------------------------

def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (`data`, `fsdp`) mesh over all devices of all processes (or the `devices` given).

    `fsdp` is the size of the parameter-sharding axis; 1 is plain data parallelism. The axes are
    `Auto` so the partitioner propagates the shardings given at the jit boundary.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ParallelError(f"mesh fsdp={fsdp} must be a positive divisor of the device count {len(devices)}")
    shape = (len(devices) // fsdp, fsdp)
    return jax.make_mesh(shape, (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def num_batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch axis is split into (every device gets one)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_sharding(shape: Sequence[int], mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> NamedSharding:
    """FSDP placement of one state array: its first axis divisible by the `fsdp` size is split.

    Arrays that are small, scalar, or have no such axis are replicated. The rule depends on the
    shape alone, so a parameter, its EMA copy and its Adam moments all land the same way.
    """
    n = mesh.shape[FSDP_AXIS]
    if n > 1 and math.prod(shape) >= min_size:
        for axis, size in enumerate(shape):
            if size % n == 0:
                spec = [None] * len(shape)
                spec[axis] = FSDP_AXIS
                return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def state_shardings(abstract_tree: Any, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """Shardings for a tree of arrays (or `ShapeDtypeStruct`s): `param_sharding` leaf by leaf."""
    return jax.tree.map(lambda leaf: param_sharding(np.shape(leaf), mesh, min_size), abstract_tree)


# -- moving data onto the mesh -------------------------------------------------------------------

def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a host tree (identical on every process) whole on every device of `mesh`."""
    return place(tree, jax.tree.map(lambda _: replicated_sharding(mesh), tree))


def place(tree: Any, shardings: Any) -> Any:
    """Puts a host tree (identical on every process) onto `shardings`, leaf by leaf.

    Goes through `make_array_from_callback` so it also works when some devices belong to other
    processes: each process fills only the shards it owns.
    """
    def put(leaf, sharding):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; checks it divides over processes and devices."""
    shards = num_batch_shards(mesh)
    if global_batch_size % shards:
        raise ParallelError(f"global batch size {global_batch_size} is not divisible by the "
                            f"{shards} devices of the mesh")
    return global_batch_size // jax.process_count()


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (this process's rows) → global arrays split on the batch axis.

    Every process passes its own rows, the same number on each; the global batch is their
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    local_shards = num_batch_shards(mesh) // jax.process_count()

    def put(path, leaf):
        value = np.asarray(leaf)
        if value.ndim == 0:
            raise ParallelError(f"batch entry {jax.tree_util.keystr(path)} is a scalar; every entry "
                                f"needs a leading batch axis")
        if value.shape[0] % local_shards:
            raise ParallelError(
                f"batch entry {jax.tree_util.keystr(path)} has {value.shape[0]} rows on this process, "
                f"not divisible by its {local_shards} devices (pad with parallel.pad_batch)")
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        return jax.make_array_from_process_local_data(sharding, value, global_shape)

    return jax.tree_util.tree_map_with_path(put, batch)


def pad_batch(batch: Any, multiple: int) -> tuple[Any, int]:
    """Pads every entry's leading axis up to a multiple of `multiple` by repeating the last row.

    Returns the padded tree and the original row count; `unpad` drops the extra rows again.
    Repeating a real row (rather than zeros) keeps padded inputs in-distribution, so no NaN or
    odd value from a padded row can leak into e.g. a batch statistic.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ParallelError("pad_batch got an empty batch")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ParallelError(f"pad_batch needs entries with one common leading size, got {sorted(map(str, sizes))}")
    n = sizes.pop()
    if n == 0:
        raise ParallelError("pad_batch got a batch with 0 rows")
    target = -(-n // multiple) * multiple

    def pad(leaf):
        leaf = np.asarray(leaf)
        if target == n:
            return leaf
        return np.concatenate([leaf, np.repeat(leaf[-1:], target - n, axis=0)], axis=0)

    return jax.tree.map(pad, batch), n


def unpad(tree: Any, n: int) -> Any:
    """Keeps the first `n` rows of every entry (undoes `pad_batch`)."""
    return jax.tree.map(lambda leaf: leaf[:n], tree)


def to_host(tree: Any) -> Any:
    """Global arrays → numpy on every process (gathers shards that live on other processes)."""
    def get(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))   # every process already has all of it
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(get, tree)


def tree_size(tree: Any) -> int:
    """Number of elements in a tree of arrays."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts the floating-point leaves of a tree to `dtype`, leaving integer leaves alone."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
