"""Fallbacks for functions with a primitive that has no closed-form kernel rule.

`monte_carlo`: empirical kernels averaged over `n_samples` draws of the
parameters, each leaf Gaussian with the moments kernelize uses (at the given
widths). `empirical`: the empirical kernels at the given parameters, with the
NNGP of that single draw, `f(x1)·f(x2)ᵀ / C`.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.empirical import empirical_kernels
from infwidth.errors import InfwidthError
from infwidth.kernel import Kernel


def fallback_kernel(err, fallback, apply_fn, params, leaves_info, x1, x2, x1_is_x2,
                    n_samples, key, apply_kwargs) -> Kernel:
  """The `Kernel` of `apply_fn` by the chosen fallback; warns naming the cause."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  weights = jax.tree_util.tree_unflatten(treedef, [l.ntk_weight for l in leaves_info])
  if fallback == 'empirical':
    if any(isinstance(l, jax.ShapeDtypeStruct) for l in leaves):
      raise InfwidthError('fallback="empirical" needs parameter values, not ShapeDtypeStructs.') from err
    warnings.warn(f'kernelize: {_cause(err)}; returning the empirical kernels at the given '
                  'parameters (fallback="empirical").', stacklevel=3)
    kernels = lambda p, a, b: empirical_kernels(apply_fn, p, a, b, ('nngp', 'ntk'), weights,
                                                **apply_kwargs)
    sample = lambda k: params
    n = 1
  else:
    warnings.warn(f'kernelize: {_cause(err)}; returning a Monte Carlo estimate over '
                  f'{n_samples} draws of the parameters (fallback="monte_carlo").', stacklevel=3)
    if key is None:
      key = jax.random.PRNGKey(0)

    def sample(k):
      ks = jax.random.split(k, len(leaves_info))
      draws = [l.mean + np.sqrt(l.var) * jax.random.normal(kk, l.shape, _dtype(leaf))
               for l, kk, leaf in zip(leaves_info, ks, leaves)]
      return jax.tree_util.tree_unflatten(treedef, draws)

    kernels = lambda p, a, b: empirical_kernels(apply_fn, p, a, b, ('nngp', 'ntk'), weights,
                                                **apply_kwargs)
    n = int(n_samples)
    if n < 1:
      raise InfwidthError(f'n_samples must be a positive integer, got {n_samples}.')

  b = None if x1_is_x2 else x2
  keys = jax.random.split(key, n) if fallback == 'monte_carlo' else jnp.zeros((1, 2), jnp.uint32)

  def one(k):
    p = sample(k)
    k12 = kernels(p, x1, b)
    d1 = _diag(kernels(p, x1, None).nngp)
    d2 = d1 if x1_is_x2 else _diag(kernels(p, x2, None).nngp)
    return k12.nngp, k12.ntk, d1, d2

  def body(acc, k):
    return jax.tree_util.tree_map(jnp.add, acc, one(k)), None

  first = one(keys[0])
  total, _ = jax.lax.scan(body, first, keys[1:]) if n > 1 else (first, None)
  nngp, ntk, cov1, cov2 = jax.tree_util.tree_map(lambda a: a / n, total)
  return Kernel(nngp, ntk, cov1, None if x1_is_x2 else cov2, x1_is_x2=x1_is_x2,
                shape1=_output_shape(apply_fn, params, x1, apply_kwargs),
                shape2=_output_shape(apply_fn, params, x1 if x1_is_x2 else x2, apply_kwargs))


def _output_shape(apply_fn, params, x, apply_kwargs):
  """The shape of `apply_fn(params, x)` (of its one output; `()` for several)."""
  out = jax.eval_shape(lambda p, a: apply_fn(p, a, **apply_kwargs), params, x)
  leaves = jax.tree_util.tree_leaves(out)
  return tuple(leaves[0].shape) if len(leaves) == 1 else ()


def _dtype(leaf):
  return getattr(leaf, 'dtype', jnp.float32)


def _diag(k):
  """Per-input entries `(N, ...)` of an `(N, N, ...)` kernel."""
  return jnp.diagonal(k, axis1=0, axis2=1).transpose((k.ndim - 2,) + tuple(range(k.ndim - 2)))


def _cause(err) -> str:
  return f'no kernel rule for `{err.primitive}` at {err.source or "unknown location"}'
