"""glide-jax: OpenAI's GLIDE in JAX/Flax."""

__version__ = "0.1.0"
