"""cm3leon_jax: a JAX/Flax reimplementation of CM3Leon (retrieval-augmented, token-based,
decoder-only text and image generation and infilling)."""

from cm3leon_jax.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
