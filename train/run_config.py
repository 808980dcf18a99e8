"""The training run's configuration: one JSON file plus `key=value` overrides.

Every section is a frozen dataclass; `RunConfig.from_dict` checks every key and value against
them, and each error names the dotted key that is wrong (`optimizer.learning_rate`,
`checkpoint.every`, ...). Overrides use the same dotted keys and JSON values
(`optimizer.learning_rate=3e-4`, `sample.prompts=["a red circle"]`); a value that is not JSON
is taken as a string (`checkpoint.dir=runs/a`).

`model` is the model's options inline (a `ModelConfig` dict, or a `ClipConfig` dict for
`model_kind: "clip"`) or the path of a JSON file holding them; with `init_from` and no `model`,
the checkpoint's own config is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from pathlib import Path
from typing import Any

from glide_jax import paths
from glide_jax.config import ConfigError, read_json_object
from glide_jax.training import COMPUTE_DTYPES, MODEL_KINDS, OptimizerConfig
from glide_jax.unet import check_run_options


@dataclasses.dataclass(frozen=True)
class DiffusionSection:
    schedule: str = ""            # "" = the model config's noise_schedule, else GLIDE's default for the kind
    steps: int = 1000


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    kind: str = "glide_bpe"       # "glide_bpe", "sentencepiece" (needs path) or "clip_bpe" (model_kind clip)
    path: str = ""                # sentencepiece model file
    vocab_dir: str = ""           # where the BPE vocab files live (default: the download cache)


@dataclasses.dataclass(frozen=True)
class DataSection:
    # The records (glide_jax.data.make_source), by kind:
    #   {"kind": "folder", "path": "data/train"}        images with same-name .txt captions
    #   {"kind": "tar", "shards": "data/*.tar"}         webdataset-style uncompressed tar shards
    #   {"kind": "jsonl", "path": "data/train.jsonl"}   one {"image": ..., "caption": ...} per line, the
    #       image a path relative to the jsonl file or, with "tar": "<shard>", a member of that shard
    #       (glide_jax.data.JsonlSource); a list of files or a glob pattern reads several
    #   {"kind": "shapes", ...}                         the demo's procedural scenes (plugin "demo")
    source: dict = dataclasses.field(default_factory=lambda: {"kind": "shapes"})
    # Modules imported before the source is made, which register more source kinds
    # (glide_jax.data.register_source); "demo" registers the procedural "shapes". [] imports none.
    plugins: list = dataclasses.field(default_factory=lambda: ["demo"])
    seed: int = -1                # -1: the run's seed
    prefetch: int = 2             # batches made ahead, one thread each (in each worker, with workers)
    workers: int = 0              # grain worker processes making batches (see glide_jax.data.DataLoader)
    low_res_size: int = 0         # upsampler input side; 0 = image_size // 4
    degradation: dict = dataclasses.field(default_factory=dict)   # glide_jax.data.Degradation fields
    masks: dict = dataclasses.field(default_factory=dict)         # glide_jax.masks.MaskConfig fields


@dataclasses.dataclass(frozen=True)
class BatchSection:
    global_size: int = 0          # examples per optimizer step over all devices...
    per_device_size: int = 0      # ...or per device (exactly one of the two)
    grad_accum: int = 1           # microbatches per step (the global batch is split into them)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    fsdp: int = 1                 # parameter-sharding axis size; 1 = pure data parallel
    fsdp_min_size: int = 65536    # smaller arrays stay replicated


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    dir: str = ""                 # the run directory: local, or any URI glide_jax.paths takes (gs://...)
    every: int = 1000
    keep: int = 3
    async_save: bool = True       # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 50
    metrics_file: str = ""        # JSON lines; "" = <checkpoint.dir>/metrics.jsonl
    tensorboard: bool = True      # event files in <checkpoint.dir>/tensorboard (see train/metrics.py)
    wandb_project: str = ""       # a Weights & Biases project to log to as well ("" = none; needs wandb)


@dataclasses.dataclass(frozen=True)
class SampleSection:
    every: int = 0                # 0 disables sample grids
    prompts: list = dataclasses.field(default_factory=list)   # empty: captions of held-out examples
    count: int = 8
    respacing: str = "50"
    sampler: str = "ddim"         # "ddim" or "ddpm"
    guidance_scale: float = 3.0
    use_ema: bool = True
    dir: str = ""                 # "" = <checkpoint.dir>/samples


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: Any = None             # dict of model options, or a path to a JSON file of them
    model_kind: str = "base"
    init_from: str = ""           # converted checkpoint directory (glide_jax.checkpoint) to fine-tune
    train_steps: int = 1000
    seed: int = 0
    precision: str = "float32"    # compute dtype; params stay float32
    caption_dropout: float = 0.2
    min_snr_gamma: float = 0.0    # > 0: Min-SNR weighting of the eps (or v) loss (see training.diffusion_task)
    high_noise_fraction: float = 0.0   # share of examples whose timestep is drawn from the noisiest part
    high_noise_from: float = 0.95      # ... which starts at this fraction of the chain
    negative_weight: float = 0.0  # > 0: hard-negative captions (training.negative_term, clip_task); needs a source with negative_caption
    negative_from: float = 0.7    # ... compared at timesteps from this fraction of the chain on (not for clip)
    ema_rate: float = 0.9999
    ema_debias: bool = True       # average only this run's params (see training.make_train_step)
    # How the U-Net runs, not what it is (not saved in the model config; checkpoints load either way):
    # remat (glide_jax.unet.REMAT_POLICIES) recomputes blocks' activations in the backward pass to fit a
    # larger batch; attention (glide_jax.layers.ATTENTION_IMPLEMENTATIONS): "cudnn" needs a GPU and bfloat16.
    remat: str = "none"
    attention: str = "einsum"
    diffusion: DiffusionSection = DiffusionSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection = DataSection()
    batch: BatchSection = BatchSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    sample: SampleSection = SampleSection()

    def __post_init__(self):
        if self.model_kind not in MODEL_KINDS:
            raise ConfigError(f"model_kind must be one of {list(MODEL_KINDS)}, got {self.model_kind!r}")
        if self.model is None and not self.init_from:
            raise ConfigError("model is required (inline options or a path) unless init_from (--init-from) is given")
        if self.model is not None and not isinstance(self.model, (dict, str)):
            raise ConfigError(f"model must be a dict of options or a path, got {type(self.model).__name__}")
        if self.train_steps <= 0:
            raise ConfigError(f"train_steps must be positive, got {self.train_steps}")
        if self.precision not in ("float32", "bfloat16"):
            raise ConfigError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.min_snr_gamma >= 0.0:
            raise ConfigError(f"min_snr_gamma must be >= 0 (0 = GLIDE's unweighted loss), got {self.min_snr_gamma}")
        if not 0.0 <= self.high_noise_fraction <= 1.0:
            raise ConfigError(f"high_noise_fraction must be in [0, 1], got {self.high_noise_fraction}")
        if not 0.0 <= self.high_noise_from < 1.0:
            raise ConfigError(f"high_noise_from must be in [0, 1) (a fraction of the chain), got {self.high_noise_from}")
        if not self.negative_weight >= 0.0:
            raise ConfigError(f"negative_weight must be >= 0 (0 = off), got {self.negative_weight}")
        if not 0.0 <= self.negative_from < 1.0:
            raise ConfigError(f"negative_from must be in [0, 1) (a fraction of the chain), got {self.negative_from}")
        if not 0.0 <= self.ema_rate <= 1.0:
            raise ConfigError(f"ema_rate must be in [0, 1], got {self.ema_rate}")
        check_run_options(self.remat, self.attention, COMPUTE_DTYPES.get(self.precision))
        if self.model_kind == "clip" and (self.remat, self.attention) != ("none", "einsum"):
            raise ConfigError("remat and attention are U-Net options; model_kind 'clip' takes neither")
        b = self.batch
        if (b.global_size > 0) == (b.per_device_size > 0) or b.global_size < 0 or b.per_device_size < 0:
            raise ConfigError("set exactly one of batch.global_size and batch.per_device_size to a positive "
                              f"number (got global_size={b.global_size}, per_device_size={b.per_device_size})")
        if b.grad_accum < 1:
            raise ConfigError(f"batch.grad_accum must be >= 1, got {b.grad_accum}")
        if self.tokenizer.kind not in ("glide_bpe", "sentencepiece", "clip_bpe"):
            raise ConfigError(f"tokenizer.kind must be 'glide_bpe', 'sentencepiece' or 'clip_bpe', "
                              f"got {self.tokenizer.kind!r}")
        if self.tokenizer.kind == "sentencepiece" and not self.tokenizer.path:
            raise ConfigError("tokenizer.path (the sentencepiece model file) is required for tokenizer.kind "
                              "'sentencepiece'")
        if (self.model_kind == "clip") != (self.tokenizer.kind == "clip_bpe"):
            raise ConfigError(f"tokenizer.kind 'clip_bpe' goes with model_kind 'clip' and only with it "
                              f"(got model_kind={self.model_kind!r}, tokenizer.kind={self.tokenizer.kind!r})")
        for key in ("every", "keep"):
            if getattr(self.checkpoint, key) <= 0:
                raise ConfigError(f"checkpoint.{key} must be positive, got {getattr(self.checkpoint, key)}")
        if not self.checkpoint.dir:
            raise ConfigError("checkpoint.dir is required (where checkpoints, metrics and samples go)")
        if self.log.every <= 0:
            raise ConfigError(f"log.every must be positive, got {self.log.every}")
        if self.sample.every < 0 or self.sample.count <= 0:
            raise ConfigError(f"sample.every must be >= 0 and sample.count positive, got "
                              f"{self.sample.every} and {self.sample.count}")
        if self.sample.sampler not in ("ddim", "ddpm"):
            raise ConfigError(f"sample.sampler must be 'ddim' or 'ddpm', got {self.sample.sampler!r}")
        if self.mesh.fsdp < 1:
            raise ConfigError(f"mesh.fsdp must be >= 1, got {self.mesh.fsdp}")
        for key, value in (("checkpoint.dir", self.checkpoint.dir), ("log.metrics_file", self.log.metrics_file),
                           ("sample.dir", self.sample.dir), ("init_from", self.init_from)):
            try:
                paths.as_path(value or ".")
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None

    @classmethod
    def from_dict(cls, values: dict, source: str = "run config") -> "RunConfig":
        try:
            return _build(cls, values, "")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key} must be of type {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: Any, prefix: str):
    where = prefix.rstrip(".") or "the run config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        names = [prefix + name for name in unknown]
        raise ConfigError(f"unknown key(s) {names}; known keys of {where} are {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key + ".")
        else:
            kwargs[name] = _check_type(value, annotation, key)
    return cls(**kwargs)


def import_plugins(modules: list) -> None:
    """Imports each module of `data.plugins`; one that cannot be imported is a ConfigError naming it."""
    for name in modules:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"data.plugins entries must be module names, got {name!r}")
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"data.plugins: cannot import {name!r} ({err})") from None


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, lists, objects, quoted strings), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each `a.b.c=value` set; a path into a model given as a file loads the file first."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if part == "model" and depth == 0 and isinstance(child, str):
                child = read_json_object(child, "model")
                node[part] = child
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section "
                                  f"(it is {child!r})")
            node = child
        node[parts[-1]] = parse_value(text)
    return raw


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """The validated config and the raw dict it came from (saved next to checkpoints)."""
    raw = read_json_object(path, "run config") if path else {}
    raw = apply_overrides(raw, list(overrides))
    return RunConfig.from_dict(raw, source=str(path) if path else "run config"), raw
