"""Tests run in float64 unless a test asks for float32 explicitly."""

import jax

jax.config.update('jax_enable_x64', True)
