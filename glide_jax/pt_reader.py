"""Read PyTorch `torch.save` checkpoints into numpy without importing torch.

Both formats torch writes are read:
- the zip format (the default since torch 1.6): a zip archive holding `<archive>/data.pkl` (the
  pickled object, where every storage is a persistent id), `<archive>/data/<key>` (the raw bytes
  of each storage), `<archive>/byteorder` and `<archive>/version`;
- the legacy format (`_use_new_zipfile_serialization=False`, and everything before torch 1.6):
  five pickles in a row (a magic number, the protocol version 1001, a `sys_info` dict with the
  byte order, the object, the sorted list of storage keys), then each storage in that order as
  an int64 element count and its raw bytes.
The still older tar format (torch < 0.4) is refused with advice.

A pickle can run arbitrary code, so the object's pickle is read with an unpickler that resolves
only the handful of globals a state dict needs (tensor and parameter rebuild functions, storage
type names, `collections.OrderedDict`); every other global is refused before anything is called.
The legacy format's small header pickles are read with no globals at all.

Unpickling produces lightweight tensor references; storages are read afterwards, once each,
straight from the file into a numpy buffer, and every tensor is cut out of its storage. A tensor
that is the sole, contiguous user of its whole storage takes the buffer without a copy, which
keeps the peak memory of a ~1.5 GB checkpoint close to its size.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["PtFormatError", "UnsafePickleError", "load_pickle_tree", "load_state_dict"]


class PtFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint; the message names the file."""


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
    # No __dict__: a pickle's BUILD opcode cannot overwrite these fields with something else.
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel


class _TensorRef:
    """A tensor as the pickle describes it; materialised once all storages are known."""

    __slots__ = ("storage", "offset", "shape", "stride", "stands_for")

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
    def __init__(self, file, path: str, storage_lookup, legacy: bool = False):
        super().__init__(file)
        self._path = path
        self._legacy = legacy
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
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if isinstance(kind, bytes):  # files pickled by Python 2 torch carry byte strings
            kind = kind.decode("ascii", "replace")
        if kind == "module":
            raise UnsafePickleError(
                f"{self._path}: the pickle holds a whole module class (a legacy 'module' "
                f"persistent id), which only torch.load can rebuild by importing code; save the "
                f"model's state_dict() instead (nothing was executed)")
        if self._legacy:
            # ('storage', type, key, location, numel, view_metadata); view_metadata is None
            # for everything torch has written since 0.4 dropped storage views.
            if not (kind == "storage" and len(pid) == 6):
                raise PtFormatError(f"{self._path}: unsupported persistent id {pid!r} in the "
                                    f"pickle (expected ('storage', type, key, location, numel, "
                                    f"view))")
            if pid[5] is not None:
                raise PtFormatError(f"{self._path}: storage {pid[2]!r} is a view of another "
                                    f"storage (torch < 0.4); re-save the file with a newer torch")
            pid = pid[:5]
        elif not (kind == "storage" and len(pid) == 5):
            raise PtFormatError(f"{self._path}: unsupported persistent id {pid!r} in the pickle "
                                f"(expected ('storage', type, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise PtFormatError(f"{self._path}: storage {key!r} has unknown type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise PtFormatError(f"{self._path}: malformed storage id {pid!r}")
        return self._storage_lookup(key, storage_type.dtype, numel)


def _sniff(path: str) -> str:
    """'zip' or 'legacy', or a PtFormatError saying what the file is instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise PtFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PtFormatError(f"{path}: is a directory, expected a .pt file") from None
    if not head:
        raise PtFormatError(f"{path}: file is empty (0 bytes); an interrupted download or save?")
    if zipfile.is_zipfile(path):
        return "zip"
    if head.startswith(b"PK"):
        raise PtFormatError(f"{path}: zip archive is truncated or corrupted (no readable central "
                            f"directory)")
    if head[:1] == b"\x80" and _is_legacy_torch_file(path):
        return "legacy"
    if len(head) == 512 and head[257:262] == b"ustar":
        raise PtFormatError(
            f"{path}: the tar-based PyTorch serialization of torch < 0.4 is not supported; re-save "
            f"it with a newer torch: torch.save(torch.load(old_path), new_path)")
    raise PtFormatError(f"{path}: not a PyTorch checkpoint (neither the zip archive torch.save "
                        f"writes nor its legacy pickle format)")


class _NoGlobalsUnpickler(pickle.Unpickler):
    """For the legacy format's header and key-list pickles, which hold only plain values."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        raise UnsafePickleError(f"{self._path}: refusing to load global {module}.{name} from a "
                                f"legacy header pickle, which holds only plain values (nothing "
                                f"was executed)")

    def persistent_load(self, pid):
        raise PtFormatError(f"{self._path}: unexpected persistent id {pid!r} in a legacy header")


def _is_legacy_torch_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return _NoGlobalsUnpickler(f, path).load() == _LEGACY_MAGIC
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


class _Storages:
    """The storages the pickle names, by key, each with the largest element count asked for."""

    def __init__(self, path: str):
        self.path = path
        self.refs: dict[str, _StorageRef] = {}

    def __call__(self, key: str, dtype: np.dtype, numel: int) -> _StorageRef:
        ref = self.refs.get(key)
        if ref is None:
            ref = self.refs[key] = _StorageRef(key, dtype, numel)
        elif ref.dtype != dtype:
            raise PtFormatError(f"{self.path}: storage {key} is used as both {ref.dtype} and {dtype}")
        ref.numel = max(ref.numel, numel)
        return ref


def _unpickle(file, path: str, storages: _Storages, what: str, legacy: bool = False) -> Any:
    try:
        return _RestrictedUnpickler(file, path, storages, legacy).load()
    except PtFormatError:
        raise
    except Exception as err:  # malformed or cut pickles raise all sorts of errors
        raise PtFormatError(f"{path}: cannot unpickle {what} ({type(err).__name__}: {err}); the "
                            f"file is truncated or corrupted") from None


def _read_zip(path: str, archive: zipfile.ZipFile, raw):
    prefix = _archive_prefix(archive, path)
    byteorder = _read_byteorder(archive, prefix, path)
    storages = _Storages(path)
    try:
        pickled = archive.read(prefix + "data.pkl")
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise PtFormatError(f"{path}: data.pkl record is corrupted ({err})") from None
    tree = _unpickle(io.BytesIO(pickled), path, storages, "data.pkl")

    def read(key: str, nbytes: int) -> np.ndarray:
        return _read_record(archive, raw, f"{prefix}data/{key}", nbytes, path)

    return tree, storages, byteorder, read


def _load_plain(f, path: str, what: str) -> Any:
    try:
        return _NoGlobalsUnpickler(f, path).load()
    except PtFormatError:
        raise
    except Exception as err:
        raise PtFormatError(f"{path}: cannot read the legacy format's {what} ({type(err).__name__}: "
                            f"{err}); the file is truncated or corrupted") from None


def _read_legacy(path: str, f):
    if _load_plain(f, path, "magic number") != _LEGACY_MAGIC:
        raise PtFormatError(f"{path}: bad magic number for the legacy torch format")
    version = _load_plain(f, path, "protocol version")
    if version != 1001:
        raise PtFormatError(f"{path}: legacy torch format protocol {version!r}, only 1001 exists")
    sys_info = _load_plain(f, path, "sys_info")
    if not (isinstance(sys_info, dict) and isinstance(sys_info.get("little_endian"), bool)):
        raise PtFormatError(f"{path}: legacy sys_info {sys_info!r} does not say the byte order")
    byteorder = "little" if sys_info["little_endian"] else "big"
    storages = _Storages(path)
    tree = _unpickle(f, path, storages, "the object pickle", legacy=True)
    keys = _load_plain(f, path, "storage key list")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise PtFormatError(f"{path}: the legacy storage key list is {type(keys).__name__}, "
                            f"expected a list of strings")
    if sorted(keys) != sorted(storages.refs):
        raise PtFormatError(f"{path}: the pickle uses storages {sorted(storages.refs)} but the "
                            f"file holds data for {sorted(keys)}")

    # Each record is an int64 element count and the bytes; find them all before reading any, so
    # a cut file fails before gigabytes are read.
    size = os.fstat(f.fileno()).st_size
    where: dict[str, int] = {}
    position = f.tell()
    for key in keys:
        ref = storages.refs[key]
        f.seek(position)
        head = f.read(8)
        if len(head) != 8:
            raise PtFormatError(f"{path}: truncated: the file ends before storage {key}'s record "
                                f"(at byte {position} of {size})")
        count = int.from_bytes(head, byteorder, signed=True)
        if count != ref.numel:
            raise PtFormatError(f"{path}: storage {key}'s record holds {count} elements, the "
                                f"pickle says {ref.numel}")
        end = position + 8 + count * ref.dtype.itemsize
        if end > size:
            raise PtFormatError(f"{path}: truncated: storage {key} needs bytes {position + 8} to "
                                f"{end}, the file has {size}")
        where[key], position = position + 8, end

    def read(key: str, nbytes: int) -> np.ndarray:
        buffer = np.empty(nbytes, dtype=np.uint8)
        f.seek(where[key])
        got = f.readinto(memoryview(buffer))
        if got != nbytes:
            raise PtFormatError(f"{path}: storage {key} is truncated ({got} of {nbytes} bytes)")
        return buffer

    return tree, storages, byteorder, read


def load_pickle_tree(path: str | os.PathLike) -> Any:
    """Everything the checkpoint's pickle holds, with every tensor as a numpy array.

    Reads the zip format and the legacy (non-zip) format. Containers come back as the pickle
    built them (dict, OrderedDict, list, tuple); dtypes are the storages' (bfloat16 as
    `ml_dtypes.bfloat16`). Raises `PtFormatError` (a `ValueError`) naming the file when it is
    not a readable torch checkpoint, and `UnsafePickleError` when the pickle refers to anything
    but tensors, storages and plain containers.
    """
    path = os.fspath(path)
    kind = _sniff(path)
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        if kind == "zip":
            try:
                archive = stack.enter_context(zipfile.ZipFile(path))
            except zipfile.BadZipFile as err:
                raise PtFormatError(f"{path}: zip archive is corrupted ({err})") from None
            tree, storages, byteorder, read = _read_zip(path, archive, raw)
        else:
            tree, storages, byteorder, read = _read_legacy(path, raw)
        arrays = _read_tensors(tree, storages, byteorder, read, path)
    return _replace_refs(tree, arrays, {})


def _read_tensors(tree, storages: _Storages, byteorder: str, read, path: str) -> dict[int, np.ndarray]:
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
        buffer = read(key, storage_ref.numel * dtype.itemsize)
        storage = buffer.view(dtype)
        if not dtype.isnative:
            storage = storage.astype(dtype.newbyteorder("="))
        for ref in users:
            arrays[id(ref.stands_for or ref)] = _materialize(ref, storage, len(users) == 1, path)
        del buffer, storage
    return arrays


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
