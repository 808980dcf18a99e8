"""GLIDE's text-conditional U-Net family in Flax (NHWC).

The four released variants (base text-to-image, super-resolution, inpainting, super-resolution
inpainting) share one network; they differ only in how the input image is assembled, which
`ModelConfig.inpaint` / `ModelConfig.super_res` select in `GlideUNet.denoise`.

Submodule names follow the reference's module tree (`input_blocks_{i}_{j}` is the reference's
`input_blocks.i.j`), so the checkpoint converter maps keys by rule rather than by table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .conditioning import build_conditioning
from .config import ConfigError, ModelConfig
from .layers import (ATTENTION_IMPLEMENTATIONS, GROUPNORM_GROUPS, Dtype, GroupNorm32, avg_pool_2x2, conv, dense,
                     multihead_attention, resize_bilinear, timestep_embedding, upsample_nearest)
from .text_encoder import TextEncoder

TextOutputs = dict[str, jax.Array]


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep(+text) embedding, optionally resampling by 2."""

    out_channels: int
    use_scale_shift_norm: bool
    dropout: float = 0.0
    resample: str | None = None  # None, "up" or "down"
    dtype: Dtype = jnp.float32
    norm_groups: int = GROUPNORM_GROUPS

    @nn.compact
    def __call__(self, x, emb, deterministic: bool = True, conditioning_map=None):
        h = GroupNorm32(swish=True, groups=self.norm_groups, name="in_norm")(x)
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = avg_pool_2x2(h), avg_pool_2x2(x)
        h = conv(self.out_channels, 3, self.dtype, "in_conv")(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(emb_width, self.dtype, "emb_proj")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if conditioning_map is not None:   # an optional extension's map (glide_jax.conditioning)
            placed = resize_bilinear(conditioning_map.astype(h.dtype), h.shape[1], h.shape[2])
            emb_out = emb_out + dense(emb_width, self.dtype, "layout_proj", zero_init=True)(placed).astype(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm32(swish=False, groups=self.norm_groups, name="out_norm")(h) * (1 + scale) + shift
            h = nn.silu(h)
        else:
            h = GroupNorm32(swish=True, groups=self.norm_groups, name="out_norm")(h + emb_out)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, self.dtype, "out_conv", zero_init=True)(h)

        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "skip_connection")(x)
        assert x.shape == h.shape, (x.shape, h.shape)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over image positions; with text, the caption's tokens are prepended to the keys
    and values (the text is not masked: GLIDE attends to padding positions too)."""

    heads: int
    dtype: Dtype = jnp.float32
    norm_groups: int = GROUPNORM_GROUPS
    implementation: str = "einsum"   # see layers.ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, xf_out=None):
        batch, height, width, channels = x.shape
        head_ch = channels // self.heads
        h = GroupNorm32(groups=self.norm_groups, name="norm")(x).reshape(batch, height * width, channels)
        # Fused projections are laid out [head][q|k|v][channel], matching the reference's weights.
        qkv = dense(3 * channels, self.dtype, "qkv")(h)
        qkv = qkv.reshape(batch, height * width, self.heads, 3, head_ch)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if xf_out is not None:
            ekv = dense(2 * channels, self.dtype, "encoder_kv")(
                xf_out.astype(self.dtype))
            ekv = ekv.reshape(batch, xf_out.shape[1], self.heads, 2, head_ch)
            k = jnp.concatenate([ekv[..., 0, :], k], axis=1)
            v = jnp.concatenate([ekv[..., 1, :], v], axis=1)
        out = multihead_attention(q, k, v, self.implementation).reshape(batch, height * width, channels)
        out = dense(channels, self.dtype, "proj_out", zero_init=True)(out)
        return x + out.reshape(x.shape)


class Downsample(nn.Module):
    """Strided 3x3 convolution (used when `resblock_updown` is off)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.channels, 3, self.dtype, "op", stride=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (used when `resblock_updown` is off)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.channels, 3, self.dtype, "conv")(upsample_nearest(x))


def _attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        if channels % num_heads:
            raise ConfigError(f"attention over {channels} channels cannot be split into num_heads={num_heads}")
        return num_heads
    if channels % num_head_channels:
        raise ConfigError(f"attention over {channels} channels is not divisible by "
                          f"num_head_channels={num_head_channels}")
    return channels // num_head_channels


# What `remat` may name: which U-Net blocks keep only their inputs for the backward pass and recompute
# the rest. "attention": the attention blocks (their [B, heads, HW, HW + text] logits and softmax are the
# largest activations at 32 px); "blocks": every ResBlock and attention block; "blocks_save_dots": the
# same, but the outputs of matmuls without batch dimensions (the Dense projections) are kept, so only
# convolutions, norms and the attention products are recomputed.
REMAT_POLICIES = ("none", "attention", "blocks", "blocks_save_dots")


def check_run_options(remat: str, attention: str, dtype: Dtype | None = None) -> None:
    """Raises a ConfigError naming `remat` or `attention` if either is unknown, or if cuDNN attention is
    asked for with a float32 compute `dtype` (its fused kernel takes only float16 and bfloat16)."""
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got {attention!r}")
    if attention == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"attention 'cudnn' needs bfloat16 (or float16) compute, got {jnp.dtype(dtype).name}")


def _block_classes(remat: str):
    """(ResBlock, AttentionBlock), wrapped in `nn.remat` as `remat` asks. The wrapped classes keep the
    submodule names they are given, so the params tree is the same whatever the policy."""
    if remat == "none":
        return ResBlock, AttentionBlock
    if remat == "attention":
        return ResBlock, nn.remat(AttentionBlock)
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "blocks_save_dots" else None
    # ResBlock.__call__(self, x, emb, deterministic, conditioning_map): `deterministic` is a Python bool,
    # so the wrapped block must be given all four arguments positionally (the U-Net always does).
    return nn.remat(ResBlock, static_argnums=(3,), policy=policy), nn.remat(AttentionBlock, policy=policy)


class UNet(nn.Module):
    """The U-Net torso: time embedding, down path, middle, up path with skips, output head.

    `remat` and `attention` are run options (`GlideUNet`'s), not part of the model."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, timesteps, xf_proj=None, xf_out=None, deterministic: bool = True):
        cfg = self.config
        check_run_options(self.remat, self.attention, self.dtype)
        res_cls, attention_cls = _block_classes(self.remat)
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def attention(ch, heads, name):
            block = attention_cls(_attention_heads(ch, heads, cfg.num_head_channels), self.dtype, cfg.norm_groups,
                                  self.attention, name=name)
            return lambda h: block(h, xf_out)

        emb = timestep_embedding(timesteps, cfg.num_channels).astype(self.dtype)
        emb = dense(cfg.time_embed_dim, self.dtype, "time_embed_0")(emb)
        emb = dense(cfg.time_embed_dim, self.dtype, "time_embed_2")(nn.silu(emb))
        if xf_proj is not None:
            emb = emb + xf_proj.astype(emb.dtype)
        conditioning_map = None
        if cfg.conditioning is not None and xf_out is not None:
            conditioning_map = build_conditioning(cfg.conditioning, self.dtype)(xf_out, emb)

        def res_block(out_ch, name, resample=None):
            block = res_cls(out_ch, cfg.use_scale_shift_norm, cfg.dropout, resample, self.dtype, cfg.norm_groups,
                            name=name)
            return lambda h: block(h, emb, deterministic, conditioning_map)

        def resample(ch, name, direction):
            if cfg.resblock_updown:
                return res_block(ch, name, resample=direction)
            return (Downsample if direction == "down" else Upsample)(ch, self.dtype, name=name)

        h = conv(cfg.channel_multipliers[0] * cfg.num_channels, 3, self.dtype, "input_blocks_0_0")(x.astype(self.dtype))
        h, skips = _down_path(h, cfg, res_block, attention, resample)
        ch = cfg.channel_multipliers[-1] * cfg.num_channels
        h = res_block(ch, "middle_block_0")(h)
        h = attention(ch, cfg.num_heads, "middle_block_1")(h)
        h = res_block(ch, "middle_block_2")(h)
        h = _up_path(h, skips, cfg, res_block, lambda ch, name: attention(ch, heads_up, name), resample)

        # The output head runs in float32 even under reduced precision, as the reference keeps it.
        h = GroupNorm32(swish=True, groups=cfg.norm_groups, name="out_norm")(h.astype(jnp.float32))
        return conv(cfg.out_channels, 3, jnp.float32, "out_conv", zero_init=True)(h)  # [B, H, W, 6]


def _down_path(h, cfg: ModelConfig, res_block, attention, resample):
    """The input blocks (called inside `UNet.__call__`, so their modules are the U-Net's); returns the
    last activation and the skips the up path concatenates, in order."""
    skips = [h]
    rate, block = 1, 1
    levels = len(cfg.channel_multipliers)
    for level, mult in enumerate(cfg.channel_multipliers):
        ch = mult * cfg.num_channels
        for _ in range(cfg.num_res_blocks):
            h = res_block(ch, f"input_blocks_{block}_0")(h)
            if rate in cfg.attention_downsample_rates:
                h = attention(ch, cfg.num_heads, f"input_blocks_{block}_1")(h)
            skips.append(h)
            block += 1
        if level != levels - 1:
            h = resample(ch, f"input_blocks_{block}_0", "down")(h)
            skips.append(h)
            rate *= 2
            block += 1
    return h, skips


def _up_path(h, skips: list, cfg: ModelConfig, res_block, attention, resample):
    """The output blocks, each taking the last of `skips` (which it empties)."""
    rate = 2 ** (len(cfg.channel_multipliers) - 1)
    block = 0
    for level, mult in reversed(list(enumerate(cfg.channel_multipliers))):
        ch = mult * cfg.num_channels
        for i in range(cfg.num_res_blocks + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            layer = 0
            h = res_block(ch, f"output_blocks_{block}_{layer}")(h)
            if rate in cfg.attention_downsample_rates:
                layer += 1
                h = attention(ch, f"output_blocks_{block}_{layer}")(h)
            if level and i == cfg.num_res_blocks:
                layer += 1
                h = resample(ch, f"output_blocks_{block}_{layer}", "up")(h)
                rate //= 2
            block += 1
    assert not skips
    return h


class GlideUNet(nn.Module):
    """A GLIDE model: optional text transformer + U-Net, with the variant's input assembly.

    Call it whole (`__call__`), or split so a sampler encodes the caption once and then runs only
    the U-Net at every step: `encode_text` then `denoise`.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    # Run options, not saved with the model (the params and outputs are the same whatever they are):
    # `remat`, one of REMAT_POLICIES, trades recomputation in the backward pass for activation memory;
    # `attention`, one of layers.ATTENTION_IMPLEMENTATIONS, picks the U-Net attention's kernel.
    remat: str = "none"
    attention: str = "einsum"

    def setup(self):
        cfg = self.config
        if cfg.has_text:
            self.text_encoder = TextEncoder(
                text_ctx=cfg.text_ctx, width=cfg.xf_width, layers=cfg.xf_layers, heads=cfg.xf_heads,
                n_vocab=cfg.n_vocab, final_ln=cfg.xf_final_ln, padding=cfg.xf_padding,
                proj_dim=cfg.time_embed_dim, dtype=self.dtype)
        self.unet = UNet(cfg, self.dtype, self.remat, self.attention)

    def encode_text(self, tokens, mask=None) -> TextOutputs | None:
        if not self.config.has_text:
            return None
        return self.text_encoder(tokens, mask)

    def denoise(self, x, timesteps, text: TextOutputs | None = None, *, low_res=None, inpaint_image=None,
                inpaint_mask=None, deterministic: bool = True):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"x must be NHWC with 3 channels, got shape {x.shape}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {timesteps.shape}")
        if cfg.has_text and text is None:
            raise ValueError("this model is text-conditional: pass tokens (and mask) or encode_text's output")
        parts = [x]
        if cfg.inpaint:
            if inpaint_image is None:
                inpaint_image = jnp.zeros_like(x)
            if inpaint_mask is None:
                inpaint_mask = jnp.zeros_like(x[..., :1])
            _check_shape("inpaint_image", inpaint_image, x.shape)
            _check_shape("inpaint_mask", inpaint_mask, x.shape[:3] + (1,))
            parts += [inpaint_image * inpaint_mask, inpaint_mask.astype(x.dtype)]
        if cfg.super_res:
            if low_res is None:
                raise ValueError("this is a super-resolution model: low_res is required")
            if low_res.ndim != 4 or low_res.shape[0] != x.shape[0] or low_res.shape[-1] != 3:
                raise ValueError(f"low_res must be NHWC [{x.shape[0]}, h, w, 3], got {low_res.shape}")
            parts.append(resize_bilinear(low_res.astype(x.dtype), x.shape[1], x.shape[2]))
        h = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else x
        xf_proj = text["xf_proj"] if text is not None else None
        xf_out = text["xf_out"] if text is not None else None
        out = self.unet(h, timesteps, xf_proj, xf_out, deterministic)
        return out.astype(x.dtype)

    def __call__(self, x, timesteps, tokens=None, mask=None, *, low_res=None, inpaint_image=None,
                 inpaint_mask=None, deterministic: bool = True):
        text = self.encode_text(tokens, mask) if self.config.has_text else None
        return self.denoise(x, timesteps, text, low_res=low_res, inpaint_image=inpaint_image,
                            inpaint_mask=inpaint_mask, deterministic=deterministic)


def _check_shape(name: str, value, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def example_inputs(config: ModelConfig, batch: int = 1) -> dict[str, Any]:
    """Zero inputs of the right shapes for `GlideUNet.__call__`, for `init` and `jax.eval_shape`."""
    size = config.image_size
    inputs: dict[str, Any] = {
        "x": jnp.zeros((batch, size, size, 3), jnp.float32),
        "timesteps": jnp.zeros((batch,), jnp.int32),
        "tokens": jnp.zeros((batch, config.text_ctx), jnp.int32) if config.has_text else None,
        "mask": jnp.ones((batch, config.text_ctx), bool) if config.has_text else None,
    }
    if config.super_res:
        low = max(size // 4, 1)
        inputs["low_res"] = jnp.zeros((batch, low, low, 3), jnp.float32)
    if config.inpaint:
        inputs["inpaint_image"] = jnp.zeros((batch, size, size, 3), jnp.float32)
        inputs["inpaint_mask"] = jnp.zeros((batch, size, size, 1), jnp.float32)
    return inputs


def init_params(config: ModelConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict:
    """Freshly initialised float32 parameters for `config` (compute dtype does not change them)."""
    model = GlideUNet(config, dtype)
    inputs = example_inputs(config)
    return jax.jit(lambda k: model.init(k, **inputs)["params"])(key)


def param_shapes(config: ModelConfig) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s, computed without allocating anything."""
    model = GlideUNet(config)
    inputs = example_inputs(config)
    return jax.eval_shape(lambda k: model.init(k, **inputs)["params"], jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
