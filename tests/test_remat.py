"""The U-Net's run options: activation rematerialisation (`remat`) and the attention kernel
(`attention`) change memory and speed, never the params or (beyond rounding) what is computed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import parallel, training
from glide_jax.config import ConfigError, ModelConfig
from glide_jax.diffusion import diffusion_for_model
from glide_jax.layers import multihead_attention
from glide_jax.unet import REMAT_POLICIES, GlideUNet, _block_classes, example_inputs, param_shapes

# Text, attention at two levels, scale-shift ResBlocks with up/down resampling, dropout: every
# block kind that remat wraps.
TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "8,4", "num_head_channels": 16, "text_ctx": 8, "xf_width": 32,
        "xf_layers": 1, "xf_heads": 2, "n_vocab": 64, "dropout": 0.1, "norm_groups": 8}
# XLA:CPU removes the optimisation barriers that keep jax.checkpoint's recomputation apart, which
# undoes remat on a CPU (XLA:GPU keeps them); bench/bench_memory.py compiles the same way.
KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _inputs(config, batch):
    inputs = example_inputs(config, batch=batch)
    inputs["x"] = jax.random.normal(jax.random.key(1), inputs["x"].shape)
    inputs["timesteps"] = jnp.arange(batch, dtype=jnp.int32) * 97 % 1000
    inputs["tokens"] = jnp.arange(batch * config.text_ctx).reshape(batch, -1) % config.n_vocab
    inputs["mask"] = jnp.arange(config.text_ctx)[None].repeat(batch, 0) < 5
    return inputs


def _random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    # Non-zero everywhere (a fresh model zeroes its residual branches, which would hide differences).
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32), param_shapes(config))


def _paths(tree):
    return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_grads_close(grads, ref_grads, what):
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = float(jnp.abs(r).max()) + 1e-12
        assert float(jnp.abs(g - r).max()) <= 1e-5 * scale, (what, jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", REMAT_POLICIES[1:])
def test_each_remat_policy_keeps_the_blocks_outputs_and_gradients(remat):
    """Both wrapped blocks, as `_block_classes` gives them, against the plain ones: a downsampling
    ResBlock with dropout on (its masks must be drawn alike in the recomputation) and an attention
    block over text tokens."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    emb = jax.random.normal(jax.random.key(1), (2, 32))
    text = jax.random.normal(jax.random.key(2), (2, 5, 16))
    plain_res, plain_attention = _block_classes("none")
    res_cls, attention_cls = _block_classes(remat)

    def grads(res_cls, attention_cls):
        res = res_cls(32, True, 0.5, "down", norm_groups=8, name="res")
        attention = attention_cls(heads=2, norm_groups=8, name="attn")

        def loss(params, x, emb, text):
            # All four arguments positionally, as the U-Net passes them (remat's static `deterministic`).
            h = res.apply({"params": params["res"]}, x, emb, False, None, rngs={"dropout": jax.random.key(5)})
            a = attention.apply({"params": params["attn"]}, x, text)
            return jnp.sum(h ** 2) + jnp.sum(a ** 2)

        params = {"res": res.init(jax.random.key(3), x, emb, True, None)["params"],
                  "attn": attention.init(jax.random.key(4), x, text)["params"]}
        params = jax.tree.map(lambda p: p + 0.1, params)   # non-zero zero-initialised kernels
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(params, x, emb, text)

    ref_value, ref_grads = grads(plain_res, plain_attention)
    value, grads = grads(res_cls, attention_cls)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    _assert_grads_close(grads, ref_grads, remat)


def test_remat_keeps_the_unet_s_params_output_and_gradients():
    config = ModelConfig.from_dict(TINY)
    inputs = _inputs(config, batch=4)
    params = _random_params(config)

    def loss_and_grad(remat):
        model = GlideUNet(config, remat=remat)

        def loss(p):
            out = model.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
            return jnp.mean(jnp.square(out)), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    # The same tree whatever the policy: a checkpoint saved with one loads under any other.
    init = lambda remat: GlideUNet(config, remat=remat).init(jax.random.key(0), **inputs)["params"]  # noqa: E731
    expected_tree = _paths(jax.eval_shape(lambda: init("none")))
    for remat in REMAT_POLICIES[1:]:
        assert _paths(jax.eval_shape(lambda: init(remat))) == expected_tree, remat
    (ref_loss, ref_out), ref_grads = loss_and_grad("none")
    (value, out), grads = loss_and_grad("blocks")
    assert float(jnp.abs(ref_out).max()) > 0.1
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
    _assert_grads_close(grads, ref_grads, "blocks")


def _train_step_temp_bytes(config, remat, batch):
    ctx = config.text_ctx
    task = training.diffusion_task(config, diffusion_for_model(config), "base", caption_dropout=0.2,
                                   empty_tokens=np.zeros(ctx, np.int32), empty_mask=np.zeros(ctx, bool),
                                   remat=remat)
    optimizer = training.make_optimizer(training.OptimizerConfig())
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    shardings = training.state_shardings(task, optimizer, mesh)
    step = training.make_train_step(task, optimizer, mesh, shardings)
    lowered = step.lower(training.abstract_state(task, optimizer), task.batch_spec(batch))
    options = KEEP_REMAT_BARRIERS if jax.default_backend() == "cpu" else {}
    return lowered.compile(options).memory_analysis().temp_size_in_bytes


def test_remat_shrinks_the_compiled_train_step_s_temporary_memory():
    # No text encoder: the compile is what this test pays for, and remat wraps only U-Net blocks.
    config = ModelConfig.from_dict(dict(TINY, image_size=32, attention_resolutions="16", xf_width=0))
    temp = {remat: _train_step_temp_bytes(config, remat, batch=16) for remat in ("none", "blocks")}
    # Measured on XLA:CPU with text: 514 MB without remat, 114 MB with every block recomputed (276 MB
    # with the attention blocks only, bench/README); the bound leaves room for other XLA versions.
    assert temp["blocks"] < 0.5 * temp["none"], temp


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 3e-2)])
def test_xla_attention_computes_the_einsum_attention(dtype, atol):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 24, 3, 16)).astype(dtype)
    k = jax.random.normal(keys[1], (2, 30, 3, 16)).astype(dtype)    # text tokens make S > T, as in the U-Net
    v = jax.random.normal(keys[2], (2, 30, 3, 16)).astype(dtype)
    ref = multihead_attention(q, k, v)
    out = multihead_attention(q, k, v, "xla")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=0, atol=atol)


def test_the_unet_with_xla_attention_gives_the_same_output():
    config = ModelConfig.from_dict(TINY)
    inputs = _inputs(config, batch=2)
    params = _random_params(config, seed=1)
    ref = GlideUNet(config).apply({"params": params}, **inputs)
    out = GlideUNet(config, attention="xla").apply({"params": params}, **inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=2e-5)


def test_unknown_run_options_are_config_errors_naming_the_option():
    config = ModelConfig.from_dict(TINY)
    inputs = _inputs(config, batch=1)
    with pytest.raises(ConfigError, match="remat must be one of"):
        GlideUNet(config, remat="everything").init(jax.random.key(0), **inputs)
    with pytest.raises(ConfigError, match="attention must be one of"):
        GlideUNet(config, attention="flash").init(jax.random.key(0), **inputs)
    with pytest.raises(ConfigError, match="'cudnn' needs bfloat16"):
        training.diffusion_task(config, diffusion_for_model(config), "base", caption_dropout=0.0,
                                attention="cudnn")
    with pytest.raises(ConfigError, match="remat must be one of"):
        training.diffusion_task(config, diffusion_for_model(config), "base", caption_dropout=0.0, remat="all")
    # The options belong to the run, not the model: its saved config has neither.
    assert "remat" not in config.to_dict() and "attention" not in config.to_dict()


def test_the_run_config_takes_and_checks_remat_and_attention():
    from train.run_config import RunConfig

    base = {"model": dict(TINY), "checkpoint": {"dir": "/tmp/unused"}, "batch": {"global_size": 2}}
    cfg = RunConfig.from_dict({**base, "remat": "blocks", "precision": "bfloat16", "attention": "cudnn"})
    assert (cfg.remat, cfg.attention) == ("blocks", "cudnn")
    assert (RunConfig.from_dict(base).remat, RunConfig.from_dict(base).attention) == ("none", "einsum")
    with pytest.raises(ConfigError, match="remat must be one of"):
        RunConfig.from_dict({**base, "remat": "yes"})
    with pytest.raises(ConfigError, match="'cudnn' needs bfloat16"):
        RunConfig.from_dict({**base, "attention": "cudnn"})


def test_the_trainer_builds_its_task_with_the_run_s_remat():
    from train.run_config import RunConfig
    from train.train import Trainer

    model = dict(TINY, xf_width=0)   # no text: the task then needs no tokenizer
    counts = {}
    for remat in ("none", "blocks"):
        # Only the task is wanted: no run directory, mesh, state or loader.
        trainer = Trainer.__new__(Trainer)
        trainer.cfg = RunConfig.from_dict({"model": model, "checkpoint": {"dir": "/tmp/unused"},
                                           "batch": {"global_size": 2}, "caption_dropout": 0.0, "remat": remat})
        trainer.model_config = ModelConfig.from_dict(model)
        task = trainer._task()
        params = jax.eval_shape(task.init, jax.random.key(0))
        jaxpr = jax.make_jaxpr(lambda p, b: task.loss(p, b, jax.random.key(0)))(params, task.batch_spec(2))
        counts[remat] = str(jaxpr).count("remat")
    # One remat per ResBlock and attention block of the tiny U-Net (14), none without the option.
    assert counts == {"none": 0, "blocks": 14}, counts
