"""Parity of the U-Net family and text transformer with the reference, through the real path:
`.pt` -> torch-free reader -> converter -> orbax save -> restore -> model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.checkpoint import load_model
from glide_jax.config import ConfigError, ModelConfig
from glide_jax.convert import main as convert_main
from glide_jax.layers import resize_bilinear
from glide_jax.unet import GlideUNet, count_params, example_inputs, init_params, param_shapes

ATOL = 1e-4  # the golden README's float32 tolerance for model outputs


def nhwc(array):
    return jnp.asarray(np.transpose(array, (0, 2, 3, 1)))


def model_kwargs(inputs):
    kwargs = {}
    for name in ("low_res", "inpaint_image", "inpaint_mask"):
        if name in inputs:
            kwargs[name] = nhwc(inputs[name])
    return kwargs


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    """Convert each golden checkpoint once with the CLI and restore it from disk."""
    cache = {}

    def get(checkpoint, config_name):
        if checkpoint not in cache:
            out = tmp_path_factory.mktemp("converted") / checkpoint
            code = convert_main(["--checkpoint", str(golden / f"{checkpoint}.pt"),
                                 "--config", str(golden / f"{config_name}.config.json"), "--out", str(out)])
            assert code == 0
            config_dict, params = load_model(out)
            cache[checkpoint] = (ModelConfig.from_dict(config_dict), params)
        return cache[checkpoint]

    return get


@pytest.mark.parametrize("checkpoint,config_name", [
    ("base", "base"), ("upsample", "upsample"), ("base_inpaint", "base_inpaint"),
    ("upsample_inpaint", "upsample_inpaint"), ("base_fp16", "base"),
])
def test_unet_matches_reference(golden, converted, checkpoint, config_name):
    config, params = converted(checkpoint, config_name)
    inputs = np.load(golden / f"{config_name}.inputs.npz")
    expected = np.load(golden / f"{checkpoint}.outputs.npz")["output"]
    model = GlideUNet(config)
    out = jax.jit(model.apply)({"params": params}, nhwc(inputs["x_t"]), jnp.asarray(inputs["timesteps"]),
                               jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["mask"]),
                               **model_kwargs(inputs))
    np.testing.assert_allclose(np.asarray(out), np.transpose(expected, (0, 2, 3, 1)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["base", "upsample", "base_inpaint", "upsample_inpaint"])
def test_text_transformer_matches_reference(golden, converted, name):
    config, params = converted(name, name)
    inputs = np.load(golden / f"{name}.inputs.npz")
    expected = np.load(golden / f"{name}.outputs.npz")
    model = GlideUNet(config)
    text = model.apply({"params": params}, jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["mask"]),
                       method=GlideUNet.encode_text)
    np.testing.assert_allclose(np.asarray(text["xf_proj"]), expected["xf_proj"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(text["xf_out"]), np.transpose(expected["xf_out"], (0, 2, 1)),
                               rtol=0, atol=ATOL)


def test_split_call_equals_whole_call(golden, converted):
    """encode_text once + denoise is what samplers use; it must equal the one-shot call."""
    config, params = converted("upsample_inpaint", "upsample_inpaint")
    inputs = np.load(golden / "upsample_inpaint.inputs.npz")
    model = GlideUNet(config)
    args = (nhwc(inputs["x_t"]), jnp.asarray(inputs["timesteps"]))
    whole = model.apply({"params": params}, *args, jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["mask"]),
                        **model_kwargs(inputs))
    text = model.apply({"params": params}, jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["mask"]),
                       method=GlideUNet.encode_text)
    split = model.apply({"params": params}, *args, text, **model_kwargs(inputs), method=GlideUNet.denoise)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(split))


@pytest.mark.parametrize("name", ["base", "upsample", "base-inpaint", "upsample-inpaint"])
def test_full_size_params_match_manifest(golden, name):
    from glide_jax.convert import full_size_check

    manifest = json.loads((golden / "manifests_full_size.json").read_text())[name]
    config = ModelConfig.from_dict(manifest["config"])
    n_params, expected = full_size_check(manifest, config)  # raises on any key/shape difference
    assert set(expected) == set(manifest["keys"])
    assert n_params == manifest["n_params"]


def test_released_configs_in_configs_dir(golden):
    from pathlib import Path

    manifests = json.loads((golden / "manifests_full_size.json").read_text())
    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in ("base", "upsample", "base-inpaint", "upsample-inpaint"):
        config = ModelConfig.from_json(configs / f"{name.replace('-', '_')}.json")
        assert count_params(param_shapes(config)) == manifests[name]["n_params"]


# Options the released models do not use: each must build, run and convert by the same rules.
VARIANTS = {
    "heads_and_plain_resblocks": dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2,2",
                                      attention_resolutions="16,8", num_heads=2, num_head_channels=-1,
                                      num_heads_upsample=4, use_scale_shift_norm=False, resblock_updown=False,
                                      text_ctx=8, xf_width=48, xf_layers=1, xf_heads=3, xf_final_ln=False,
                                      xf_padding=False, n_vocab=300),
    "no_text_superres_inpaint": dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,3",
                                     attention_resolutions="32", num_head_channels=32, xf_width=0,
                                     inpaint=True, super_res=True),
    "odd_size_superres": dict(image_size=24, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                              attention_resolutions="12", num_head_channels=16, resblock_updown=False,
                              text_ctx=6, xf_width=32, xf_layers=2, xf_heads=2, super_res=True, n_vocab=300),
}


def _torch_layout_state_dict(params):
    """Invert the converter's layout rules, to check that conversion round-trips exactly."""
    from flax import traverse_util

    from glide_jax.convert import _layout, torch_key

    state_dict = {}
    for path, value in traverse_util.flatten_dict(params, sep=".").items():
        value = np.asarray(value)
        layout = _layout(path, value.ndim)
        if layout == "conv2d":
            value = value.transpose(3, 2, 0, 1)
        elif layout == "conv1d":
            value = value.T[..., None]
        elif layout == "linear":
            value = value.T
        state_dict[torch_key(path)] = value.astype(np.float16 if value.ndim > 1 else np.float32)
    return state_dict


def randomized(params, seed=0):
    """Every parameter random and non-zero (fresh models zero their residual outputs), as the golden
    files do, so every path of the network contributes to the output."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32), params)


def test_fresh_model_starts_with_zero_residual_branches_and_output():
    """As in the reference: a newly initialised model predicts zeros and its blocks are identities."""
    config = ModelConfig.from_dict(VARIANTS["no_text_superres_inpaint"])
    params = init_params(config, jax.random.key(0))
    out = jax.jit(GlideUNet(config).apply)({"params": params}, **example_inputs(config))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert float(jnp.abs(params["unet"]["input_blocks_1_0"]["in_conv"]["kernel"]).max()) > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_builds_runs_and_round_trips(name):
    from glide_jax.convert import convert_state_dict

    config = ModelConfig.from_dict(VARIANTS[name])
    params = randomized(param_shapes(config), seed=1)
    inputs = example_inputs(config, batch=2)
    inputs["x"] = jax.random.normal(jax.random.key(2), inputs["x"].shape)
    out = jax.jit(GlideUNet(config).apply)({"params": params}, **inputs)
    assert out.shape == inputs["x"].shape[:3] + (6,)
    assert np.isfinite(np.asarray(out)).all()
    # float16 storage as in the released files: values are rounded, then upcast to float32.
    state_dict = _torch_layout_state_dict(params)
    restored = convert_state_dict(state_dict, config)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)):
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    config = ModelConfig.from_dict(VARIANTS["heads_and_plain_resblocks"])
    params = randomized(param_shapes(config), seed=3)
    inputs = example_inputs(config, batch=2)
    inputs["x"] = jax.random.normal(jax.random.key(5), inputs["x"].shape)
    inputs["tokens"] = jnp.arange(16).reshape(2, 8) % 300
    full = jax.jit(GlideUNet(config).apply)({"params": params}, **inputs)
    half = jax.jit(GlideUNet(config, dtype=jnp.bfloat16).apply)({"params": params}, **inputs)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert half.dtype == jnp.float32  # the output head runs in float32
    rel = float(jnp.linalg.norm(half - full) / jnp.linalg.norm(full))
    assert rel < 0.05, rel


def test_dropout_is_active_only_when_not_deterministic():
    config = ModelConfig.from_dict(dict(VARIANTS["no_text_superres_inpaint"], dropout=0.5))
    params = randomized(param_shapes(config))
    inputs = example_inputs(config, batch=1)
    apply = jax.jit(GlideUNet(config).apply, static_argnames="deterministic")
    a = apply({"params": params}, **inputs)
    b = apply({"params": params}, **inputs)
    c = apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def _reference_bilinear(image, height, width):
    """Per-pixel loop of torch's align_corners=False bilinear rule, independent of the matrix form."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((height, width, image.shape[2]))
    for i in range(height):
        sy = max((i + 0.5) * in_h / height - 0.5, 0)
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, in_h - 1); fy = sy - y0
        for j in range(width):
            sx = max((j + 0.5) * in_w / width - 0.5, 0)
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, in_w - 1); fx = sx - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                         + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
    return out


@pytest.mark.parametrize("size_in,size_out", [((4, 4), (16, 16)), ((5, 3), (12, 7)), ((9, 8), (4, 5))])
def test_resize_bilinear_follows_torch_rule(size_in, size_out):
    image = np.random.default_rng(0).normal(size=size_in + (2,))
    got = resize_bilinear(jnp.asarray(image[None], jnp.float32), *size_out)[0]
    np.testing.assert_allclose(np.asarray(got), _reference_bilinear(image, *size_out), atol=1e-5)


def test_missing_text_or_low_res_is_a_clear_error():
    config = ModelConfig.from_dict(VARIANTS["odd_size_superres"])
    model = GlideUNet(config)
    inputs = example_inputs(config)
    del inputs["low_res"]
    with pytest.raises(ValueError, match="low_res is required"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    bad = example_inputs(config)
    bad["tokens"] = jnp.zeros((1, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"text_ctx=6"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), **bad))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown model config key.*'num_chanels'"):
        ModelConfig.from_dict({"num_chanels": 3})
    with pytest.raises(ConfigError, match="attention_resolutions entry 5"):
        ModelConfig(image_size=64, attention_resolutions="5")
    with pytest.raises(ConfigError, match="channel_mult is empty and image_size 48"):
        ModelConfig(image_size=48)
    with pytest.raises(ConfigError, match="xf_width 30 is not divisible by xf_heads 4"):
        ModelConfig(xf_width=30, xf_heads=4)
    with pytest.raises(ConfigError, match="norm_groups 12 does not divide the 32 channels .*num_channels 32"):
        ModelConfig(image_size=32, num_channels=32, channel_mult="1,2", norm_groups=12)
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        ModelConfig.from_json(path)
    config = ModelConfig(image_size=32, num_channels=32, channel_mult="1,2", attention_resolutions="16",
                         num_head_channels=24, xf_width=0)
    with pytest.raises(ConfigError, match="num_head_channels=24"):
        param_shapes(config)


def test_norm_groups_sets_every_group_norm_and_lets_blocks_see_the_overall_colour():
    import jax

    from glide_jax.layers import GroupNorm32

    x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
    shifted = x + np.arange(8, dtype=np.float32)   # a different constant offset per channel
    for groups in (8, 2):
        norm = GroupNorm32(groups=groups)
        params = norm.init(jax.random.key(0), x)
        out = np.asarray(norm.apply(params, x))
        grouped = x.reshape(2, 4, 4, groups, 8 // groups)
        mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
        var = grouped.var(axis=(1, 2, 4), keepdims=True)
        np.testing.assert_allclose(out, ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape), atol=1e-5)
        change = np.abs(np.asarray(norm.apply(params, shifted)) - out).max()
        # One channel per group removes each channel's mean: the offsets are invisible after it.
        assert (change < 1e-4) if groups == 8 else (change > 0.1), (groups, change)

    # The U-Net passes the option to every GroupNorm (the parameters do not depend on it).
    config = ModelConfig(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="1",
                         num_head_channels=32, xf_width=0, dropout=0.0)
    fewer = ModelConfig(**{**config.to_dict(), "norm_groups": 8})
    assert jax.tree.map(np.shape, param_shapes(config)) == jax.tree.map(np.shape, param_shapes(fewer))
    params = jax.tree.map(lambda s: np.random.default_rng(1).normal(size=s.shape).astype(np.float32) * 0.1,
                          param_shapes(config))
    x8, t = np.random.default_rng(2).normal(size=(1, 8, 8, 3)).astype(np.float32), np.array([10])
    jaxpr = str(jax.make_jaxpr(lambda p: GlideUNet(fewer).apply({"params": p}, x8, t))(params))
    assert "8,4]" in jaxpr and ",32,1]" not in jaxpr   # every norm reshapes 32 channels into 8 groups of 4
    a = GlideUNet(config).apply({"params": params}, x8, t)
    b = GlideUNet(fewer).apply({"params": params}, x8, t)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_text_layout_lets_the_caption_condition_places_differently():
    from glide_jax.conditioning import TextLayout, TextLayoutOptions
    from glide_jax.unet import ResBlock

    rng = np.random.default_rng(0)
    text, other_text = rng.normal(size=(2, 2, 5, 16)).astype(np.float32)
    emb = rng.normal(size=(2, 32)).astype(np.float32)
    layout = TextLayout(TextLayoutOptions(size=4, heads=4))
    layout_params = layout.init(jax.random.key(0), text, emb)["params"]
    assert layout_params["queries"].shape == (16, 16)
    maps = np.asarray(layout.apply({"params": layout_params}, text, emb))
    assert maps.shape == (2, 4, 4, 16)
    # Fresh, the queries already differ by place, so the map does too, and it follows the caption.
    assert maps.std(axis=(1, 2)).min() > 1e-3
    assert np.abs(np.asarray(layout.apply({"params": layout_params}, other_text, emb)) - maps).max() > 0.05

    # A ResBlock given a spatially constant input computes the same thing at every place away from the
    # convolutions' padding; the layout's projection is what can make its interior vary.
    x = np.broadcast_to(rng.normal(size=(2, 1, 1, 8)), (2, 8, 8, 8)).astype(np.float32)
    block_emb = rng.normal(size=(2, 12)).astype(np.float32)
    block = ResBlock(8, use_scale_shift_norm=True, norm_groups=2)
    fresh = block.init(jax.random.key(1), x, block_emb, True, maps)["params"]
    np.testing.assert_array_equal(fresh["layout_proj"]["kernel"], 0.0)
    params = randomized({key: value for key, value in fresh.items() if key != "layout_proj"})
    plain = np.asarray(block.apply({"params": params}, x, block_emb))
    np.testing.assert_array_equal(block.apply({"params": {**params, "layout_proj": fresh["layout_proj"]}},
                                              x, block_emb, True, maps), plain)
    interior = np.s_[:, 2:-2, 2:-2]
    assert np.ptp(plain[interior], axis=(1, 2)).max() < 1e-5
    trained = {**params, "layout_proj": randomized(fresh["layout_proj"], seed=1)}
    laid_out = np.asarray(block.apply({"params": trained}, x, block_emb, True, maps))
    assert np.ptp(laid_out[interior], axis=(1, 2)).min() > 1e-3

    # The U-Net builds one layout and gives every ResBlock a projection of it, only when asked.
    config = ModelConfig(image_size=8, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                         num_head_channels=8, text_ctx=5, xf_width=16, xf_layers=1, xf_heads=2, n_vocab=20,
                         dropout=0.0, norm_groups=4)
    with_layout = ModelConfig(**{**config.to_dict(), "conditioning": {"kind": "text_layout", "size": 4}})
    shapes = param_shapes(with_layout)["unet"]
    assert shapes["text_layout"]["queries"].shape == (16, 16)
    res_blocks = {name for name, layer in shapes.items() if "in_conv" in layer}
    assert {name for name, layer in shapes.items() if "layout_proj" in layer} == res_blocks and len(res_blocks) == 10
    assert not any("layout_proj" in layer or name == "text_layout" for name, layer in param_shapes(config)["unet"].items())
    with pytest.raises(ConfigError, match="conditioning text_layout needs a text transformer"):
        ModelConfig(**{**config.to_dict(), "xf_width": 0, "conditioning": {"kind": "text_layout", "size": 4}})
    with pytest.raises(ConfigError, match="text_layout: heads 3 must be positive and divide xf_width 16"):
        ModelConfig(**{**config.to_dict(), "conditioning": {"kind": "text_layout", "size": 4, "heads": 3}})
    with pytest.raises(ConfigError, match="conditioning kind 'grid' is not registered; registered kinds: .*'text_layout'"):
        ModelConfig(**{**config.to_dict(), "conditioning": {"kind": "grid"}})
    with pytest.raises(ConfigError, match="unknown conditioning option\\(s\\) \\['sizes'\\] for kind 'text_layout'"):
        ModelConfig(**{**config.to_dict(), "conditioning": {"kind": "text_layout", "sizes": 4}})
    # The config round-trips through its JSON form, and stays hashable (it is a Flax module field).
    assert ModelConfig.from_dict(with_layout.to_dict()) == with_layout and hash(with_layout)
    assert with_layout.to_dict()["conditioning"] == {"kind": "text_layout", "size": 4, "heads": 4}


def test_configs_with_removed_model_keys_migrate_or_name_the_replacement():
    base = dict(image_size=8, num_channels=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                num_head_channels=8, text_ctx=5, xf_width=16, xf_layers=1, xf_heads=2, n_vocab=20, norm_groups=4)
    old = {**base, "attention_position_embedding": False, "text_layout_size": 4, "text_layout_heads": 2,
           "text_layout_values": "features"}
    with pytest.warns(FutureWarning, match="old.json: model config key\\(s\\) attention_position_embedding, "
                      "text_layout_heads, text_layout_size, text_layout_values are deprecated; read as conditioning"):
        migrated = ModelConfig.from_dict(old, source="old.json")
    assert migrated == ModelConfig(**base, conditioning={"kind": "text_layout", "size": 4, "heads": 2})
    with pytest.warns(FutureWarning, match="read as nothing"):
        assert ModelConfig.from_dict({**base, "text_layout_size": 0}).conditioning is None
    with pytest.raises(ConfigError, match="old.json: attention_position_embedding was removed; replaced by nothing"):
        ModelConfig.from_dict({**base, "attention_position_embedding": True}, source="old.json")
    with pytest.raises(ConfigError, match="text_layout_values 'words' was removed"):
        ModelConfig.from_dict({**base, "text_layout_size": 4, "text_layout_values": "words"})


def test_attention_is_the_same_map_at_every_place():
    from glide_jax.unet import AttentionBlock

    x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
    text = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32)
    mirrored = x[:, :, ::-1]
    plain = AttentionBlock(heads=2, norm_groups=2)
    params = randomized(plain.init(jax.random.key(0), x, text)["params"])
    # GLIDE's attention has no position embedding: mirror the input, and the output is mirrored
    # too, so "left of" and "right of" cannot be told apart by it.
    np.testing.assert_allclose(np.asarray(plain.apply({"params": params}, mirrored, text)),
                               np.asarray(plain.apply({"params": params}, x, text))[:, :, ::-1], atol=1e-5)


def test_bundled_demo_base_gives_the_recorded_output():
    """The bundled base (with its text-layout extension) against its output recorded before the
    model options were reorganised: refactoring the U-Net must not change what it computes."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    fixture = np.load(root / "tests" / "data" / "demo_base_output.npz")
    config, params = load_model(root / "demo" / "base", dtype=np.float32)
    model = GlideUNet(ModelConfig.from_dict(config))
    out = model.apply({"params": params}, fixture["x"], fixture["t"], fixture["tokens"], fixture["mask"])
    np.testing.assert_allclose(np.asarray(out), fixture["out"], rtol=0, atol=1e-5)
