"""glide-jax: OpenAI's GLIDE in JAX/Flax.

    >>> from glide_jax import Pipeline
    >>> pipe = Pipeline.from_pretrained("demo")      # or "glide", or a directory of models
    >>> images = pipe("a red circle on a white background").images
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineError", "PipelineOutput"]


def __getattr__(name):
    # Lazy, so that `import glide_jax.<module>` does not import jax before a CLI has set XLA_FLAGS.
    if name in __all__:
        from glide_jax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'glide_jax' has no attribute {name!r}")
