"""A stand-in for Google Cloud Storage, backed by a local folder, for tests that must not reach
the network: `gs://bucket/key` is `ROOT/bucket/key`.

`install(monkeypatch, root)` puts it behind every layer that touches `gs://` paths here: etils'
`epath` (its `gs` backend), TensorStore (orbax's GCS kvstore spec becomes a file kvstore on the
same folder) and orbax's hierarchical-namespace query (a plain bucket: no). orbax still takes the
paths for GCS ones, so it uses its object-store protocol (commit markers, no directory renames).

Like an object store it refuses to append to an object (`open(..., "a")`), which is the one
object-store limit code can trip over without noticing on a local disk. It is not an object store
in every other way: a directory rename here is atomic and `mkdir` is needed before a write.
"""

from __future__ import annotations

import os
from pathlib import Path

from etils.epath import backend as backend_lib
from etils.epath import gpath

PREFIX = "gs://"


class FakeGcsBackend(backend_lib.Backend):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.opened: list[tuple[str, str]] = []     # (gs:// path, mode), to see what was written

    def local(self, path) -> str:
        text = os.fspath(path)
        if not text.startswith(PREFIX):
            raise ValueError(f"fake GCS got a path that is not gs://: {text!r}")
        return str(self.root / text[len(PREFIX):])

    def remote(self, local: str) -> str:
        return PREFIX + os.path.relpath(local, self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"fake GCS: objects cannot be appended to or updated ({path}, {mode!r})")
        self.opened.append((os.fspath(path), mode))
        return backend_lib.os_backend.open(self.local(path), mode)

    def exists(self, path):
        return backend_lib.os_backend.exists(self.local(path))

    def isdir(self, path):
        return backend_lib.os_backend.isdir(self.local(path))

    def listdir(self, path):
        return backend_lib.os_backend.listdir(self.local(path))

    def glob(self, path):
        return [self.remote(p) for p in backend_lib.os_backend.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in os.walk(self.local(top), topdown=top_down, onerror=on_error):
            yield self.remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        backend_lib.os_backend.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        backend_lib.os_backend.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        backend_lib.os_backend.rmtree(self.local(path))

    def remove(self, path):
        backend_lib.os_backend.remove(self.local(path))

    def rename(self, path, dst):
        backend_lib.os_backend.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        backend_lib.os_backend.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        backend_lib.os_backend.copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return backend_lib.os_backend.stat(self.local(path))


def install(monkeypatch, root: Path) -> FakeGcsBackend:
    from orbax.checkpoint._src.path import gcs_utils

    root.mkdir(parents=True, exist_ok=True)
    fake = FakeGcsBackend(root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    # epath would pick TensorFlow's gfile over the backend table if TensorFlow were installed.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

    def kvstore(path: str) -> dict:
        return {"driver": "file", "path": fake.local(path)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    return fake
