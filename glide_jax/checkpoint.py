"""Model params on disk (orbax) next to the config that builds them.

A saved model is a directory:

    DIRECTORY/config.json   the model's options (any JSON object)
    DIRECTORY/params/       the params pytree, written by orbax

Saving is atomic at the level of DIRECTORY: everything is written into a temporary sibling and
moved into place only once complete, so a crash or an exception mid-save never leaves a
half-written model under the final name, and an overwritten model stays intact until the new one
is complete.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from glide_jax.config import ConfigError, read_json_object

__all__ = ["CheckpointError", "save_model", "load_model", "restore_params", "CONFIG_FILE",
           "PARAMS_DIR"]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


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


def _looks_like_model(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / PARAMS_DIR).is_dir()


def _exchange(a: Path, b: Path) -> bool:
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


def _move_into_place(staged: Path, directory: Path) -> None:
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


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save_model(directory: str | os.PathLike, params: Any, config: dict, *,
               overwrite: bool = False) -> Path:
    """Write `params` and `config` to `directory` atomically; returns the directory's path.

    Refuses (`FileExistsError`) if `directory` exists, unless `overwrite=True`; even then it only
    replaces a directory that holds a saved model (`config.json` and `params/`), so a mistyped
    path cannot wipe unrelated files. Leaves keep their dtypes (bfloat16 included). With several
    JAX processes every process must call this with the same arguments, as orbax requires.
    """
    directory = Path(directory).absolute()
    config_text = _config_json(config)
    _check_params(params)
    if directory.exists() or directory.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
        if not directory.is_dir() or not _looks_like_model(directory):
            raise FileExistsError(
                f"{directory} exists but is not a saved model (no {CONFIG_FILE} and {PARAMS_DIR}/); "
                f"refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)

    primary = jax.process_index() == 0
    if jax.process_count() > 1:
        # Every process must write into the same staging path, so it cannot be random.
        staged = directory.with_name(f".{directory.name}.saving")
        if primary and staged.exists():
            shutil.rmtree(staged)  # left behind by an earlier crash
        _sync(f"glide_jax.save_model.clean:{directory}")
    else:
        staged = directory.with_name(f".{directory.name}.saving-{uuid.uuid4().hex[:8]}")
    try:
        if primary:
            staged.mkdir()
            with open(staged / CONFIG_FILE, "w") as f:
                f.write(config_text)
                f.flush()
                os.fsync(f.fileno())
        _sync(f"glide_jax.save_model.staged:{directory}")
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(staged / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        _sync(f"glide_jax.save_model.written:{directory}")
        if primary:
            _move_into_place(staged, directory)
        _sync(f"glide_jax.save_model.moved:{directory}")
    except BaseException:
        if primary:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return directory


# -- loading -------------------------------------------------------------------------------------


def _locate(directory: str | os.PathLike) -> tuple[Path, Path]:
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"saved model directory {directory} does not exist")
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{directory} has no {PARAMS_DIR}/ folder; not a saved model")
    return directory, params_dir


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; not a saved model")
    try:
        return read_json_object(path, "model config")
    except ConfigError as err:   # a damaged saved model, not a user's config mistake
        raise CheckpointError(str(err)) from None


def _param_metadata(params_dir: Path) -> Any:
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
