"""Write the small `torch.save` files under tests/data/torch/ that test_pt_reader.py reads.

The reader must agree with what torch itself writes, so these files come from real torch, not
from the hand-written archives in the tests. torch is never a dependency of glide-jax: run this
in a separate virtual environment, from the repository root:

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchenv/bin/python tests/data/make_torch_fixtures.py

It rewrites every file in tests/data/torch/ (deterministically, apart from zip timestamps) and
prints their sizes. Commit the result.

Files, each state in both containers (`NAME.zip.pt`: the default zip format; `NAME.legacy.pt`:
`_use_new_zipfile_serialization=False`):
  state      a flat state dict: a tiny module's own state_dict (with its `_metadata`) plus float32,
             float16, bfloat16, int64, bool tensors, a strided (non-contiguous) view, a transposed
             view and a storage-offset view sharing one storage, an empty and a 0-d tensor
  nested     nested OrderedDicts, a list and a tuple, one tensor referenced twice, plain numbers
  expected_state.npz, expected_nested.npz
             the values, keyed by the path of each tensor in the tree ("a/b/0")
Hostile files, under hostile/ (the reader must refuse every one and run nothing):
  system.*, exec.*, eval.*          a `__reduce__` payload (os.system / builtins.exec /
                                    builtins.eval) that would create the file `pwned_<kind>` in the
                                    current directory
  offset_past_end.*                 a view whose storage offset lies past its storage's end
  numel_past_end.*                  a storage that claims more elements than its data holds
  truncated_half.*, truncated_tail.*  the file cut at half and 7 bytes before its end
  missing_record.zip.pt             a zip without one of its data/<key> records
  module_pid.legacy.pt              a legacy persistent id of kind "module" (a pickled class)
  empty.pt                          zero bytes
"""

from __future__ import annotations

import collections
import io
import os
import pickletools
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "torch"
HOSTILE = OUT / "hostile"


def save(obj, path: Path, legacy: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def both(obj, stem: str, directory: Path = OUT) -> list[Path]:
    return [save(obj, directory / f"{stem}.zip.pt", legacy=False),
            save(obj, directory / f"{stem}.legacy.pt", legacy=True)]


def flatten(tree, prefix="") -> dict[str, np.ndarray]:
    out = {}
    if isinstance(tree, torch.Tensor):
        value = tree.detach()
        # npz has no bfloat16: store its bits, the test views them back
        out[prefix] = value.view(torch.int16).numpy() if value.dtype == torch.bfloat16 \
            else value.numpy()
    elif isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}/{i}" if prefix else str(i)))
    return out


def make_state() -> collections.OrderedDict:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3),
                                 torch.nn.Linear(3, 2))
    state = module.state_dict()  # an OrderedDict carrying `_metadata`, as real checkpoints do
    grid = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state["grid"] = grid
    state["grid_strided"] = grid[:, ::2]  # non-contiguous, same storage
    state["grid_transposed"] = grid.t()
    state["grid_rows"] = grid[2:]  # storage offset 12
    state["f16"] = torch.randn(5).half()
    state["bf16"] = torch.randn(3, 2).bfloat16()
    state["i64"] = torch.tensor([0, -1, 2**62 + 3, -(2**63)], dtype=torch.int64)
    state["bool"] = torch.tensor([True, False, True])
    state["empty"] = torch.zeros(0, 3)
    state["scalar"] = torch.tensor(3.25)
    return state


def make_nested() -> collections.OrderedDict:
    torch.manual_seed(1)
    shared = torch.randn(2, 3)
    return collections.OrderedDict([
        ("model", collections.OrderedDict([
            ("encoder", collections.OrderedDict([("w", shared), ("b", torch.zeros(3))])),
            ("head", collections.OrderedDict([("w", torch.randn(3, 1).half())])),
        ])),
        ("ema", [shared, (torch.arange(4), "tag")]),
        ("step", 1234),
        ("lr", 2.5e-4),
    ])


class Payload:
    """What an attacker pickles: unpickling calls `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def pickle_span(path: Path) -> tuple[int, bytes]:
    """(start, bytes) of the pickle that holds the tensors: data.pkl, or the legacy file's 4th."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            return -1, zf.read(name)
    data = path.read_bytes()
    start = 0
    for _ in range(3):  # magic number, protocol version, sys_info
        start = end_of_pickle(data, start)
    return start, data[start:end_of_pickle(data, start)]


def end_of_pickle(data: bytes, start: int) -> int:
    for op, _arg, pos in pickletools.genops(io.BytesIO(data[start:])):
        if op.name == "STOP":
            return start + pos + 1
    raise ValueError("no STOP")


def patch_pickle(path: Path, out: Path, edit) -> Path:
    """Write `out`: `path` with its tensor pickle's bytes passed through `edit` (same length)."""
    start, pkl = pickle_span(path)
    new = edit(pkl)
    assert len(new) == len(pkl)
    if start < 0:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                dst.writestr(info, new if info.filename.endswith("/data.pkl")
                             else src.read(info.filename))
    else:
        data = path.read_bytes()
        out.write_bytes(data[:start] + new + data[start + len(pkl):])
    return out


def set_int_after_persid(pkl: bytes, which: int, value: int) -> bytes:
    """Replace the `which`-th small int after the first storage persistent id (0: the storage
    offset of `_rebuild_tensor_v2`'s arguments; in the legacy id tuple, the numel comes before)."""
    ops = list(pickletools.genops(io.BytesIO(pkl)))
    first = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    return _set_nth_int(pkl, ops[first + 1:], which, value)


def set_int_before_persid(pkl: bytes, which_from_end: int, value: int) -> bytes:
    ops = list(pickletools.genops(io.BytesIO(pkl)))
    first = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    return _set_nth_int(pkl, list(reversed(ops[:first])), which_from_end, value)


def _set_nth_int(pkl: bytes, ops, which: int, value: int) -> bytes:
    ints = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BININT1", "BININT2", "BININT")]
    op, _arg, pos = ints[which]
    width = {"BININT1": 1, "BININT2": 2, "BININT": 4}[op.name]
    assert value < 256 ** width // (2 if width == 4 else 1)
    return pkl[:pos + 1] + value.to_bytes(width, "little", signed=width == 4) \
        + pkl[pos + 1 + width:]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    HOSTILE.mkdir(exist_ok=True)
    for old in list(OUT.glob("*.pt")) + list(HOSTILE.glob("*.pt")):
        old.unlink()

    for stem, tree in (("state", make_state()), ("nested", make_nested())):
        both(tree, stem)
        np.savez(OUT / f"expected_{stem}.npz", **flatten(tree))
        # torch's own reader must agree with the expectations, both formats
        for path in (OUT / f"{stem}.zip.pt", OUT / f"{stem}.legacy.pt"):
            back = flatten(torch.load(path, weights_only=True))
            for key, value in flatten(tree).items():
                assert np.array_equal(back[key], value), (path, key)

    for kind, func, arg in (("system", os.system, "touch pwned_system"),
                            ("exec", exec, "open('pwned_exec', 'w').close()"),
                            ("eval", eval, "open('pwned_eval', 'w').close()")):
        both({"w": torch.zeros(2), "payload": Payload(func, arg)}, kind, HOSTILE)

    one = collections.OrderedDict([("w", torch.arange(6, dtype=torch.float32)[2:])])  # offset 2
    for src in both(one, "one", HOSTILE):
        fmt = src.name.split(".")[1]
        # zip: ids are ('storage', type, key, location, numel), then offset; legacy adds a view
        # metadata None after numel. Either way the 1st int after the id is the offset ...
        patch_pickle(src, HOSTILE / f"offset_past_end.{fmt}.pt",
                     lambda p: set_int_after_persid(p, 0, 200))
        # ... and the id's numel is the last int before BINPERSID (the key is a string).
        patch_pickle(src, HOSTILE / f"numel_past_end.{fmt}.pt",
                     lambda p: set_int_before_persid(p, 0, 60))
        data = src.read_bytes()
        (HOSTILE / f"truncated_half.{fmt}.pt").write_bytes(data[:len(data) // 2])
        (HOSTILE / f"truncated_tail.{fmt}.pt").write_bytes(data[:-7])
    src = HOSTILE / "one.zip.pt"
    with zipfile.ZipFile(src) as zin, \
            zipfile.ZipFile(HOSTILE / "missing_record.zip.pt", "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info.filename))
    for path in HOSTILE.glob("one.*.pt"):
        path.unlink()

    # A legacy persistent id of kind "module": torch.load would import and check the class.
    save({"net": torch.nn.Linear}, HOSTILE / "module_pid.legacy.pt", legacy=True)
    (HOSTILE / "empty.pt").write_bytes(b"")

    for path in sorted(OUT.rglob("*")):
        if path.is_file() and path.suffix in (".pt", ".npz"):
            print(f"{path.stat().st_size:6d}  {path.relative_to(OUT.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
