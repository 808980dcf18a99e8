"""Where a training run's numbers and sample grids go, written by the primary process only.

- JSON lines (`log.metrics_file`, default `<checkpoint.dir>/metrics.jsonl`): always, one record per
  `log.every` steps and a final `done` record.
- TensorBoard (`<checkpoint.dir>/tensorboard`, on unless `log.tensorboard` is false): each number
  of a record but its step and clock times as a scalar under the record's key (`loss`,
  `grad_norm`, `learning_rate`, `images_per_sec`, ...), sample grids as images (`samples`).
- Weights & Biases, when `log.wandb_project` is set: the same scalars and images, in one W&B
  run per run directory (its id is kept in `<checkpoint.dir>/wandb_run_id`, so a resumed run
  goes on in the same W&B run).

Any of these files may be on an object store (`gs://`). Objects cannot be appended to, so there
each file is kept in memory and uploaded whole, at most every `FLUSH_SECS` and when the run ends
(as TensorFlow's and tensorboardX's own GCS writers do); a killed run loses at most that long
of it.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid

import numpy as np

from glide_jax import paths
from glide_jax.config import ConfigError

FLUSH_SECS = 60
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
# Not metrics: the step is the x axis, and clock times say nothing about the model.
_NOT_SCALARS = ("step", "time", "eta_s")


def check_config(log_section) -> None:
    """Refuses, before anything is built, a W&B project without wandb installed."""
    if log_section.wandb_project:
        _import_wandb()


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb_project is set but wandb is not installed; `pip install wandb`, "
                          "or leave log.wandb_project empty") from None
    return wandb


class JsonLines:
    """A JSON-lines file: appended to and flushed line by line on a local disk (so `tail -f`
    follows it), re-uploaded whole on an object store (see the module's docstring)."""

    def __init__(self, path):
        self.path = paths.as_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        if paths.is_local(self.path):
            self._file = open(self.path, "a")
        else:
            # Earlier sessions' lines (a resumed run) are kept: each upload replaces the object.
            self._lines = [self.path.read_text()] if self.path.exists() else []
            self._uploaded = time.monotonic()

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        if time.monotonic() - self._uploaded >= FLUSH_SECS:
            self._upload()

    def _upload(self) -> None:
        paths.write_bytes(self.path, "".join(self._lines).encode())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self._upload()


class _ObjectRecordFile:
    """One tensorboardX event file on an object store, uploaded whole at each flush."""

    def __init__(self, path: str):
        self.path = paths.as_path(path)
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _ObjectStoreRecordFiles:
    """tensorboardX's writer factory interface (`record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _ObjectRecordFile:
        return _ObjectRecordFile(path)

    def directory_check(self, path: str) -> None:
        paths.as_path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(logdir, purge_step: int | None):
    from tensorboardX import SummaryWriter, record_writer

    logdir = paths.as_path(logdir)
    if not paths.is_local(logdir):
        # tensorboardX picks a writer by the path's scheme. Its own gs:// and s3:// writers need
        # google-cloud-storage or boto3; this one goes through epath, as the checkpoints do.
        record_writer.register_writer_factory(os.fspath(logdir).split(":")[0], _ObjectStoreRecordFiles())
    # purge_step: TensorBoard hides what an earlier session logged past the checkpoint this one
    # resumed from, so the curves show the run the checkpoints hold. The file name has only a
    # 1 s clock and the host: the suffix keeps a quick restart from writing over the last file,
    # and sorts a later session's file after an earlier one's.
    suffix = f".from{purge_step or 0:010d}.{uuid.uuid4().hex[:6]}"
    return SummaryWriter(logdir=os.fspath(logdir), flush_secs=FLUSH_SECS, purge_step=purge_step,
                         filename_suffix=suffix)


class MetricsWriter:
    """JSON lines, TensorBoard and W&B behind one interface (see the module's docstring)."""

    def __init__(self, log_section, run_dir, metrics_path, run_config: dict, start_step: int = 0):
        run_dir = paths.as_path(run_dir)
        self.lines = JsonLines(metrics_path)
        self.tensorboard = self.wandb = self._wandb_lib = None
        try:
            if log_section.tensorboard:
                self.tensorboard = _summary_writer(run_dir / TENSORBOARD_DIR, start_step + 1 if start_step else None)
            if log_section.wandb_project:
                self._wandb_lib = _import_wandb()
                self.wandb = _wandb_run(self._wandb_lib, log_section.wandb_project, run_dir, run_config)
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        """One record of `Trainer._log_record` (it has a step): a JSON line and its scalars."""
        self.lines.write(record)
        step = record["step"]
        scalars = {key: float(value) for key, value in record.items()
                   if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, global_step=step, walltime=record.get("time"))
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def event(self, record: dict) -> None:
        """A record that is not a step's metrics (the run's `done`): a JSON line only."""
        self.lines.write(record)

    def image(self, tag: str, step: int, image: np.ndarray, caption: str = "") -> None:
        """An (H, W, 3) uint8 image, e.g. a sample grid."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, global_step=step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({tag: self._wandb_lib.Image(image, caption=caption or None)}, step=step)

    def close(self) -> None:
        # Each is closed even if another fails: every one holds data not yet written.
        if self.lines is None:
            return
        errors = []
        for closer in (self.lines.close, getattr(self.tensorboard, "close", None),
                       getattr(self.wandb, "finish", None)):
            if closer is None:
                continue
            try:
                closer()
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others closed
                errors.append(err)
        self.lines = self.tensorboard = self.wandb = None
        if errors:
            raise errors[0]


def _wandb_run(wandb, project: str, run_dir, run_config: dict):
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
    run = wandb.init(project=project, id=run_id, resume="allow", name=run_dir.name, config=run_config)
    if not id_file.exists():
        paths.write_bytes(id_file, (run_id + "\n").encode())
    return run
