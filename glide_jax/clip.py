"""GLIDE's noised CLIP in Flax (NHWC): config, encoders, reference-checkpoint conversion, guidance.

The noised CLIP is a ViT image encoder that also sees the diffusion timestep (a learned embedding
`w_t` per original timestep takes the place of the class token) and a causal text transformer
pooled at each prompt's end token. CLIP guidance pushes x_t along the gradient of the image-text
similarity; the text side is encoded once, before sampling.

Reading top to bottom: `ClipConfig` (the reference's `config.yaml` keys), the modules, the
functional entry points (`encode_image`, `encode_text`, ...), the converter from the reference's
`clip_image_enc.pt` / `clip_text_enc.pt`, CLIP guidance (`clip_cond_fn`) and the contrastive loss
used to train the noised CLIP.

Attention context: the reference pads both contexts to a multiple of 32 (its block size) and adds
a -1e10 bias to every padded query/key and, for text, above the diagonal. Padded keys therefore get
softmax weight exp(-1e10) == 0 exactly and padded queries are sliced off, so the computation is
exactly unpadded attention: full over [timestep token, patches] for images, causal over all
`max_text_len` positions for text. No `text_len` mask: positions after the end token are ordinary
(zero-id) tokens, and causality alone keeps them from reaching the pooled end position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from glide_jax.config import ConfigError, read_json_object
from glide_jax.layers import LayerNorm32

Dtype = Any

# CLIP's pixel statistics, on the [0, 255] scale.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)

# The value the reference adds to masked attention logits; it makes their weight exactly zero.
MASKED_LOGIT = -1e10

# The reference's L2 normalisation adds this to the norm.
NORM_EPS = 1e-12

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# -- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """The reference's `clip/config.yaml`; the defaults are the released noised CLIP's."""

    logit_scale: float = 100.0
    beta_schedule: str = "squaredcos_cap_v2"
    n_timesteps: int = 1000
    image_size: int = 64
    patch_size: int = 4
    n_vocab: int = 65536
    max_text_len: int = 77
    n_embd: int = 512
    n_head_state_text: int = 64
    n_head_text: int = 8
    n_xf_blocks_text: int = 12
    n_head_state_image: int = 64
    n_head_image: int = 12
    n_xf_blocks_image: int = 12

    def __post_init__(self):
        positive = ("n_timesteps", "image_size", "patch_size", "n_vocab", "max_text_len", "n_embd",
                    "n_head_state_text", "n_head_text", "n_xf_blocks_text", "n_head_state_image",
                    "n_head_image", "n_xf_blocks_image")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"CLIP config: {key} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"CLIP config: image_size {self.image_size} is not divisible by "
                              f"patch_size {self.patch_size}")
        if not self.logit_scale > 0:
            raise ConfigError(f"CLIP config: logit_scale must be positive, got {self.logit_scale!r}")

    @property
    def width_image(self) -> int:
        return self.n_head_image * self.n_head_state_image

    @property
    def width_text(self) -> int:
        return self.n_head_text * self.n_head_state_text

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_context(self) -> int:
        """Tokens the image transformer sees: the timestep token, then the patches row by row."""
        return 1 + self.patches_per_side ** 2

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "CLIP config") -> "ClipConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown CLIP config key(s) {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**dict(values))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ClipConfig":
        return cls.from_dict(read_json_object(path, "CLIP config"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _compute_dtype(dtype: str | Dtype) -> Dtype:
    if isinstance(dtype, str):
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(_COMPUTE_DTYPES)}, got {dtype!r}")
        return _COMPUTE_DTYPES[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"compute dtype must be float32 or bfloat16, got {dtype}")
    return dtype


# -- modules -------------------------------------------------------------------------------------


def _dense(features: int, std: float, use_bias: bool, dtype: Dtype, name: str) -> nn.Dense:
    # The reference's per-layer init scales; they matter only for training from scratch.
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros,
                    name=name)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Softmax attention of [B, T, heads, ch] q, k, v; with `causal`, position i sees keys <= i.

    q and k are each scaled by ch**-1/4, as the reference does; logits and softmax in float32.
    """
    scale = q.shape[-1] ** -0.25
    logits = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale).astype(jnp.float32)
    if causal:
        n = q.shape[1]
        allowed = jnp.tril(jnp.ones((n, n), dtype=bool))
        logits = jnp.where(allowed, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshc->bthc", weights, v)  # [B, T, heads, ch]


class AttentionResblock(nn.Module):
    """Pre-LayerNorm multi-head self-attention with a residual; the key projection has no bias."""

    n_head: int
    n_head_state: int
    n_resblocks: int
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array) -> jax.Array:
        batch, n, _ = m.shape
        width = self.n_head * self.n_head_state
        r = LayerNorm32(name="ln")(m)
        std = 1 / math.sqrt(width)
        q = _dense(width, std, True, self.dtype, "f_q")(r)
        k = _dense(width, std, False, self.dtype, "f_k")(r)
        v = _dense(width, std, True, self.dtype, "f_v")(r)
        heads = (batch, n, self.n_head, self.n_head_state)
        r = masked_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), self.causal)
        r = r.reshape(batch, n, width)
        r = _dense(width, 1 / math.sqrt(width * self.n_resblocks ** 2), True, self.dtype, "f_c")(r)
        return m + r


class FullyConnectedResblock(nn.Module):
    """Pre-LayerNorm MLP (4x width, exact GELU) with a residual."""

    width: int
    n_resblocks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array) -> jax.Array:
        r = LayerNorm32(name="ln")(m)
        r = _dense(4 * self.width, math.sqrt(2 / (4 * self.width)), True, self.dtype, "f_1")(r)
        r = nn.gelu(r, approximate=False)
        r = _dense(self.width, 1 / math.sqrt(self.width * self.n_resblocks ** 2), True, self.dtype, "f_2")(r)
        return m + r


class TransformerBlock(nn.Module):
    n_head: int
    n_head_state: int
    n_resblocks: int
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = AttentionResblock(self.n_head, self.n_head_state, self.n_resblocks, self.causal,
                              self.dtype, name="f_attn")(x)
        return FullyConnectedResblock(self.n_head * self.n_head_state, self.n_resblocks, self.dtype,
                                      name="f_mlp")(x)


class ImageEmbedding(nn.Module):
    """Pixels in [0, 255] (NHWC) and timesteps -> LayerNormed [timestep token, patch tokens]."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, timesteps: jax.Array) -> jax.Array:
        cfg = self.config
        width, p, side = cfg.width_image, cfg.patch_size, cfg.patches_per_side
        patch_proj = self.param("patch_proj", nn.initializers.normal(math.sqrt(2 / (width * p * p))),
                                (p, p, 3, width), jnp.float32)  # HWIO
        w_t = self.param("w_t", nn.initializers.normal(1 / math.sqrt(width)),
                         (cfg.n_timesteps, width), jnp.float32)
        w_pos = self.param("w_pos", nn.initializers.normal(1 / math.sqrt(width)),
                           (cfg.image_context, width), jnp.float32)

        x = (pixels.astype(jnp.float32) - jnp.asarray(IMAGE_CHANNEL_MEANS, jnp.float32)) / jnp.asarray(
            IMAGE_CHANNEL_STDS, jnp.float32)
        batch = x.shape[0]
        # A stride-p, p x p convolution is a matmul over non-overlapping patches taken row by row,
        # the token order of the reference's flattened convolution output.
        patches = x.reshape(batch, side, p, side, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, side * side, p * p * 3).astype(self.dtype)
        tokens = patches @ patch_proj.reshape(p * p * 3, width).astype(self.dtype)
        time_token = jnp.take(w_t, timesteps, axis=0)[:, None, :]
        x = jnp.concatenate([time_token, tokens.astype(jnp.float32)], axis=1) + w_pos[None]
        assert x.shape == (batch, cfg.image_context, width), x.shape
        return LayerNorm32(name="ln")(x)


class FeatureHead(nn.Module):
    """LayerNorm then a bias-free projection to the joint embedding space."""

    n_embd: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        x = LayerNorm32(name="ln")(pooled.astype(jnp.float32))
        in_width = x.shape[-1]
        x = _dense(self.n_embd, math.sqrt(2 / (in_width + self.n_embd)), False, self.dtype, "f")(x)
        return x.astype(jnp.float32)


class ClipImageEncoder(nn.Module):
    """Noised CLIP image tower: [B, H, W, 3] pixels in [0, 255] and [B] timesteps -> [B, n_embd]."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, timesteps: jax.Array, return_probe_features: bool = False):
        cfg = self.config
        h = ImageEmbedding(cfg, self.dtype, name="input")(pixels, timesteps)
        for i in range(cfg.n_xf_blocks_image):
            h = TransformerBlock(cfg.n_head_image, cfg.n_head_state_image, 2 * cfg.n_xf_blocks_image,
                                 causal=False, dtype=self.dtype, name=f"block_{i}")(h)
        pooled = h[:, 0]  # the timestep token's slot plays the class token
        if return_probe_features:
            return pooled  # [B, width_image]
        return FeatureHead(cfg.n_embd, self.dtype, name="output")(pooled)  # [B, n_embd]


class TextEmbedding(nn.Module):
    """Token plus position embeddings; every one of the `max_text_len` positions is used."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        w_voc = self.param("w_voc", nn.initializers.normal(0.02), (cfg.n_vocab, cfg.width_text), jnp.float32)
        w_pos = self.param("w_pos", nn.initializers.normal(0.01), (cfg.max_text_len, cfg.width_text),
                           jnp.float32)
        return jnp.take(w_voc, tokens, axis=0) + w_pos[None]


class ClipTextEncoder(nn.Module):
    """Noised CLIP text tower: [B, max_text_len] tokens and [B] lengths -> [B, n_embd].

    `text_len` counts the start and end tokens; the feature is read at position text_len - 1.
    """

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, text_len: jax.Array, return_probe_features: bool = False):
        cfg = self.config
        h = TextEmbedding(cfg, name="input")(tokens)
        for i in range(cfg.n_xf_blocks_text):
            h = TransformerBlock(cfg.n_head_text, cfg.n_head_state_text, 2 * cfg.n_xf_blocks_text,
                                 causal=True, dtype=self.dtype, name=f"block_{i}")(h)
        end = (text_len - 1).astype(jnp.int32)
        pooled = jnp.take_along_axis(h, end[:, None, None], axis=1)[:, 0]  # [B, width_text]
        if return_probe_features:
            return pooled
        return FeatureHead(cfg.n_embd, self.dtype, name="output")(pooled)  # [B, n_embd]


# -- functional entry points -----------------------------------------------------------------------


def _tower_params(params: Mapping[str, Any], tower: str) -> Any:
    if not isinstance(params, Mapping) or tower not in params:
        found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"CLIP params must be a mapping with '{tower}' (from convert_clip_state_dicts "
                         f"or init_clip_params); found {found}")
    return params[tower]


def _check_images(images: jax.Array, timesteps: jax.Array, config: ClipConfig) -> None:
    size = config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
        hint = " (this looks NCHW; the project's images are NHWC)" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise ValueError(f"CLIP images must have shape (B, {size}, {size}, 3), got {tuple(images.shape)}{hint}")
    if timesteps.ndim != 1 or timesteps.shape[0] != images.shape[0]:
        raise ValueError(f"CLIP timesteps must have shape ({images.shape[0]},) to match the images, "
                         f"got {tuple(timesteps.shape)}")
    if not jnp.issubdtype(timesteps.dtype, jnp.integer):
        # w_t is indexed by the original 1000-step timestep; a float here usually means rescaled
        # or respaced timesteps reached the classifier by mistake.
        raise TypeError(f"CLIP timesteps must be integers in [0, {config.n_timesteps}) (original, "
                        f"unrespaced indexing), got dtype {timesteps.dtype}")
    if not isinstance(timesteps, jax.core.Tracer):
        values = np.asarray(timesteps)
        if values.size and (values.min() < 0 or values.max() >= config.n_timesteps):
            raise ValueError(f"CLIP timesteps must lie in [0, {config.n_timesteps}), got {values.tolist()}")


def _check_text(tokens: jax.Array, text_len: jax.Array, config: ClipConfig) -> None:
    if tokens.ndim != 2 or tokens.shape[1] != config.max_text_len:
        raise ValueError(f"CLIP tokens must have shape (B, {config.max_text_len}), got {tuple(tokens.shape)}")
    if text_len.ndim != 1 or text_len.shape[0] != tokens.shape[0]:
        raise ValueError(f"CLIP text_len must have shape ({tokens.shape[0]},) to match the tokens, "
                         f"got {tuple(text_len.shape)}")
    if not isinstance(text_len, jax.core.Tracer):
        values = np.asarray(text_len)
        if values.size and (values.min() < 1 or values.max() > config.max_text_len):
            raise ValueError(f"CLIP text_len must lie in [1, {config.max_text_len}] (it counts the start "
                             f"and end tokens), got {values.tolist()}")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        if values.size and (values.min() < 0 or values.max() >= config.n_vocab):
            raise ValueError(f"CLIP tokens must lie in [0, {config.n_vocab}), got range "
                             f"[{values.min()}, {values.max()}]")


def l2_normalize(z: jax.Array) -> jax.Array:
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + NORM_EPS)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _image_features(image_params, images, timesteps, config: ClipConfig, dtype: Dtype):
    pixels = (images.astype(jnp.float32) + 1) * 127.5  # the reference's CLIP sees [0, 255]
    return ClipImageEncoder(config, dtype).apply({"params": image_params}, pixels, timesteps)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _text_features(text_params, tokens, text_len, config: ClipConfig, dtype: Dtype):
    return ClipTextEncoder(config, dtype).apply({"params": text_params}, tokens, text_len)


# The public functions check their inputs (values too, when concrete) and then run one compiled
# program; inside a caller's jit the inner jit is simply inlined.


def image_features(params, config: ClipConfig, images: jax.Array, timesteps: jax.Array, *,
                   dtype: str | Dtype = "float32") -> jax.Array:
    """Raw image features [B, n_embd] of NHWC `images` in [-1, 1] at original `timesteps`."""
    images, timesteps = jnp.asarray(images), jnp.asarray(timesteps)
    _check_images(images, timesteps, config)
    return _image_features(_tower_params(params, "image_encoder"), images, timesteps, config,
                           _compute_dtype(dtype))


def encode_image(params, config: ClipConfig, images: jax.Array, timesteps: jax.Array, *,
                 dtype: str | Dtype = "float32") -> jax.Array:
    """L2-normalised image embeddings [B, n_embd] (see `image_features`)."""
    return l2_normalize(image_features(params, config, images, timesteps, dtype=dtype))


def text_features(params, config: ClipConfig, tokens: jax.Array, text_len: jax.Array, *,
                  dtype: str | Dtype = "float32") -> jax.Array:
    """Raw text features [B, n_embd] of CLIP-tokenised prompts (`ClipBPETokenizer.padded_and_len`)."""
    tokens, text_len = jnp.asarray(tokens), jnp.asarray(text_len)
    _check_text(tokens, text_len, config)
    return _text_features(_tower_params(params, "text_encoder"), tokens, text_len, config,
                          _compute_dtype(dtype))


def encode_text(params, config: ClipConfig, tokens: jax.Array, text_len: jax.Array, *,
                dtype: str | Dtype = "float32") -> jax.Array:
    """L2-normalised text embeddings [B, n_embd] (see `text_features`)."""
    return l2_normalize(text_features(params, config, tokens, text_len, dtype=dtype))


def init_clip_params(config: ClipConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh params with the reference's initialisation: {'image_encoder': ..., 'text_encoder': ...}."""
    # One compiled program: run op by op, initialisation is dominated by per-op dispatch.
    return jax.jit(_init_clip_params, static_argnums=0)(config, key)


def _init_clip_params(config: ClipConfig, key: jax.Array) -> dict[str, Any]:
    image_key, text_key = jax.random.split(key)
    size = config.image_size
    pixels = jnp.zeros((1, size, size, 3), jnp.float32)
    image = ClipImageEncoder(config).init(image_key, pixels, jnp.zeros((1,), jnp.int32))["params"]
    tokens = jnp.zeros((1, config.max_text_len), jnp.int32)
    text = ClipTextEncoder(config).init(text_key, tokens, jnp.ones((1,), jnp.int32))["params"]
    return {"image_encoder": image, "text_encoder": text}


def clip_params_shapes(config: ClipConfig) -> dict[str, Any]:
    """The params tree as `jax.ShapeDtypeStruct`s, computed without allocating any weight."""
    return jax.eval_shape(lambda key: _init_clip_params(config, key), jax.random.key(0))


# -- conversion from the reference's state dicts ---------------------------------------------------

_TOWERS = {"image_encoder": "clip_image_enc.pt", "text_encoder": "clip_text_enc.pt"}


class ClipConversionError(ValueError):
    """A reference CLIP state dict does not fit the config; the message lists every bad key."""


def _reference_key(path: tuple[str, ...]) -> str:
    """Flax path ('block_0', 'f_attn', 'f_q', 'kernel') -> reference key 'blocks.block_0.f_attn.f_q.w'."""
    *modules, leaf = path
    leaf = {"kernel": "w", "scale": "g", "bias": "b"}.get(leaf, leaf)
    return ".".join(("blocks", *modules, leaf))


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return value.T  # torch Linear stores [out, in]
    if path[-1] == "patch_proj":
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value


def _reference_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return tuple(reversed(shape))
    if path[-1] == "patch_proj":
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def _flat_paths(tree) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(entry.key for entry in path): leaf for path, leaf in flat}


def reference_state_dict_shapes(config: ClipConfig, tower: str) -> dict[str, tuple[int, ...]]:
    """Reference state-dict key -> shape that `tower` ('image_encoder'/'text_encoder') expects."""
    if tower not in _TOWERS:
        raise ValueError(f"tower must be one of {sorted(_TOWERS)}, got {tower!r}")
    shapes = _flat_paths(clip_params_shapes(config)[tower])
    return {_reference_key(path): _reference_shape(path, leaf.shape) for path, leaf in shapes.items()}


def convert_clip_state_dict(state_dict: Mapping[str, np.ndarray], config: ClipConfig, tower: str,
                            source: str = "state dict") -> dict[str, Any]:
    """One reference tower's state dict -> that tower's float32 Flax params.

    Every missing, unexpected or mis-shaped key is reported (name, expected vs found shape) in one
    `ClipConversionError` before anything is converted.
    """
    if tower not in _TOWERS:
        raise ValueError(f"tower must be one of {sorted(_TOWERS)}, got {tower!r}")
    shapes = _flat_paths(clip_params_shapes(config)[tower])
    expected = {_reference_key(path): (path, _reference_shape(path, leaf.shape)) for path, leaf in shapes.items()}
    problems = []
    for key in sorted(set(expected) - set(state_dict)):
        problems.append(f"missing key {key!r} (expected shape {expected[key][1]})")
    for key in sorted(set(state_dict) - set(expected)):
        problems.append(f"unexpected key {key!r} (found shape {tuple(np.shape(state_dict[key]))})")
    for key in sorted(set(expected) & set(state_dict)):
        found = state_dict[key]
        if tuple(np.shape(found)) != expected[key][1]:
            problems.append(f"key {key!r}: expected shape {expected[key][1]}, found {tuple(np.shape(found))}")
        elif not np.issubdtype(np.asarray(found).dtype, np.floating):
            problems.append(f"key {key!r}: expected a floating-point tensor, found dtype {np.asarray(found).dtype}")
    if problems:
        raise ClipConversionError(
            f"{source} does not match the CLIP {tower} for config {config.to_dict()}:\n  " + "\n  ".join(problems))

    params: dict[str, Any] = {}
    for key, (path, _) in expected.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax(path, np.asarray(state_dict[key], dtype=np.float32)))
    return params


def convert_clip_state_dicts(image_sd: Mapping[str, np.ndarray], text_sd: Mapping[str, np.ndarray],
                             config: ClipConfig) -> dict[str, Any]:
    """The reference's `clip_image_enc.pt` and `clip_text_enc.pt` state dicts -> CLIP params."""
    return {"image_encoder": convert_clip_state_dict(image_sd, config, "image_encoder", source="image state dict"),
            "text_encoder": convert_clip_state_dict(text_sd, config, "text_encoder", source="text state dict")}


def load_clip_checkpoints(image_path: str | Path, text_path: str | Path, config: ClipConfig) -> dict[str, Any]:
    """Read both reference `.pt` files (torch-free) and convert them."""
    from glide_jax.pt_reader import load_state_dict

    return {"image_encoder": convert_clip_state_dict(load_state_dict(image_path), config, "image_encoder",
                                                     source=str(image_path)),
            "text_encoder": convert_clip_state_dict(load_state_dict(text_path), config, "text_encoder",
                                                    source=str(text_path))}


# -- CLIP guidance ---------------------------------------------------------------------------------


@struct.dataclass
class ClipCondFn:
    """`cond_fn(x_t, original_timesteps) -> gradient` for the samplers' CLIP guidance.

    A pytree: the image tower's params, the text embeddings and the scale are leaves, so the whole
    object can be an argument of a jitted sampler (its weights then stay arguments, not constants
    baked into the executable) or be built inside one.
    """

    image_params: Any
    text_embeddings: jax.Array  # [B or 1, n_embd], L2-normalised
    guidance_scale: jax.Array
    config: ClipConfig = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")

    def similarity(self, x_t: jax.Array, original_timesteps: jax.Array) -> jax.Array:
        """exp(log logit_scale) · Σ_batch <z_text, z_image(x_t, t)>, as the reference guides with."""
        z_image = encode_image({"image_encoder": self.image_params}, self.config, x_t, original_timesteps,
                               dtype=self.dtype)
        scale = jnp.exp(jnp.float32(np.log(self.config.logit_scale)))
        return scale * jnp.sum(self.text_embeddings * z_image)

    def __call__(self, x_t: jax.Array, original_timesteps: jax.Array) -> jax.Array:
        if self.text_embeddings.shape[0] not in (1, x_t.shape[0]):
            raise ValueError(f"CLIP guidance has text embeddings for {self.text_embeddings.shape[0]} prompts "
                             f"but x_t has batch {x_t.shape[0]}; expected 1 or {x_t.shape[0]}")
        x = x_t.astype(jnp.float32)
        grad = jax.grad(self.similarity)(x, original_timesteps)
        return (grad * self.guidance_scale).astype(x_t.dtype)  # [B, H, W, 3]


def clip_cond_fn(clip_params, config: ClipConfig, text_embeddings: jax.Array, guidance_scale, *,
                 dtype: str = "float32") -> ClipCondFn:
    """CLIP guidance for `text_embeddings` (from `encode_text`, computed once before sampling)."""
    text_embeddings = jnp.asarray(text_embeddings, jnp.float32)
    if text_embeddings.ndim != 2 or text_embeddings.shape[1] != config.n_embd:
        raise ValueError(f"text_embeddings must have shape (B, {config.n_embd}), got {tuple(text_embeddings.shape)}")
    _compute_dtype(dtype)
    return ClipCondFn(image_params=_tower_params(clip_params, "image_encoder"), text_embeddings=text_embeddings,
                      guidance_scale=jnp.asarray(guidance_scale, jnp.float32), config=config, dtype=dtype)


# -- training --------------------------------------------------------------------------------------


def clip_contrastive_loss(params, config: ClipConfig, key: jax.Array, images: jax.Array, tokens: jax.Array,
                          text_len: jax.Array, *, diffusion=None, dtype: str = "float32") -> jax.Array:
    """CLIP's symmetric cross-entropy over the batch's image/text pairs, images noised first.

    Each image is noised with q_sample at a timestep drawn uniformly from the config's schedule
    (`diffusion` defaults to `config.beta_schedule` over `config.n_timesteps` steps), so the image
    tower learns to recognise content at every noise level, as guidance will query it. The
    temperature is the config's fixed `logit_scale`, as in the released model.
    """
    return clip_losses(params, config, key, images, tokens, text_len, diffusion=diffusion, dtype=dtype)["contrastive"]


def clip_losses(params, config: ClipConfig, key: jax.Array, images: jax.Array, tokens: jax.Array,
                text_len: jax.Array, *, negative_tokens=None, negative_len=None, has_negative=None,
                diffusion=None, dtype: str = "float32") -> dict:
    """`clip_contrastive_loss` as "contrastive", and with hard-negative captions (`negative_tokens`,
    `negative_len`, `has_negative`: per image a caption it nearly matches, e.g. its two objects'
    colours exchanged) also "negative": the cross-entropy of the own caption against that one
    alone, softplus(s_negative - s_own) at the contrastive temperature, averaged over the images
    that have one; "negative_won", the share of those whose own caption scored higher, and
    "negative_compared", the share of images that have one.

    In-batch negatives almost never differ from an image's caption only in which object has which
    colour, so the contrastive loss alone does not ask the CLIP to bind; this term does.
    """
    from glide_jax.diffusion import GaussianDiffusion

    if diffusion is None:
        diffusion = GaussianDiffusion.create(config.beta_schedule, config.n_timesteps)
    if diffusion.num_timesteps != config.n_timesteps:
        raise ValueError(f"the diffusion has {diffusion.num_timesteps} steps but the CLIP config's "
                         f"n_timesteps is {config.n_timesteps}; w_t is indexed by the original timestep")
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    if tokens.shape[0] != batch:
        raise ValueError(f"{batch} images but {tokens.shape[0]} token rows; the loss pairs image i with text i")
    t_key, noise_key = jax.random.split(key)
    timesteps = jax.random.randint(t_key, (batch,), 0, config.n_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, images.shape, jnp.float32)
    x_t = diffusion.q_sample(images, timesteps, noise)
    z_image = encode_image(params, config, x_t, timesteps, dtype=dtype)
    z_text = encode_text(params, config, tokens, text_len, dtype=dtype)
    logits = config.logit_scale * z_image @ z_text.T  # [B images, B texts]
    labels = jnp.arange(batch)
    image_to_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
    text_to_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
    out = {"contrastive": 0.5 * (image_to_text + text_to_image)}
    if negative_tokens is not None:
        if negative_tokens.shape[0] != batch:
            raise ValueError(f"{batch} images but {negative_tokens.shape[0]} negative token rows")
        z_negative = encode_text(params, config, negative_tokens, negative_len, dtype=dtype)
        gap = config.logit_scale * jnp.sum(z_image * (z_negative - z_text), axis=-1)   # s_negative - s_own
        counted = jnp.asarray(has_negative, bool)
        n = jnp.maximum(jnp.sum(counted), 1)
        out["negative"] = jnp.sum(jnp.where(counted, jax.nn.softplus(gap), 0.0)) / n
        out["negative_won"] = jnp.sum(counted & (gap < 0)) / n
        out["negative_compared"] = jnp.sum(counted) / batch
    return out
