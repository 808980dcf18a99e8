"""XLA compiler options that glide-jax's programs (the sampling stages, the training step) are
compiled with, per platform.

XLA:CPU (jaxlib 0.10) hands convolutions, matrix products and reductions to YNNPACK by default.
On GLIDE's 3x3 convolutions YNNPACK is slower than XLA's own (Eigen) convolution on these CPUs
(1.5x over the U-Net's 74 convolutions, up to 2.7x on some shapes), while its matrix products and
reductions are the faster ones (a softmax over 1152 keys takes half the time). So on the CPU convolutions are kept off YNNPACK: the full-size guided
base step went from 2.72 s to 2.19 s on 2 idle cores (bench/README, "CPU float32 against the
original"). Other platforms get no options.

`GLIDE_JAX_XLA_OPTIONS=0` turns this off. An option the user already set in `XLA_FLAGS` wins, and
a jaxlib that does not know an option compiles without it (with one warning), never fails.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable

from glide_jax.compile_cache import OFF_VALUES

ENV = "GLIDE_JAX_XLA_OPTIONS"

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _accepted_on_cpu(options: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The options this jaxlib's CPU compiler takes: a trivial program compiled once with each."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    probe = jax.jit(lambda x: x + 1).lower(jax.device_put(jnp.zeros((), jnp.float32), cpu))
    accepted = []
    for name, value in options:
        try:
            probe.compile(compiler_options={name: value})
        except Exception as error:  # jaxlib raises its own runtime error type for unknown options
            warnings.warn(f"this jaxlib ({jax.__version__}) does not take the XLA option {name}={value} "
                          f"({str(error).splitlines()[0]}); compiling without it (set {ENV}=0 to silence this)",
                          RuntimeWarning, stacklevel=3)
            continue
        accepted.append((name, value))
    return tuple(accepted)


def compiler_options(devices: Iterable) -> dict[str, str] | None:
    """Options to pass as `compiler_options=` when compiling a program for `devices` (a mesh's
    devices), or None when there are none for that platform."""
    if os.environ.get(ENV, "").strip().lower() in OFF_VALUES:
        return None
    platforms = {device.platform for device in devices}
    if platforms != {"cpu"}:
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = tuple((name, value) for name, value in CPU_OPTIONS.items() if f"--{name}=" not in flags)
    accepted = _accepted_on_cpu(wanted) if wanted else ()
    return dict(accepted) or None
