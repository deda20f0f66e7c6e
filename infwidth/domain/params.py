"""Parameter leaves as the domain sees them: moments, NTK weights, wide axes.

Each leaf of `params` becomes a `ParamLeaf` whose entries are i.i.d. with the
leaf's mean and variance (DESIGN §3): given exactly (`ParamStats`) or
estimated from the sample. Estimates from small leaves are reported, so that
kernelize can warn.
"""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain.errors import InfwidthError
from infwidth.domain.values import ParamLeaf

#: Bound on the kernel's relative error from estimated variances above which
#: kernelize warns: a leaf's variance estimated from `n` Gaussian entries is
#: off by about `√(2/n)`, and a kernel moves by at most about that much per
#: leaf, so the bound is the root sum of squares over the estimated leaves.
SAMPLING_ERROR_WARN = 0.02
#: Leaves named in the warning: those whose own error exceeds this.
SAMPLING_ERROR_NAMED = 0.01


class ParamStats(NamedTuple):
  """Exact moments of a parameter tensor's entries (treated as i.i.d.)."""
  mean: float
  var: float


def _is_stats(x) -> bool:
  return isinstance(x, ParamStats)


def leaf_names(params) -> List[str]:
  paths, _ = jax.tree_util.tree_flatten_with_path(params)
  return [jax.tree_util.keystr(p) or '<params>' for p, _ in paths]


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def leaf_moments(params, param_stats=None, ntk_weights=None
                 ) -> Tuple[List[ParamLeaf], List[Tuple[str, int, float]]]:
  """One `ParamLeaf` per parameter leaf, and the leaves whose estimate is noisy
  as `(name, entries, relative error)`.

  A leaf that is a tracer (the transform form under `jax.jit`) without exact
  stats gets traced moments: its mean and variance are computed in the trace.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  names = leaf_names(params)
  if param_stats is None:
    stats = [None] * len(leaves)
  else:
    stats = _flatten_like(params, param_stats, 'param_stats',
                          'an infwidth.ParamStats(mean, var) or None')
  if ntk_weights is None:
    weights = [1.0] * len(leaves)
  else:
    weights = [float(w) for w in _flatten_like(params, ntk_weights, 'ntk_weights', 'a number')]
  out, noisy = [], []
  for i, (leaf, name, st, w) in enumerate(zip(leaves, names, stats, weights)):
    shape = tuple(np.shape(leaf))
    if isinstance(leaf, jax.ShapeDtypeStruct):
      if st is None:
        raise InfwidthError(
            f'parameter {name} is a ShapeDtypeStruct without moments: pass '
            'param_stats with an infwidth.ParamStats(mean, var) for every such leaf.')
    elif not hasattr(leaf, 'shape') or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise InfwidthError(
          f'parameter {name} is {type(leaf).__name__}, not a floating-point array; '
          'params must be a pytree of arrays (use eqx.partition / nnx.split to '
          'separate static parts).')
    if st is not None:
      mean, var = float(st.mean), float(st.var)
      if var < 0 or not (math.isfinite(mean) and math.isfinite(var)):
        raise InfwidthError(f'param_stats for {name}: ParamStats(mean={mean}, var={var}) '
                            'must be finite with a variance of at least 0.')
    elif _is_tracer(leaf):
      a = jnp.asarray(leaf)
      mean, var = centred_if_insignificant(jnp.mean(a), jnp.var(a), a.size)
    else:
      a = _leaf_values(leaf, name)
      mean, var = float(a.mean()), float(a.var())
      mean, var = centred_if_insignificant(mean, var, a.size)
    if st is None and (_is_tracer(var) or var > 0):
      # Relative error of a variance estimate from `size` Gaussian entries.
      size = max(math.prod(shape), 1)
      noisy.append((name, size, math.sqrt(2.0 / size)))
    leaf_obj = ParamLeaf(i, name, shape, mean, var, w)
    leaf_obj.exact = st is not None
    out.append(leaf_obj)
  total = math.sqrt(sum(e * e for _, _, e in noisy))
  if total <= SAMPLING_ERROR_WARN:
    return out, []
  return out, [n for n in noisy if n[2] > SAMPLING_ERROR_NAMED]


#: An estimated mean within this many standard errors of 0 is taken as 0.
MEAN_SIGNIFICANCE = 3.0


def centred_if_insignificant(mean: float, var: float, size: int) -> Tuple[float, float]:
  """`(0, mean² + var)` where the sample mean of `size` entries lies within
  `MEAN_SIGNIFICANCE` standard errors (`√(var/size)`) of 0, else `(mean, var)`.

  A centred leaf's sample mean is noise of order `σ/√size`: kept, it would make
  every downstream rectifier see a non-centred Gaussian (a slower, and no more
  accurate, kernel). The second moment `E[θ²]`, which the kernel depends on,
  is kept either way.
  """
  if _is_tracer(mean) or _is_tracer(var):  # parameters traced under jit
    small = (size > 1) & (jnp.abs(mean) <= MEAN_SIGNIFICANCE * jnp.sqrt(var / size))
    return jnp.where(small, 0.0, mean), jnp.where(small, var + mean * mean, var)
  if size > 1 and abs(mean) <= MEAN_SIGNIFICANCE * math.sqrt(var / size):
    return 0.0, var + mean * mean
  return mean, var


def _flatten_like(params, tree, what: str, leaf_kind: str) -> list:
  """`tree`'s leaves, one per parameter; an error showing both structures if
  `tree` does not match `params`."""
  treedef = jax.tree_util.tree_structure(params)
  if _is_stats(tree) and treedef.num_nodes == treedef.num_leaves == 1:   # one array
    return [tree]
  try:
    if _is_stats(tree):
      raise ValueError('a single ParamStats')
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    shapes = jax.tree_util.tree_map(lambda l: _Shown(f'<{leaf_kind}: {tuple(np.shape(l))}>'),
                                    params)
    given = jax.tree_util.tree_map(
        lambda l: _Shown(type(l).__name__) if not isinstance(l, (int, float)) else l, tree,
        is_leaf=_is_stats)
    raise InfwidthError(
        f'{what} must have the structure of params, with {leaf_kind} in place of each '
        f'parameter.\n  expected: {_short(shapes)}\n  got:      {_short(given)}\n'
        f'  ({e})') from None


class _Shown(str):
  def __repr__(self):
    return str(self)


def _short(tree, limit: int = 600) -> str:
  text = repr(tree)
  return text if len(text) <= limit else text[:limit] + ' …'


def _leaf_values(leaf, name: str) -> np.ndarray:
  """A concrete parameter's entries for estimating its moments: finite."""
  a = np.asarray(leaf, dtype=np.float64)
  bad = ~np.isfinite(a)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise InfwidthError(
        f'parameter {name} (shape {a.shape}) has {int(bad.sum())} NaN or inf entries '
        f'(the first at index {where}); its moments, and so the kernel, would be NaN. '
        'Check the initialisation, or give its moments with param_stats.')
  return a


def set_wide_axes(leaves_info: List[ParamLeaf], params, wide_axes: Optional[Any]) -> None:
  """Records explicit wide (channel) axes per leaf: a pytree of axis tuples or None."""
  for leaf in leaves_info:
    leaf.wide_axes = None
  if wide_axes is None:
    return
  treedef = jax.tree_util.tree_structure(params)
  try:
    specs = treedef.flatten_up_to(wide_axes)
  except (ValueError, TypeError) as e:
    raise InfwidthError(f'wide_axes must be a pytree matching params with a tuple of axes '
                        f'(or None) per parameter: {e}') from None
  for leaf, spec in zip(leaves_info, specs):
    if spec is None:
      continue
    spec = (spec,) if isinstance(spec, int) else tuple(spec)
    nd = len(leaf.shape)
    if any(not isinstance(a, int) or not -nd <= a < nd for a in spec):
      raise InfwidthError(f'wide_axes for {leaf.name}: {spec} are not axes of a '
                          f'parameter of shape {leaf.shape}.')
    leaf.wide_axes = tuple(a % nd for a in spec)
