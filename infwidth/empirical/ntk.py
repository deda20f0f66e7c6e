"""Empirical NNGP and NTK of finite networks, with NT's API and conventions.

`Θ(x1, x2) = Σ_θ w_θ · ∂f(x1)/∂θ · ∂f(x2)/∂θᵀ`, summed over parameter leaves
(`w_θ = 1` unless `ntk_weights` says otherwise), computed in one of three ways
(Novak et al., "Fast Finite Width Neural Tangent Kernel", 2022): contraction
of the two Jacobians, NTK-vector products, or structured derivatives
(`structured.py`). Kernels are laid out as in Neural Tangents
(see `_utils.py`).
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.empirical import _utils
from infwidth.empirical._utils import Axes, PyTree, VMapAxes
from infwidth.kernel import kernel_namedtuple

ApplyFn = Callable[..., PyTree]
Get = Union[None, str, Tuple[str, ...]]


class NtkImplementation(enum.IntEnum):
  """How the empirical NTK is computed (values as in Neural Tangents).

  Attributes:
    AUTO: picks the cheapest of the others by XLA's FLOP and memory-traffic
      estimate of each, per input shapes (cached).
    JACOBIAN_CONTRACTION: instantiates both Jacobians (reverse mode) and
      contracts them.
    NTK_VECTOR_PRODUCTS: computes `Θ` column by column as `J1 (J2ᵀ v)`
      (a VJP then a JVP), never contracting Jacobians.
    STRUCTURED_DERIVATIVES: a jaxpr interpreter that contracts the structured
      Jacobians of `dot_general`, `conv_general_dilated` and `gather` with
      respect to their weights without materialising them; other parameters
      use Jacobian contraction.
  """
  AUTO = 0
  JACOBIAN_CONTRACTION = 1
  NTK_VECTOR_PRODUCTS = 2
  STRUCTURED_DERIVATIVES = 3


DEFAULT_NTK_IMPLEMENTATION = NtkImplementation.JACOBIAN_CONTRACTION


class _Setup:
  """What every implementation needs to know about one call."""

  def __init__(self, f, x1, x2, params, apply_fn_kwargs, vmap_axes, ntk_weights):
    self.f = f
    self.x1 = x1
    self.x2 = x2
    self.params = params
    self.kw1, self.kw2 = _utils.split_kwargs(apply_fn_kwargs, x1, x2)
    self.fx1 = jax.eval_shape(functools.partial(f, **self.kw1), params, x1)
    self.fx2 = self.fx1 if x2 is None else jax.eval_shape(
        functools.partial(f, **self.kw2), params, x2)
    self.out_leaves1, self.out_tree = jax.tree.flatten(self.fx1)
    self.out_leaves2 = jax.tree.leaves(self.fx2)
    self.x_axis, self.fx_axis, self.kw_axes = _utils.canonicalize_vmap_axes(
        vmap_axes, x1, self.fx1, self.kw1)
    self.vmapped = self.fx_axis is not None
    self.fx_axes = (jax.tree.leaves(self.fx_axis) if self.vmapped
                    else [None] * len(self.out_leaves1))
    self.leaves, self.treedef = jax.tree.flatten(params)
    self.weights = _leaf_weights(self.treedef, self.leaves, ntk_weights)
    self.active = [i for i, w in enumerate(self.weights) if w is not None]
    self.dtype = _utils.result_dtype(params)

  def params_with(self, active_values: Sequence[jax.Array]) -> PyTree:
    leaves = list(self.leaves)
    for i, v in zip(self.active, active_values):
      leaves[i] = v
    return jax.tree.unflatten(self.treedef, leaves)

  def side_fn(self) -> Callable:
    """`g(params, x, **kw)`: `f`, on one example when `vmap_axes` is given."""
    if not self.vmapped:
      return self.f
    return _utils.per_example_fn(self.f, self.x_axis, self.fx_axis, self.kw_axes)

  def map_sides(self, fn: Callable, x, kw) -> Any:
    """`fn(x, kw)`, vmapped over examples (leading output axis) if asked."""
    if not self.vmapped:
      return fn(x, kw)
    in_x, in_kw = _utils.vmap_in_axes(self.x_axis, self.kw_axes, kw)
    return jax.vmap(fn, in_axes=(in_x, in_kw))(x, kw)

  def to_output_layout(self, arr: jax.Array, k: int) -> jax.Array:
    """Moves a vmapped leading example axis to its place among output axes."""
    if not self.vmapped:
      return arr
    return jnp.moveaxis(arr, 0, self.fx_axes[k])


def _leaf_weights(treedef, leaves, ntk_weights) -> List[Optional[Any]]:
  """Per-leaf NTK weights; `None` for leaves that do not contribute."""
  if ntk_weights is None:
    ws = [1.] * len(leaves)
  else:
    ws = treedef.flatten_up_to(ntk_weights)
  out = []
  for leaf, w in zip(leaves, ws):
    inexact = jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    static_zero = (isinstance(w, (int, float, np.number, np.ndarray))
                   and np.all(np.asarray(w) == 0))
    out.append(w if inexact and not static_zero else None)
  return out


def _scale(w, k):
  return k if isinstance(w, (int, float)) and w == 1 else w * k


# JACOBIAN CONTRACTION


def _jacobian_contraction(s: _Setup, trace_axes: Axes, diagonal_axes: Axes):
  g = s.side_fn()

  def jac(x, kw):
    def fp(active):
      return jax.tree.leaves(g(s.params_with(active), x, **kw))
    return jax.jacrev(fp)([s.leaves[i] for i in s.active])

  j1 = s.map_sides(jac, s.x1, s.kw1)
  j2 = j1 if s.x2 is None else s.map_sides(jac, s.x2, s.kw2)
  out = []
  for k, (fx1, fx2) in enumerate(zip(s.out_leaves1, s.out_leaves2)):
    letters = _utils.Letters()
    o1, o2, o = _utils.output_letters(len(fx1.shape), trace_axes,
                                      diagonal_axes, letters)
    ntk = jnp.zeros(_utils.kernel_shape(fx1.shape, fx2.shape, trace_axes,
                                        diagonal_axes), s.dtype)
    for a, i in enumerate(s.active):
      p = letters(s.leaves[i].ndim)
      term = _utils.einsum(s.to_output_layout(j1[k][a], k), o1 + p,
                           s.to_output_layout(j2[k][a], k), o2 + p, out=o)
      ntk = ntk + _scale(s.weights[i], term)
    out.append(ntk / _trace_size(fx1.shape, trace_axes))
  return out


def _trace_size(shape, trace_axes) -> int:
  return _utils.size_at(shape, _utils.canonicalize_axes(trace_axes, len(shape)))


# NTK-VECTOR PRODUCTS


def _ntk_vector_products(s: _Setup, trace_axes: Axes, diagonal_axes: Axes):
  g = s.side_fn()
  x2 = s.x1 if s.x2 is None else s.x2
  kw2 = s.kw1 if s.x2 is None else s.kw2

  def pair(x1, kw1, x2, kw2):
    active = [s.leaves[i] for i in s.active]
    f1 = lambda a: jax.tree.leaves(g(s.params_with(a), x1, **kw1))
    f2 = lambda a: jax.tree.leaves(g(s.params_with(a), x2, **kw2))
    out2, vjp2 = jax.vjp(f2, active)

    def column(ct, forward):
      tangent = vjp2(ct)[0]
      tangent = [_scale(s.weights[i], t) for i, t in zip(s.active, tangent)]
      return forward(tangent)

    def jvp1(tangent):
      return jax.jvp(f1, (active,), (tangent,))[1]

    def transposed_vjp1(tangent):
      # `J1 t` as the transpose of `t' ↦ J1ᵀ t'`: works where forward mode
      # cannot (custom_vjp functions).
      out1, vjp1 = jax.vjp(f1, active)
      return jax.linear_transpose(lambda c: vjp1(c)[0], out1)(tangent)[0]

    shapes2 = [o.shape for o in out2]
    basis = _utils.std_basis(out2)
    try:
      cols = jax.vmap(lambda ct: column(ct, jvp1))(basis)
    except TypeError:  # forward mode through a custom_vjp function
      cols = jax.vmap(lambda ct: column(ct, transposed_vjp1))(basis)
    res = []
    for k, (c, shape2) in enumerate(zip(cols, shapes2)):
      c = _utils.split_rows(c, shapes2)[k]  # (*o2, *o1): this output only
      n2 = len(shape2)
      res.append(jnp.moveaxis(c, tuple(range(n2)),
                              tuple(range(c.ndim - n2, c.ndim))))
    return res

  if not s.vmapped:
    kernels = pair(s.x1, s.kw1, x2, kw2)
  else:
    in_x, in_kw1 = _utils.vmap_in_axes(s.x_axis, s.kw_axes, s.kw1)
    _, in_kw2 = _utils.vmap_in_axes(s.x_axis, s.kw_axes, kw2)
    inner = jax.vmap(pair, in_axes=(in_x, in_kw1, None, None))
    outer = jax.vmap(inner, in_axes=(None, None, in_x, in_kw2))
    kernels = outer(s.x1, s.kw1, x2, kw2)  # (N2, N1, *o1, *o2) per output
    fixed = []
    for k, kern in enumerate(kernels):
      n1 = len(s.out_leaves1[k].shape) - 1
      ax = s.fx_axes[k]
      kern = jnp.moveaxis(kern, 1, 0)                # (N1, N2, o1, o2)
      kern = jnp.moveaxis(kern, 1, 1 + n1)           # (N1, o1, N2, o2)
      kern = jnp.moveaxis(kern, 1 + n1, 1 + n1 + ax)
      fixed.append(jnp.moveaxis(kern, 0, ax))
    kernels = fixed
  return [_utils.trace_and_diagonal(kern, len(fx.shape), trace_axes,
                                    diagonal_axes)
          for kern, fx in zip(kernels, s.out_leaves1)]


# STRUCTURED DERIVATIVES


def _structured(s: _Setup, trace_axes: Axes, diagonal_axes: Axes):
  from infwidth.empirical import structured  # pylint: disable=g-import-not-at-top
  return structured.structured_ntk(s, trace_axes, diagonal_axes)


_IMPLEMENTATIONS = {
    NtkImplementation.JACOBIAN_CONTRACTION: _jacobian_contraction,
    NtkImplementation.NTK_VECTOR_PRODUCTS: _ntk_vector_products,
    NtkImplementation.STRUCTURED_DERIVATIVES: _structured,
}


# AUTO


_AUTO_CACHE: Dict[Any, NtkImplementation] = {}
# Bytes moved are weighted against FLOPs: both XLA:CPU and GPUs do several
# FLOPs in the time one byte comes from memory.
_BYTE_COST = 4.


def _abstract(tree):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
      if isinstance(a, (jax.Array, np.ndarray)) or hasattr(a, 'aval') else a,
      tree)


def _choose_implementation(f, x1, x2, params, kwargs, trace_axes, diagonal_axes,
                           vmap_axes, ntk_weights) -> NtkImplementation:
  """The implementation with the lowest estimated cost for these shapes."""
  array_kw = {k: v for k, v in kwargs.items()
              if all(hasattr(l, 'shape') for l in jax.tree.leaves(v))}
  static_kw = {k: v for k, v in kwargs.items() if k not in array_kw}
  abstract = _abstract((x1, x2, params, array_kw, ntk_weights))
  key = (id(f), str(jax.tree.map(lambda a: (getattr(a, 'shape', a),
                                            str(getattr(a, 'dtype', ''))),
                                 abstract)),
         repr(static_kw), repr(trace_axes), repr(diagonal_axes), repr(vmap_axes))
  if key in _AUTO_CACHE:
    return _AUTO_CACHE[key]
  costs = {}
  for impl in _IMPLEMENTATIONS:
    def run(x1, x2, params, array_kw, ntk_weights, impl=impl):
      return _ntk(f, x1, x2, params, dict(static_kw, **array_kw), trace_axes,
                  diagonal_axes, vmap_axes, impl, ntk_weights)
    try:
      cost = jax.jit(run).lower(*abstract).cost_analysis()
      if isinstance(cost, (list, tuple)):
        cost = cost[0]
      costs[impl] = cost.get('flops', 0.) + _BYTE_COST * cost.get(
          'bytes accessed', 0.)
    except Exception:  # pylint: disable=broad-except
      continue  # An implementation that cannot handle `f` is not a candidate.
  best = min(costs, key=costs.get) if costs else (
      NtkImplementation.JACOBIAN_CONTRACTION)
  _AUTO_CACHE[key] = best
  return best


def _ntk(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes,
         vmap_axes, implementation, ntk_weights) -> PyTree:
  implementation = NtkImplementation(implementation)
  if implementation == NtkImplementation.AUTO:
    implementation = _choose_implementation(
        f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes,
        vmap_axes, ntk_weights)
  s = _Setup(f, x1, x2, params, apply_fn_kwargs, vmap_axes, ntk_weights)
  kernels = _IMPLEMENTATIONS[implementation](s, trace_axes, diagonal_axes)
  return jax.tree.unflatten(s.out_tree, kernels)


def _nngp(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes):
  kw1, kw2 = _utils.split_kwargs(apply_fn_kwargs, x1, x2)
  out1 = f(params, x1, **kw1)
  out2 = out1 if x2 is None else f(params, x2, **kw2)
  return jax.tree.map(
      lambda a, b: _utils.contract_outputs(a, b, trace_axes, diagonal_axes),
      out1, out2)


# PUBLIC API


def empirical_nngp_fn(f: ApplyFn, trace_axes: Axes = (-1,),
                      diagonal_axes: Axes = ()) -> Callable[..., PyTree]:
  """The empirical NNGP `f(x1) f(x2)ᵀ` of one network, as NT's.

  Args:
    f: `f(params, x, **kwargs)` returning an array or a pytree of arrays.
    trace_axes: output axes summed over; the kernel is divided by their total
      size (so it is per output entry, e.g. per logit).
    diagonal_axes: output axes that appear once (only equal indices).

  Returns:
    `nngp_fn(x1, x2, params, **apply_fn_kwargs)`; `x2=None` means `x1`. For
    outputs `(N, C)` and the defaults the kernel is `(N1, N2)`; axes not traced
    appear twice, interleaved (`(N1, N2, C1, C2)` with `trace_axes=()`).
  """

  def nngp_fn(x1: PyTree, x2: Optional[PyTree], params: PyTree,
              **apply_fn_kwargs) -> PyTree:
    return _nngp(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes)

  return nngp_fn


def empirical_ntk_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = None,
    implementation: Union[NtkImplementation, int] = DEFAULT_NTK_IMPLEMENTATION,
) -> Callable[..., PyTree]:
  """The empirical NTK `J(x1) J(x2)ᵀ` of one network, as NT's.

  Args:
    f: `f(params, x, **kwargs)` returning an array or a pytree of arrays
      (each output gets its own kernel; no cross terms).
    trace_axes: output axes summed over, the kernel divided by their size.
    diagonal_axes: output axes that appear once.
    vmap_axes: `(in_axes, out_axes, kwargs_axes)` or one int for both `x` and
      the output: certifies that `f` maps examples independently along those
      axes, so per-example Jacobians are computed with `vmap`. `None` (no such
      structure) is always correct.
    implementation: an `NtkImplementation` (or its int value).

  Returns:
    `ntk_fn(x1, x2, params, **apply_fn_kwargs)`, in the layout of
    `empirical_nngp_fn`.
  """

  def ntk_fn(x1: PyTree, x2: Optional[PyTree], params: PyTree,
             **apply_fn_kwargs) -> PyTree:
    return _ntk(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes,
                vmap_axes, implementation, None)

  return ntk_fn


def _get_tuple(get: Get) -> Tuple[Tuple[str, ...], bool]:
  if get is None:
    return ('nngp', 'ntk'), False
  if isinstance(get, str):
    return (get,), True
  return tuple(get), False


def _kernels(f, x1, x2, get, params, apply_fn_kwargs, trace_axes,
             diagonal_axes, vmap_axes, implementation, ntk_weights):
  gets, single = _get_tuple(get)
  for g in gets:
    if g not in ('nngp', 'ntk'):
      raise ValueError(f'Empirical kernels are "nngp" and "ntk", got {g!r}.')
  out = {}
  if 'nngp' in gets:
    out['nngp'] = _nngp(f, x1, x2, params, apply_fn_kwargs, trace_axes,
                        diagonal_axes)
  if 'ntk' in gets:
    out['ntk'] = _ntk(f, x1, x2, params, apply_fn_kwargs, trace_axes,
                      diagonal_axes, vmap_axes, implementation, ntk_weights)
  if single:
    return out[gets[0]]
  kind = kernel_namedtuple(gets)
  # A pytree of outputs gives a pytree of namedtuples, as in NT.
  return jax.tree.map(lambda *ks: kind(*ks), *[out[g] for g in gets])


def empirical_kernel_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = None,
    implementation: Union[NtkImplementation, int] = DEFAULT_NTK_IMPLEMENTATION,
) -> Callable[..., Any]:
  """Empirical NNGP and NTK of one network, as NT's `empirical_kernel_fn`.

  Args: as `empirical_ntk_fn` (`vmap_axes` and `implementation` apply to the
    NTK only).

  Returns:
    `kernel_fn(x1, x2, get, params, **apply_fn_kwargs)`: `get` is `'nngp'`,
    `'ntk'` (an array comes back), a tuple of them, or `None` for both (a
    namedtuple comes back).
  """

  def kernel_fn(x1: PyTree, x2: Optional[PyTree], get: Get, params: PyTree,
                **apply_fn_kwargs) -> Any:
    return _kernels(f, x1, x2, get, params, apply_fn_kwargs, trace_axes,
                    diagonal_axes, vmap_axes, implementation, None)

  return kernel_fn


def empirical_kernels(
    apply_fn: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: Optional[PyTree] = None,
    get: Get = ('nngp', 'ntk'),
    ntk_weights: Optional[PyTree] = None,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = None,
    implementation: Union[NtkImplementation, int] = (
        NtkImplementation.STRUCTURED_DERIVATIVES),
    **apply_kwargs,
) -> Any:
  """Empirical kernels of `apply_fn` at `params`, with per-leaf NTK weights.

  The NNGP is `f(x1) f(x2)ᵀ / C` (summed over the traced axes, by default the
  last, and divided by their size: per logit) and the NTK is
  `Σ_θ w_θ ∂f(x1)/∂θ ∂f(x2)/∂θᵀ / C`.

  Args:
    apply_fn: `apply_fn(params, x, **apply_kwargs)`.
    params: pytree of parameters.
    x1: first inputs, e.g. `(N1, ...)`.
    x2: second inputs, `(N2, ...)`; `None` means `x1`.
    get: `'nngp'`, `'ntk'` or a tuple of them (a namedtuple comes back).
    ntk_weights: pytree of scalars matching `params` (learning-rate multiplier
      of each leaf); `0` excludes a leaf, `None` weights all leaves by 1.
    trace_axes, diagonal_axes, vmap_axes, implementation: as in
      `empirical_ntk_fn`; structured derivatives by default.
    **apply_kwargs: passed to `apply_fn`.

  Returns:
    Kernels of shape `(N1, N2)` for outputs `(N, C)` and the default axes.
  """
  return _kernels(apply_fn, x1, x2, get, params, apply_kwargs, trace_axes,
                  diagonal_axes, vmap_axes, implementation, ntk_weights)


def empirical_ntk_vp_fn(f: Callable, x1: PyTree, x2: Optional[PyTree], params: PyTree,
                        **apply_fn_kwargs) -> Callable[[PyTree], PyTree]:
  """NT's NTK-vector product: a function of cotangents shaped like
  `f(params, x2)` returning `Θ(x1, x2) · cotangents`, shaped like
  `f(params, x1)`, without forming the NTK: one vector-Jacobian product at
  `x2`, then one Jacobian-vector product at `x1` (`x2=None` means `x1`).
  `apply_fn_kwargs` are split between the two inputs as in `empirical_ntk_fn`."""
  kw1, kw2 = _utils.split_kwargs(apply_fn_kwargs, x1, x2)
  x2 = x1 if x2 is None else x2

  def ntk_vp(cotangents: PyTree) -> PyTree:
    _, vjp = jax.vjp(lambda p: f(p, x2, **kw2), params)
    tangents, = vjp(cotangents)
    return jax.jvp(lambda p: f(p, x1, **kw1), (params,), (tangents,))[1]

  return ntk_vp
