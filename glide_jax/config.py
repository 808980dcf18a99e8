"""Model configuration, using the reference's option names.

A `ModelConfig` is what `create_model` in the reference takes (plus `n_vocab`, which the
reference hard-wires to GLIDE's tokenizer). String-valued options (`channel_mult`,
`attention_resolutions`) are accepted in the reference's comma-separated form and exposed as
parsed tuples, so configs written for the original code load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from glide_jax import paths

GLIDE_VOCAB_SIZE = 50257

# What a diffusion model's output can predict (ModelConfig.prediction).
PREDICTIONS = ("eps", "v")
# Keys of older configs: what replaces each (`ModelConfig.from_dict` migrates them).
REMOVED_KEYS = {
    "attention_position_embedding": "nothing (it did not help the demo base, demo/REPRODUCE.md); only false is accepted",
    "text_layout_values": "nothing: the text layout reads the transformer's features (\"words\" did not help, "
                          "demo/REPRODUCE.md); only \"features\" is accepted",
    "text_layout_size": 'conditioning: {"kind": "text_layout", "size": ..., "heads": ...}',
    "text_layout_heads": 'conditioning: {"kind": "text_layout", "size": ..., "heads": ...}',
}

# Keys that appear in the reference's `*.config.json` / `model_and_diffusion_defaults()` but do
# not change the network: they are accepted and kept for round-tripping, never silently dropped.
NON_ARCHITECTURE_KEYS = ("kind", "use_fp16", "cache_text_emb", "diffusion_steps", "noise_schedule",
                     "timestep_respacing")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object (`what` names it in errors, e.g. "model config"), on
    any filesystem `glide_jax.paths` reaches (gs:// among them)."""
    path = paths.as_path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of {what} options, got {type(values).__name__}")
    return values


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    image_size: int = 64
    num_channels: int = 192
    num_res_blocks: int = 3
    channel_mult: str = ""
    attention_resolutions: str = "32,16,8"
    num_heads: int = 1
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.1
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    inpaint: bool = False
    super_res: bool = False
    n_vocab: int = GLIDE_VOCAB_SIZE
    # Groups of every GroupNorm (the reference hard-wires 32). A GroupNorm removes each group's mean,
    # so with one channel per group (num_channels 32) no block can see an image's overall colour or
    # brightness: small models need fewer groups than GLIDE's 192-channel ones.
    norm_groups: int = 32
    # What the first half of the output channels predicts: "eps" (the noise, as every released
    # GLIDE model) or "v" (alpha·eps - sigma·x_0, Salimans & Ho 2022; see glide_jax.diffusion).
    # Same network and params either way, but not interchangeable: it belongs to the weights.
    prediction: str = "eps"
    # An optional conditioning extension (`glide_jax.conditioning`), as {"kind": ..., **options};
    # None for GLIDE. The bundled demo base uses {"kind": "text_layout", "size": 8, "heads": 4}.
    conditioning: Any = None
    # Reference keys with no effect on the network (see NON_ARCHITECTURE_KEYS).
    kind: str | None = None
    use_fp16: bool = False
    cache_text_emb: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str | None = None
    timestep_respacing: str = ""

    def __post_init__(self):
        self.channel_multipliers  # validates
        self.attention_downsample_rates  # validates
        for key in ("image_size", "num_channels", "num_res_blocks"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ConfigError(f"num_head_channels must be -1 or positive, got {self.num_head_channels}")
        if self.num_head_channels == -1 and self.num_heads <= 0:
            raise ConfigError(f"num_heads must be positive when num_head_channels is -1, got {self.num_heads}")
        if self.xf_width and self.xf_width % self.xf_heads:
            raise ConfigError(f"xf_width {self.xf_width} is not divisible by xf_heads {self.xf_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        if self.conditioning is not None:
            from .conditioning import parse_conditioning
            # Frozen: a dict spec becomes its (hashable) options object once, here.
            object.__setattr__(self, "conditioning", parse_conditioning(self.conditioning))
            validate = getattr(self.conditioning, "validate", None)
            if validate is not None:
                validate(self)
        if self.norm_groups <= 0:
            raise ConfigError(f"norm_groups must be positive, got {self.norm_groups}")
        for mult in self.channel_multipliers:
            if (mult * self.num_channels) % self.norm_groups:
                raise ConfigError(
                    f"norm_groups {self.norm_groups} does not divide the {mult * self.num_channels} channels of a "
                    f"level (num_channels {self.num_channels} x channel_mult {mult})")

    # -- derived values -------------------------------------------------------------------------

    @property
    def channel_multipliers(self) -> tuple[int, ...]:
        """Per-level channel multipliers; the reference's defaults when `channel_mult` is empty."""
        if isinstance(self.channel_mult, (tuple, list)):
            mult = tuple(int(m) for m in self.channel_mult)
        elif self.channel_mult == "":
            defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
            if self.image_size not in defaults:
                raise ConfigError(
                    f"channel_mult is empty and image_size {self.image_size} has no default "
                    f"(defaults exist for {sorted(defaults)}); set channel_mult explicitly")
            mult = defaults[self.image_size]
        else:
            try:
                mult = tuple(int(m) for m in str(self.channel_mult).split(","))
            except ValueError:
                raise ConfigError(f"channel_mult must be comma-separated integers, got {self.channel_mult!r}") from None
        if not mult or any(m <= 0 for m in mult):
            raise ConfigError(f"channel_mult must be positive integers, got {self.channel_mult!r}")
        if self.image_size % (2 ** (len(mult) - 1)):
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2**{len(mult) - 1}, "
                f"needed by channel_mult {self.channel_mult!r} ({len(mult)} levels)")
        return mult

    @property
    def attention_downsample_rates(self) -> tuple[int, ...]:
        """`attention_resolutions` (image resolutions) as downsample rates, as the U-Net uses them."""
        value = self.attention_resolutions
        if isinstance(value, (tuple, list)):
            resolutions = [int(r) for r in value]
        elif value == "":
            resolutions = []
        else:
            try:
                resolutions = [int(r) for r in str(value).split(",")]
            except ValueError:
                raise ConfigError(
                    f"attention_resolutions must be comma-separated integers, got {value!r}") from None
        rates = []
        for res in resolutions:
            if res <= 0 or self.image_size % res:
                raise ConfigError(
                    f"attention_resolutions entry {res} does not divide image_size {self.image_size}")
            rates.append(self.image_size // res)
        return tuple(rates)

    @property
    def in_channels(self) -> int:
        """Channels the U-Net's first convolution sees: x, plus inpainting and low-res inputs."""
        channels = 3
        if self.inpaint:
            channels += 3 + 1
        if self.super_res:
            channels += 3
        return channels

    @property
    def out_channels(self) -> int:
        return 6  # eps and the variance interpolation, 3 channels each

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.num_channels

    @property
    def has_text(self) -> bool:
        return bool(self.xf_width)

    # -- (de)serialisation ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ModelConfig":
        values = _migrate(values, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config key(s) {unknown}; known keys are {sorted(known)}")
        typed = {}
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue
            value = values[field.name]
            if field.name in ("channel_mult", "attention_resolutions") and isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            typed[field.name] = value
        try:
            return cls(**typed)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json_object(path, "model config"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        from .conditioning import conditioning_spec
        return {**dataclasses.asdict(self), "conditioning": conditioning_spec(self.conditioning)}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


def _migrate(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with the keys of older configs (`REMOVED_KEYS`) replaced: a setting that still means
    something is rewritten with a one-line warning, one that no longer can is a ConfigError."""
    old = {key: values[key] for key in REMOVED_KEYS if key in values}
    if not old:
        return values
    if old.get("attention_position_embedding", False) is not False:
        raise ConfigError(f"{source}: attention_position_embedding was removed; replaced by "
                          f"{REMOVED_KEYS['attention_position_embedding']}")
    if old.get("text_layout_values", "features") != "features":
        raise ConfigError(f"{source}: text_layout_values {old['text_layout_values']!r} was removed; replaced by "
                          f"{REMOVED_KEYS['text_layout_values']}")
    values = {key: value for key, value in values.items() if key not in REMOVED_KEYS}
    if old.get("text_layout_size"):
        if values.get("conditioning") is not None:
            raise ConfigError(f"{source}: both text_layout_size and conditioning are set; keep only conditioning")
        values["conditioning"] = {"kind": "text_layout", "size": old["text_layout_size"],
                                  "heads": old.get("text_layout_heads", 4)}
    replaced = ", ".join(sorted(old))
    now = f"conditioning {values['conditioning']}" if old.get("text_layout_size") else "nothing (their defaults)"
    warnings.warn(f"{source}: model config key(s) {replaced} are deprecated; read as {now}", FutureWarning, stacklevel=3)
    return values
