"""Fallbacks for functions with something that has no analytic kernel rule.

`monte_carlo`: empirical kernels averaged over `n_samples` draws of the
parameters, each leaf Gaussian with the moments kernelize uses (at the given
widths). `empirical`: the empirical kernels at the given parameters, with the
NNGP of that single draw, `f(x1)·f(x2)ᵀ / C`. Both give the same `Kernel`
fields and shapes as the analytic path (one per output of the function).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from infwidth.domain.errors import InfwidthError
from infwidth.domain.kernel import Kernel, build_kernel
from infwidth.domain.noise import is_key
from infwidth.empirical.ntk import empirical_kernels


def fallback_kernel(err, fallback, apply_fn, params, leaves_info, x1, x2, x1_is_x2,
                    n_samples, key, apply_kwargs):
  """The `Kernel`s of `apply_fn` by the chosen fallback; warns naming the cause."""
  if isinstance(x1, Kernel):
    raise InfwidthError('the fallbacks need inputs, not a Kernel in place of x1.') from err
  leaves, treedef = jax.tree_util.tree_flatten(params)
  weights = jax.tree_util.tree_unflatten(treedef, [l.ntk_weight for l in leaves_info])
  if fallback == 'empirical':
    if any(isinstance(l, jax.ShapeDtypeStruct) for l in leaves):
      raise InfwidthError('fallback="empirical" needs parameter values, not ShapeDtypeStructs.') from err
    warnings.warn(f'kernelize: {_cause(err)}; returning the empirical kernels at the given '
                  'parameters (fallback="empirical").', stacklevel=3)
    sample = lambda k: params
    n = 1
  else:
    warnings.warn(f'kernelize: {_cause(err)}; returning a Monte Carlo estimate over '
                  f'{n_samples} draws of the parameters (fallback="monte_carlo").', stacklevel=3)
    if key is None:
      key = jax.random.PRNGKey(0)

    def sample(k):
      ks = jax.random.split(k, len(leaves_info))
      draws = [l.mean + jnp.sqrt(l.var) * jax.random.normal(kk, l.shape, _dtype(leaf))
               for l, kk, leaf in zip(leaves_info, ks, leaves)]
      return jax.tree_util.tree_unflatten(treedef, draws)

    n = int(n_samples)
    if n < 1:
      raise InfwidthError(f'n_samples must be a positive integer, got {n_samples}.')

  kernels = lambda p, a, b, kw: empirical_kernels(apply_fn, p, a, b, ('nngp', 'ntk'), weights,
                                                  **kw)
  is_pair = lambda v: hasattr(v, 'nngp') and hasattr(v, 'ntk')
  b = None if x1_is_x2 else x2
  keys = jax.random.split(key, n) if fallback == 'monte_carlo' else jnp.zeros((1, 2), jnp.uint32)

  def one(k):
    p = sample(k)
    kw = _fresh_keys(apply_kwargs, k) if fallback == 'monte_carlo' else apply_kwargs
    k12 = jax.tree_util.tree_leaves(kernels(p, x1, b, kw), is_leaf=is_pair)
    d1 = [_diag(k.nngp)
          for k in jax.tree_util.tree_leaves(kernels(p, x1, None, kw), is_leaf=is_pair)]
    d2 = d1 if x1_is_x2 else [
        _diag(k.nngp) for k in jax.tree_util.tree_leaves(kernels(p, x2, None, kw), is_leaf=is_pair)]
    return [(k.nngp, k.ntk, c1, c2) for k, c1, c2 in zip(k12, d1, d2)]

  def body(acc, k):
    return jax.tree_util.tree_map(jnp.add, acc, one(k)), None

  first = one(keys[0])
  total, _ = jax.lax.scan(body, first, keys[1:]) if n > 1 else (first, None)
  means = jax.tree_util.tree_map(lambda a: a / n, total)
  out1 = jax.eval_shape(lambda x: apply_fn(params, x, **apply_kwargs), x1)
  out2 = out1 if x1_is_x2 else jax.eval_shape(lambda x: apply_fn(params, x, **apply_kwargs), x2)
  shapes1, out_tree = jax.tree_util.tree_flatten(out1)
  shapes2 = jax.tree_util.tree_leaves(out2)
  kernels_out = [
      build_kernel(nngp, ntk, cov1, cov2, shape1=tuple(s1.shape), shape2=tuple(s2.shape),
                   x1_is_x2=x1_is_x2, spatial_shape=tuple(s1.shape[1:-1]))
      for (nngp, ntk, cov1, cov2), s1, s2 in zip(means, shapes1, shapes2)]
  return jax.tree_util.tree_unflatten(out_tree, kernels_out)


def _fresh_keys(apply_kwargs, k):
  """`apply_kwargs` with each single PRNG key folded with the draw's key, so
  that random masks (dropout) are drawn afresh with each draw of the
  parameters."""
  salt = jax.random.bits(k, (), jnp.uint32)
  fresh = lambda l: jax.random.fold_in(l, salt) if is_key(l) and (
      l.shape in ((), (2,)) if l.dtype == jnp.uint32 else l.shape == ()) else l
  return jax.tree_util.tree_map(fresh, apply_kwargs)


def _dtype(leaf):
  return getattr(leaf, 'dtype', jnp.float32)


def _diag(k):
  """Per-input entries `(N, ...)` of an `(N, N, ...)` kernel."""
  return jnp.diagonal(k, axis1=0, axis2=1).transpose((k.ndim - 2,) + tuple(range(k.ndim - 2)))


def _cause(err) -> str:
  what = f'`{err.primitive}`' if err.primitive is not None else err.reason
  return f'no kernel rule for {what} at {err.source or "unknown location"}'
