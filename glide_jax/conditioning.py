"""Optional conditioning extensions of the U-Net. No released GLIDE model has one.

An extension is a Flax module that turns the text transformer's outputs `xf_out` [B, T, W] and the
timestep(+pooled text) embedding [B, E] into a map over the image [B, h, w, C]. When a model config
names one (`ModelConfig.conditioning = {"kind": ..., **options}`), the U-Net builds it once per call
(its parameters live under `unet/<kind>`) and every ResBlock adds a projection of the map, resized
to its resolution and zero at initialisation (`layout_proj`), to its timestep scale and shift. So
adding an extension to a trained model leaves its function unchanged until it is trained.

Extensions are registered by kind with `register_conditioning(kind, options_class, module_class)`;
`options_class` is a frozen dataclass of the extension's options (its field names are the config's
keys) and `module_class(options, dtype, name=kind)` builds the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from .config import ConfigError
from .layers import Dtype, dense, multihead_attention


@dataclasses.dataclass(frozen=True)
class _Extension:
    options: type
    module: Callable[..., nn.Module]


_EXTENSIONS: dict[str, _Extension] = {}


def register_conditioning(kind: str, options: type, module: Callable[..., nn.Module]) -> None:
    """Makes `{"kind": kind, ...}` a valid `ModelConfig.conditioning`; `options` is a frozen
    dataclass whose optional `validate(model_config)` raises ConfigError for options that do not fit
    the model."""
    if kind in _EXTENSIONS and _EXTENSIONS[kind] != _Extension(options, module):
        raise ValueError(f"conditioning extension {kind!r} is already registered")
    _EXTENSIONS[kind] = _Extension(options, module)


def registered_conditioning() -> list[str]:
    return sorted(_EXTENSIONS)


def parse_conditioning(spec: Any):
    """The options object of a `{"kind": ..., **options}` spec (an options object passes through)."""
    if spec is None or any(isinstance(spec, e.options) for e in _EXTENSIONS.values()):
        return spec
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"conditioning must be null or an object with a 'kind' "
                          f"(one of {registered_conditioning()}), got {spec!r}")
    kind = spec["kind"]
    if kind not in _EXTENSIONS:
        raise ConfigError(f"conditioning kind {kind!r} is not registered; registered kinds: {registered_conditioning()}")
    options = _EXTENSIONS[kind].options
    known = {f.name for f in dataclasses.fields(options)}
    unknown = sorted(set(spec) - known - {"kind"})
    if unknown:
        raise ConfigError(f"unknown conditioning option(s) {unknown} for kind {kind!r}; known: {sorted(known)}")
    return options(**{k: v for k, v in spec.items() if k != "kind"})


def conditioning_kind(options) -> str:
    return next(kind for kind, e in _EXTENSIONS.items() if isinstance(options, e.options))


def conditioning_spec(options) -> dict | None:
    """The JSON form of an options object: `{"kind": ..., **options}`."""
    if options is None:
        return None
    return {"kind": conditioning_kind(options), **dataclasses.asdict(options)}


def build_conditioning(options, dtype: Dtype) -> nn.Module:
    kind = conditioning_kind(options)
    return _EXTENSIONS[kind].module(options, dtype, name=kind)


# -- the text layout ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextLayoutOptions:
    """A `size`×`size` grid of learned queries, one per place, attending to the caption's tokens
    with `heads` heads. GLIDE gives the caption's pooled vector to every place alike, and its tokens
    only through attention that must first find the place in a noisy image; this path lets the
    caption alone say "red here, blue there" at the noisiest steps, where a small model settles the
    colours. The bundled demo base uses it (demo/REPRODUCE.md, items 7 and 8)."""

    size: int
    heads: int = 4

    def validate(self, config) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"conditioning text_layout: size must be a positive integer, got {self.size!r}")
        if not config.has_text:
            raise ConfigError("conditioning text_layout needs a text transformer (xf_width > 0)")
        if self.heads <= 0 or config.xf_width % self.heads:
            raise ConfigError(f"conditioning text_layout: heads {self.heads} must be positive and divide "
                              f"xf_width {config.xf_width}")


class TextLayout(nn.Module):
    """The caption laid out over the grid of `TextLayoutOptions`: one learned query per place attends
    to the text transformer's outputs, and the timestep embedding is added so that the map can say
    different things at different noise levels. Returns [B, size, size, width]."""

    options: TextLayoutOptions
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, xf_out, emb):
        size, heads = self.options.size, self.options.heads
        batch, _, width = xf_out.shape
        head_ch = width // heads
        # Unit-scale queries: the attention must tell the places apart from the first step on.
        queries = self.param("queries", nn.initializers.normal(1.0), (size * size, width), jnp.float32)
        q = dense(width, self.dtype, "q")(queries.astype(self.dtype))
        q = jnp.broadcast_to(q.reshape(1, -1, heads, head_ch), (batch, q.shape[0], heads, head_ch))
        kv = dense(2 * width, self.dtype, "kv")(xf_out.astype(self.dtype))
        kv = kv.reshape(batch, xf_out.shape[1], heads, 2, head_ch)
        out = multihead_attention(q, kv[..., 0, :], kv[..., 1, :]).reshape(batch, -1, width)
        out = dense(width, self.dtype, "proj")(out) + dense(width, self.dtype, "emb_proj")(nn.silu(emb))[:, None, :]
        return nn.silu(out).reshape(batch, size, size, width)


register_conditioning("text_layout", TextLayoutOptions, TextLayout)
