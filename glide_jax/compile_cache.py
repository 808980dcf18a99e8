"""A persistent XLA compilation cache, so a second run of the same sampler does not compile again.

On by default for the `Pipeline` (and so the CLIs and the web app) under `<cache>/xla`
(`<cache>` is `download.cache_dir()`); `GLIDE_JAX_COMPILE_CACHE=0` turns it off, and any other
value names the directory to use. A directory the user already gave JAX
(`jax_compilation_cache_dir`, `JAX_COMPILATION_CACHE_DIR`) is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "GLIDE_JAX_COMPILE_CACHE"
# What turns off one of glide-jax's on-by-default switches (this one, glide_jax.xla_options).
OFF_VALUES = {"0", "false", "no", "off"}


def cache_directory() -> Path | None:
    """Where compiled programs are kept, or None when the cache is off."""
    from glide_jax import download

    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    return Path(value).expanduser() if value else download.cache_dir() / "xla"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns the cache on (at `directory`, else `cache_directory()`); returns where it is, or None
    when it is off. Idempotent; never overrides a directory set in JAX's own configuration."""
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    target = Path(directory) if directory is not None else cache_directory()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None   # an unwritable cache costs compile time, never the run
    jax.config.update("jax_compilation_cache_dir", str(target))
    # The demo's programs compile in seconds; JAX's default threshold (1 s) would skip the cheap
    # ones, which are the ones a short CLI run spends most of its time compiling.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target
