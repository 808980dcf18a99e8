"""Training: the train state, the optimizer, the losses of each model kind and the step function.

Data flow of one step: a global batch (sharded over the mesh's devices) → split into
`grad_accum` microbatches → per microbatch, the kind's loss and its gradient in the compute dtype
against float32 master params → mean gradient → global-norm clip → AdamW → EMA update. The whole
step is one `jax.jit` program whose input and output shardings are fixed up front, so it compiles
once and XLA inserts the gradient all-reduce (see `glide_jax.parallel`).

Model kinds (`TrainTask.kind`):
- `base`: text-to-image. Captions are replaced by the empty caption with probability
  `caption_dropout` (0.2 by default) so one model learns both the conditional and the
  unconditional eps that classifier-free guidance mixes.
- `upsample`: super-resolution; the batch carries `low_res`, the degraded small image.
- `inpaint`: the batch carries `inpaint_mask` (1 = keep); the model sees the kept pixels.
- `upsample_inpaint`: both of the above.
- `clip`: the noised CLIP, trained with the contrastive loss on images noised to random timesteps.

Randomness comes from `fold_in(state.rng, step)`. The diffusion kinds draw each example's
timestep, noise and caption dropout from that key and the example's row in the global batch, so
gradient accumulation sees the same draws as one big batch (exactly the same update when the
model has no dropout; dropout masks are drawn per microbatch). JAX's partitionable threefry makes
every draw independent of how the batch is sharded: the same global batch gives the same update
on 1 or on 8 devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from glide_jax import parallel, xla_options
from glide_jax.config import ConfigError, ModelConfig

DIFFUSION_KINDS = ("base", "upsample", "inpaint", "upsample_inpaint")
MODEL_KINDS = DIFFUSION_KINDS + ("clip",)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; `step` is the step that produced it."""

    def __init__(self, step: int, metrics: dict[str, float]):
        self.step = step
        self.metrics = metrics
        super().__init__(f"non-finite loss at step {step}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))


# -- optimizer -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    schedule: str = "constant"          # "constant" or "cosine" (after warm-up)
    warmup_steps: int = 0
    decay_steps: int = 0                # cosine: steps from the end of warm-up to min_learning_rate
    min_learning_rate: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0              # global-norm clip; 0 disables
    restart_step: int = 0               # > 0: the schedule, warm-up included, begins again here
    # Parameter subtrees left as they are ("text_encoder/resblocks_0", ...: '/'-joined leading path
    # components), e.g. a pretrained text encoder kept fixed under a new U-Net.
    frozen: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optimizer.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        for key in ("warmup_steps", "decay_steps", "restart_step"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optimizer.{key} must be >= 0, got {getattr(self, key)}")
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ConfigError("optimizer.decay_steps must be positive for the cosine schedule")
        if self.grad_clip < 0:
            raise ConfigError(f"optimizer.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ConfigError(f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        for prefix in self.frozen:
            if not isinstance(prefix, str) or not all(prefix.split("/")):
                raise ConfigError(f"optimizer.frozen entries must be '/'-joined parameter paths such as "
                                  f"'text_encoder/resblocks_0', got {prefix!r}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to `min_learning_rate`; with
    `restart_step`, the same schedule again from that step (a warm restart: a finished run resumed
    with a larger `train_steps` would otherwise go on at its final, smallest rate)."""
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps,
                                            alpha=cfg.min_learning_rate / cfg.learning_rate)
    once = after
    if cfg.warmup_steps > 0:
        warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        once = optax.join_schedules([warmup, after], [cfg.warmup_steps])
    if cfg.restart_step == 0:
        return once
    return optax.join_schedules([once, once], [cfg.restart_step])


def frozen_labels(params: Any, frozen: list[str]) -> Any:
    """"frozen" or "trained" for each leaf of `params`; a prefix that names no parameter is an
    error (a typo would otherwise train what was meant to stay fixed)."""
    prefixes = [tuple(p.split("/")) for p in frozen]
    used = set()

    def label(path, _):
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        hits = [p for p in prefixes if names[:len(p)] == p]
        used.update(hits)
        return "frozen" if hits else "trained"

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = ["/".join(p) for p in prefixes if p not in used]
    if unused:
        top = sorted(str(k) for k in params) if isinstance(params, dict) else []
        raise ConfigError(f"optimizer.frozen: {unused} name no parameter (top-level parameter groups: {top})")
    return labels


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; weight decay only on matrices and kernels, not on
    biases, norm scales or embeddings' 1-D tables (decaying those only fights the norms).
    Parameters under `cfg.frozen` get no update (and no optimizer state); the clipping norm is
    that of the trained parameters' gradients."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    trained = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
    if not cfg.frozen:
        return trained
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()},
                                 lambda params: frozen_labels(params, cfg.frozen))


# -- state -----------------------------------------------------------------------------------------

class TrainState(struct.PyTreeNode):
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # float32 master parameters
    ema_params: Any          # exponential moving average of params, float32
    opt_state: Any
    rng: jax.Array           # raw uint32 key data; raw so checkpoints hold plain arrays


def _key(raw: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(raw)


# -- tasks (what a model kind trains on) -----------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class TrainTask:
    """A model plus its objective: `init(key)` gives params, `loss(params, batch, key)` the loss.

    `batch_spec(batch_size)` names the arrays a batch must hold, with shapes and dtypes; the
    training loop builds exactly those.
    """

    kind: str
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, dict, jax.Array, bool], tuple[jax.Array, dict]]
    batch_spec: Callable[[int], dict[str, jax.ShapeDtypeStruct]]
    image_size: int


# The hard-negative term (diffusion_task's `negative_weight`): the scale, in weighted MSE, below which a
# gap between the two captions' errors counts as decided, and the share of each batch it runs on.
NEGATIVE_TEMPERATURE = 0.01
NEGATIVE_SHARE = 0.25


def draw_timesteps(example_keys: jax.Array, num_timesteps: int, high_noise_fraction: float = 0.0,
                   high_noise_from: float = 0.95) -> jax.Array:
    """One training timestep per example key [B]: uniform over the chain, except that
    `high_noise_fraction` of the examples draw uniformly from timestep int(high_noise_from * T) on.
    The uniform draw is the same with or without the high-noise option, so a fraction of 0
    reproduces runs that predate it.

    Why: at the noisiest steps the image's mean colour is still hidden in the noise, so the text
    alone must decide it, yet the eps target is almost x_t itself: a wrong mean costs so little loss,
    on so few of the uniform draws, that a model can learn to copy the noise's mean instead of
    reading the caption."""
    start = min(int(high_noise_from * num_timesteps), num_timesteps - 1)

    def one(key):
        uniform = jax.random.randint(jax.random.fold_in(key, 0), (), 0, num_timesteps)
        if high_noise_fraction <= 0.0:
            return uniform
        noisy = jax.random.randint(jax.random.fold_in(key, 3), (), start, num_timesteps)
        return jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 4), high_noise_fraction), noisy, uniform)

    return jax.vmap(one)(example_keys)


def diffusion_task(config: ModelConfig, diffusion, kind: str, *, compute_dtype: str = "float32",
                   caption_dropout: float = 0.2, empty_tokens=None, empty_mask=None,
                   low_res_size: int | None = None, min_snr_gamma: float = 0.0,
                   high_noise_fraction: float = 0.0, high_noise_from: float = 0.95,
                   negative_weight: float = 0.0, negative_from: float = 0.7, remat: str = "none",
                   attention: str = "einsum") -> TrainTask:
    """Task for the GLIDE U-Net kinds (`base`, `upsample`, `inpaint`, `upsample_inpaint`).

    `empty_tokens`/`empty_mask` (text_ctx,) are the tokenizer's empty caption, used for caption
    dropout. `low_res_size` is the side of the upsampler's input (image_size // 4 by default).
    `min_snr_gamma` > 0 weights each example's MSE (`min_snr_weights`); 0 keeps GLIDE's unweighted
    objective. `high_noise_fraction` of the examples draw their timestep from `high_noise_from` * T
    on (`draw_timesteps`). `negative_weight` > 0 adds the hard-negative term (`negative_term`) on
    examples with a timestep from `negative_from` * T on; batches then carry `negative_tokens`,
    `negative_mask` and `has_negative`. `remat` (`glide_jax.unet.REMAT_POLICIES`) and `attention`
    (`glide_jax.layers.ATTENTION_IMPLEMENTATIONS`) are the U-Net's run options: memory and speed, the
    same params and (up to rounding) the same loss.
    """
    from glide_jax.unet import GlideUNet, check_run_options, example_inputs

    _check_diffusion_options(config, diffusion, kind, compute_dtype, caption_dropout, min_snr_gamma,
                             high_noise_fraction, high_noise_from, negative_weight, negative_from)
    wants_super_res = kind in ("upsample", "upsample_inpaint")
    wants_inpaint = kind in ("inpaint", "upsample_inpaint")
    mse_weights = min_snr_weights(diffusion, config.prediction, min_snr_gamma)
    empty_tokens, empty_mask = _empty_caption(config, caption_dropout, empty_tokens, empty_mask)
    low = low_res_size or max(config.image_size // 4, 1)
    check_run_options(remat, attention, COMPUTE_DTYPES[compute_dtype])
    model = GlideUNet(config, COMPUTE_DTYPES[compute_dtype], remat=remat, attention=attention)
    num_timesteps = diffusion.num_timesteps
    negative_start = min(int(negative_from * num_timesteps), num_timesteps - 1)

    def init(key):
        return model.init(key, **example_inputs(config))["params"]

    def batch_spec(batch_size):
        return _diffusion_batch_spec(config, batch_size, low, wants_super_res, wants_inpaint, negative_weight > 0)

    def loss(params, batch, key, train=True, rows=None):
        x0 = batch["images"]
        n = x0.shape[0]
        rows = jnp.arange(n) if rows is None else rows
        t, noise, drop, k_dropout = _draw_examples(key, rows, x0.shape[1:], num_timesteps, caption_dropout,
                                                   high_noise_fraction, high_noise_from)
        x_t = diffusion.q_sample(x0, t, noise)
        dropping = train and caption_dropout > 0
        caption_kept = ~drop if dropping else jnp.ones_like(drop)
        tokens = mask = None
        if config.has_text:
            tokens, mask = batch["tokens"], batch["mask"]
            if dropping:
                tokens = jnp.where(drop[:, None], jnp.asarray(empty_tokens)[None], tokens)
                mask = jnp.where(drop[:, None], jnp.asarray(empty_mask)[None], mask)
        kwargs = {}
        if wants_super_res:
            kwargs["low_res"] = batch["low_res"]
        if wants_inpaint:
            kwargs["inpaint_mask"] = batch["inpaint_mask"]
            kwargs["inpaint_image"] = x0 * batch["inpaint_mask"]

        def predict(x, timesteps, tokens, mask, dropout_key, **inputs):
            return model.apply({"params": params}, x, diffusion.original_timesteps(timesteps), tokens, mask,
                               deterministic=not train, rngs={"dropout": dropout_key}, **inputs).astype(jnp.float32)

        terms = diffusion.training_losses(predict(x_t, t, tokens, mask, k_dropout, **kwargs), x0, x_t, t, noise)
        if min_snr_gamma > 0:
            terms["loss"] = jnp.asarray(mse_weights)[t] * terms["mse"] + terms["vb"]
        metrics = {name: value.mean() for name, value in terms.items()}
        if negative_weight > 0:
            qualifies = batch["has_negative"] & (t >= negative_start) & caption_kept
            metrics.update(negative_term(
                lambda rows_compared: predict(x_t[rows_compared], t[rows_compared], batch["negative_tokens"][rows_compared],
                                              batch["negative_mask"][rows_compared], jax.random.fold_in(k_dropout, 1),
                                              **{name: value[rows_compared] for name, value in kwargs.items()}),
                diffusion, x0, x_t, t, noise, terms["mse"], jnp.asarray(mse_weights), qualifies))
            metrics["loss"] = metrics["loss"] + negative_weight * metrics["negative"]
        return metrics["loss"], metrics

    return TrainTask(kind=kind, init=init, loss=loss, batch_spec=batch_spec, image_size=config.image_size)


def _check_diffusion_options(config: ModelConfig, diffusion, kind: str, compute_dtype: str, caption_dropout: float,
                             min_snr_gamma: float, high_noise_fraction: float, high_noise_from: float,
                             negative_weight: float, negative_from: float) -> None:
    if kind not in DIFFUSION_KINDS:
        raise ConfigError(f"model_kind must be one of {list(MODEL_KINDS)}, got {kind!r}")
    wants_super_res = kind in ("upsample", "upsample_inpaint")
    wants_inpaint = kind in ("inpaint", "upsample_inpaint")
    if config.super_res != wants_super_res or config.inpaint != wants_inpaint:
        raise ConfigError(
            f"model_kind {kind!r} needs model.super_res={wants_super_res} and model.inpaint={wants_inpaint}, "
            f"but the model config has super_res={config.super_res}, inpaint={config.inpaint}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"precision must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if not 0.0 <= caption_dropout < 1.0:
        raise ConfigError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if not min_snr_gamma >= 0.0:
        raise ConfigError(f"min_snr_gamma must be >= 0 (0 = unweighted), got {min_snr_gamma}")
    if not 0.0 <= high_noise_fraction <= 1.0:
        raise ConfigError(f"high_noise_fraction must be in [0, 1], got {high_noise_fraction}")
    if not 0.0 <= high_noise_from < 1.0:
        raise ConfigError(f"high_noise_from must be in [0, 1) (a fraction of the chain), got {high_noise_from}")
    if not negative_weight >= 0.0:
        raise ConfigError(f"negative_weight must be >= 0 (0 = off), got {negative_weight}")
    if not 0.0 <= negative_from < 1.0:
        raise ConfigError(f"negative_from must be in [0, 1) (a fraction of the chain), got {negative_from}")
    if negative_weight > 0 and not config.has_text:
        raise ConfigError("negative_weight > 0 needs a text-conditional model: negatives are captions")
    if diffusion.prediction != config.prediction:
        raise ConfigError(f"the model predicts {config.prediction!r} (model.prediction) but the diffusion was "
                          f"built for {diffusion.prediction!r}: the loss would train the wrong target")


def min_snr_weights(diffusion, prediction: str, gamma: float) -> np.ndarray:
    """Per-timestep weights [T] of the MSE term: min(SNR(t), gamma) / SNR(t) for eps prediction
    (Hang et al. 2023, "Min-SNR weighting"), all ones for gamma 0 (GLIDE's unweighted objective).

    With eps prediction the unweighted loss is dominated by the nearly clean timesteps, while what
    an image shows (the colours, which shape, where) is decided at high noise, whose x_0 errors the
    eps MSE scales down by SNR(t): the weighting shifts the gradient towards those steps. The vb
    term, which trains only the variances, is left as it is.

    For v prediction the v MSE is the x_0 MSE times SNR(t) + 1, and the weight is
    (min(SNR(t), gamma) + 1) / (SNR(t) + 1): x_0 errors count min(SNR, gamma) + 1 times. Hang et
    al.'s v form, min(SNR, gamma) / (SNR + 1), would give the noisiest steps the same vanishing
    weight as the eps form, undoing what v-prediction is for.
    """
    snr = diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)
    if gamma <= 0:
        weights = np.ones_like(snr)
    elif prediction == "v":
        weights = (np.minimum(snr, gamma) + 1.0) / (snr + 1.0)
    else:
        weights = np.minimum(snr, gamma) / snr
    return weights.astype(np.float32)


def _empty_caption(config: ModelConfig, caption_dropout: float, empty_tokens, empty_mask):
    """The empty caption as validated arrays (text_ctx,), or (None, None) where none is needed."""
    if config.has_text and caption_dropout > 0 and (empty_tokens is None or empty_mask is None):
        raise ConfigError("caption_dropout > 0 needs the tokenizer's empty caption (empty_tokens, empty_mask)")
    if not config.has_text or empty_tokens is None:
        return None, None
    empty_tokens = np.asarray(empty_tokens, np.int32)
    empty_mask = np.asarray(empty_mask, bool)
    if empty_tokens.shape != (config.text_ctx,) or empty_mask.shape != (config.text_ctx,):
        raise ConfigError(f"empty caption tokens/mask must have shape ({config.text_ctx},) (text_ctx), "
                          f"got {empty_tokens.shape} / {empty_mask.shape}")
    return empty_tokens, empty_mask


def _diffusion_batch_spec(config: ModelConfig, batch_size: int, low: int, super_res: bool, inpaint: bool,
                          negatives: bool) -> dict[str, jax.ShapeDtypeStruct]:
    size, ctx = config.image_size, config.text_ctx
    spec = {"images": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)}
    if config.has_text:
        spec["tokens"] = jax.ShapeDtypeStruct((batch_size, ctx), jnp.int32)
        spec["mask"] = jax.ShapeDtypeStruct((batch_size, ctx), jnp.bool_)
    if super_res:
        spec["low_res"] = jax.ShapeDtypeStruct((batch_size, low, low, 3), jnp.float32)
    if inpaint:
        spec["inpaint_mask"] = jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.float32)
    if negatives:
        spec["negative_tokens"] = jax.ShapeDtypeStruct((batch_size, ctx), jnp.int32)
        spec["negative_mask"] = jax.ShapeDtypeStruct((batch_size, ctx), jnp.bool_)
        spec["has_negative"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
    return spec


def _draw_examples(key, rows, image_shape, num_timesteps: int, caption_dropout: float,
                   high_noise_fraction: float, high_noise_from: float):
    """(timesteps [B], noise [B, H, W, 3], caption dropout [B], dropout key) of a (micro)batch.
    Timestep, noise and caption dropout are drawn per example from (key, row in the global batch),
    so splitting the batch into microbatches does not change them."""
    k_examples, k_dropout = jax.random.split(key)
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(k_examples, rows)
    draws = jax.vmap(lambda k: (jax.random.normal(jax.random.fold_in(k, 1), image_shape, jnp.float32),
                                jax.random.bernoulli(jax.random.fold_in(k, 2), caption_dropout)))
    noise, drop = draws(example_keys)
    t = draw_timesteps(example_keys, num_timesteps, high_noise_fraction, high_noise_from)
    # Dropout draws for the whole (micro)batch at once; distinct per microbatch.
    return t, noise, drop, jax.random.fold_in(k_dropout, rows[0])


def negative_term(predict_negative: Callable[[jax.Array], jax.Array], diffusion, x0, x_t, t, noise,
                  own_mse, mse_weights, qualifies) -> dict[str, jax.Array]:
    """The hard-negative term and its metrics, for batches whose examples may carry a caption the
    image nearly matches (a source's `negative_caption`; for the demo's shapes, the two objects'
    colours or shapes exchanged).

    On the examples that `qualify` (one is given, a timestep from `negative_from` * T on and their
    own caption kept), the model also predicts from the same x_t under the negative caption
    (`predict_negative(rows)`), and the term asks that prediction's (weighted) MSE to exceed the own
    caption's: NEGATIVE_TEMPERATURE * softplus((mse_own - mse_negative) / NEGATIVE_TEMPERATURE),
    averaged over the batch. The plain loss barely rewards binding each colour to its object (the
    two captions' best predictions differ only faintly at the noise levels where a sample's colours
    are settled); this term rewards exactly that difference. To bound its cost the negative pass
    runs on NEGATIVE_SHARE of each (micro)batch, those of its examples that qualify first.
    """
    n = x0.shape[0]
    rows_compared = jnp.argsort(~qualifies, stable=True)[:max(1, int(n * NEGATIVE_SHARE))]
    t_compared = t[rows_compared]
    neg_mse = diffusion.training_losses(predict_negative(rows_compared), x0[rows_compared], x_t[rows_compared],
                                        t_compared, noise[rows_compared])["mse"]
    gap = mse_weights[t_compared] * (own_mse[rows_compared] - neg_mse)   # < 0: the own caption explains x_0 better
    compared = qualifies[rows_compared]
    hinge = NEGATIVE_TEMPERATURE * jax.nn.softplus(gap / NEGATIVE_TEMPERATURE)
    return {"negative": jnp.sum(jnp.where(compared, hinge, 0.0)) / n,
            "negative_won": jnp.sum(compared & (gap < 0)) / jnp.maximum(jnp.sum(compared), 1),
            "negative_compared": jnp.sum(compared) / n}


def clip_task(clip_config, *, compute_dtype: str = "float32", negative_weight: float = 0.0) -> TrainTask:
    """Task for the noised CLIP: both towers, contrastive loss on images noised to uniform
    timesteps (`glide_jax.clip.clip_contrastive_loss`). Negatives are the other examples of the
    (micro)batch, so gradient accumulation shrinks the set of negatives per loss term.
    `negative_weight` > 0 adds that weight times the hard-negative term of `glide_jax.clip.clip_losses`
    (batches then carry `negative_clip_tokens`, `negative_clip_text_len` and `has_negative`)."""
    from glide_jax import clip as clip_lib

    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"precision must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if not negative_weight >= 0.0:
        raise ConfigError(f"negative_weight must be >= 0 (0 = off), got {negative_weight}")
    size = clip_config.image_size
    ctx = clip_config.max_text_len

    def init(key):
        return clip_lib._init_clip_params(clip_config, key)

    def batch_spec(batch_size):
        spec = {"images": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                "clip_tokens": jax.ShapeDtypeStruct((batch_size, ctx), jnp.int32),
                "clip_text_len": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        if negative_weight > 0:
            spec["negative_clip_tokens"] = jax.ShapeDtypeStruct((batch_size, ctx), jnp.int32)
            spec["negative_clip_text_len"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
            spec["has_negative"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
        return spec

    def loss(params, batch, key, train=True, rows=None):
        negatives = {}
        if negative_weight > 0:
            negatives = dict(negative_tokens=batch["negative_clip_tokens"],
                             negative_len=batch["negative_clip_text_len"], has_negative=batch["has_negative"])
        terms = clip_lib.clip_losses(params, clip_config, key, batch["images"], batch["clip_tokens"],
                                     batch["clip_text_len"], dtype=compute_dtype, **negatives)
        if negative_weight > 0:
            value = terms["contrastive"] + negative_weight * terms["negative"]
            return value, {**terms, "loss": value}
        return terms["contrastive"], {"loss": terms["contrastive"]}

    return TrainTask(kind="clip", init=init, loss=loss, batch_spec=batch_spec, image_size=size)


# -- creating the state ----------------------------------------------------------------------------

def abstract_state(task: TrainTask, optimizer: optax.GradientTransformation) -> TrainState:
    """The train state's shapes and dtypes, computed without allocating anything."""
    return jax.eval_shape(lambda k: _fresh_state(task.init(k), optimizer, k), jax.random.key(0))


def _fresh_state(params, optimizer, key) -> TrainState:
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                      rng=jax.random.key_data(key))


def state_shardings(task: TrainTask, optimizer, mesh, fsdp_min_size: int = parallel.DEFAULT_FSDP_MIN_SIZE):
    return parallel.state_shardings(abstract_state(task, optimizer), mesh, fsdp_min_size)


def create_train_state(task: TrainTask, optimizer, key: jax.Array, mesh, *, params=None,
                       fsdp_min_size: int = parallel.DEFAULT_FSDP_MIN_SIZE) -> TrainState:
    """A fresh state placed on `mesh`: params from `task.init(key)`, or the given `params`
    (e.g. a converted checkpoint, for fine-tuning), which must match the model's tree."""
    shardings = state_shardings(task, optimizer, mesh, fsdp_min_size)
    key_init, key_train = jax.random.split(key)
    if params is None:
        build = jax.jit(lambda k1, k2: _fresh_state(task.init(k1), optimizer, k2), out_shardings=shardings)
        return build(key_init, key_train)
    expected = abstract_state(task, optimizer).params
    check_params_match(expected, params)
    if not all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params)):
        params = parallel.place(params, shardings.params)
    build = jax.jit(lambda p, k: _fresh_state(p, optimizer, k), out_shardings=shardings)
    return build(params, key_train)


def check_params_match(expected, params, source: str = "init params") -> None:
    """Raises naming the first parameter whose path or shape differs from the model's."""
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ConfigError(f"{source} do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for path, shape in want.items():
        if got[path] != shape:
            raise ConfigError(f"{source}: parameter {path} has shape {got[path]}, the model expects {shape}")


# -- the step ----------------------------------------------------------------------------------------

def ema_step_rate(ema_rate: float, n) -> jax.Array:
    """Rate of the n-th EMA update (n >= 1) that keeps the EMA bias-corrected (see
    `make_train_step`): r (1 - r^(n-1)) / (1 - r^n), 0 at the first step, r in the limit."""
    if ema_rate >= 1.0:      # a frozen EMA has nothing to correct
        return jnp.float32(ema_rate)
    r = jnp.float32(ema_rate)
    n = jnp.asarray(n, jnp.float32)
    return r * (1.0 - r ** (n - 1.0)) / (1.0 - r ** n)


def make_train_step(task: TrainTask, optimizer: optax.GradientTransformation, mesh, shardings, *,
                    ema_rate: float = 0.9999, ema_debias: bool = True, grad_accum: int = 1,
                    lr_schedule: optax.Schedule | None = None, frozen: Sequence[str] = (),
                    donate: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted `step(state, batch) -> (state, metrics)` for global batches on `mesh`.

    `shardings` are the state's (from `state_shardings`). The batch's leading axis must divide
    into `grad_accum` microbatches that each divide over the mesh's devices. Metrics (scalars,
    replicated): the kind's loss terms averaged over the batch, `grad_norm` before clipping and
    `learning_rate` of this step. `grad_norm` leaves out the params under `frozen` (the
    optimizer's `OptimizerConfig.frozen`): it is the norm the clipping sees.

    `ema_debias`: after n steps the EMA is `sum_k (1 - r) r^(n-k) params_k / (1 - r^n)`, an
    average of the params this state's steps produced only. The plain EMA also keeps weight
    r^n on the params the state started from (0.999^1800 = 16% random init, 0.9999^5000 = 61%
    of the checkpoint a fine-tuning run started from). The correction is Adam's bias correction,
    folded into each step's rate, so the state holds the corrected average and needs nothing
    extra; after ~5/(1 - r) steps both agree to 1%.
    """
    if not 0.0 <= ema_rate <= 1.0:
        raise ConfigError(f"ema_rate must be in [0, 1], got {ema_rate}")
    if grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {grad_accum}")
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))

    def split_microbatches(batch):
        # Microbatch i takes rows i, i + grad_accum, ...: every device keeps its own rows, so
        # splitting moves no data between devices.
        def split(x):
            x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
            return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_sharding)
        rows = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
        return jax.tree.map(split, batch), split(rows)

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(_key(state.rng), state.step)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, key, True, None)
        else:
            def body(carry, inputs):
                grads_sum, metrics_sum = carry
                micro, rows = inputs
                (_, metrics), grads = grad_fn(state.params, micro, key, True, rows)
                return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            micro_batches, micro_rows = split_microbatches(batch)
            first_metrics = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro_batches),
                                                           key, True, micro_rows[0])[0][1])
            metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_metrics)
            (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), (micro_batches, micro_rows))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
        if frozen:
            labels = jax.tree.leaves(frozen_labels(grads, list(frozen)))
            grad_norm = optax.tree.norm([g for g, label in zip(jax.tree.leaves(grads), labels) if label == "trained"])
        else:
            grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rate = ema_step_rate(ema_rate, state.step + 1) if ema_debias else ema_rate
        ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state.ema_params, params)
        metrics = dict(metrics, grad_norm=grad_norm)
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,) if donate else (),
                   compiler_options=xla_options.compiler_options(mesh.devices.flat))


def make_eval_loss(task: TrainTask, mesh) -> Callable[[Any, dict, jax.Array], dict]:
    """`eval(params, batch, key) -> metrics` without dropout or caption dropout, for held-out
    loss at fixed timesteps/noise (the same key gives the same draws)."""
    def evaluate(params, batch, key):
        return task.loss(params, batch, key, False)[1]

    return jax.jit(evaluate, out_shardings=parallel.replicated_sharding(mesh),
                   compiler_options=xla_options.compiler_options(mesh.devices.flat))


def check_finite(step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Host values of `metrics`; raises `NonFiniteLossError` naming `step` if any is NaN/inf."""
    values = {name: float(value) for name, value in metrics.items()}
    if not all(np.isfinite(v) for v in values.values()):
        raise NonFiniteLossError(step, values)
    return values


def params_checksum(params) -> float:
    """Sum of |p| over this process's copy of the params: processes that disagree differ here."""
    total = 0.0
    for leaf in jax.tree.leaves(params):
        # Replicas of one shard share an index; count each distinct shard once.
        shards = {tuple((i.start, i.stop) for i in s.index): s.data for s in leaf.addressable_shards}
        total += float(sum(np.abs(np.asarray(data, np.float64)).sum() for data in shards.values()))
    return total
