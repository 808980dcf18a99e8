"""Read PyTorch `torch.save` checkpoints into numpy without importing torch.

Only the zip format (the default since torch 1.6) is supported. Such a file is a zip archive
holding `<archive>/data.pkl` (the pickled object, where every storage is a persistent id),
`<archive>/data/<key>` (the raw bytes of each storage), `<archive>/byteorder` and
`<archive>/version`.

A pickle can run arbitrary code, so `data.pkl` is read with an unpickler that resolves only the
handful of globals a state dict needs (tensor and parameter rebuild functions, storage type names,
`collections.OrderedDict`); every other global is refused before anything is called.

Unpickling produces lightweight tensor references; storages are read afterwards, once each,
straight from the archive into a numpy buffer, and every tensor is cut out of its storage. A
tensor that is the sole, contiguous user of its whole storage takes the buffer without a copy,
which keeps the peak memory of a ~1.5 GB checkpoint close to its size.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["PtFormatError", "UnsafePickleError", "load_pickle_tree", "load_state_dict"]


class PtFormatError(ValueError):
    """The file is not a readable PyTorch zip checkpoint; the message names the file."""


class UnsafePickleError(PtFormatError):
    """The pickle asked for a global outside the allow-list; nothing was executed."""


# torch storage type name -> numpy dtype of its elements (little-endian unless `byteorder` says).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # as in the zip spec (APPNOTE 4.3.7)


class _StorageType:
    """What a `torch.XxxStorage` global resolves to: only its element dtype matters here."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel


class _TensorRef:
    """A tensor as the pickle describes it; materialised once all storages are known."""

    def __init__(self, storage: _StorageRef, offset: int, shape: tuple, stride: tuple,
                 stands_for: _StorageRef | None = None):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.stands_for = stands_for  # set when this view represents a bare storage


def _as_int_tuple(value, what: str, path: str) -> tuple[int, ...]:
    if isinstance(value, int):  # torch.Size is pickled as a tuple, but be lenient with scalars
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise PtFormatError(f"{path}: tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _make_rebuilders(path: str):
    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                          backward_hooks=None, metadata=None):
        if not isinstance(storage, _StorageRef):
            raise PtFormatError(f"{path}: _rebuild_tensor_v2 got {type(storage).__name__} "
                                f"instead of a storage")
        if not isinstance(storage_offset, int) or storage_offset < 0:
            raise PtFormatError(f"{path}: bad storage offset {storage_offset!r}")
        shape = _as_int_tuple(size, "size", path)
        strides = _as_int_tuple(stride, "stride", path)
        if len(shape) != len(strides):
            raise PtFormatError(f"{path}: tensor size {shape} and stride {strides} differ in rank")
        if any(s < 0 for s in shape) or any(s < 0 for s in strides):
            raise PtFormatError(f"{path}: negative size or stride in tensor {shape}/{strides}")
        return _TensorRef(storage, storage_offset, shape, strides)

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
        if not isinstance(data, _TensorRef):
            raise PtFormatError(f"{path}: _rebuild_parameter got {type(data).__name__} "
                                f"instead of a tensor")
        return data

    def rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
        return rebuild_parameter(data, requires_grad, backward_hooks)

    return {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storage_lookup):
        super().__init__(file)
        self._path = path
        self._allowed = _make_rebuilders(path)
        self._storage_lookup = storage_lookup

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"{self._path}: refusing to load global {module}.{name} from the checkpoint's pickle; "
            f"only tensors, storages and plain containers are allowed (nothing was executed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PtFormatError(f"{self._path}: unsupported persistent id {pid!r} in the pickle "
                                f"(expected ('storage', type, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise PtFormatError(f"{self._path}: storage {key!r} has unknown type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise PtFormatError(f"{self._path}: malformed storage id {pid!r}")
        return self._storage_lookup(key, storage_type.dtype, numel)


def _open_archive(path: str) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise PtFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PtFormatError(f"{path}: is a directory, expected a .pt file") from None
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        pass
    if head.startswith(b"PK"):
        raise PtFormatError(f"{path}: zip archive is truncated or corrupted (no readable central "
                            f"directory)")
    if head[:1] == b"\x80" and _is_legacy_torch_file(path):
        raise PtFormatError(
            f"{path}: legacy (pre-1.6, non-zip) PyTorch serialization is not supported; re-save "
            f"it with a newer torch: torch.save(torch.load(old_path), new_path)")
    raise PtFormatError(f"{path}: not a PyTorch checkpoint (expected a zip archive as written by "
                        f"torch.save since torch 1.6)")


def _is_legacy_torch_file(path: str) -> bool:
    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError("globals are not allowed here")

    try:
        with open(path, "rb") as f:
            return _NoGlobals(f).load() == _LEGACY_MAGIC
    except Exception:  # anything unreadable is simply "not legacy"; the caller reports it
        return False


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    candidates = [n for n in archive.namelist()
                  if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not candidates:
        raise PtFormatError(f"{path}: zip archive has no data.pkl record; not a torch.save file")
    if len(candidates) > 1:
        raise PtFormatError(f"{path}: zip archive has several data.pkl records {candidates}")
    return candidates[0][: -len("data.pkl")]


def _read_byteorder(archive: zipfile.ZipFile, prefix: str, path: str) -> str:
    try:
        value = archive.read(prefix + "byteorder").decode("ascii").strip()
    except KeyError:
        return "little"  # files from before torch recorded it were written little-endian
    if value not in ("little", "big"):
        raise PtFormatError(f"{path}: byteorder record says {value!r}, expected 'little' or 'big'")
    return value


def _read_record(archive: zipfile.ZipFile, raw, name: str, nbytes: int, path: str) -> np.ndarray:
    """The first `nbytes` of record `name`, read once into a fresh writable buffer."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise PtFormatError(f"{path}: storage record {name} is missing from the archive") from None
    if info.file_size < nbytes:
        raise PtFormatError(f"{path}: storage record {name} has {info.file_size} bytes, the "
                            f"pickle needs {nbytes}")
    buffer = np.empty(info.file_size, dtype=np.uint8)
    if info.compress_type == zipfile.ZIP_STORED:
        # torch stores storages uncompressed: read them straight into the buffer, skipping the
        # intermediate bytes object zipfile.read would make.
        raw.seek(info.header_offset)
        header = raw.read(_ZIP_LOCAL_HEADER.size)
        if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise PtFormatError(f"{path}: bad local zip header for record {name}")
        fields = _ZIP_LOCAL_HEADER.unpack(header)
        name_len, extra_len = fields[-2], fields[-1]
        raw.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
        got = raw.readinto(memoryview(buffer))
        if got != info.file_size:
            raise PtFormatError(f"{path}: storage record {name} is truncated ({got} of "
                                f"{info.file_size} bytes)")
        if zlib.crc32(memoryview(buffer)) != info.CRC:
            raise PtFormatError(f"{path}: storage record {name} fails its CRC check (corrupted)")
    else:
        try:
            buffer[:] = np.frombuffer(archive.read(name), dtype=np.uint8)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise PtFormatError(f"{path}: storage record {name} is corrupted ({err})") from None
    return buffer[:nbytes]


def _materialize(ref: _TensorRef, storage: np.ndarray, sole_user: bool, path: str) -> np.ndarray:
    shape, itemsize = ref.shape, storage.itemsize
    if 0 in shape:
        return np.empty(shape, dtype=storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(shape, ref.stride))
    if last >= storage.size:
        raise PtFormatError(
            f"{path}: tensor view (offset {ref.offset}, size {shape}, stride {ref.stride}) "
            f"reaches element {last} of storage {ref.storage.key}, which has {storage.size}")
    numel = int(np.prod(shape, dtype=np.int64))
    contiguous = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
    is_contiguous = all(n == 1 or s == c for n, s, c in zip(shape, ref.stride, contiguous))
    if sole_user and is_contiguous and ref.offset == 0 and numel == storage.size:
        return storage.reshape(shape)
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], shape=shape, strides=tuple(s * itemsize for s in ref.stride),
        writeable=False)
    return np.array(view, copy=True)


def _replace_refs(obj, arrays: dict[int, np.ndarray], seen: dict[int, Any]):
    if isinstance(obj, (_TensorRef, _StorageRef)):
        return arrays[id(obj)]
    if id(obj) in seen:  # keep shared containers shared, and stop on cycles
        return seen[id(obj)]
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for key in list(obj):
            obj[key] = _replace_refs(obj[key], arrays, seen)
        if getattr(obj, "__dict__", None):  # e.g. a state dict's `_metadata`
            for key, value in obj.__dict__.items():
                obj.__dict__[key] = _replace_refs(value, arrays, seen)
        return obj
    if isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_replace_refs(v, arrays, seen) for v in obj]
        return obj
    if isinstance(obj, tuple):
        result = tuple(_replace_refs(v, arrays, seen) for v in obj)
        seen[id(obj)] = result
        return result
    if isinstance(obj, (set, frozenset)):
        return obj  # tensors are unhashable in torch, so sets never hold them
    return obj


def _collect_refs(obj, out: list, seen: set):
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, _TensorRef):
        out.append(obj)
    elif isinstance(obj, _StorageRef):
        # A bare storage in the pickle (not behind a tensor) comes back as a flat array.
        out.append(_TensorRef(obj, 0, (obj.numel,), (1,), stands_for=obj))
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_refs(value, out, seen)
        for value in getattr(obj, "__dict__", {}).values():
            _collect_refs(value, out, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect_refs(value, out, seen)


def load_pickle_tree(path: str | os.PathLike) -> Any:
    """Everything the checkpoint's pickle holds, with every tensor as a numpy array.

    Containers come back as the pickle built them (dict, OrderedDict, list, tuple); dtypes are
    the storages' (bfloat16 as `ml_dtypes.bfloat16`). Raises `PtFormatError` (a `ValueError`)
    naming the file when it is not a readable torch zip checkpoint, and `UnsafePickleError` when
    the pickle refers to anything but tensors, storages and plain containers.
    """
    path = os.fspath(path)
    with _open_archive(path) as archive, open(path, "rb") as raw:
        prefix = _archive_prefix(archive, path)
        byteorder = _read_byteorder(archive, prefix, path)
        storages: dict[str, _StorageRef] = {}

        def storage_lookup(key: str, dtype: np.dtype, numel: int) -> _StorageRef:
            ref = storages.get(key)
            if ref is None:
                ref = storages[key] = _StorageRef(key, dtype, numel)
            elif ref.dtype != dtype:
                raise PtFormatError(f"{path}: storage {key} is used as both {ref.dtype} and {dtype}")
            ref.numel = max(ref.numel, numel)
            return ref

        try:
            pickled = archive.read(prefix + "data.pkl")
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise PtFormatError(f"{path}: data.pkl record is corrupted ({err})") from None
        try:
            tree = _RestrictedUnpickler(io.BytesIO(pickled), path, storage_lookup).load()
        except PtFormatError:
            raise
        except Exception as err:  # malformed pickles raise all sorts of errors
            raise PtFormatError(f"{path}: cannot unpickle data.pkl ({type(err).__name__}: {err})") \
                from None

        refs: list[_TensorRef] = []
        _collect_refs(tree, refs, set())
        by_storage: dict[str, list[_TensorRef]] = collections.defaultdict(list)
        for ref in refs:
            by_storage[ref.storage.key].append(ref)

        arrays: dict[int, np.ndarray] = {}
        for key in sorted(by_storage, key=lambda k: (len(k), k)):  # file order: "0", "1", ..., "10"
            users = by_storage[key]
            storage_ref = users[0].storage
            dtype = storage_ref.dtype
            if dtype.itemsize > 1:
                dtype = dtype.newbyteorder("<" if byteorder == "little" else ">")
            buffer = _read_record(archive, raw, f"{prefix}data/{key}",
                                  storage_ref.numel * dtype.itemsize, path)
            storage = buffer.view(dtype)
            if not dtype.isnative:
                storage = storage.astype(dtype.newbyteorder("="))
            for ref in users:
                arrays[id(ref.stands_for or ref)] = _materialize(ref, storage, len(users) == 1, path)
            del buffer, storage

    return _replace_refs(tree, arrays, {})


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `torch.save(model.state_dict())` file as a flat `{name: numpy array}` dict.

    Raises `PtFormatError` when the pickle is not a mapping of string names to tensors (use
    `load_pickle_tree` for checkpoints that nest their state dict in other containers).
    """
    path = os.fspath(path)
    tree = load_pickle_tree(path)
    if not isinstance(tree, dict):
        raise PtFormatError(f"{path}: expected a state dict (mapping of names to tensors), the "
                            f"pickle holds a {type(tree).__name__}; use load_pickle_tree")
    result: dict[str, np.ndarray] = {}
    for name, value in tree.items():
        if not isinstance(name, str):
            raise PtFormatError(f"{path}: state dict key {name!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise PtFormatError(f"{path}: state dict entry {name!r} is a {type(value).__name__}, "
                                f"not a tensor; use load_pickle_tree for nested checkpoints")
        result[name] = value
    return result
