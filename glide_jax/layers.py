"""Building blocks shared by GLIDE's text transformer and U-Net (NHWC, flax.linen).

Normalisation layers always compute in float32 whatever the compute dtype, as the reference does
for its fp16 models: statistics over thousands of activations lose too much in half precision.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

GROUPNORM_GROUPS = 32
NORM_EPS = 1e-5


class GroupNorm32(nn.Module):
    """GroupNorm over `groups` groups of contiguous channels (the reference's 32 by default),
    computed in float32, optional SiLU after."""

    swish: bool = False
    groups: int = GROUPNORM_GROUPS

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.groups:
            raise ValueError(f"GroupNorm needs channels divisible by its {self.groups} groups, got {channels} "
                             f"(input shape {x.shape}); choose num_channels, channel_mult and norm_groups accordingly")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        h = x.astype(jnp.float32)
        # Two-pass statistics, summed per channel over the positions first and only then over each
        # group's channels, and applied per channel: XLA:CPU vectorises [B, positions, C] far better
        # than the [B, positions, groups, C/G] view (whose innermost axis is C/G, e.g. 6).
        positions = tuple(range(1, h.ndim - 1))
        per_group = channels // self.groups
        count = math.prod(h.shape[1:-1]) * per_group

        def group_means(per_channel_sums):   # [B, C] -> [B, 1, ..., C]: each channel's group mean
            means = per_channel_sums.reshape(-1, self.groups, per_group).sum(-1) / count
            return jnp.repeat(means, per_group, axis=-1).reshape(h.shape[:1] + (1,) * len(positions) + (channels,))

        centred = h - group_means(h.sum(positions))
        y = centred * jax.lax.rsqrt(group_means(jnp.square(centred).sum(positions)) + NORM_EPS) * scale + bias
        if self.swish:
            y = nn.silu(y)
        return y.astype(x.dtype)


class LayerNorm32(nn.Module):
    """LayerNorm over the last axis computed in float32 (torch's epsilon), output in the input's dtype."""

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
        h = x.astype(jnp.float32)
        mean = h.mean(axis=-1, keepdims=True)
        var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
        y = (h - mean) * jax.lax.rsqrt(var + NORM_EPS) * scale + bias
        return y.astype(x.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], zero-padded if dim is odd."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding  # [B, dim]


# How `multihead_attention` computes: "einsum" (the reference's order of operations, below), or
# `jax.nn.dot_product_attention` with its "xla" implementation (the same softmax attention as XLA
# ops, logits accumulated in float32) or "cudnn" (cuDNN's fused flash attention: GPU only, float16 or
# bfloat16 inputs; it never materialises the [B, heads, T, S] logits).
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "einsum") -> jax.Array:
    """Softmax attention over [B, T, heads, ch] queries and [B, S, heads, ch] keys/values.

    "einsum": q and k are each scaled by ch**-1/4 before the product (rather than dividing the logits
    by sqrt(ch) afterwards) so half-precision logits stay in range; the softmax runs in float32.
    """
    if implementation != "einsum":
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be one of {list(ATTENTION_IMPLEMENTATIONS)}, "
                             f"got {implementation!r}")
        return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]),
                                            implementation=implementation)
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
    logits = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshc->bthc", weights, v)  # [B, T, heads, ch]


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation weights of torch's bilinear resize with align_corners=False."""
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(src), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        matrix[i, lo] += 1.0 - frac
        matrix[i, hi] += frac
    return matrix


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC images, matching torch's `interpolate(mode="bilinear",
    align_corners=False)` exactly (no antialiasing, edge clamping), for any size ratio.

    `jax.image.resize` antialiases when shrinking and so would not reproduce the reference.
    """
    rows = jnp.asarray(_bilinear_matrix(images.shape[1], height), images.dtype)
    cols = jnp.asarray(_bilinear_matrix(images.shape[2], width), images.dtype)
    precision = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,bhwc->bowc", rows, images, precision=precision)
    return jnp.einsum("pw,bowc->bopc", cols, out, precision=precision)


# PyTorch's default for Linear/Conv weights (kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in))).
# Uniform also compiles far faster on XLA:CPU than flax's truncated normal (no erf_inv per parameter),
# which matters for initialising a model with hundreds of parameter arrays.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _kernel_init(zero_init: bool):
    # The reference zero-initialises the last layer of every residual branch and the output head,
    # so a fresh model starts as the identity on its skip paths.
    return nn.initializers.zeros if zero_init else torch_default_init


def dense(features: int, dtype: Dtype, name: str, zero_init: bool = False) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_kernel_init(zero_init),
                    name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
         zero_init: bool = False) -> nn.Conv:
    # Explicit padding: flax's "SAME" pads (0, 1) for stride 2 on even sizes, torch pads (1, 1).
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=_kernel_init(zero_init), name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
