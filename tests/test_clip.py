"""Noised CLIP: parity with the reference's golden outputs, full-size manifests, conversion errors,
attention structure, bfloat16 compute, guidance under jit, and contrastive training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glide_jax import clip
from glide_jax.config import ConfigError
from glide_jax.pt_reader import load_state_dict

ATOL = 1e-4  # golden README: float32 model outputs


@pytest.fixture(scope="module")
def tiny(golden):
    config = clip.ClipConfig.from_json(golden / "clip.config.json")
    image_sd = load_state_dict(golden / "clip_image_enc.pt")
    text_sd = load_state_dict(golden / "clip_text_enc.pt")
    params = clip.convert_clip_state_dicts(image_sd, text_sd, config)
    inputs = dict(np.load(golden / "clip.inputs.npz"))
    inputs["images"] = inputs["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    outputs = dict(np.load(golden / "clip.outputs.npz"))
    return config, params, inputs, outputs, (image_sd, text_sd)


def test_golden_features_and_embeddings(tiny):
    config, params, inp, out, _ = tiny
    images, t, tokens, text_len = inp["images"], inp["timesteps"], inp["tokens"], inp["text_len"]
    np.testing.assert_allclose(clip.image_features(params, config, images, t), out["image_features_raw"], atol=ATOL)
    np.testing.assert_allclose(clip.text_features(params, config, tokens, text_len), out["text_features_raw"],
                               atol=ATOL)
    np.testing.assert_allclose(clip.encode_image(params, config, images, t), out["image_embeddings"], atol=ATOL)
    np.testing.assert_allclose(clip.encode_text(params, config, tokens, text_len), out["text_embeddings"],
                               atol=ATOL)


def test_golden_guidance_gradient_under_jit(tiny):
    config, params, inp, out, _ = tiny
    z_text = clip.encode_text(params, config, inp["tokens"], inp["text_len"])
    cond_fn = clip.clip_cond_fn(params, config, z_text, 3.0)
    # Passed as an argument, the guidance's weights are traced leaves, not baked-in constants.
    assert any(leaf is params["image_encoder"]["input"]["w_t"] for leaf in jax.tree.leaves(cond_fn))

    @jax.jit
    def two_steps(cond_fn, x, t):
        def body(x, _):
            return x, cond_fn(x, t)
        return jax.lax.scan(body, x, None, length=2)[1]

    grads = two_steps(cond_fn, jnp.asarray(inp["images"]), jnp.asarray(inp["timesteps"], jnp.int32))
    expected = out["cond_fn_grad_scale3"].transpose(0, 2, 3, 1)
    assert grads.shape == (2,) + expected.shape
    np.testing.assert_allclose(grads[0], expected, atol=ATOL)
    np.testing.assert_array_equal(grads[0], grads[1])


@pytest.mark.parametrize("tower, manifest_name", [("image_encoder", "clip/image-enc"),
                                                  ("text_encoder", "clip/text-enc")])
def test_full_size_manifest(golden, tower, manifest_name):
    manifest = json.loads((golden / "manifests_full_size.json").read_text())[manifest_name]
    config = clip.ClipConfig.from_dict(manifest["config"])
    assert config == clip.ClipConfig()  # the defaults are the released model's
    expected = {key: tuple(shape) for key, (shape, _dtype) in manifest["keys"].items()}
    assert clip.reference_state_dict_shapes(config, tower) == expected
    shapes = clip.clip_params_shapes(config)[tower]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == manifest["n_params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


def test_conversion_names_every_bad_key_before_converting(tiny):
    config, _, _, _, (image_sd, text_sd) = tiny
    # Shapes from the golden state dict itself, so any golden set made the same way passes.
    missing = f"blocks.block_{config.n_xf_blocks_image - 1}.f_mlp.f_2.b"
    width = image_sd[missing].shape[0]
    n_pos = image_sd["blocks.input.w_pos"].shape[0]
    broken = dict(image_sd)
    del broken[missing]
    broken["blocks.block_0.f_attn.f_k.b"] = np.zeros(width, np.float32)
    broken["blocks.input.w_pos"] = np.zeros((n_pos - 1, width), np.float32)
    with pytest.raises(clip.ClipConversionError) as err:
        clip.convert_clip_state_dicts(broken, text_sd, config)
    message = str(err.value)
    assert f"missing key '{missing}' (expected shape ({width},))" in message
    assert f"unexpected key 'blocks.block_0.f_attn.f_k.b' (found shape ({width},))" in message
    assert (f"key 'blocks.input.w_pos': expected shape ({n_pos}, {width}), "
            f"found ({n_pos - 1}, {width})") in message
    with pytest.raises(clip.ClipConversionError, match="text_encoder"):
        clip.convert_clip_state_dicts(image_sd, image_sd, config)


def test_text_attention_is_causal_and_image_attention_is_full(tiny):
    config, params, inp, _, _ = tiny
    tokens, text_len = np.array(inp["tokens"]), inp["text_len"]
    base = clip.text_features(params, config, tokens, text_len)
    after_end = tokens.copy()
    after_end[0, text_len[0]:] = 123  # positions after the end token cannot reach it
    np.testing.assert_array_equal(clip.text_features(params, config, after_end, text_len)[0], base[0])
    before_end = tokens.copy()
    before_end[0, 1] = 123
    assert np.abs(clip.text_features(params, config, before_end, text_len)[0] - base[0]).max() > 1e-3

    images, t = np.array(inp["images"]), inp["timesteps"]
    base = clip.image_features(params, config, images, t)
    images[:, -config.patch_size:, -config.patch_size:] = 0.0  # last patch only
    assert np.abs(clip.image_features(params, config, images, t) - base).max(axis=-1).min() > 1e-4
    # The timestep token carries w_t[t] into the pooled feature.
    assert np.abs(clip.image_features(params, config, inp["images"], t + 1) - base).max(axis=-1).min() > 1e-4


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(tiny):
    config, params, inp, out, _ = tiny
    z_image = clip.encode_image(params, config, inp["images"], inp["timesteps"], dtype="bfloat16")
    z_text = clip.encode_text(params, config, inp["tokens"], inp["text_len"], dtype="bfloat16")
    assert z_image.dtype == z_text.dtype == jnp.float32
    assert np.sum(z_image * out["image_embeddings"], axis=-1).min() > 0.999
    assert np.sum(z_text * out["text_embeddings"], axis=-1).min() > 0.999
    size, text_len = config.image_size, config.max_text_len
    for module, args in [(clip.ClipImageEncoder, (jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))),
                         (clip.ClipTextEncoder, (jnp.zeros((1, text_len), jnp.int32), jnp.ones((1,), jnp.int32)))]:
        shapes = jax.eval_shape(module(config, dtype=jnp.bfloat16).init, jax.random.key(0), *args)
        assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}, module


def test_bad_inputs_and_configs_are_named(tiny):
    config, params, inp, _, _ = tiny
    nchw = inp["images"].transpose(0, 3, 1, 2)
    size, n_t, text_ctx = config.image_size, config.n_timesteps, config.max_text_len
    bad_t = np.zeros_like(inp["timesteps"])
    bad_t[-1] = n_t  # one step past the schedule
    bad_len = np.array(inp["text_len"])
    bad_len[0] = 0  # not even the start token
    with pytest.raises(ValueError, match=rf"\(B, {size}, {size}, 3\).*NCHW"):
        clip.encode_image(params, config, nchw, inp["timesteps"])
    with pytest.raises(TypeError, match="integers"):
        clip.encode_image(params, config, inp["images"], inp["timesteps"].astype(np.float32))
    with pytest.raises(ValueError, match=rf"\[0, {n_t}\)"):
        clip.encode_image(params, config, inp["images"], bad_t)
    with pytest.raises(ValueError, match=rf"text_len must lie in \[1, {text_ctx}\]"):
        clip.encode_text(params, config, inp["tokens"], bad_len)
    with pytest.raises(ValueError, match=rf"\(B, {text_ctx}\)"):
        clip.encode_text(params, config, inp["tokens"][:, :text_ctx - 1], inp["text_len"])
    with pytest.raises(ValueError, match="image_encoder"):
        clip.encode_image(params["text_encoder"], config, inp["images"], inp["timesteps"])
    with pytest.raises(ConfigError, match=r"unknown CLIP config key\(s\) \['n_layers'\]"):
        clip.ClipConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="not divisible by patch_size 5"):
        clip.ClipConfig(patch_size=5)


def test_noised_clip_trains():
    config = clip.ClipConfig(image_size=16, patch_size=4, n_vocab=64, max_text_len=8, n_embd=16,
                             n_head_state_text=8, n_head_text=2, n_xf_blocks_text=1,
                             n_head_state_image=8, n_head_image=2, n_xf_blocks_image=1)
    data_key, init_key, loss_key = jax.random.split(jax.random.key(0), 3)
    batch = 4
    # Four distinct images (a bright square in a different quadrant each) paired with four captions.
    images = -np.ones((batch, 16, 16, 3), np.float32)
    for i in range(batch):
        r, c = divmod(i, 2)
        images[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    tokens = np.asarray(jax.random.randint(data_key, (batch, 8), 1, 64), np.int32)
    text_len = np.array([3, 4, 5, 8], np.int32)

    params = clip.init_clip_params(config, init_key)
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(params, opt_state):
        # The same key every step: the noising is fixed, so the loss values are comparable.
        loss, grads = jax.value_and_grad(clip.clip_contrastive_loss)(
            params, config, loss_key, images, tokens, text_len)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    params, opt_state, loss0, grads = train_step(params, optimizer.init(params))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, f"zero gradient for {name}"
    losses = [float(loss0)]
    for _ in range(8):
        params, opt_state, loss, _ = train_step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_hard_negative_term_compares_each_image_with_its_own_negative_caption_only():
    config = clip.ClipConfig(image_size=16, patch_size=4, n_vocab=64, max_text_len=8, n_embd=16,
                             n_head_state_text=8, n_head_text=2, n_xf_blocks_text=1,
                             n_head_state_image=8, n_head_image=2, n_xf_blocks_image=1)
    data_key, init_key, loss_key = jax.random.split(jax.random.key(1), 3)
    images = np.asarray(jax.random.uniform(data_key, (4, 16, 16, 3), minval=-1, maxval=1))
    tokens = np.asarray(jax.random.randint(data_key, (4, 8), 1, 64), np.int32)
    text_len = np.array([3, 4, 5, 8], np.int32)
    params = clip.init_clip_params(config, init_key)
    plain = clip.clip_contrastive_loss(params, config, loss_key, images, tokens, text_len)

    # A negative identical to the own caption: the two score the same, softplus(0) = log 2, never won.
    same = clip.clip_losses(params, config, loss_key, images, tokens, text_len, negative_tokens=tokens,
                            negative_len=text_len, has_negative=np.array([True, True, False, True]))
    np.testing.assert_allclose(same["contrastive"], plain, rtol=1e-6)
    np.testing.assert_allclose(same["negative"], np.log(2.0), rtol=1e-5)
    assert float(same["negative_won"]) == 0.0 and float(same["negative_compared"]) == 0.75

    # Other captions as negatives: the term is the mean over the images that have one.
    other, other_len = np.roll(tokens, 1, axis=0), np.roll(text_len, 1)
    each = [clip.clip_losses(params, config, loss_key, images, tokens, text_len, negative_tokens=other,
                             negative_len=other_len, has_negative=np.arange(4) == i)["negative"] for i in range(4)]
    mask = np.array([True, False, True, True])
    got = clip.clip_losses(params, config, loss_key, images, tokens, text_len, negative_tokens=other,
                           negative_len=other_len, has_negative=mask)
    np.testing.assert_allclose(got["negative"], np.mean(np.asarray(each)[mask]), rtol=1e-5)
    grads = jax.grad(lambda p: clip.clip_losses(p, config, loss_key, images, tokens, text_len, negative_tokens=other,
                                                negative_len=other_len, has_negative=mask)["negative"])(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # Both towers learn from it: the image's embedding and the two captions'.
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["text_encoder"])) > 0
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["image_encoder"])) > 0
    with pytest.raises(ValueError, match="4 images but 3 negative token rows"):
        clip.clip_losses(params, config, loss_key, images, tokens, text_len, negative_tokens=other[:3],
                         negative_len=other_len[:3], has_negative=mask[:3])
