"""Paths on every filesystem `etils.epath` reaches: local ones, `gs://`, `s3://`, ...

Run, checkpoint and output directories may be any of them (`gs://` needs `gcsfs` or TensorFlow
installed, as epath reads it through one of them). What only a local filesystem gives — a lock
that dies with its process, fsync, a rename that atomically replaces a file or swaps two
directories — is used on local paths only. On an object store the unit of atomicity is the
object: one upload is published whole or not at all, so a file is written as one object and
never appended to or renamed into place.
"""

from __future__ import annotations

import os
import re
import uuid

from etils import epath

__all__ = ["as_path", "is_local", "absolute", "write_bytes"]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`; a URI whose scheme epath has no backend for is a ValueError."""
    if isinstance(path, epath.Path):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a path (str or os.PathLike), got {type(path).__name__} {path!r}")
    try:
        return epath.Path(path)
    except KeyError:
        # epath looks the scheme up in its registry and would say only KeyError('http://').
        scheme = _URI.match(os.fspath(path))
        raise ValueError(f"{path}: etils.epath cannot open {scheme.group(0) if scheme else 'such'} paths "
                         f"(it knows local paths, gs://, s3://, az:// and hf://)") from None


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on the local filesystem (a mounted bucket, e.g. gcsfuse, counts as local)."""
    return _URI.match(os.fspath(as_path(path))) is None


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute when local (a later chdir must not move it); a URI is already absolute."""
    path = as_path(path)
    return epath.Path(os.path.abspath(path)) if is_local(path) else path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that no reader ever sees part of it, and a failed write leaves
    what was there before."""
    path = as_path(path)
    if not is_local(path):
        # An object store makes an upload visible only once it is complete.
        path.write_bytes(data)
        return
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
