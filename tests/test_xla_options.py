"""glide_jax.xla_options: which XLA options the stages and the training step are compiled with."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from glide_jax import parallel, stages, xla_options
from glide_jax.config import ModelConfig
from glide_jax.diffusion import GaussianDiffusion
from glide_jax.unet import param_shapes

CPU = [types.SimpleNamespace(platform="cpu")]


@pytest.fixture(autouse=True)
def fresh_probe():
    xla_options._accepted_on_cpu.cache_clear()
    yield
    xla_options._accepted_on_cpu.cache_clear()


def test_cpu_programs_keep_convolutions_off_ynnpack(monkeypatch):
    monkeypatch.delenv(xla_options.ENV, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = xla_options.compiler_options(jax.devices())
    assert options == xla_options.CPU_OPTIONS
    # Matrix products and reductions stay on YNNPACK; convolutions are the ones taken off it.
    kinds = options["xla_cpu_experimental_ynn_fusion_type"].split(",")
    assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in kinds and not any("CONVOLUTION" in k for k in kinds)


def test_other_platforms_and_the_switch_get_no_options(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options([types.SimpleNamespace(platform="gpu")]) is None
    assert xla_options.compiler_options(CPU + [types.SimpleNamespace(platform="tpu")]) is None
    for off in ("0", "off", "False"):
        monkeypatch.setenv(xla_options.ENV, off)
        assert xla_options.compiler_options(CPU) is None


def test_an_option_the_user_set_in_xla_flags_wins(monkeypatch):
    monkeypatch.delenv(xla_options.ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    assert xla_options.compiler_options(CPU) is None


def test_an_option_this_jaxlib_does_not_know_is_dropped_with_a_warning(monkeypatch):
    monkeypatch.delenv(xla_options.ENV, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", dict(xla_options.CPU_OPTIONS, xla_cpu_no_such_option="1"))
    with pytest.warns(RuntimeWarning, match="xla_cpu_no_such_option=1"):
        options = xla_options.compiler_options(CPU)
    assert options == {k: v for k, v in xla_options.CPU_OPTIONS.items() if k != "xla_cpu_no_such_option"}


def test_stage_programs_are_compiled_with_the_options(monkeypatch):
    # An option XLA refuses makes the stage's compile fail, which shows the options reach it.
    config = ModelConfig(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                         num_head_channels=8, text_ctx=4, xf_width=16, xf_layers=1, xf_heads=2, dropout=0.0)
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), param_shapes(config))
    tokens = np.ones((1, config.text_ctx), np.int32)
    seen = []

    def refused(devices):
        seen.append({d.platform for d in devices})
        return {"xla_cpu_no_such_option": "1"}

    monkeypatch.setattr(xla_options, "compiler_options", refused)
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        stages.sample_base(config, params, tokens, tokens > 0, jax.random.key(0),
                           diffusion=GaussianDiffusion.create("linear", 1000, "2"), guidance_scale=None,
                           mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    assert seen == [{"cpu"}]
