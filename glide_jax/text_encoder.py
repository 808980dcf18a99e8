"""GLIDE's text transformer: caption tokens -> a pooled vector for the timestep embedding and
per-token features that the U-Net's attention layers use as extra keys and values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import Dtype, LayerNorm32, dense, multihead_attention


class SelfAttention(nn.Module):
    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, length, _ = x.shape
        head_ch = self.width // self.heads
        # The fused projection is laid out [head][q|k|v][channel], as the reference's weights are.
        qkv = dense(3 * self.width, self.dtype, "c_qkv")(x)
        qkv = qkv.reshape(batch, length, self.heads, 3, head_ch)
        out = multihead_attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :])
        out = out.reshape(batch, length, self.width)
        return dense(self.width, self.dtype, "c_proj")(out)


class MLP(nn.Module):
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(4 * self.width, self.dtype, "c_fc")(x)
        h = nn.gelu(h, approximate=False)  # torch.nn.GELU's default is the exact erf form
        return dense(self.width, self.dtype, "c_proj")(h)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block (no causal mask: GLIDE encodes the whole caption at once)."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x + SelfAttention(self.width, self.heads, self.dtype, name="attn")(LayerNorm32(name="ln_1")(x))
        x = x + MLP(self.width, self.dtype, name="mlp")(LayerNorm32(name="ln_2")(x))
        return x


class TextEncoder(nn.Module):
    """Encodes `tokens` [B, text_ctx] (with `mask` [B, text_ctx], true on real tokens).

    Returns `xf_proj` [B, time_embed_dim], projected from the **last position** (even when that
    position is padding, as in the reference), and `xf_out` [B, text_ctx, width].
    """

    text_ctx: int
    width: int
    layers: int
    heads: int
    n_vocab: int
    final_ln: bool
    padding: bool
    proj_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None) -> dict[str, jax.Array]:
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must have shape [batch, text_ctx={self.text_ctx}], got {tokens.shape}")
        init = nn.initializers.normal(stddev=0.01)
        token_embedding = nn.Embed(self.n_vocab, self.width, param_dtype=jnp.float32,
                                   embedding_init=init, name="token_embedding")
        positional = self.param("positional_embedding", init, (self.text_ctx, self.width), jnp.float32)
        x = token_embedding(tokens) + positional[None]
        if self.padding:
            if mask is None:
                raise ValueError("this model uses xf_padding, so a token mask is required")
            if mask.shape != tokens.shape:
                raise ValueError(f"mask shape {mask.shape} does not match tokens shape {tokens.shape}")
            padding = self.param("padding_embedding", init, (self.text_ctx, self.width), jnp.float32)
            x = jnp.where(mask[..., None], x, padding[None])
        x = x.astype(self.dtype)
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.width, self.heads, self.dtype, name=f"resblocks_{i}")(x)
        if self.final_ln:
            x = LayerNorm32(name="final_ln")(x)
        xf_proj = dense(self.proj_dim, self.dtype, "transformer_proj")(x[:, -1])
        return {"xf_proj": xf_proj, "xf_out": x}
