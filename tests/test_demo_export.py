"""demo/export.py's model surgery: added U-Net attention blocks and text-transformer layers, and the
inpainting model's widened input, keep the trained model's function exactly, so training continues
where it left off."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import checkpoint, unet
from glide_jax.config import ModelConfig

from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "demo"))
import export  # noqa: E402

SMALL = dict(image_size=16, num_channels=16, num_res_blocks=1, channel_mult="1,2,2", num_head_channels=8,
             text_ctx=6, xf_width=16, xf_layers=1, xf_heads=2, n_vocab=20, norm_groups=4)


def outputs(config, params):
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    t = jnp.array([5, 500, 999])
    tokens = jax.random.randint(jax.random.key(2), (3, 6), 0, 20)
    return unet.GlideUNet(config).apply({"params": params}, x, t, tokens, jnp.ones((3, 6), bool))


def trained_like(config):
    """Params with every leaf random (a freshly initialised attention block would be an identity map
    whatever happens to it, which would hide a mix-up of layers)."""
    params = unet.init_params(config, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(tree, [np.asarray(0.2 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])


def test_added_attention_layers_start_as_identity_maps():
    small = ModelConfig(attention_resolutions="4", **SMALL)
    grown_config = ModelConfig(attention_resolutions="8,4", **SMALL)
    trained = trained_like(small)
    fresh = jax.tree.map(np.asarray, unet.init_params(grown_config, jax.random.key(7)))
    grown = export.grow_attention(trained, fresh)

    assert set(grown["unet"]) - set(trained["unet"]) == {"input_blocks_3_1", "output_blocks_2_1", "output_blocks_3_2"}
    # In the 8 px level's last output block the new attention takes the upsampling layer's index,
    # and the upsampling layer moves on by one with its trained weights.
    for name in ("input_blocks_3_1", "output_blocks_2_1", "output_blocks_3_1"):
        assert set(grown["unet"][name]) == {"norm", "qkv", "encoder_kv", "proj_out"}
    np.testing.assert_array_equal(grown["unet"]["output_blocks_3_2"]["in_conv"]["kernel"],
                                  trained["unet"]["output_blocks_3_1"]["in_conv"]["kernel"])
    np.testing.assert_array_equal(outputs(small, trained), outputs(grown_config, grown))
    # Not trivially so: the grown model, given its own fresh weights, computes something else.
    assert not np.allclose(outputs(small, trained), outputs(grown_config, fresh), atol=1e-3)


def test_growing_refuses_a_model_that_loses_layers():
    with_attention = ModelConfig(attention_resolutions="8,4", **SMALL)
    without = ModelConfig(attention_resolutions="4", **SMALL)
    trained = trained_like(with_attention)
    fresh = jax.tree.map(np.asarray, unet.init_params(without, jax.random.key(7)))
    with pytest.raises(SystemExit, match="have no place in the grown U-Net"):
        export.grow_attention(trained, fresh)


def test_growing_refuses_a_model_of_another_width():
    trained = trained_like(ModelConfig(attention_resolutions="4", **SMALL))
    wider = ModelConfig(attention_resolutions="8,4", **dict(SMALL, num_channels=32))
    fresh = jax.tree.map(np.asarray, unet.init_params(wider, jax.random.key(7)))
    with pytest.raises(SystemExit, match="trained shapes"):
        export.grow_attention(trained, fresh)


def test_added_text_layers_start_as_identity_maps():
    small = ModelConfig(attention_resolutions="4", **SMALL)
    deeper = ModelConfig(attention_resolutions="4", **dict(SMALL, xf_layers=3))
    trained = trained_like(small)
    fresh = jax.tree.map(np.asarray, unet.init_params(deeper, jax.random.key(7)))
    grown_text = export.grow_text_layers(trained["text_encoder"], fresh["text_encoder"])
    assert set(grown_text) - set(trained["text_encoder"]) == {"resblocks_1", "resblocks_2"}
    # Only the output projections are zeroed: the new layers' other weights can still learn.
    assert np.any(grown_text["resblocks_1"]["attn"]["c_qkv"]["kernel"])
    grown = {**trained, "text_encoder": grown_text}
    np.testing.assert_array_equal(outputs(small, trained), outputs(deeper, grown))
    assert not np.allclose(outputs(small, trained), outputs(deeper, {**trained, "text_encoder": fresh["text_encoder"]}),
                           atol=1e-3)


def test_growing_text_refuses_another_width():
    trained = trained_like(ModelConfig(attention_resolutions="4", **SMALL))
    wider = ModelConfig(attention_resolutions="4", **dict(SMALL, xf_width=32, xf_layers=2))
    fresh = jax.tree.map(np.asarray, unet.init_params(wider, jax.random.key(7)))
    with pytest.raises(SystemExit, match="text_encoder/.*trained shapes"):
        export.grow_text_layers(trained["text_encoder"], fresh["text_encoder"])


def test_the_inpainting_start_computes_the_base_model_whatever_the_hole():
    base_config = ModelConfig(attention_resolutions="4", **SMALL)
    inpaint_config = ModelConfig(attention_resolutions="4", inpaint=True, **SMALL)
    trained = trained_like(base_config)
    widened = export.widen_for_inpainting(trained)
    assert widened["unet"]["input_blocks_0_0"]["kernel"].shape[2] == 7
    assert trained["unet"]["input_blocks_0_0"]["kernel"].shape[2] == 3      # the base is left as it was
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    t = jnp.array([5, 500, 999])
    tokens = jax.random.randint(jax.random.key(2), (3, 6), 0, 20)
    image = jax.random.uniform(jax.random.key(4), (3, 16, 16, 3), minval=-1, maxval=1)
    mask = (jax.random.uniform(jax.random.key(5), (3, 16, 16, 1)) > 0.5).astype(jnp.float32)
    inpainting = unet.GlideUNet(inpaint_config).apply({"params": widened}, x, t, tokens, jnp.ones((3, 6), bool),
                                                      inpaint_image=image * mask, inpaint_mask=mask)
    np.testing.assert_array_equal(outputs(base_config, trained), inpainting)
    # The zero weights on the four new channels are what keeps it so: others change the output.
    nudged = jax.tree.map(lambda a: a, widened)
    nudged["unet"]["input_blocks_0_0"]["kernel"] = jnp.asarray(widened["unet"]["input_blocks_0_0"]["kernel"]).at[:, :, 3:].add(0.1)
    moved = unet.GlideUNet(inpaint_config).apply({"params": nudged}, x, t, tokens, jnp.ones((3, 6), bool),
                                                 inpaint_image=image * mask, inpaint_mask=mask)
    assert not np.allclose(inpainting, moved, atol=1e-3)
    with pytest.raises(SystemExit, match="expected a 3-channel input convolution"):
        export.widen_for_inpainting(widened)


import bind_text  # noqa: E402
import probe_binding  # noqa: E402
import probe_clip  # noqa: E402


def test_binding_labels_mark_each_object_s_words_with_its_colour_shape_and_place():
    from demo import shapes
    from glide_jax import tokenizers

    tokenizer = tokenizers.SentencePieceTokenizer(str(PROJECT_ROOT / "demo" / "tokenizer.model"))
    colour, kind, place = shapes.SHAPE_COLOURS.index, shapes.KINDS.index, bind_text.PLACES.index
    # Named right object first, comma forms, and two identical objects told apart by their order.
    labels = bind_text.object_token_labels("a white circle to the right of a white circle, gray background", tokenizer, 16)
    expected = np.full((16, 3), -1)
    expected[1], expected[2] = (colour("white"), -1, place("right")), (-1, kind("circle"), place("right"))
    expected[8], expected[9] = (colour("white"), -1, place("left")), (-1, kind("circle"), place("left"))
    np.testing.assert_array_equal(labels, expected)
    labels = bind_text.object_token_labels("on a black background, a blue square below a red triangle", tokenizer, 16)
    expected = np.full((16, 3), -1)
    expected[5], expected[6] = (colour("blue"), -1, place("bottom")), (-1, kind("square"), place("bottom"))
    expected[9], expected[10] = (colour("red"), -1, place("top")), (-1, kind("triangle"), place("top"))
    np.testing.assert_array_equal(labels, expected)
    labels = bind_text.object_token_labels("red circle, white background", tokenizer, 16)
    np.testing.assert_array_equal(labels[:2], [(colour("red"), -1, place("alone")), (-1, kind("circle"), place("alone"))])
    assert (labels[2:] == -1).all()
    with pytest.raises(ValueError, match="is 4 tokens, more than text_ctx=3"):
        bind_text.object_token_labels("red circle, white background", tokenizer, 3)


def test_binding_teaches_a_text_transformer_what_a_linear_probe_could_not_read_and_keeps_the_rest():
    from glide_jax import tokenizers

    tokenizer = tokenizers.SentencePieceTokenizer(str(PROJECT_ROOT / "demo" / "tokenizer.model"))
    config = {**SMALL, "attention_resolutions": "8", "text_ctx": 16, "n_vocab": tokenizer.n_vocab}
    params = jax.tree.map(np.asarray, unet.init_params(ModelConfig.from_dict(config), jax.random.key(0)))
    bound, accuracy = bind_text.bind(params, config, tokenizer, steps=600, batch_size=32,
                                     learning_rate=3e-3, seed=0, probe_size=300, log=lambda *_: None)
    before, after = accuracy["before"]["train"], accuracy["after"]["train"]
    # Where an object is depends on the relation word and the order of the phrases, which a fresh
    # transformer's features do not carry; its own colour and shape words it only has to keep.
    assert after["place"] > before["place"] + 0.2, accuracy
    assert after["colour"] > 0.95 and after["shape"] > 0.95, accuracy
    changed = [name for name in params["text_encoder"]
               if any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(params["text_encoder"][name]),
                                                              jax.tree.leaves(bound["text_encoder"][name])))]
    assert "transformer_proj" not in changed and "resblocks_0" in changed
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["unet"]), jax.tree.leaves(bound["unet"])))
    assert bind_text.frozen_paths(bound["text_encoder"]) == [
        f"text_encoder/{n}" for n in sorted(params["text_encoder"]) if n != "transformer_proj"]


def test_binding_with_a_keep_weight_changes_the_features_less():
    from glide_jax import tokenizers

    tokenizer = tokenizers.SentencePieceTokenizer(str(PROJECT_ROOT / "demo" / "tokenizer.model"))
    config = {**SMALL, "attention_resolutions": "8", "text_ctx": 16, "n_vocab": tokenizer.n_vocab}
    params = jax.tree.map(np.asarray, unet.init_params(ModelConfig.from_dict(config), jax.random.key(0)))
    change = {}
    for weight in (0.0, 10.0):
        _, accuracy = bind_text.bind(params, config, tokenizer, steps=100, batch_size=32, learning_rate=3e-3,
                                     seed=0, keep_weight=weight, probe_size=100, log=lambda *_: None)
        assert accuracy["before"]["train"]["feature_change"] == 0.0
        change[weight] = accuracy["after"]["train"]["feature_change"]
    assert change[10.0] < 0.5 * change[0.0], change


def test_a_run_exports_as_float16_for_bundling_and_float32_to_start_from(tmp_path):
    import json

    import orbax.checkpoint as ocp

    config = ModelConfig(attention_resolutions="4", **SMALL)
    ema = jax.tree.map(lambda a: a + np.float32(1e-4), trained_like(config))
    run = tmp_path / "run"
    saver = ocp.StandardCheckpointer()
    for step in (5, 10):   # the newest checkpoint is the one exported
        saver.save(run / str(step) / "state", {"ema_params": jax.tree.map(lambda a: a * step, ema)})
        saver.wait_until_finished()
        (run / str(step) / "run").mkdir(parents=True)
        (run / str(step) / "run" / "metadata").write_text(json.dumps({"model": config.to_dict(), "model_kind": "base"}))
    tokenizer = PROJECT_ROOT / "demo" / "tokenizer.model"
    assert export.main(["init", "--run", str(run), "--out", str(tmp_path / "init")]) == 0
    assert export.main(["model", "--run", str(run), "--out", str(tmp_path / "model"), "--tokenizer", str(tokenizer)]) == 0
    init_config, init = checkpoint.load_model(tmp_path / "init")
    model_config, model = checkpoint.load_model(tmp_path / "model")
    assert init_config == model_config == config.to_dict()
    expected = jax.tree.map(lambda a: np.asarray(a * 10), ema)
    jax.tree.map(np.testing.assert_array_equal, init, expected)
    assert {leaf.dtype for leaf in jax.tree.leaves(model)} == {np.dtype(np.float16)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a.astype(np.float32), b, rtol=1e-3, atol=1e-4), model, expected)
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    assert json.loads((tmp_path / "model" / "TRAINED.json").read_text())["step"] == 10
    # An earlier checkpoint on request; a missing one is named with those there are.
    assert export.main(["init", "--run", str(run), "--out", str(tmp_path / "init5"), "--step", "5"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b * 5)), checkpoint.load_model(tmp_path / "init5")[1], ema)
    with pytest.raises(SystemExit, match="no checkpoint at step 7 in .*; it has 5, 10"):
        export.main(["model", "--run", str(run), "--out", str(tmp_path / "m7"), "--step", "7"])
    assert export.main(["inpaint-init", "--run", str(run), "--out", str(tmp_path / "inpaint5"), "--step", "5"]) == 0
    widened_config, widened = checkpoint.load_model(tmp_path / "inpaint5")
    assert widened_config["inpaint"] and widened["unet"]["input_blocks_0_0"]["kernel"].shape[2] == 7
    np.testing.assert_array_equal(widened["unet"]["input_blocks_0_0"]["kernel"][:, :, :3],
                                  np.asarray(ema["unet"]["input_blocks_0_0"]["kernel"] * 5))


def test_added_text_layout_changes_nothing_until_trained(tmp_path):
    small = ModelConfig(attention_resolutions="4", **SMALL)
    laid_out = ModelConfig(attention_resolutions="4", conditioning={"kind": "text_layout", "size": 4}, **SMALL)
    trained = trained_like(small)
    checkpoint.save_model(tmp_path / "trained", trained, small.to_dict())
    assert export.main(["grow", "--model", str(tmp_path / "trained"), "--text-layout", "4",
                        "--out", str(tmp_path / "grown")]) == 0
    config, grown = checkpoint.load_model(tmp_path / "grown")
    assert config["conditioning"] == {"kind": "text_layout", "size": 4, "heads": 4}
    np.testing.assert_array_equal(grown["unet"]["middle_block_0"]["in_conv"]["kernel"],
                                  trained["unet"]["middle_block_0"]["in_conv"]["kernel"])
    np.testing.assert_array_equal(outputs(small, trained), outputs(laid_out, grown))
    nudged = jax.tree.map(lambda a: a, grown)
    nudged["unet"]["middle_block_0"]["layout_proj"]["kernel"] = np.full_like(
        grown["unet"]["middle_block_0"]["layout_proj"]["kernel"], 0.1)
    assert not np.allclose(outputs(laid_out, nudged), outputs(small, trained), atol=1e-3)


def test_binding_probe_tells_a_model_that_binds_from_one_that_reads_the_image():
    from demo import shapes

    drawn = {}
    for objects in (2, 1):
        scenes = probe_binding.probe_scenes(6, seed=5, objects=objects)
        for scene, own, changed in zip(scenes, probe_binding.captions(scenes, False), probe_binding.captions(scenes, True)):
            recoloured = shapes.Scene(scene.background, tuple(
                dataclasses.replace(shape, colour=colour) for shape, colour in zip(scene.shapes, probe_binding.changed_colours(scene))),
                scene.relation)
            # The changed caption says what is drawn here (parse_caption may name the objects in another order).
            assert shapes.parse_caption(changed) in {shapes.parse_caption(c) for c in recoloured.captions()}
            drawn[own] = scene.render(32).astype(np.float32) / 127.5 - 1
            drawn[changed] = recoloured.render(32).astype(np.float32) / 127.5 - 1
    alpha_bar = np.linspace(0.999, 0.001, 1000)

    def binds(noisy, t, texts):       # draws each caption's colours on the objects it names
        return np.stack([drawn[text] for text in texts])

    def reads_the_image(noisy, t, texts):
        return noisy / np.sqrt(alpha_bar[t])

    kwargs = dict(count=6, seed=5, timesteps=(100, 999))
    every = {"own": 1.0, "swapped": 1.0, "recoloured": 1.0}
    assert probe_binding.follow_rates(binds, alpha_bar, **kwargs) == {100: every, 999: every}
    reader = probe_binding.follow_rates(reads_the_image, alpha_bar, **kwargs)
    assert reader[100] == {"own": 1.0, "swapped": 0.0, "recoloured": 0.0}
    assert all(0.2 < share < 0.8 for share in reader[999].values()), reader[999]   # the noise decides


def test_clip_probe_tells_a_clip_that_reads_the_whole_caption_from_one_that_reads_a_bag_of_words():
    from demo import shapes

    alpha_bar = np.linspace(0.999, 0.001, 1000)

    def analysed(noisy, t):
        pixels = np.clip((noisy / np.sqrt(alpha_bar[t]) + 1) * 127.5, 0, 255).round().astype(np.uint8)
        return [shapes.analyse(image) for image in pixels]

    def reads_everything(noisy, t, captions):     # 1 where the analyser finds the caption true
        return np.array([[float(shapes.score(shapes.parse_caption(c), a)["all"]) for c in captions]
                         for a in analysed(noisy, t)])

    def reads_a_bag_of_words(noisy, t, captions):  # how many of the colours and shapes it names are there
        def named(caption):
            spec = shapes.parse_caption(caption)
            return {w for obj in spec.objects for w in obj}
        return np.array([[float(len(named(c) & {w for o in a["objects"] for w in (o["colour"], o["kind"])}))
                          for c in captions] for a in analysed(noisy, t)])

    kwargs = dict(count=8, seed=5, timesteps=(0,))
    changed_words = {"colours swapped": 2, "shapes swapped": 2, "relation inverted": 1}
    for scene in probe_clip.probe_scenes(8, seed=5):
        for i in range(5):   # the same phrasing: only the changed words differ
            own = probe_clip.phrase(scene.spec, i).replace(",", "").split()
            for name, spec in probe_clip.near_misses(scene).items():
                other = probe_clip.phrase(spec, i).replace(",", "").split()
                assert shapes.parse_caption(" ".join(other)) != shapes.parse_caption(" ".join(own))
                if name in changed_words:
                    assert len(other) == len(own) and sum(a != b for a, b in zip(own, other)) == changed_words[name], (own, other)
    assert probe_clip.win_rates(reads_everything, alpha_bar, **kwargs) == {
        0: {"retrieval": 1.0, **{name: 1.0 for name in probe_clip.NEAR_MISSES}}}
    bag = probe_clip.win_rates(reads_a_bag_of_words, alpha_bar, **kwargs)[0]
    assert {name: bag[name] for name in probe_clip.NEAR_MISSES} == {name: 0.0 for name in probe_clip.NEAR_MISSES}

def test_binding_probe_zeroes_one_text_path():
    params = {"text_encoder": {"transformer_proj": {"kernel": np.ones((2, 3))}, "token_embedding": {"embedding": np.ones(4)}},
              "unet": {"middle_block_1": {"encoder_kv": {"kernel": np.ones((2, 6))}, "qkv": {"kernel": np.ones((3, 9))}},
                       "middle_block_0": {"layout_proj": {"kernel": np.ones((4, 8))}, "in_conv": {"kernel": np.ones(3)}}}}
    pooled = probe_binding.without_text_path(params, "pooled-text")
    assert not pooled["text_encoder"]["transformer_proj"]["kernel"].any()
    assert pooled["unet"]["middle_block_1"]["encoder_kv"]["kernel"].all() and pooled["text_encoder"]["token_embedding"]["embedding"].all()
    tokens = probe_binding.without_text_path(params, "token-attention")
    assert not tokens["unet"]["middle_block_1"]["encoder_kv"]["kernel"].any()
    assert tokens["unet"]["middle_block_1"]["qkv"]["kernel"].all() and tokens["text_encoder"]["transformer_proj"]["kernel"].all()
    laid_out = probe_binding.without_text_path(params, "text-layout")
    assert not laid_out["unet"]["middle_block_0"]["layout_proj"]["kernel"].any()
    assert laid_out["unet"]["middle_block_0"]["in_conv"]["kernel"].all() and laid_out["unet"]["middle_block_1"]["encoder_kv"]["kernel"].all()
    with pytest.raises(SystemExit, match="no text-layout parameters"):
        probe_binding.without_text_path({"unet": {"qkv": {"kernel": np.ones(2)}}}, "text-layout")
    with pytest.raises(SystemExit, match="no token-attention parameters"):
        probe_binding.without_text_path({"unet": {"qkv": {"kernel": np.ones(2)}}}, "token-attention")


def test_binding_probe_runs_on_the_bundled_base(capsys, tmp_path):
    assert probe_binding.main(["--model", str(PROJECT_ROOT / "demo" / "base"), "--scenes", "2",
                               "--without", "token-attention"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "without token-attention" in lines[0]
    assert [line[:6] for line in lines[1:]] == [f"t={t:4d}" for t in probe_binding.TIMESTEPS]
    # At t=300 the image still shows the colours: every object keeps its drawn one.
    assert "own caption 1.00, colours swapped 0.00  one object, another colour named: 0.00" in lines[1]
    with pytest.raises(SystemExit, match="not an exported base model"):
        probe_binding.main(["--model", str(tmp_path)])
