"""`kernelize`: the infinite-width NNGP and NTK of any JAX function (DESIGN §1)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from infwidth import algebra as A
from infwidth import moments as M
from infwidth.rules.chain import Chain
from infwidth.rules import builtin as _builtin_rules  # noqa: F401  (registers the rules)
from infwidth.errors import InfwidthError, UnsupportedPrimitiveError
from infwidth.interpreters.kernel_interpreter import interpret
from infwidth.interpreters.loop_rolling import eval_rolled
from infwidth.interpreters.sizes import largest_value
from infwidth import memory, pair_blocks
from infwidth.joint_outputs import joint
from infwidth.kernel import Kernel
from infwidth.rules.values import Det

#: Relative sampling error of an estimated variance above which kernelize warns.
SAMPLING_ERROR_WARN = 0.05
_GETS = ('nngp', 'ntk')
#: Track only equal spatial positions where the output allows (DESIGN §5).
#: Setting it to False tracks full spatial blocks: same values, more cost.
DIAGONAL_SPATIAL = True


class ParamStats(NamedTuple):
  """Exact moments of a parameter tensor's entries (treated as i.i.d.)."""
  mean: float
  var: float


def _is_stats(x) -> bool:
  return isinstance(x, ParamStats)


def _leaf_names(params):
  paths, _ = jax.tree_util.tree_flatten_with_path(params)
  return [jax.tree_util.keystr(p) or '<params>' for p, _ in paths]


def _leaf_moments(params, param_stats, ntk_weights):
  """One `ParamLeaf` per parameter leaf, and the leaves whose estimate is noisy."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  names = _leaf_names(params)
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
    else:
      a = _leaf_values(leaf, name)
      mean, var = float(a.mean()), float(a.var())
      # Relative error of a variance estimate from `size` Gaussian entries.
      if var > 0 and math.sqrt(2.0 / a.size) > SAMPLING_ERROR_WARN:
        noisy.append((name, a.size, math.sqrt(2.0 / a.size)))
    leaf_obj = A.ParamLeaf(i, name, shape, mean, var, w)
    leaf_obj.exact = st is not None
    out.append(leaf_obj)
  return out, noisy


def _flatten_like(params, tree, what: str, leaf_kind: str) -> list:
  """`tree`'s leaves, one per parameter; an error showing both structures if
  `tree` does not match `params`."""
  treedef = jax.tree_util.tree_structure(params)
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
  """A parameter's entries for estimating its moments: concrete and finite."""
  if _is_tracer(leaf):
    raise InfwidthError(
        f'parameter {name} is a traced value: kernelize reads the moments of the '
        'parameters when it is called, so call it outside jax.jit (and jit the kernel '
        'function it returns), or give param_stats with an infwidth.ParamStats(mean, var) '
        'for every parameter.')
  a = np.asarray(leaf, dtype=np.float64)
  bad = ~np.isfinite(a)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise InfwidthError(
        f'parameter {name} (shape {a.shape}) has {int(bad.sum())} NaN or inf entries '
        f'(the first at index {where}); its moments, and so the kernel, would be NaN. '
        'Check the initialisation, or give its moments with param_stats.')
  return a


def _set_wide_axes(leaves_info, params, wide_axes):
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


def _check_get(get):
  if get is None:
    return None
  gets = (get,) if isinstance(get, str) else tuple(get)
  for g in gets:
    if g not in _GETS:
      raise InfwidthError(f'get={get!r}: each entry must be one of {_GETS} (or get=None for a Kernel).')
  return gets


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_inputs(x1, x2):
  if not hasattr(x1, 'shape') or jnp.ndim(x1) < 1:
    raise InfwidthError(f'x1 must be an array with a leading batch axis, got {type(x1).__name__} '
                        f'of shape {getattr(x1, "shape", None)}.')
  if x2 is not None:
    if not hasattr(x2, 'shape') or tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
      raise InfwidthError(
          f'x1 and x2 must have the same shape apart from the batch axis: got '
          f'{tuple(x1.shape)} and {tuple(getattr(x2, "shape", ()))}.')
  for name, x in (('x1', x1), ('x2', x2)):
    if x is None or _is_tracer(x):
      continue
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
      continue
    bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    if bad.any():
      rows = np.nonzero(bad)[0][:10].tolist()
      raise InfwidthError(f'{name} has NaN or inf entries in rows {rows}; the kernel would be '
                          'meaningless. (Under jax.jit non-finite inputs propagate as NaN.)')


def kernelize(apply_fn: Callable, params: Any, *, param_stats: Any = None,
              ntk_weights: Any = None, wide_axes: Any = None, fallback: str = 'error',
              n_samples: int = 64, key: Optional[jax.Array] = None) -> Callable:
  """The infinite-width kernel function of `apply_fn(params, x, **kwargs)`.

  Args:
    apply_fn: any JAX function of parameters and a batch of inputs (plain JAX,
      Flax `model.apply`, Haiku `transformed.apply`, Equinox via partition).
    params: its parameters (arrays or `jax.ShapeDtypeStruct`s); their
      widths set the bookkeeping, their entries' moments the distribution.
    param_stats: optional pytree matching `params` of `ParamStats(mean, var)`
      or None leaves (estimated from the sample).
    ntk_weights: optional pytree of per-leaf learning-rate multipliers
      (default 1; 0 excludes a leaf from the NTK).
    wide_axes: optional pytree matching `params` of axis tuples (or None):
      which axes of each parameter are wide (its channel axis after a
      contraction), overriding the inference.
    fallback: 'error', 'monte_carlo' or 'empirical' for primitives without
      a closed-form rule.
    n_samples: Monte Carlo samples for `fallback='monte_carlo'`.
    key: PRNG key for `fallback='monte_carlo'`.

  Returns:
    `kernel_fn(x1, x2=None, get=None, **apply_kwargs)` returning an
    `(N1, N2)` array (per output channel) for `get='nngp'`/`'ntk'`, a
    namedtuple for a tuple `get`, or a `Kernel` for `get=None`.
  """
  if fallback not in ('error', 'monte_carlo', 'empirical'):
    raise InfwidthError(f"fallback={fallback!r}: must be 'error', 'monte_carlo' or 'empirical'.")
  leaves_info, noisy = _leaf_moments(params, param_stats, ntk_weights)
  _set_wide_axes(leaves_info, params, wide_axes)
  treedef = jax.tree_util.tree_structure(params)
  shapes = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(np.shape(l), l.dtype), params)

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
      msg = ', '.join(f'{n} ({s} entries, ±{100 * e:.0f}%)' for n, s, e in noisy)
      warnings.warn(f'parameter moments estimated from small samples: {msg}. Pass '
                    'param_stats with exact moments for an exact kernel.', stacklevel=2)
    try:
      k = _analytic(apply_fn, shapes, treedef, leaves_info, x1, x2, x1_is_x2, apply_kwargs,
                    gets)
    except UnsupportedPrimitiveError as e:
      if fallback == 'error':
        raise
      k = _fallback(e, fallback, apply_fn, params, leaves_info, x1, x2, x1_is_x2,
                    n_samples, key, apply_kwargs)
    if gets is None:
      return k
    pick = lambda kk: kk.get(gets[0]) if isinstance(get, str) else kk.get(gets)
    return jax.tree_util.tree_map(pick, k, is_leaf=lambda v: isinstance(v, Kernel))

  return kernel_fn


def _analytic(apply_fn, shapes, treedef, leaves_info, x1, x2, x1_is_x2, apply_kwargs,
              gets=None) -> Kernel:
  if isinstance(x1, Kernel):
    moments, xj, x_val = _kernel_input(x1)
    return _joint(_interpret(apply_fn, shapes, leaves_info, moments, xj, x_val, apply_kwargs),
                  gets)
  x1 = jnp.asarray(x1)
  dtype = x1.dtype if jnp.issubdtype(x1.dtype, jnp.floating) else jnp.float32
  x1 = x1.astype(dtype)
  x2 = None if x1_is_x2 else jnp.asarray(x2, dtype)
  n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
  traces = {}

  def traced(r1, r2, same):
    """The kernel computation for batches of r1 and r2 inputs (memoised)."""
    if (r1, r2, same) not in traces:
      traces[r1, r2, same] = _trace_kernels(apply_fn, shapes, leaves_info, apply_kwargs,
                                            x1.shape[1:], r1, r2, same, dtype)
    return traces[r1, r2, same]

  def pair_kernels(a, b):
    return _eval_kernels(*traced(a.shape[0], b.shape[0], False), jnp.concatenate([a, b]), gets)

  # Spatial kernels are computed on blocks of input pairs, sized from the
  # entries of each pair's largest intermediate.
  whole = traced(n1, n2, x2 is None)
  per_pair = largest_value(whole[0].jaxpr, lead=(n1, n2)) // max(n1 * n2, 1)
  rows = pair_blocks.block_rows(n1, n2, per_pair)
  _check_memory(whole[0].jaxpr, None if rows is None else traced(rows, rows, False)[0].jaxpr,
                n1, n2, fused=_is_tracer(x1),
                joint_loop=_is_tracer(x1) and _joint_loop(gets))
  if rows is not None:
    return pair_blocks.blocked_kernel(pair_kernels, x1, x2, rows)
  return _eval_kernels(*whole, x1 if x2 is None else jnp.concatenate([x1, x2]), gets)


def _check_memory(whole, block, n1, n2, fused, joint_loop):
  """Raises `KernelMemoryError` before a computation that cannot fit: the
  whole jaxpr's peak, or (computed on blocks of pairs, one compiled loop)
  the stacked and assembled results plus one block's peak. `fused`: the
  computation is traced into a compiled program (under `jit`); `joint_loop`:
  with the NNGP and NTK in one loop (`_joint`)."""
  out = memory.output_bytes(whole)
  if block is None:
    peak = memory.peak_bytes(whole, fused)
  else:
    peak = 2 * out + memory.peak_bytes(block, fused=True)
  if joint_loop:
    peak += 2 * out   # `joint` pads each result to twice its size
  memory.check_fits(peak, out, n1, n2)


def _trace_kernels(apply_fn, shapes, leaves_info, apply_kwargs, feature_shape, n1, n2,
                   x1_is_x2, dtype):
  """The kernel computation for `n1` and `n2` inputs of shape `feature_shape`
  (the same inputs if `x1_is_x2`) as a jaxpr of their joint batch:
  `(closed jaxpr, output treedef)`."""
  out_tree = []

  def kernels_of(xj):
    moments = M.Moments(n1, n2, x1_is_x2, dtype, diag=DIAGONAL_SPATIAL and xj.ndim > 2)
    x_val = Det(xj, ('b',) + tuple(f'x{i}' for i in range(1, xj.ndim)))
    k = _interpret(apply_fn, shapes, leaves_info, moments, xj, x_val, apply_kwargs)
    leaves, tree = jax.tree_util.tree_flatten(k)
    out_tree.append(tree)
    return leaves

  n_joint = n1 if x1_is_x2 else n1 + n2
  xj = jax.ShapeDtypeStruct((n_joint,) + tuple(feature_shape), dtype)
  closed = jax.make_jaxpr(kernels_of)(xj)
  return closed, out_tree[0]


def _eval_kernels(closed, out_tree, xj, gets):
  # Evaluated with its repeated blocks (one per layer of a deep network) as
  # scans: XLA:CPU compiles a long unrolled program slowly and recomputes
  # across its layers.
  return _joint(jax.tree_util.tree_unflatten(out_tree, eval_rolled(closed, xj)), gets)


def _joint(kernels, gets):
  """Each kernel's NNGP and NTK from one fused loop, which computes what their
  recursions share once (under a trace, when both are asked for: `gets`).

  Only on CPU: XLA's GPU and TPU compilers fuse loops with several outputs
  themselves.
  """
  if not _joint_loop(gets):
    return kernels

  def one(k: Kernel):
    if k.ntk is None or not isinstance(k.nngp, jax.core.Tracer):
      return k
    nngp, ntk = joint((k.nngp, k.ntk))
    return k.replace(nngp=nngp, ntk=ntk)
  return jax.tree_util.tree_map(one, kernels, is_leaf=lambda v: isinstance(v, Kernel))


def _joint_loop(gets) -> bool:
  return (gets is None or {'nngp', 'ntk'} <= set(gets)) and jax.default_backend() == 'cpu'


def _interpret(apply_fn, shapes, leaves_info, moments, xj, x_val, apply_kwargs) -> Kernel:
  """The kernels of `apply_fn`'s outputs for the joint batch `xj` (abstract value `x_val`)."""
  n1, n2, x1_is_x2, dtype = moments.n1, moments.n2, moments.x1_is_x2, moments.dtype
  closed, out_shapes = jax.make_jaxpr(lambda p, x: apply_fn(p, x, **apply_kwargs),
                                      return_shape=True)(shapes, xj)
  param_vals = [A.ParamRef(l, l.shape, tuple(range(len(l.shape)))) for l in leaves_info]
  args = param_vals + [x_val]
  # The requirements decision (DESIGN §5): values are tracked at equal spatial
  # positions where everything after them allows it; the moment engine tracks
  # the values below a pooling in full blocks. An output that keeps spatial
  # axes (or values on different grids paired) abandons the diagonal attempt
  # (nothing of it is left in the trace that is used) and all blocks are full.
  if moments.diag:
    try:
      outs = interpret(closed.jaxpr, closed.consts, args, moments)
      if any(isinstance(o, A.Wide) and o.spatial for o in outs):
        raise A.NeedFullSpatial()
      return _kernels(outs, out_shapes, moments)
    except A.NeedFullSpatial:
      moments = M.Moments(n1, n2, x1_is_x2, dtype, diag=False)
  outs = interpret(closed.jaxpr, closed.consts, args, moments)
  return _kernels(outs, out_shapes, moments)


def _kernels(outs, out_shapes, moments):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out_shapes)[0]]
  kernels = [_output_kernel(out, moments, path if len(outs) > 1 else '')
             for out, path in zip(outs, paths)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shapes), kernels)


def _kernel_input(k: Kernel):
  """A Kernel in place of x1: a Gaussian input whose channel axis is wide (NT's
  composition `kernel_fn(kernel_fn_prev(x1, x2))`)."""
  if k.nngp is None or jnp.ndim(k.nngp) != 2:
    raise InfwidthError('a Kernel in place of x1 must have an (N1, N2) nngp (no spatial '
                        f'axes yet); got shape {None if k.nngp is None else jnp.shape(k.nngp)}.')
  if k.cov1 is None:
    raise InfwidthError('a Kernel in place of x1 needs cov1 (and cov2 unless x1_is_x2).')
  n1, n2 = jnp.shape(k.nngp)
  dtype = jnp.result_type(k.nngp)
  n_joint = n1 if k.x1_is_x2 else n1 + n2
  shape = (n_joint,) + tuple(k.shape1[1:]) if k.shape1 else (n_joint, 1)
  if len(shape) != 2:
    raise InfwidthError(f'a Kernel in place of x1 must describe (N, C) outputs; got {k.shape1}.')
  src = A.KernelSource(k)
  x_val = A.Wide(shape, ('b', 'c'), (A.Term(Chain(), A.combo_of(src, ())),))
  return M.Moments(n1, n2, k.x1_is_x2, dtype), jax.ShapeDtypeStruct(shape, dtype), x_val


def _output_kernel(out, moments: M.Moments, path: str = '') -> Kernel:
  """The `Kernel` of one output of the function (per output channel); `path`
  names the output among several."""
  n1, n2, x1_is_x2, dtype = moments.n1, moments.n2, moments.x1_is_x2, moments.dtype
  if not isinstance(out, A.Wide):
    which = f'output {path} of apply_fn' if path else 'the output of apply_fn'
    fix = (' Return only the outputs that go through the network (or compute this one '
           'outside apply_fn).' if path else '')
    raise InfwidthError(
        f'{which} does not depend on any parameter through a linear '
        'map with a channel axis, so it has no infinite-width limit (no wide axis found).'
        + fix)
  st = moments.wide_pair(out, out)
  ntk = moments.wide_ntk(out, out)
  k = len(out.spatial)
  nngp = _full(st.cross, (n1, n2) + _spatial_shape(out) * 2, dtype)
  ntk = _full(ntk, (n1, n2) + _spatial_shape(out) * 2, dtype)
  cov1 = _full(st.diag1, (n1,) + _spatial_shape(out) * 2, dtype)
  cov2 = None if x1_is_x2 else _full(st.diag2, (n2,) + _spatial_shape(out) * 2, dtype)
  nngp, ntk = _interleave(nngp, 2, k), _interleave(ntk, 2, k)
  cov1 = _interleave(cov1, 1, k)
  cov2 = None if cov2 is None else _interleave(cov2, 1, k)
  shape1 = (n1,) + tuple(out.shape[1:])
  shape2 = (n2,) + tuple(out.shape[1:])
  return Kernel(nngp, ntk, cov1, cov2, x1_is_x2=x1_is_x2, shape1=shape1, shape2=shape2,
                batch_axis=out.roles.index('b') if 'b' in out.roles else 0,
                channel_axis=out.channel_axis)


def _spatial_shape(w: A.Wide):
  return tuple(w.shape[i] for i, r in enumerate(w.roles) if r not in ('b', 'c', None))


def _full(x, shape, dtype):
  return jnp.broadcast_to(jnp.asarray(x, dtype), shape)


def _interleave(x, nb: int, k: int):
  """`(*batch, s1..sk, s1'..sk')` → `(*batch, s1, s1', …, sk, sk')` (NT's layout)."""
  if k == 0:
    return x
  perm = list(range(nb))
  for i in range(k):
    perm += [nb + i, nb + k + i]
  return jnp.transpose(x, perm)


def _fallback(err, fallback, apply_fn, params, leaves_info, x1, x2, x1_is_x2, n_samples,
              key, apply_kwargs) -> Kernel:
  from infwidth import _fallback as fb
  return fb.fallback_kernel(err, fallback, apply_fn, params, leaves_info, x1, x2, x1_is_x2,
                            n_samples, key, apply_kwargs)
