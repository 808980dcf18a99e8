"""Two processes sampling together (jax.distributed over 127.0.0.1, CPU collectives) write,
between them, the images one process writes alone: each host writes its own share.

Not byte for byte: each device of the two-host mesh runs half the batch, and XLA:CPU's kernels for
another batch size round differently (~1e-6); the first step at t=999 amplifies that by ~2e4 at
the few pixels whose x_0 prediction is not clipped (see tests/test_traces.py). So each image must
be nearly identical to the single-host image of the same index and far from every other one.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glide_jax.config import ModelConfig
from glide_jax.convert import convert_checkpoint

from conftest import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint_dir(golden, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    convert_checkpoint(golden / "base.pt", ModelConfig.from_json(golden / "base.config.json"), root / "base")
    return root


def generate_command(golden, checkpoint_dir, out):
    return [sys.executable, "-m", "sample.generate", "--checkpoint-dir", str(checkpoint_dir),
            "--vocab-dir", str(golden / "vocab"), "--prompt", "a red cube", "--prompt", "a blue ball",
            "--batch-size", "2", "--steps", "3", "--sampler", "ddim", "--no-upsample", "--seed", "7",
            "--out", str(out)]


def test_two_hosts_write_the_single_host_images(golden, checkpoint_dir, tmp_path):
    single = tmp_path / "single"
    subprocess.run(generate_command(golden, checkpoint_dir, single), cwd=PROJECT_ROOT, check=True,
                   capture_output=True, timeout=600)

    port = free_port()
    procs = []
    for process_id in range(2):
        env = dict(os.environ, GLIDE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", GLIDE_NUM_PROCESSES="2",
                   GLIDE_PROCESS_ID=str(process_id))
        procs.append(subprocess.Popen(generate_command(golden, checkpoint_dir, tmp_path / f"host{process_id}"),
                                      cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]

    written = {0: sorted(p.name for p in (tmp_path / "host0").glob("*.png")),
               1: sorted(p.name for p in (tmp_path / "host1").glob("*.png"))}
    assert written[0] == ["0000.png", "0002.png", "grid.png"]  # the first host also writes the grid
    assert written[1] == ["0001.png", "0003.png"]
    reference = {name: np.asarray(Image.open(single / name), np.float32) for name in written[0] + written[1]}
    for host, names in written.items():
        for name in names:
            image = np.asarray(Image.open(tmp_path / f"host{host}" / name), np.float32)
            distances = {other: np.abs(image - ref).mean() for other, ref in reference.items()
                         if ref.shape == image.shape}
            assert distances[name] < 0.25, (host, name, distances)  # mean over 8-bit values
            others = [d for other, d in distances.items() if other != name]
            if name != "grid.png":
                assert min(others) > 20 * max(distances[name], 0.25), (host, name, distances)
