"""Train or fine-tune a GLIDE model (or the noised CLIP) on every device of every process.

    python -m train.train --config configs/train_shapes_base.json [key=value ...]
    python -m train.train --config configs/train_finetune_base.json --init-from ckpt/base

Multi-process: start one copy per host with GLIDE_COORDINATOR_ADDRESS=host:port,
GLIDE_NUM_PROCESSES and GLIDE_PROCESS_ID set (see `glide_jax.parallel.initialize_distributed`).

A run lives in `checkpoint.dir`, a local directory or any URI `glide_jax.paths` takes
(`gs://bucket/runs/a`): orbax checkpoints `<step>/` (train state + every process's data position +
the run config), `metrics.jsonl`, `tensorboard/` and `samples/` (see train/metrics.py). Started
again with the same directory it resumes from the newest checkpoint: params, EMA, optimizer state,
step, RNG and data position come back, so the run goes on as if it had never stopped. One run at a
time per local directory: the first process holds `<checkpoint.dir>/lock` while it runs (nothing
guards a directory on an object store; see `lock_run_dir`). Exit codes: 0 done, 2 bad
configuration, 3 non-finite loss (the last good checkpoint is kept), 4 the directory is in use.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from glide_jax import paths

log = logging.getLogger("glide_jax.train")

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3
EXIT_BUSY = 4


class RunDirectoryBusy(Exception):
    pass


def lock_run_dir(run_dir):
    """Holds `run_dir/lock` for as long as the returned file stays open (the OS drops the lock when
    the process dies, so a killed run leaves nothing stale behind). A second run on the same
    directory would save its checkpoints over the first one's, each pruning the other's steps.

    A directory on an object store gets no lock (None, and a warning): a lock object outlives a
    killed or preempted holder, and would then refuse the very resume such a run is restarted for.
    """
    run_dir = paths.as_path(run_dir)
    if not paths.is_local(run_dir):
        log.warning("checkpoint.dir %s is on an object store, where no lock guards it: make sure no "
                    "other run uses it (two would overwrite each other's checkpoints)", run_dir)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirectoryBusy(
            f"checkpoint.dir {run_dir} is in use by another training run (pid {holder}, holding "
            f"{run_dir / 'lock'}); two runs on one directory would overwrite each other's checkpoints")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run config JSON (see train/run_config.py)")
    parser.add_argument("--init-from", dest="init_from", help="converted checkpoint directory to fine-tune from")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.learning_rate=1e-4")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # orbax reports every save step by step through absl at INFO; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from glide_jax import parallel
    # Must run before anything touches a device.
    parallel.initialize_distributed()

    from glide_jax.config import ConfigError
    from glide_jax.training import NonFiniteLossError
    from train.run_config import load_run_config

    overrides = list(args.overrides) + ([f"init_from={json.dumps(args.init_from)}"] if args.init_from else [])
    try:
        cfg, raw = load_run_config(args.config, overrides)
        trainer = Trainer(cfg, raw)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RunDirectoryBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUSY
    try:
        trainer.run()
    except NonFiniteLossError as err:
        last = trainer.last_checkpoint_step
        print(f"stopping: {err}; last good checkpoint: "
              f"{'step ' + str(last) if last is not None else 'none'}", file=sys.stderr)
        return EXIT_NON_FINITE
    finally:
        trainer.close()
    return 0


class Trainer:
    """Builds everything a run needs from its config, then `run()`s the training loop."""

    def __init__(self, cfg, raw: dict):
        import jax
        import orbax.checkpoint as ocp

        from glide_jax import parallel, training
        from glide_jax.config import ConfigError

        from train import metrics

        metrics.check_config(cfg.log)
        self.cfg, self.raw = cfg, raw
        self.run_dir = paths.absolute(cfg.checkpoint.dir)
        # The primary process speaks for the run (the others may share its filesystem).
        self.run_lock = lock_run_dir(self.run_dir) if jax.process_index() == 0 else None
        self.mesh = parallel.make_mesh(cfg.mesh.fsdp)
        devices = parallel.num_batch_shards(self.mesh)
        self.global_batch = cfg.batch.global_size or cfg.batch.per_device_size * devices
        if self.global_batch % (devices * cfg.batch.grad_accum):
            raise ConfigError(f"batch: the global batch of {self.global_batch} must split into "
                              f"batch.grad_accum={cfg.batch.grad_accum} microbatches that each divide over "
                              f"the {devices} devices")
        self.local_batch = parallel.local_batch_size(self.global_batch, self.mesh)

        self.model_config = self._model_config()
        self.tokenizer = self._tokenizer()
        self.task = self._task()
        self.lr_schedule = training.learning_rate_schedule(cfg.optimizer)
        self.optimizer = training.make_optimizer(cfg.optimizer)
        self.shardings = training.state_shardings(self.task, self.optimizer, self.mesh, cfg.mesh.fsdp_min_size)

        self.manager = ocp.CheckpointManager(
            self.run_dir, options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.checkpoint.keep, create=True,
                enable_async_checkpointing=cfg.checkpoint.async_save),
            item_names=("state", "data", "run"))
        self.last_checkpoint_step = self.manager.latest_step()
        data_states = None
        if self.last_checkpoint_step is not None:
            self.state, data_states = self._restore(self.last_checkpoint_step)
        else:
            init_params = None
            if cfg.init_from:
                log.info("fine-tuning from %s", cfg.init_from)
                self._warn_if_prediction_changes()
                init_params = self._init_params()
            self.state = training.create_train_state(
                self.task, self.optimizer, jax.random.key(cfg.seed), self.mesh, params=init_params,
                fsdp_min_size=cfg.mesh.fsdp_min_size)
        self.loader = self._loader(data_states[jax.process_index()] if data_states else None)
        self.train_step = training.make_train_step(
            self.task, self.optimizer, self.mesh, self.shardings, ema_rate=cfg.ema_rate, ema_debias=cfg.ema_debias,
            grad_accum=cfg.batch.grad_accum, lr_schedule=self.lr_schedule, frozen=cfg.optimizer.frozen)
        self.metrics_path = paths.as_path(cfg.log.metrics_file) if cfg.log.metrics_file else self.run_dir / "metrics.jsonl"
        self.sampler = None
        if cfg.sample.every:
            from train.preview import PreviewSampler
            self.sampler = PreviewSampler(self)

    # -- set-up ------------------------------------------------------------------------------------

    def _model_config(self):
        """The model's config: inline, from a file, or (fine-tuning without one) the checkpoint's."""
        from glide_jax.config import ModelConfig, read_json_object

        cfg = self.cfg
        options = cfg.model
        if isinstance(options, str):
            options = read_json_object(options, "model")
        if options is None:
            from glide_jax import checkpoint
            options = read_json_object(paths.as_path(cfg.init_from) / checkpoint.CONFIG_FILE, "init_from")
        if cfg.model_kind == "clip":
            from glide_jax.clip import ClipConfig
            return ClipConfig.from_dict(options, source="model")
        return ModelConfig.from_dict(options, source="model")

    def _warn_if_prediction_changes(self):
        """Fine-tuning an eps model into a v model (or back) is legitimate (the demo base was made
        so), but the same params then mean something else, so it is said out loud, not silent."""
        from glide_jax import checkpoint
        from glide_jax.config import read_json_object

        if self.cfg.model_kind == "clip":
            return
        saved = paths.as_path(self.cfg.init_from) / checkpoint.CONFIG_FILE
        if not saved.is_file():
            return
        before = read_json_object(saved, "init_from").get("prediction", "eps")
        if before != self.model_config.prediction:
            log.warning("init_from %s predicts %s but this run trains prediction=%s: the output head's "
                        "meaning changes, so expect a higher loss at first", self.cfg.init_from, before,
                        self.model_config.prediction)

    def _init_params(self):
        """The `init_from` checkpoint's params, read straight into this run's sharding as float32
        (each process reads only its shards: no host copy of a 3.5B model)."""
        from glide_jax import checkpoint, parallel
        from glide_jax.config import ConfigError

        cfg = self.cfg
        # The tree is checked against the model's by create_train_state, naming any mismatch.
        try:
            return checkpoint.restore_params(
                cfg.init_from, lambda name, shape, dtype: parallel.param_sharding(shape, self.mesh, cfg.mesh.fsdp_min_size),
                dtype=np.float32)
        except (FileNotFoundError, checkpoint.CheckpointError) as err:
            raise ConfigError(f"init_from: {err}") from None

    def _tokenizer(self):
        from glide_jax import tokenizers
        from glide_jax.config import ConfigError

        section = self.cfg.tokenizer
        try:
            if section.kind == "sentencepiece":
                tokenizer = tokenizers.SentencePieceTokenizer(section.path)
            elif section.kind == "clip_bpe":
                tokenizer = tokenizers.ClipBPETokenizer(section.vocab_dir or None)
            else:
                tokenizer = tokenizers.GlideBPETokenizer(section.vocab_dir or None)
        except (OSError, ValueError) as err:
            raise ConfigError(f"tokenizer: {err}") from None
        n_vocab = self.model_config.n_vocab
        if tokenizer.n_vocab > n_vocab:
            raise ConfigError(f"tokenizer: its vocabulary has {tokenizer.n_vocab} ids but model.n_vocab is "
                              f"{n_vocab}; set model.n_vocab >= {tokenizer.n_vocab}")
        return tokenizer

    def _task(self):
        from glide_jax import training
        from glide_jax.diffusion import default_schedule, diffusion_for_model

        cfg = self.cfg
        if cfg.model_kind == "clip":
            return training.clip_task(self.model_config, compute_dtype=cfg.precision,
                                      negative_weight=cfg.negative_weight)
        mc = self.model_config
        self.schedule = cfg.diffusion.schedule or default_schedule(mc)
        self.diffusion = diffusion_for_model(mc, schedule=self.schedule, steps=cfg.diffusion.steps)
        empty_tokens = empty_mask = None
        if mc.has_text:
            empty_tokens, empty_mask = self.tokenizer.pad_and_mask([], mc.text_ctx)
        return training.diffusion_task(
            mc, self.diffusion, cfg.model_kind, compute_dtype=cfg.precision,
            caption_dropout=cfg.caption_dropout, empty_tokens=empty_tokens, empty_mask=empty_mask,
            low_res_size=self.low_res_size, min_snr_gamma=cfg.min_snr_gamma,
            high_noise_fraction=cfg.high_noise_fraction, high_noise_from=cfg.high_noise_from,
            negative_weight=cfg.negative_weight, negative_from=cfg.negative_from, remat=cfg.remat,
            attention=cfg.attention)

    @property
    def low_res_size(self) -> int | None:
        if self.cfg.model_kind not in ("upsample", "upsample_inpaint"):
            return None
        return self.cfg.data.low_res_size or max(self.model_config.image_size // 4, 1)

    def _loader(self, state: dict | None, seed_offset: int = 0, batch_size: int | None = None, prefetch=None):
        import grain

        from glide_jax import data, masks
        from glide_jax.config import ConfigError

        from train.run_config import import_plugins

        section = self.cfg.data
        import_plugins(section.plugins)
        try:
            source = data.make_source(dict(section.source))
            degradation = data.Degradation(**_tuples(section.degradation))
            mask_config = masks.MaskConfig(**_tuples(section.masks)) if self.cfg.model_kind in (
                "inpaint", "upsample_inpaint") else None
            # Each process reads only its own rows of every global batch (the global batches are
            # the same for any number of processes).
            shard = grain.sharding.ShardByJaxProcess()
            return data.DataLoader(
                source, batch_size=batch_size or self.local_batch, image_size=self.task.image_size,
                seed=(section.seed if section.seed >= 0 else self.cfg.seed) + seed_offset,
                prefetch=section.prefetch if prefetch is None else prefetch, workers=section.workers,
                host_index=shard.shard_index, host_count=shard.shard_count, state=state,
                low_res_size=self.low_res_size, degradation=degradation, masks=mask_config,
                negatives=self.cfg.negative_weight > 0)
        except (data.DataError, TypeError, ValueError) as err:
            raise ConfigError(f"data: {err}") from None

    def host_batch(self, batch: dict) -> dict:
        """A loader batch → the arrays the task's step takes (captions tokenized)."""
        out = {"images": batch["images"]}
        negatives = batch.get("negative_captions")
        if negatives is not None:
            out["has_negative"] = np.array([bool(caption) for caption in negatives])   # "" = none
        if self.cfg.model_kind == "clip":
            ctx = self.model_config.max_text_len
            out["clip_tokens"], out["clip_text_len"] = self.tokenizer.batch_padded_and_len(batch["captions"], ctx)
            if negatives is not None:
                out["negative_clip_tokens"], out["negative_clip_text_len"] = self.tokenizer.batch_padded_and_len(
                    negatives, ctx)
        elif self.model_config.has_text:
            out["tokens"], out["mask"] = self.tokenizer.tokenize_batch(batch["captions"], self.model_config.text_ctx)
            if negatives is not None:
                out["negative_tokens"], out["negative_mask"] = self.tokenizer.tokenize_batch(
                    negatives, self.model_config.text_ctx)
        for key in ("low_res", "inpaint_mask"):
            if key in batch:
                out[key] = batch[key]
        spec = self.task.batch_spec(len(batch["images"]))
        for key, want in spec.items():
            if key not in out:
                raise ValueError(f"batch lacks {key!r}, which model_kind {self.cfg.model_kind!r} trains on")
            if tuple(out[key].shape) != tuple(want.shape):
                raise ValueError(f"batch[{key!r}] has shape {tuple(out[key].shape)}, expected {tuple(want.shape)}")
            out[key] = np.asarray(out[key], want.dtype)
        return out

    # -- checkpoints -------------------------------------------------------------------------------

    def _restore(self, step: int):
        import jax
        import orbax.checkpoint as ocp

        from glide_jax import training

        self._check_frozen_unchanged(step)
        abstract = training.abstract_state(self.task, self.optimizer)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        data_states = restored["data"]["processes"]
        if len(data_states) != jax.process_count():
            from glide_jax.config import ConfigError
            raise ConfigError(f"checkpoint {self.run_dir / str(step)} was written by {len(data_states)} "
                              f"processes; this run has {jax.process_count()} (data positions are per process)")
        log.info("resumed from %s at step %d", self.run_dir, step)
        return restored["state"], data_states

    def _check_frozen_unchanged(self, step: int) -> None:
        """Frozen parameters have no optimizer state, so a resume with another `optimizer.frozen`
        could not restore it: say so instead of orbax's tree-structure mismatch."""
        import orbax.checkpoint as ocp

        from glide_jax.config import ConfigError

        saved = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
        saved_frozen = list((saved.get("optimizer") or {}).get("frozen", []))
        if saved_frozen != list(self.cfg.optimizer.frozen):
            raise ConfigError(f"optimizer.frozen is {list(self.cfg.optimizer.frozen)}, but the checkpoints in "
                              f"{self.run_dir} were trained with {saved_frozen}; resume with the same list, or "
                              f"start a new checkpoint.dir with init_from (export the run first)")

    def save(self, step: int) -> None:
        import orbax.checkpoint as ocp

        data_states = _gather_json(self.loader.state())
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=ocp.args.JsonSave({"processes": data_states}),
            run=ocp.args.JsonSave(self.raw)), force=True)
        self.last_checkpoint_step = step

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        import jax

        from glide_jax import parallel, training

        cfg = self.cfg
        start = int(jax.device_get(self.state.step))
        total = cfg.train_steps
        if start >= total:
            log.info("already at step %d of %d; nothing to do", start, total)
            return
        primary = parallel.is_primary()
        writer = None
        if primary:
            from train.metrics import MetricsWriter
            writer = MetricsWriter(cfg.log, self.run_dir, self.metrics_path, self.raw, start_step=start)
        log.info("training %s: %d devices, %d processes, global batch %d (%d per process), steps %d -> %d",
                 cfg.model_kind, self.mesh.size, jax.process_count(), self.global_batch, self.local_batch,
                 start, total)
        pending = None                     # (step, metrics) not yet checked for finiteness
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        window_first = start
        run_start, run_first = window_start, start

        def settle():
            nonlocal pending
            if pending is not None:
                window.append(training.check_finite(*pending))
                pending = None

        try:
            for step in range(start + 1, total + 1):
                batch = parallel.shard_batch(self.host_batch(next(self.loader)), self.mesh)
                self.state, metrics = self.train_step(self.state, batch)
                # The previous step's metrics are fetched only now, so the host waits on a step
                # that is already done while the device works on this one.
                settle()
                pending = (step, metrics)
                if step == start + 1:
                    # Keep compilation out of the images/s and ETA figures.
                    settle()
                    window_start = run_start = time.perf_counter()
                    window_first = run_first = step
                if step % cfg.log.every == 0 or step == total:
                    settle()
                    now = time.perf_counter()
                    # The first step of a session only compiles; it has no rate of its own.
                    rate = ((step - window_first) * self.global_batch / (now - window_start)
                            if step > window_first else None)
                    eta = (now - run_start) / (step - run_first) * (total - step) if step > run_first else None
                    record = self._log_record(step, window, rate, eta)
                    if primary:
                        writer.log(record)
                    window, window_start, window_first = [], time.perf_counter(), step
                if step % cfg.checkpoint.every == 0 or step == total:
                    settle()       # never checkpoint a state whose loss was not finite
                    self.save(step)
                if self.sampler is not None and (step % cfg.sample.every == 0 or step == total):
                    self.sampler.write(step, writer)
            settle()
            if primary:
                checksum = training.params_checksum(self.state.params)
                writer.event({"event": "done", "step": total, "params_checksum": checksum,
                              "process": jax.process_index()})
            log.info("done: step %d, params checksum %.9g", total, training.params_checksum(self.state.params))
        finally:
            try:
                self.manager.wait_until_finished()
            finally:
                if writer is not None:
                    writer.close()

    def _log_record(self, step, window, images_per_sec, eta_s) -> dict:
        means = {k: float(np.mean([m[k] for m in window])) for k in window[0]} if window else {}
        record = {"step": step, **means, "images_per_sec": images_per_sec, "eta_s": eta_s, "time": time.time()}
        eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if eta_s is not None else "?"
        rate = f"{images_per_sec:.1f}" if images_per_sec is not None else "?"
        log.info("step %d/%d  loss %.5f  grad_norm %.4f  lr %.3g  %s img/s  eta %s", step, self.cfg.train_steps,
                 means.get("loss", float("nan")), means.get("grad_norm", float("nan")),
                 means.get("learning_rate", float("nan")), rate, eta)
        if "negative_won" in means:
            log.info("step %d  negative captions: own caption better on %.1f%% of %.1f%% compared", step,
                     100 * means["negative_won"], 100 * means["negative_compared"])
        return record

    def close(self) -> None:
        loader = getattr(self, "loader", None)
        if loader is not None:
            loader.close()
        manager = getattr(self, "manager", None)
        if manager is not None:
            manager.close()
        run_lock = getattr(self, "run_lock", None)
        if run_lock is not None:
            run_lock.close()


def _tuples(options: dict) -> dict:
    """JSON lists → tuples, as the data/mask config dataclasses take ranges as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _gather_json(value: Any) -> list:
    """Every process's JSON-able `value`, in process order, on every process."""
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, np.ravel(lengths))]


if __name__ == "__main__":
    from glide_jax.errors import run_cli

    sys.exit(run_cli(main, "train.train"))
