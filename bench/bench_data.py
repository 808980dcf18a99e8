"""Decode + augment throughput of the training data loader: the grain pipeline
(`glide_jax.data.DataLoader`) against the hand-written loader it replaced, on the same images.

    PYTHONPATH=. python bench/bench_data.py --workers 0,1,2 --batches 12 --json /tmp/bench_data.json

The old loader is not part of the library any more: it is read from git (`git show
<commit>:glide_jax/data.py`, by default the last commit that still had it) into a module in a
temporary directory, which its spawned worker processes import too.

Data: `--images` JPEGs of `--source-size` (random smooth colour fields plus noise, so that
decoding is real work), each with a caption file, in a temporary folder read by the folder
source of each loader. Augmentation: resize the shorter side and centre-crop to `--image-size`;
with `--augment upsample` (the default) also the upsampler's degraded low-res input (blur, JPEG
re-compression and noise each with probability 0.5, `low_res_size = image_size // 4`), which is
the most per-example work any model kind asks of the loader.

Per loader and worker count: construction and the first batch (worker start-up included) are
timed apart; then `--batches` batches are timed, giving images/s (wall) and the CPU time this
process and its worker processes spent per image (Linux /proc), which depends less on what else
runs on the machine. Cases alternate between the two loaders so that both see the same load;
`--repeats` runs each case that many times and the fastest is kept. The 1-minute load average
(`os.getloadavg()`) is printed with every row: the machine may be shared, so compare rows of one
invocation only.

grain's index shuffle costs ~300 us per call on a 100-record epoch, ~30 us on 1000 and ~4 us
from 10^5 records on (measured with grain 0.2.18), so the default `--images` is large enough for
it to be a few percent of an example's cost, as it is on a real data set.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_MODULE = "glide_jax_data_before_grain"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu_seconds(pids) -> float:
    """User + system CPU time of these processes so far (Linux /proc; 0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _process_tree() -> list[int]:
    """This process and its children (the loaders' worker processes)."""
    me, found = os.getpid(), [os.getpid()]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _old_loader_commit() -> str:
    """The parent of the commit that removed the hand-written loader from glide_jax/data.py."""
    removed = subprocess.run(["git", "log", "-n1", "--format=%H", "-S", "def shuffle_buffer_order",
                              "--", "glide_jax/data.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    commit = removed.stdout.strip()
    if not commit:
        raise SystemExit("no commit of glide_jax/data.py has the old loader; pass --old-commit")
    return f"{commit}^"


def _import_old_loader(commit: str, directory: Path):
    source = subprocess.run(["git", "show", f"{commit}:glide_jax/data.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    if "class DataLoader" not in source or "shuffle_buffer_order" not in source:
        raise SystemExit(f"{commit}:glide_jax/data.py is not the hand-written loader")
    (directory / f"{OLD_MODULE}.py").write_text(source)
    # Spawned workers get this process's sys.path, so they can import the module by name too.
    sys.path.insert(0, str(directory))
    return importlib.import_module(OLD_MODULE)


def _make_images(folder: Path, count: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    for index in range(count):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
        (folder / f"{index:05d}.txt").write_text(f"a smooth field of colour number {index}\n")


def _loader(module, folder: Path, workers: int, args):
    """A loader of `module` (the old one or glide_jax.data) with this benchmark's settings."""
    extras = {}
    if args.augment == "upsample":
        extras = dict(low_res_size=args.image_size // 4,
                      degradation=module.Degradation(blur_prob=0.5, jpeg_prob=0.5, noise_prob=0.5))
    return module.DataLoader(module.FolderSource(folder), batch_size=args.batch_size, image_size=args.image_size,
                             seed=0, prefetch=args.prefetch, workers=workers, **extras)


def _case(module, folder: Path, workers: int, args) -> dict:
    load_before = _load()
    start = time.perf_counter()
    loader = _loader(module, folder, workers, args)
    next(loader)
    first = time.perf_counter() - start
    processes = _process_tree()
    cpu = _cpu_seconds(processes)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds(processes) - cpu
    loader.close()
    images = args.batches * args.batch_size
    return {"first_batch_s": first, "images_per_s": images / elapsed, "cpu_ms_per_image": 1000 * cpu / images,
            "load_before": load_before, "load_after": _load()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker process counts")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--source-size", default="384x288", help="WxH of the JPEGs on disk")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--augment", choices=("crop", "upsample"), default="upsample")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per case (after the first)")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--old-commit", help="commit whose glide_jax/data.py is the old loader (default: found)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.source_size.lower().split("x"))

    from glide_jax import data

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        commit = args.old_commit or _old_loader_commit()
        old = _import_old_loader(commit, tmp)
        folder = tmp / "images"
        folder.mkdir()
        _make_images(folder, args.images, (width, height))
        print(f"{args.images} JPEGs {width}x{height} -> {args.image_size} px, augment {args.augment}, batch "
              f"{args.batch_size}, prefetch {args.prefetch}, {args.batches} timed batches; old loader from "
              f"{commit}; CPUs usable: {len(os.sched_getaffinity(0))}; load {_load()}")
        print(f"{'loader':<8} {'workers':>7} {'first batch s':>13} {'images/s':>9} {'CPU ms/image':>12} "
              f"{'load before':>11} {'load after':>10}")
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            for name, module in (("old", old), ("grain", data)):
                runs = [_case(module, folder, workers, args) for _ in range(args.repeats)]
                best = max(runs, key=lambda r: r["images_per_s"])
                rows.append({"loader": name, "workers": workers, **best})
                print(f"{name:<8} {workers:>7} {best['first_batch_s']:>13.2f} {best['images_per_s']:>9.1f} "
                      f"{best['cpu_ms_per_image']:>12.2f} {best['load_before']:>11.2f} {best['load_after']:>10.2f}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "old_commit": commit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
