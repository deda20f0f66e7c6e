"""Old JAX names that Neural Tangents' tests (written for JAX 0.4) still use,
restored for `run_nt_tests.py` only: failures then measure infwidth, not the
JAX version."""

try:
  import jax

  for _name in ('map', 'leaves', 'flatten', 'unflatten', 'structure', 'all', 'reduce',
                'transpose'):
    if not hasattr(jax, 'tree_' + _name) and hasattr(jax.tree, _name):
      setattr(jax, 'tree_' + _name, getattr(jax.tree, _name))
except ImportError:
  pass
