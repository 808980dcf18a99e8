"""The converter reports every bad key before writing anything."""

import numpy as np
import pytest

from glide_jax.config import ModelConfig
from glide_jax.convert import ConversionError, convert_state_dict, main as convert_main
from glide_jax.pt_reader import load_state_dict


@pytest.fixture(scope="module")
def base(golden):
    return ModelConfig.from_json(golden / "base.config.json"), load_state_dict(golden / "base.pt")


def test_missing_unexpected_and_misshaped_keys_are_all_named(base):
    config, state_dict = base
    # Shapes from the golden state dict, so any golden set made the same way passes.
    conv = state_dict["input_blocks.1.0.in_layers.2.weight"].shape
    out = state_dict["out.2.weight"].shape
    broken = dict(state_dict)
    del broken["input_blocks.1.0.in_layers.2.weight"]
    broken["input_blocks.1.0.extra.weight"] = np.zeros(3, np.float32)
    broken["out.2.weight"] = np.zeros(out[:2] + (1, 1), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(broken, config, source="broken.pt")
    message = str(err.value)
    assert "broken.pt" in message
    assert f"input_blocks.1.0.in_layers.2.weight (expected shape {conv})" in message
    assert "input_blocks.1.0.extra.weight (shape (3,))" in message
    assert f"out.2.weight: expected shape {out}, found {out[:2] + (1, 1)}" in message


def test_wrong_config_is_refused_and_nothing_written(golden, tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text((golden / "upsample.config.json").read_text())
    out = tmp_path / "converted"
    code = convert_main(["--checkpoint", str(golden / "base.pt"), "--config", str(wrong), "--out", str(out)])
    assert code == 2
    assert not out.exists()


def test_existing_output_is_not_overwritten_without_flag(golden, tmp_path):
    out = tmp_path / "converted"
    args = ["--checkpoint", str(golden / "base.pt"), "--config", str(golden / "base.config.json"),
            "--out", str(out)]
    assert convert_main(args) == 0
    assert convert_main(args) == 2
    assert convert_main(args + ["--overwrite"]) == 0


def test_clip_conversion_cli_round_trips_through_orbax(golden, tmp_path):
    import jax.numpy as jnp

    from glide_jax.checkpoint import load_model
    from glide_jax.clip import ClipConfig, text_features

    out = tmp_path / "clip"
    code = convert_main(["--clip-image", str(golden / "clip_image_enc.pt"), "--clip-text",
                         str(golden / "clip_text_enc.pt"), "--config", str(golden / "clip.config.json"),
                         "--out", str(out)])
    assert code == 0
    config_dict, params = load_model(out)
    config = ClipConfig.from_dict(config_dict)
    inputs, outputs = np.load(golden / "clip.inputs.npz"), np.load(golden / "clip.outputs.npz")
    got = text_features(params, config, jnp.asarray(inputs["tokens"]), jnp.asarray(inputs["text_len"]))
    np.testing.assert_allclose(np.asarray(got), outputs["text_features_raw"], rtol=0, atol=1e-4)


def test_clip_image_and_text_files_swapped_is_refused(golden, tmp_path):
    out = tmp_path / "clip"
    code = convert_main(["--clip-image", str(golden / "clip_text_enc.pt"), "--clip-text",
                         str(golden / "clip_image_enc.pt"), "--config", str(golden / "clip.config.json"),
                         "--out", str(out)])
    assert code == 2
    assert not out.exists()
