"""The torch-free `.pt` reader: golden checkpoints, hand-written archives, hostile input."""

import collections
import io
import json
import pickle
import pickletools
import re
import shutil
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from glide_jax.pt_reader import PtFormatError, UnsafePickleError, load_pickle_tree, load_state_dict

# -- a minimal torch.save writer, so the tests need no torch ------------------------------------


class _Global:
    """Pickled as the GLOBAL `module name` without the module having to exist here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists the callable be callable
        raise AssertionError("writer-side placeholder, never called")


class _Storage:
    def __init__(self, key, type_name, values: np.ndarray):
        self.key, self.type_name, self.values = key, type_name, np.ascontiguousarray(values).ravel()


class _Tensor:
    def __init__(self, storage, offset, size, stride, parameter=False):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.parameter = parameter

    def __reduce__(self):
        rebuilt = (_Global("torch._utils", "_rebuild_tensor_v2"),
                   (self.storage, self.offset, self.size, self.stride, False,
                    collections.OrderedDict()))
        if not self.parameter:
            return rebuilt
        return (_Global("torch._utils", "_rebuild_parameter"),
                (_TensorReduce(rebuilt), True, collections.OrderedDict()))


class _TensorReduce:
    def __init__(self, reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


class _Call:
    """An arbitrary `module.name(*args)` call in the pickle: what an attacker would write."""

    def __init__(self, module, name, args):
        self.module, self.name, self.args = module, name, args

    def __reduce__(self):
        return (_Global(self.module, self.name), self.args)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_marker_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_marker_global

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _Global("torch", obj.type_name), obj.key, "cpu", obj.values.size)
        return None


def write_pt(path, obj, storages, *, byteorder="little", archive="archive", skip_records=(),
             storage_bytes=None):
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", buffer.getvalue())
        zf.writestr(f"{archive}/byteorder", byteorder)
        zf.writestr(f"{archive}/version", "3\n")
        for storage in storages:
            if storage.key in skip_records:
                continue
            data = storage.values
            if byteorder == "big" and data.dtype.itemsize > 1:
                data = data.astype(data.dtype.newbyteorder(">"))
            raw = data.tobytes() if storage_bytes is None else storage_bytes
            zf.writestr(f"{archive}/data/{storage.key}", raw)
    return path


def contiguous(storage, shape, offset=0, parameter=False):
    strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    return _Tensor(storage, offset, shape, strides, parameter=parameter)


# -- golden checkpoints from the original PyTorch GLIDE ------------------------------------------


def test_every_golden_checkpoint_loads(golden):
    paths = sorted(golden.glob("*.pt"))
    assert len(paths) >= 7
    for path in paths:
        state = load_state_dict(path)
        assert state, path
        assert all(isinstance(v, np.ndarray) for v in state.values())
        assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f"), path


def test_base_checkpoint_shapes_follow_its_config(golden):
    from glide_jax.config import ModelConfig
    from glide_jax.convert import expected_state_dict
    from glide_jax.unet import param_shapes

    config = json.loads((golden / "base.config.json").read_text())
    state = load_state_dict(golden / "base.pt")
    # Every key the config's network has, none lost or invented by the reader.
    assert set(state) == set(expected_state_dict(param_shapes(ModelConfig.from_dict(config))))
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
    width, ch = config["xf_width"], config["num_channels"]
    assert state["positional_embedding"].shape == (config["text_ctx"], width)
    assert state["token_embedding.weight"].shape == (ModelConfig().n_vocab, width)
    assert state["input_blocks.0.0.weight"].shape == (ch, 3, 3, 3)
    assert state["out.2.weight"].shape == (6, ch, 3, 3)
    assert state["time_embed.0.weight"].shape == (4 * ch, ch)
    assert state["transformer_proj.weight"].shape == (4 * ch, width)


def test_fp16_checkpoint_is_base_rounded_to_half(golden):
    full = load_state_dict(golden / "base.pt")
    mixed = load_state_dict(golden / "base_fp16.pt")
    assert set(full) == set(mixed)
    dtypes = collections.Counter(v.dtype for v in mixed.values())
    assert dtypes[np.dtype(np.float16)] > 100 and dtypes[np.dtype(np.float32)] > 100
    for name, value in mixed.items():
        assert value.shape == full[name].shape, name
        np.testing.assert_array_equal(value, full[name].astype(value.dtype), err_msg=name)
    # The same tensors are half precision in the released checkpoints (per the golden manifest).
    manifest = json.loads((golden / "manifests_full_size.json").read_text())["base"]["keys"]
    common = [name for name in mixed if name in manifest]
    assert len(common) > 200
    for name in common:
        assert str(mixed[name].dtype) == manifest[name][1], name


# -- hand-written archives -----------------------------------------------------------------------


@pytest.mark.parametrize("type_name,dtype", [
    ("FloatStorage", np.float32), ("HalfStorage", np.float16), ("DoubleStorage", np.float64),
    ("BFloat16Storage", ml_dtypes.bfloat16), ("LongStorage", np.int64), ("IntStorage", np.int32),
    ("BoolStorage", np.bool_), ("ByteStorage", np.uint8), ("CharStorage", np.int8),
    ("ShortStorage", np.int16),
])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_storage_dtypes_and_byteorder(tmp_path, type_name, dtype, byteorder):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(12) * 50).astype(dtype)
    if dtype == np.int64:
        values[0] = np.iinfo(np.int64).max  # all eight bytes matter
    storage = _Storage("0", type_name, values)
    path = write_pt(tmp_path / "t.pt", {"w": contiguous(storage, (3, 4))}, [storage],
                    byteorder=byteorder)
    result = load_state_dict(path)["w"]
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    np.testing.assert_array_equal(result, values.reshape(3, 4))


def test_views_offsets_and_shared_storage(tmp_path):
    base = np.arange(30, dtype=np.float32)
    storage = _Storage("7", "FloatStorage", base)
    tree = collections.OrderedDict([
        ("whole", contiguous(storage, (5, 6))),
        ("transposed", _Tensor(storage, 0, (6, 5), (1, 6))),
        ("row_slice", contiguous(storage, (2, 6), offset=12)),
        ("column", _Tensor(storage, 2, (5,), (6,))),
        ("scalar", _Tensor(storage, 29, (), ())),
        ("broadcast", _Tensor(storage, 4, (3, 2), (0, 1))),
        ("empty", _Tensor(storage, 0, (0, 6), (6, 1))),
    ])
    state = load_state_dict(write_pt(tmp_path / "v.pt", tree, [storage]))
    grid = base.reshape(5, 6)
    np.testing.assert_array_equal(state["whole"], grid)
    np.testing.assert_array_equal(state["transposed"], grid.T)
    np.testing.assert_array_equal(state["row_slice"], grid[2:4])
    np.testing.assert_array_equal(state["column"], grid[:, 2])
    assert state["scalar"].shape == () and state["scalar"] == 29.0
    np.testing.assert_array_equal(state["broadcast"], [[4, 5], [4, 5], [4, 5]])
    assert state["empty"].shape == (0, 6)
    # Views of one storage come back as independent arrays.
    state["whole"][0, 0] = -1.0
    assert state["transposed"][0, 0] == 0.0 and state["broadcast"].flags.writeable


def test_two_storages_and_parameters(tmp_path):
    a = _Storage("0", "FloatStorage", np.linspace(-1, 1, 6, dtype=np.float32))
    b = _Storage("1", "LongStorage", np.array([3, 1, 4], dtype=np.int64))
    tree = {"weight": contiguous(a, (2, 3), parameter=True), "steps": contiguous(b, (3,))}
    state = load_state_dict(write_pt(tmp_path / "p.pt", tree, [a, b]))
    np.testing.assert_array_equal(state["weight"], a.values.reshape(2, 3))
    np.testing.assert_array_equal(state["steps"], [3, 1, 4])


def test_nested_tree(tmp_path):
    s = _Storage("0", "FloatStorage", np.arange(8, dtype=np.float32))
    t = contiguous(s, (2, 4))
    tree = {"model": collections.OrderedDict([("a", t), ("b", contiguous(s, (4,), offset=4))]),
            "step": 12, "history": [t, (contiguous(s, (1,)), "x")], "lr": 1e-4}
    path = write_pt(tmp_path / "n.pt", tree, [s])
    loaded = load_pickle_tree(path)
    assert isinstance(loaded["model"], collections.OrderedDict)
    np.testing.assert_array_equal(loaded["model"]["a"], np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(loaded["model"]["b"], [4, 5, 6, 7])
    assert loaded["step"] == 12 and loaded["lr"] == 1e-4
    assert loaded["history"][0] is loaded["model"]["a"]  # one tensor pickled twice stays one
    assert loaded["history"][1][1] == "x" and loaded["history"][1][0].tolist() == [0.0]
    with pytest.raises(PtFormatError, match=r"n\.pt.*'model'.*load_pickle_tree"):
        load_state_dict(path)


def test_bare_storage_and_self_referencing_dict(tmp_path):
    s = _Storage("0", "IntStorage", np.array([5, 6, 7], dtype=np.int32))
    tree = {"weight": contiguous(s, (3,)), "raw": s}
    tree["me"] = tree
    loaded = load_pickle_tree(write_pt(tmp_path / "c.pt", tree, [s]))
    assert loaded["me"] is loaded
    np.testing.assert_array_equal(loaded["raw"], [5, 6, 7])
    np.testing.assert_array_equal(loaded["weight"], [5, 6, 7])
    assert loaded["raw"].dtype == np.int32


def test_non_mapping_state_dict_is_refused(tmp_path):
    s = _Storage("0", "FloatStorage", np.zeros(2, np.float32))
    path = write_pt(tmp_path / "l.pt", [contiguous(s, (2,))], [s])
    assert len(load_pickle_tree(path)) == 1
    with pytest.raises(PtFormatError, match=r"l\.pt.*list"):
        load_state_dict(path)


# -- hostile and broken input --------------------------------------------------------------------


@pytest.mark.parametrize("module,name,make_args", [
    ("os", "system", lambda marker: (f"touch {marker}",)),
    ("posix", "system", lambda marker: (f"touch {marker}",)),
    ("builtins", "eval", lambda marker: (f"open({str(marker)!r}, 'w').close()",)),
    ("subprocess", "Popen", lambda marker: (["touch", str(marker)],)),
])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, module, name, make_args):
    marker = tmp_path / "pwned"
    s = _Storage("0", "FloatStorage", np.zeros(2, np.float32))
    tree = {"w": contiguous(s, (2,)), "payload": _Call(module, name, make_args(marker))}
    path = write_pt(tmp_path / "evil.pt", tree, [s])
    with pytest.raises(UnsafePickleError, match=rf"evil\.pt.*{module}\.{name}"):
        load_state_dict(path)
    assert not marker.exists()


class _TensorWithState(_Tensor):
    """A tensor whose pickle ends with BUILD, trying to swap the rebuilt tensor's storage."""

    def __reduce__(self):
        return super().__reduce__() + ({"storage": "not a storage", "offset": -5},)


def test_build_opcode_cannot_rewrite_a_tensor(tmp_path):
    s = _Storage("0", "FloatStorage", np.zeros(2, np.float32))
    path = write_pt(tmp_path / "built.pt", {"w": _TensorWithState(s, 0, (2,), (1,))}, [s])
    with zipfile.ZipFile(path) as zf:
        ops = [op.name for op, _, _ in pickletools.genops(zf.read("archive/data.pkl"))]
    assert "BUILD" in ops
    with pytest.raises(PtFormatError, match=r"built\.pt: cannot unpickle data\.pkl"):
        load_state_dict(path)


def test_truncated_golden_checkpoint(golden, tmp_path):
    data = (golden / "base.pt").read_bytes()
    for fraction in (0.5, 0.999):
        path = tmp_path / f"cut_{fraction}.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(PtFormatError, match=rf"cut_{fraction}\.pt.*truncated"):
            load_state_dict(path)


def test_corrupted_storage_bytes_fail_the_crc(golden, tmp_path):
    path = tmp_path / "flipped.pt"
    shutil.copy(golden / "clip_image_enc.pt", path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("clip_image_enc/data/0")
    data = bytearray(path.read_bytes())
    header_len = 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + header_len + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PtFormatError, match=r"flipped\.pt.*data/0.*CRC"):
        load_state_dict(path)


def test_random_non_zip_file(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(PtFormatError, match=r"noise\.pt.*not a PyTorch checkpoint"):
        load_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(PtFormatError, match=r"absent\.pt.*no such file"):
        load_state_dict(tmp_path / "absent.pt")
    with pytest.raises(PtFormatError, match=r"is a directory"):
        load_state_dict(tmp_path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    with pytest.raises(PtFormatError, match=r"other\.zip.*no data\.pkl"):
        load_state_dict(path)


def test_missing_storage_record(tmp_path):
    s = _Storage("3", "FloatStorage", np.zeros(4, np.float32))
    path = write_pt(tmp_path / "m.pt", {"w": contiguous(s, (4,))}, [s], skip_records=("3",))
    with pytest.raises(PtFormatError, match=r"m\.pt.*archive/data/3 is missing"):
        load_state_dict(path)


def test_short_storage_record(tmp_path):
    s = _Storage("0", "FloatStorage", np.zeros(4, np.float32))
    path = write_pt(tmp_path / "s.pt", {"w": contiguous(s, (4,))}, [s], storage_bytes=b"\0" * 8)
    with pytest.raises(PtFormatError, match=r"s\.pt.*8 bytes.*needs 16"):
        load_state_dict(path)


def test_view_outside_its_storage_is_refused(tmp_path):
    # as_strided would happily read past the buffer: the bounds are checked first.
    s = _Storage("0", "FloatStorage", np.zeros(4, np.float32))
    path = write_pt(tmp_path / "oob.pt", {"w": _Tensor(s, 2, (2, 2), (2, 1))}, [s])
    with pytest.raises(PtFormatError, match=r"oob\.pt.*reaches element 5.*has 4"):
        load_state_dict(path)


def test_legacy_file_cut_after_its_header(tmp_path):
    path = tmp_path / "old.pt"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
    with pytest.raises(PtFormatError, match=r"old\.pt.*legacy format's sys_info.*truncated"):
        load_state_dict(path)


# -- files torch 2.13 wrote (tests/data/make_torch_fixtures.py), in both of its formats ----------

TORCH_DATA = Path(__file__).resolve().parent / "data" / "torch"
FORMATS = ["zip", "legacy"]


def _flatten(tree, prefix=""):
    """The fixture script's flattening: tensor paths like "model/encoder/w" -> arrays."""
    out = {}
    if isinstance(tree, np.ndarray):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}/{i}" if prefix else str(i)))
    return out


def _assert_matches_expected(loaded: dict, expected_npz):
    with np.load(expected_npz) as expected:
        assert list(loaded) == list(expected.files)  # same entries, in the file's order
        for key in expected.files:
            want, got = expected[key], loaded[key]
            if got.dtype == ml_dtypes.bfloat16:  # npz has no bfloat16: the script stored bits
                got = got.view(np.int16)
            assert got.dtype == want.dtype and got.shape == want.shape, key
            np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_written_state_dict(fmt):
    path = TORCH_DATA / f"state.{fmt}.pt"
    assert (path.read_bytes()[:2] == b"PK") == (fmt == "zip")  # the fixture is the format named
    state = load_state_dict(path)
    _assert_matches_expected(state, TORCH_DATA / "expected_state.npz")
    assert state["grid_strided"].shape == (4, 3) and state["grid_rows"].shape == (2, 6)
    assert state["empty"].shape == (0, 3) and state["scalar"].shape == ()
    assert state["bf16"].dtype == ml_dtypes.bfloat16 and state["i64"].dtype == np.int64
    # Views sharing one storage come back as independent arrays.
    state["grid"][0, 0] = -1.0
    assert state["grid_transposed"][0, 0] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_written_nested_tree(fmt):
    tree = load_pickle_tree(TORCH_DATA / f"nested.{fmt}.pt")
    assert isinstance(tree["model"]["encoder"], collections.OrderedDict)
    assert tree["step"] == 1234 and tree["lr"] == 2.5e-4 and tree["ema"][1][1] == "tag"
    assert tree["ema"][0] is tree["model"]["encoder"]["w"]  # one tensor saved twice stays one
    _assert_matches_expected(_flatten(tree), TORCH_DATA / "expected_nested.npz")


def test_both_formats_read_the_same():
    for stem in ("state", "nested"):
        a = _flatten(load_pickle_tree(TORCH_DATA / f"{stem}.zip.pt"))
        b = _flatten(load_pickle_tree(TORCH_DATA / f"{stem}.legacy.pt"))
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


HOSTILE = [
    ("system.zip.pt", UnsafePickleError, r"(posix|os)\.system.*nothing was executed"),
    ("system.legacy.pt", UnsafePickleError, r"(posix|os)\.system.*nothing was executed"),
    ("exec.zip.pt", UnsafePickleError, r"(__builtin__|builtins)\.exec.*nothing was executed"),
    ("exec.legacy.pt", UnsafePickleError, r"(__builtin__|builtins)\.exec.*nothing was executed"),
    ("eval.zip.pt", UnsafePickleError, r"(__builtin__|builtins)\.eval.*nothing was executed"),
    ("eval.legacy.pt", UnsafePickleError, r"(__builtin__|builtins)\.eval.*nothing was executed"),
    ("module_pid.legacy.pt", UnsafePickleError, r"torch\.nn\.modules\.linear\.Linear"),
    ("offset_past_end.zip.pt", PtFormatError, r"offset 200.*reaches element 203.*has 6"),
    ("offset_past_end.legacy.pt", PtFormatError, r"offset 200.*reaches element 203.*has 6"),
    ("numel_past_end.zip.pt", PtFormatError, r"data/0 has 24 bytes, the pickle needs 240"),
    ("numel_past_end.legacy.pt", PtFormatError, r"record holds 6 elements, the pickle says 60"),
    ("truncated_half.zip.pt", PtFormatError, r"truncated or corrupted"),
    ("truncated_half.legacy.pt", PtFormatError, r"cannot unpickle.*truncated"),
    ("truncated_tail.zip.pt", PtFormatError, r"truncated or corrupted"),
    ("truncated_tail.legacy.pt", PtFormatError, r"truncated: storage \d+ needs bytes 352 to 376, the "
                                                r"file has 369"),
    ("missing_record.zip.pt", PtFormatError, r"record one\.zip/data/0 is missing"),
    ("empty.pt", PtFormatError, r"empty \(0 bytes\)"),
]


def test_every_hostile_fixture_has_a_case():
    assert sorted(p.name for p in (TORCH_DATA / "hostile").iterdir()) == sorted(n for n, _, _ in HOSTILE)


@pytest.mark.parametrize("name,error,message", HOSTILE, ids=[n for n, _, _ in HOSTILE])
def test_hostile_torch_file_is_refused(tmp_path, monkeypatch, name, error, message):
    # The payloads would create pwned_<kind> in the working directory.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=rf"{re.escape(name)}: .*{message}"):
        load_pickle_tree(TORCH_DATA / "hostile" / name)
    with pytest.raises(error, match=re.escape(name)):
        load_state_dict(TORCH_DATA / "hostile" / name)
    assert list(tmp_path.iterdir()) == []
