"""Model params on disk (orbax) next to the config that builds them.

A saved model is a directory:

    DIRECTORY/config.json   the model's options (any JSON object)
    DIRECTORY/params/       the params pytree, written by orbax (format "orbax", the default)
 or DIRECTORY/model.safetensors   the same leaves by their "/"-joined paths (format "safetensors":
                                  the exchange format other tools and the Hugging Face Hub read)

Saving is atomic at the level of DIRECTORY: everything is written into a temporary sibling and
moved into place only once complete, so a crash or an exception mid-save never leaves a
half-written model under the final name, and an overwritten model stays intact until the new one
is complete.

DIRECTORY may be on any filesystem `glide_jax.paths` takes (`gs://...`). An object store cannot
rename a directory atomically, so there the complete staged model is copied under its final name
with `config.json` last: a model is only one once its config is there (`is_saved_model`,
`load_model`), so the final name never holds one that loads partly. An overwritten model goes
only once the new one is complete (staged); while the copy runs, the final name holds no model.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from glide_jax import paths
from glide_jax.config import ConfigError, read_json_object

__all__ = ["CheckpointError", "save_model", "load_model", "restore_params", "CONFIG_FILE",
           "PARAMS_DIR", "SAFETENSORS_FILE", "FORMATS", "is_saved_model"]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
SAFETENSORS_FILE = "model.safetensors"
FORMATS = ("orbax", "safetensors")


class CheckpointError(ValueError):
    """A saved model is malformed or cannot be read; the message names the directory."""


# -- saving --------------------------------------------------------------------------------------


def _check_params(params: Any) -> None:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    if not leaves:
        raise CheckpointError("params is an empty tree; there is nothing to save")
    for key_path, leaf in leaves:
        if not isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
            raise CheckpointError(
                f"params leaf {jax.tree_util.keystr(key_path)} is a {type(leaf).__name__}; "
                f"expected a numpy or jax array")


def _config_json(config: dict) -> str:
    if not isinstance(config, dict):
        raise CheckpointError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.dumps(config, indent=1, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config is not JSON-serialisable: {err}") from None


def is_saved_model(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a config and params in either format."""
    directory = paths.as_path(directory)
    return (directory / CONFIG_FILE).is_file() and (
        (directory / PARAMS_DIR).is_dir() or (directory / SAFETENSORS_FILE).is_file())


def _flat(params: Any) -> dict[str, np.ndarray]:
    """Leaves by their "/"-joined dict keys (Flax param trees are nested dicts of arrays)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", None) for k in path]
        if any(not isinstance(k, str) or "/" in k for k in keys):
            raise CheckpointError(f"params leaf {jax.tree_util.keystr(path)}: safetensors needs nested dicts "
                                  f"with string keys without '/'")
        flat["/".join(keys)] = np.asarray(leaf)
    return flat


def _unflat(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _write_safetensors(path: epath.Path, params: Any) -> None:
    from safetensors.numpy import save, save_file

    tensors = _flat(params)
    unsupported = {k: str(v.dtype) for k, v in tensors.items() if v.dtype.name == "bfloat16"}
    if unsupported:
        # numpy's safetensors writer has no bfloat16; widening is exact.
        tensors = {k: (v.astype(np.float32) if k in unsupported else v) for k, v in tensors.items()}
    metadata = {"format": "glide-jax"}
    if not paths.is_local(path):
        paths.write_bytes(path, save(tensors, metadata=metadata))
        return
    save_file(tensors, os.fspath(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _exchange(a: epath.Path, b: epath.Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the filesystem cannot exchange; fall back to two renames
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _move_into_place(staged: epath.Path, directory: epath.Path) -> None:
    """Local filesystems: the staged model takes the final name by rename (exchange if possible)."""
    if not directory.exists():
        os.rename(staged, directory)
        return
    if _exchange(staged, directory):
        shutil.rmtree(staged)  # now holds the old model
        return
    # Two renames: the final name briefly does not exist, but never holds a partial model.
    retired = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(directory, retired)
    try:
        os.rename(staged, directory)
    except BaseException:
        os.rename(retired, directory)
        raise
    shutil.rmtree(retired)


def _publish(staged: epath.Path, directory: epath.Path) -> None:
    """Object stores: the staged model copied under the final name, its config last.

    A rename there is a copy and a delete per object, so nothing is gained by renaming; copying
    instead keeps the staged model whole until the final one is, so a failure at any point leaves
    a complete model somewhere (said in the error) and nothing under the final name that loads.
    """
    try:
        if directory.exists():
            # The old model stops being one before any of its files go.
            (directory / CONFIG_FILE).unlink(missing_ok=True)
            directory.rmtree()
        config = staged / CONFIG_FILE
        for source in sorted(_files(staged), key=lambda path: path == config):
            target = directory / source.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            source.copy(target, overwrite=True)
    except Exception as err:
        raise CheckpointError(f"{directory}: moving the saved model into place failed "
                              f"({type(err).__name__}: {err}); the complete model is in {staged} (remove "
                              f"{directory} before saving there again)") from err
    staged.rmtree()


def _files(directory: epath.Path):
    for entry in directory.iterdir():
        if entry.is_dir():
            yield from _files(entry)
        else:
            yield entry


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _check_target(directory: epath.Path, overwrite: bool) -> None:
    exists = directory.exists() or (paths.is_local(directory) and os.path.islink(directory))
    if not exists:
        return
    if not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
    if not directory.is_dir() or not is_saved_model(directory):
        raise FileExistsError(
            f"{directory} exists but is not a saved model (no {CONFIG_FILE} and {PARAMS_DIR}/ or "
            f"{SAFETENSORS_FILE}); refusing to replace it")


def _staging_path(directory: epath.Path, primary: bool) -> epath.Path:
    if jax.process_count() == 1:
        return directory.with_name(f".{directory.name}.saving-{uuid.uuid4().hex[:8]}")
    # Every process must write into the same staging path, so it cannot be random.
    staged = directory.with_name(f".{directory.name}.saving")
    if primary and staged.exists():
        staged.rmtree()  # left behind by an earlier crash
    _sync(f"glide_jax.save_model.clean:{directory}")
    return staged


def save_model(directory: str | os.PathLike, params: Any, config: dict, *,
               overwrite: bool = False, format: str = "orbax") -> epath.Path:
    """Write `params` and `config` to `directory` atomically; returns the directory's path.

    `directory` is local or any URI `glide_jax.paths` takes (`gs://bucket/models/base`).
    `format` "orbax" (sharded, multi-host) or "safetensors" (one file, written by process 0;
    bfloat16 leaves are stored as float32).

    Refuses (`FileExistsError`) if `directory` exists, unless `overwrite=True`; even then it only
    replaces a directory that holds a saved model (`config.json` and `params/`), so a mistyped
    path cannot wipe unrelated files. Leaves keep their dtypes (bfloat16 included). With several
    JAX processes every process must call this with the same arguments, as orbax requires.
    """
    directory = paths.absolute(directory)
    if format not in FORMATS:
        raise CheckpointError(f"format must be one of {FORMATS}, got {format!r}")
    config_text = _config_json(config)
    _check_params(params)
    _check_target(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)

    primary = jax.process_index() == 0
    staged = _staging_path(directory, primary)
    try:
        if primary:
            staged.mkdir()
            paths.write_bytes(staged / CONFIG_FILE, config_text.encode())
        _sync(f"glide_jax.save_model.staged:{directory}")
        if format == "safetensors":
            if primary:
                _write_safetensors(staged / SAFETENSORS_FILE, jax.device_get(params))
        else:
            checkpointer = ocp.StandardCheckpointer()
            try:
                checkpointer.save(staged / PARAMS_DIR, params)
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()
        _sync(f"glide_jax.save_model.written:{directory}")
        if primary and paths.is_local(directory):
            _move_into_place(staged, directory)
    except BaseException:
        if primary:
            _discard(staged)
        raise
    if primary and not paths.is_local(directory):
        _publish(staged, directory)    # keeps the staged model if it fails
    _sync(f"glide_jax.save_model.moved:{directory}")
    return directory


def _discard(staged: epath.Path) -> None:
    try:
        staged.rmtree()
    except Exception:  # noqa: BLE001 - an object store's client raises its own types
        pass   # never there, or already gone: the error being raised is the one that matters


# -- loading -------------------------------------------------------------------------------------


def _locate(directory: str | os.PathLike) -> tuple[epath.Path, epath.Path]:
    """The model directory and its params: the `params/` folder or the safetensors file."""
    directory = paths.absolute(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"saved model directory {directory} does not exist")
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        if (directory / SAFETENSORS_FILE).is_file():
            return directory, directory / SAFETENSORS_FILE
        raise FileNotFoundError(f"{directory} has no {PARAMS_DIR}/ folder or {SAFETENSORS_FILE}; "
                                f"not a saved model")
    return directory, params_dir


def _read_safetensors(path: epath.Path, dtype) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    try:
        flat = load_file(os.fspath(path)) if paths.is_local(path) else load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return _unflat({k: (v.astype(_cast_dtype(v.dtype, dtype)) if _cast_dtype(v.dtype, dtype) else v)
                    for k, v in flat.items()})


def _read_config(directory: epath.Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; not a saved model")
    try:
        return read_json_object(path, "model config")
    except ConfigError as err:   # a damaged saved model, not a user's config mistake
        raise CheckpointError(str(err)) from None


def _param_metadata(params_dir: epath.Path) -> Any:
    """The saved tree with a shape/dtype record at each leaf."""
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(params_dir)
    except Exception as err:  # orbax raises several types for unreadable checkpoints
        raise CheckpointError(f"{params_dir}: cannot read the params metadata "
                              f"({type(err).__name__}: {err})") from None
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)


def _cast_dtype(saved: np.dtype, dtype) -> np.dtype | None:
    """The dtype to restore as: `dtype` for floating-point leaves, the saved one otherwise."""
    if dtype is not None and jax.numpy.issubdtype(saved, jax.numpy.floating):
        return np.dtype(dtype)
    return None


def load_model(directory: str | os.PathLike, *, dtype=None) -> tuple[dict, Any]:
    """`(config, params)` of a model written by `save_model`, params as numpy arrays on the host.

    Leaves keep their saved dtypes unless `dtype` is given, which casts the floating-point leaves
    (integer and boolean leaves are left alone).
    """
    directory, params_dir = _locate(directory)
    config = _read_config(directory)
    if params_dir.name == SAFETENSORS_FILE:
        return config, _read_safetensors(params_dir, dtype)
    metadata = _param_metadata(params_dir)
    restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=_cast_dtype(m.dtype, dtype)),
        metadata)
    try:
        params = ocp.PyTreeCheckpointer().restore(
            params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as err:
        raise CheckpointError(f"{params_dir}: cannot restore params "
                              f"({type(err).__name__}: {err})") from None
    return config, params


def restore_params(directory: str | os.PathLike,
                   sharding: jax.sharding.Sharding | Any | Callable[..., jax.sharding.Sharding], *,
                   dtype=None) -> Any:
    """Params of a saved model as jax arrays placed directly with `sharding`.

    `sharding` is one `jax.sharding.Sharding` for every leaf, a pytree of shardings with the
    params' structure, or a function `(name, shape, dtype) -> Sharding` where name is the leaf's
    key path (e.g. `['input_blocks_0']['kernel']`). Each process reads only the shards it
    holds. `dtype` casts floating-point leaves, as in `load_model`.
    """
    directory, params_dir = _locate(directory)
    if params_dir.name == SAFETENSORS_FILE:
        return _place_all(_read_safetensors(params_dir, dtype), sharding)
    metadata = _param_metadata(params_dir)
    meta_leaves, treedef = jax.tree_util.tree_flatten_with_path(metadata)

    if isinstance(sharding, jax.sharding.Sharding):
        shardings = [sharding] * len(meta_leaves)
    elif callable(sharding):
        shardings = [sharding(jax.tree_util.keystr(path), tuple(m.shape), np.dtype(m.dtype))
                     for path, m in meta_leaves]
    else:
        given_leaves, given_def = jax.tree_util.tree_flatten(
            sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if given_def != treedef:
            raise CheckpointError(
                f"{params_dir}: the sharding tree does not match the saved params tree "
                f"(saved {treedef}, got {given_def})")
        shardings = given_leaves
    for (path, _), leaf_sharding in zip(meta_leaves, shardings):
        if not isinstance(leaf_sharding, jax.sharding.Sharding):
            raise CheckpointError(f"sharding for {jax.tree_util.keystr(path)} is a "
                                  f"{type(leaf_sharding).__name__}, not a jax.sharding.Sharding")

    abstract = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(tuple(m.shape), _cast_dtype(m.dtype, dtype) or m.dtype, sharding=s)
        for (_, m), s in zip(meta_leaves, shardings)])
    try:
        return ocp.StandardCheckpointer().restore(params_dir, abstract)
    except Exception as err:
        raise CheckpointError(f"{params_dir}: cannot restore params "
                              f"({type(err).__name__}: {err})") from None


def _place_all(params: Any, sharding) -> Any:
    """Host params placed as `restore_params` takes `sharding` (one, a tree, or a function)."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(params, sharding)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda path, a: jax.device_put(a, sharding(jax.tree_util.keystr(path), a.shape, a.dtype)), params)
    return jax.device_put(params, sharding)
