"""har_jax: LRCN human action recognition in JAX."""

__version__ = '0.1.0'
