"""`kernelize`: the infinite-width NNGP and NTK of any JAX function (DESIGN §1).

Two forms, like `jax.grad`:

* `kernelize(apply_fn)` (or `@kernelize`) is a transform: it returns
  `kernel_fn(params, x1, x2=None, get=None, **apply_kwargs)`, which reads
  the parameters' widths and moments at each call and composes with
  `jax.jit(kernel_fn, static_argnames='get')`.
* `kernelize(apply_fn, params)` binds the parameters once and returns
  `kernel_fn(x1, x2=None, get=None, **apply_kwargs)`, Neural Tangents' form.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain import gaussian_engine
from infwidth.domain.errors import InfwidthError, UnsupportedPrimitiveError
from infwidth.domain.kernel import FIELDS as KERNEL_FIELDS, Kernel
from infwidth.empirical.fallback import fallback_kernel
from infwidth.domain.params import SAMPLING_ERROR_WARN, ParamStats, leaf_moments, set_wide_axes
from infwidth.interpreters.kernel_program import analytic_kernels

__all__ = ['ParamStats', 'SAMPLING_ERROR_WARN', 'kernelize']

_FALLBACKS = ('error', 'monte_carlo', 'empirical')


def _check_get(get):
  """`get` as a tuple of lower-case `Kernel` field names (NT's rules), or None."""
  if get is None:
    return None
  gets = (get,) if isinstance(get, str) else tuple(get)
  if not gets:
    raise InfwidthError('get must be non-empty: a field name, a tuple of them, or None.')
  gets = tuple(g.lower() if isinstance(g, str) else g for g in gets)
  for g in gets:
    if g not in KERNEL_FIELDS:
      raise InfwidthError(f'get={get!r}: each entry must be a Kernel field, one of '
                          f'{KERNEL_FIELDS} (or get=None for the whole Kernel).')
  if len(set(gets)) < len(gets):
    raise InfwidthError(f'get={get!r}: all entries must be unique.')
  return gets


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _is_array_tree(v) -> bool:
  leaves = jax.tree_util.tree_leaves(v)
  return bool(leaves) and all(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)


def _check_inputs(x1, x2):
  """Inputs are an array, or a pytree of arrays (several inputs), each with a
  leading batch axis of one size; `x2` has `x1`'s structure and shapes apart
  from the batch axis."""
  leaves1, tree1 = jax.tree_util.tree_flatten(x1)
  if not leaves1 or any(not hasattr(l, 'shape') or jnp.ndim(l) < 1 for l in leaves1):
    raise InfwidthError(f'x1 must be an array with a leading batch axis (or a tuple, list or '
                        f'dict of them), got {type(x1).__name__} of shape '
                        f'{getattr(x1, "shape", None)}.')
  if len({l.shape[0] for l in leaves1}) > 1:
    raise InfwidthError('the inputs in x1 must have one batch size (the leading axis); got '
                        f'shapes {[tuple(l.shape) for l in leaves1]}.')
  if x2 is not None:
    leaves2, tree2 = jax.tree_util.tree_flatten(x2)
    shape = lambda ls: [tuple(getattr(l, 'shape', ()))[1:] for l in ls]
    if tree2 != tree1 or shape(leaves2) != shape(leaves1) or len(
        {getattr(l, 'shape', (None,))[0] for l in leaves2}) > 1:
      raise InfwidthError(
          f'x1 and x2 must have the same shape apart from the batch axis: got '
          f'{_shapes_of(x1)} and {_shapes_of(x2)}.')
  for name, xs in (('x1', leaves1), ('x2', jax.tree_util.tree_leaves(x2))):
    for x in xs:
      _check_finite(name, x)


def _shapes_of(x):
  if hasattr(x, 'shape'):
    return tuple(x.shape)
  return jax.tree_util.tree_map(lambda l: tuple(getattr(l, 'shape', ())), x)


def _check_finite(name, x):
  if _is_tracer(x):
    return
  a = np.asarray(x)
  if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
    return
  bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
  if bad.any():
    rows = np.nonzero(bad)[0][:10].tolist()
    raise InfwidthError(f'{name} has NaN or inf entries in rows {rows}; the kernel would be '
                        'meaningless. (Under jax.jit non-finite inputs propagate as NaN.)')


def kernelize(apply_fn: Optional[Callable] = None, params: Any = None, *,
              param_stats: Any = None, ntk_weights: Any = None, wide_axes: Any = None,
              fallback: str = 'error', n_samples: int = 64,
              key: Optional[jax.Array] = None,
              integration_points: Optional[int] = None) -> Callable:
  """The infinite-width kernel function of `apply_fn(params, x, **kwargs)`.

  Args:
    apply_fn: any JAX function of parameters and a batch of inputs (plain JAX,
      Flax `model.apply`, Haiku `transformed.apply`, Equinox via partition).
      Omitted, `kernelize(**options)` returns a decorator.
    params: its parameters (arrays or `jax.ShapeDtypeStruct`s); their
      widths set the bookkeeping, their entries' moments the distribution.
      Omitted, kernelize is a transform: the kernel function takes the
      parameters as its first argument.
    param_stats: optional pytree matching `params` of `ParamStats(mean, var)`
      or None leaves (estimated from the sample).
    ntk_weights: optional pytree of per-leaf learning-rate multipliers
      (default 1; 0 excludes a leaf from the NTK).
    wide_axes: optional pytree matching `params` of axis tuples (or None):
      which axes of each parameter are wide (its channel axis after a
      contraction), overriding the inference.
    fallback: 'error', 'monte_carlo' or 'empirical': what to return where
      something has no analytic rule (`UnsupportedPrimitiveError`).
    n_samples: Monte Carlo samples for `fallback='monte_carlo'`.
    key: PRNG key for `fallback='monte_carlo'`.
    integration_points: points of the quasi-Monte Carlo rule for functions of
      several Gaussians with no exact rule (default 8192; the error falls
      roughly as 1/points, docs/semantics.md).

  Returns:
    With `params`: `kernel_fn(x1, x2=None, get=None, **apply_kwargs)`.
    Without: `kernel_fn(params, x1, x2=None, get=None, **apply_kwargs)`.
    Either returns an `(N1, N2)` array (per output channel) for
    `get='nngp'`/`'ntk'`, a namedtuple for a tuple `get`, or a `Kernel` for
    `get=None`; a pytree of outputs gives the same pytree of kernels.
  """
  options = dict(param_stats=param_stats, ntk_weights=ntk_weights, wide_axes=wide_axes,
                 fallback=fallback, n_samples=n_samples, key=key,
                 integration_points=integration_points)
  if apply_fn is None:
    return functools.partial(kernelize, **options)
  if not callable(apply_fn):
    raise InfwidthError(f'kernelize takes a function first, got {type(apply_fn).__name__}: '
                        'kernelize(apply_fn) or kernelize(apply_fn, params).')
  if fallback not in _FALLBACKS:
    raise InfwidthError(f"fallback={fallback!r}: must be 'error', 'monte_carlo' or 'empirical'.")
  if params is not None:
    return _bound_kernel_fn(apply_fn, params, options, compile_eager=True)

  def kernel_fn(params, x1, x2=None, get=None, **apply_kwargs):
    return _bound_kernel_fn(apply_fn, params, options, stacklevel=3)(x1, x2, get, **apply_kwargs)

  # Not functools.wraps: `jax.jit` would read apply_fn's signature through
  # `__wrapped__` and refuse `static_argnames='get'`.
  kernel_fn.__name__ = f'kernel_fn_of_{getattr(apply_fn, "__name__", "apply_fn")}'
  kernel_fn.__doc__ = (f'The infinite-width kernels of {getattr(apply_fn, "__name__", "apply_fn")}: '
                       '`kernel_fn(params, x1, x2=None, get=None, **apply_kwargs)`.')
  return kernel_fn


def _rank_promotion_allowed(fn):
  """Runs `fn` with implicit rank promotion allowed: the kernel computation
  broadcasts statistics of different ranks, and must work where the user
  sets `jax_numpy_rank_promotion='raise'` (as NT's tests do)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.numpy_rank_promotion('allow'):
      return fn(*args, **kwargs)
  return wrapped


def _bound_kernel_fn(apply_fn, params, options, stacklevel=2, compile_eager=False):
  """`kernel_fn(x1, x2=None, get=None, **apply_kwargs)` at these parameters.

  `compile_eager`: eager calls run the analytic kernel as one compiled
  computation, cached by input shapes, dtypes, `get` and the non-array
  keyword arguments (as `jax.jit(kernel_fn)` would), so that an eager call
  costs what the first call of the jitted form does and repeated calls reuse
  it. Off for the transform form, whose parameters may change at each call.
  """
  leaves_info, noisy = leaf_moments(params, options['param_stats'], options['ntk_weights'])
  set_wide_axes(leaves_info, params, options['wide_axes'])
  shapes = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(np.shape(l), l.dtype), params)

  def analytic(x1, x2, x1_is_x2, gets, apply_kwargs):
    with gaussian_engine.integration_points(options['integration_points']):
      return analytic_kernels(apply_fn, shapes, leaves_info, x1, x2, x1_is_x2, apply_kwargs,
                              gets)

  @functools.partial(jax.jit, static_argnames=('x1_is_x2', 'gets', 'static_kwargs'))
  def compiled(x1, x2, array_kwargs, x1_is_x2, gets, static_kwargs):
    return analytic(x1, x2, x1_is_x2, gets, {**array_kwargs, **dict(static_kwargs)})

  def analytic_maybe_compiled(x1, x2, x1_is_x2, gets, apply_kwargs):
    eager = not any(_is_tracer(l) for l in jax.tree_util.tree_leaves((x1, x2, apply_kwargs)))
    if compile_eager and eager and not isinstance(x1, Kernel):
      arrays = {k: v for k, v in apply_kwargs.items() if _is_array_tree(v)}
      static = tuple(sorted((k, v) for k, v in apply_kwargs.items() if k not in arrays))
      try:
        hash(static)
      except TypeError:   # unhashable options: evaluated op by op
        return analytic(x1, x2, x1_is_x2, gets, apply_kwargs)
      with jax.numpy_rank_promotion('allow'):
        return compiled(x1, None if x1_is_x2 else x2, arrays, x1_is_x2, gets, static)
    return analytic(x1, x2, x1_is_x2, gets, apply_kwargs)

  @_rank_promotion_allowed
  def kernel_fn(x1, x2=None, get=None, **apply_kwargs):
    gets = _check_get(get)
    if isinstance(x1, Kernel):
      if x2 is not None:
        raise InfwidthError('with a Kernel in place of x1, x2 must be None: the Kernel '
                            'already holds both batches.')
      x1_is_x2 = x1.x1_is_x2
    else:
      x1_is_x2 = x2 is None or x2 is x1
      _check_inputs(x1, None if x1_is_x2 else x2)
    if noisy:
      msg = ', '.join(f'{n} ({s} entries, ±{100 * e:.1f}%)' for n, s, e in noisy)
      total = 100 * math.sqrt(sum(e * e for _, _, e in noisy))
      warnings.warn(f'parameter moments estimated from small samples: {msg}; the kernel may '
                    f'be off by up to about ±{total:.1f}%. Pass param_stats with exact '
                    'moments for an exact kernel (estimated means within 3 standard errors '
                    'of 0 are taken as 0).', stacklevel=stacklevel)
    try:
      k = analytic_maybe_compiled(x1, x2, x1_is_x2, gets, apply_kwargs)
    except UnsupportedPrimitiveError as e:
      if options['fallback'] == 'error':
        raise
      k = fallback_kernel(e, options['fallback'], apply_fn, params, leaves_info, x1, x2,
                          x1_is_x2, options['n_samples'], options['key'], apply_kwargs)
    if gets is None:
      return k
    pick = lambda kk: kk.get(gets[0]) if isinstance(get, str) else kk.get(gets)
    return jax.tree_util.tree_map(pick, k, is_leaf=lambda v: isinstance(v, Kernel))

  return kernel_fn
