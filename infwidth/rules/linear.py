"""Linear maps with fresh Gaussian weights (DESIGN §2, kind 1): `dot_general`
with a parameter operand creates a new Gaussian source."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.errors import UnsupportedValueError
from infwidth.domain.chain import Chain
from infwidth.rules import spatial
from infwidth.rules.registry import register
from infwidth.rules.wide_ops import check_whole_use, relayout


def _dot_general_roles(eqn, invals, outs):
  """Roles of a constant-folded `dot_general`: batch, then free axes of each side."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  l, r = invals
  lf = [i for i in range(len(l.shape)) if i not in lc and i not in lb]
  rf = [i for i in range(len(r.shape)) if i not in rc and i not in rb]
  return [tuple([l.roles[i] for i in lb] + [l.roles[i] for i in lf] + [r.roles[i] for i in rf])]


@register(P.dot_general_p, family='linear', accepts=(A.ChannelConcat,),
          det_roles=_dot_general_roles, structured='dot')
def dot_general_rule(ctx, lhs, rhs, *, dimension_numbers, **_):
  return param_dot(ctx, lhs, rhs, dimension_numbers, tuple(ctx.eqn.outvars[0].aval.shape))


def param_dot(ctx, lhs, rhs, dimension_numbers, out_shape):
  """`dot_general` of a parameter view and a value, with result shape
  `out_shape` (a piece of a concatenation of parameters has its own)."""
  (lc, rc), (lb, rb) = dimension_numbers
  kinds = {type(lhs), type(rhs)}
  if kinds == {A.Det, A.Wide}:
    return constant_map(ctx, lhs, rhs, dimension_numbers)
  if isinstance(lhs, A.ParamRef) == isinstance(rhs, A.ParamRef):
    raise ctx.unsupported('a product of two wide values or two parameters')
  param_is_lhs = isinstance(lhs, A.ParamRef)
  p, x = (lhs, rhs) if param_is_lhs else (rhs, lhs)
  pc, xc = (lc, rc) if param_is_lhs else (rc, lc)
  pb, xb = (lb, rb) if param_is_lhs else (rb, lb)
  if pb:
    raise ctx.unsupported('batch dimensions shared between a parameter and its input')
  p_free = [i for i in range(len(p.shape)) if i not in pc]
  # Channel axes: the free weight axes that come from the leaf (a size-1
  # output axis is a valid single channel). A weight with several output axes
  # (`(in, heads, head_dim)`) gives i.i.d. entries over all of them.
  from_leaf = [i for i in p_free if p.axes[i] is not None]
  big = [i for i in from_leaf if p.shape[i] != 1] or from_leaf
  explicit = getattr(p.leaf, 'wide_axes', None)
  if explicit is not None and not set(explicit) <= {p.axes[i] for i in from_leaf}:
    raise UnsupportedValueError(
        f'wide_axes for parameter {p.leaf.name!r} of shape {p.leaf.shape} names axes '
        f'{tuple(explicit)}, but here only its axes {tuple(p.axes[i] for i in from_leaf)} are '
        'output (free) axes; give wide_axes= among the output axes, or None to infer them.')
  if not big or any(p.shape[i] != 1 for i in p_free if i not in big):
    raise UnsupportedValueError(
        f'parameter {p.leaf.name!r} of shape {p.leaf.shape} has no output axis from its own '
        'entries after its contraction (every free axis is added by a broadcast).')
  x_free = [i for i in range(len(x.shape)) if i not in xc]
  # dot_general output: lhs free axes, then rhs free axes.
  x_roles = [x.roles[i] for i in x_free]
  p_roles = ['c' if i in big else None for i in p_free]
  roles = tuple(p_roles + x_roles) if param_is_lhs else tuple(x_roles + p_roles)
  spatial = tuple(r for r in x_roles if r not in ('b', 'c', None))
  contracted_leaf_axes = tuple(p.axes[i] for i in pc)

  # The same weight applied to the same value twice is one random variable.
  key = ('linear-source', id(p.leaf), id(x), tuple(xc), tuple(pc), p.axes, p.scale, roles)
  cached = ctx.moments.sources.get(key)
  if cached is not None:
    return A.Wide(out_shape, roles, (A.Term(Chain(), A.combo_of(cached, spatial)),))
  if isinstance(x, A.Wide):
    xc_big = [i for i in xc if x.shape[i] != 1 or x.roles[i] == 'c']
    kinds = [x.roles[i] for i in xc_big]
    if 'c' not in kinds or 'b' in kinds or (x.hidden and 'c' in x_roles):
      raise UnsupportedValueError(
          f'a weight contracts axes {kinds} of a wide value; a contraction must sum '
          'channel axes (with, optionally, spatial axes), never the batch axis.')
    # Spatial axes summed with the channels (after a Flatten, or a readout
    # over (positions, features)): Σ_{s,i} y_si y'_si = n·Σ_s E[y_s y'_s], a
    # trace over s. Channel axes left free stay channel axes of the output:
    # their entries remain i.i.d.
    traced = tuple(r for r, _ in x.hidden) + tuple(k for k in kinds if k != 'c')
    n = int(np.prod([x.shape[i] for i in xc_big if x.roles[i] == 'c'], dtype=int))
    n //= int(np.prod([size for _, size in x.hidden], dtype=int))
    check_whole_use(ctx, p)
    src = A.LinearSource(p, x, spatial, width=n, traced=traced)
  elif _all_zero(x.value):
    # A zero input (an RNN's zero initial state): the product is exactly zero,
    # the same for every input; the weight is not used.
    dtype = ctx.eqn.outvars[0].aval.dtype
    return A.Det(np.zeros(out_shape, dtype), roles, compact=np.zeros((1,) * len(out_shape), dtype))
  else:
    if 'b' in [x.roles[i] for i in xc]:
      raise UnsupportedValueError('a weight contracts the batch axis of the input: the inputs '
                          'must have their batch axis first and it must not be summed.')
    v = jnp.asarray(x.value)
    drop = [i for i in x_free if x.roles[i] is None]
    # An array built inside the function from shapes (an RNN's initial state
    # `zeros((x.shape[0], H))`) carries no batch axis: it is the same along
    # such an axis, and the output is a broadcast along it.
    v = _constant_along(x.value, v, [i for i in drop if x.shape[i] != 1], x.shape)
    check_whole_use(ctx, p)
    src = A.LinearSource(p, _batch_first(v, x.roles, x_free, xc), spatial)
  src.contracted_leaf_axes = contracted_leaf_axes
  check_orientation(ctx, p, contracted_leaf_axes)
  ctx.moments.sources[key] = src
  ctx.moments.keep_alive.append(x)
  return A.Wide(out_shape, roles, (A.Term(Chain(), A.combo_of(src, spatial)),))


def check_orientation(ctx, p: A.ParamRef, contracted: tuple) -> None:
  """Refuses a weight used both as `W` and as its transpose (contracting
  different axes of the leaf: a tied autoencoder `h = φ(x W)`, `y = h Wᵀ`, or
  a readout tied to an embedding table).

  A weight applied always along the same axes is independent, in the limit,
  of every value it multiplies (weight reuse in loops, two branches): the
  NNGP is exact. A transposed use is not: `y_d = Σ_c W_dc φ(z_c)` with
  `z_c = Σ_d x_d W_dc/√D` has `E[W_dc φ(z_c)] = (x_d/√D)·E[φ′(z_c)] ≠ 0`, so
  the sum over the wide axis picks up a mean of order √n (it diverges with
  1/√n scaling) or, in general, corrections this library does not compute
  (docs/semantics.md, "Weight sharing")."""
  seen = ctx.moments.leaf_orientations.setdefault(id(p.leaf), tuple(contracted))
  if seen != tuple(contracted):
    raise ctx.unsupported(
        f'parameter {p.leaf.name!r} of shape {p.leaf.shape} is contracted along its axes '
        f'{seen} in one place and {tuple(contracted)} in another (a weight used with its '
        'transpose: a tied autoencoder or a readout tied to an embedding). The weight is '
        'then correlated with the value it multiplies, and the infinite-width limit needs '
        'corrections that are not implemented (with 1/sqrt(width) scaling it diverges); '
        'untie the weights')


def _all_zero(value) -> bool:
  return not isinstance(value, jax.core.Tracer) and not np.any(np.asarray(value))


def _batch_first(v, roles, free, trailing=()):
  """`v` in canonical input layout `(B|1, *S, *trailing)`: its free axes with
  role 'b', then those with spatial roles, then the `trailing` axes; free axes
  without a role must have size 1 and are dropped."""
  free = list(free)
  b_axes = [i for i in free if roles[i] == 'b']
  s_axes = [i for i in free if roles[i] not in ('b', None)]
  drop = [i for i in free if roles[i] is None]
  v = jnp.transpose(v, b_axes + s_axes + list(trailing) + drop)
  v = v.reshape(v.shape[:len(b_axes) + len(s_axes) + len(trailing)])
  return v if b_axes else v[None]


def _constant_along(value, v, axes, shape):
  """`v` (the array `value`) with size-1 `axes`, where it is the same along
  them (checked on the concrete value); else the error that the batch axis
  cannot be told."""
  if not axes:
    return v
  index = tuple(slice(0, 1) if i in axes else slice(None) for i in range(v.ndim))
  same = not isinstance(value, jax.core.Tracer) and bool(
      np.all(np.asarray(value) == np.asarray(value)[index]))
  if same:
    return jnp.asarray(np.asarray(value)[index])
  raise UnsupportedValueError(
      f'cannot tell which axis of an input of shape {shape} is the batch axis: an array '
      'that varies along an axis of the input\'s batch size is not derived from the inputs. '
      'The inputs must have their batch axis first; arrays built inside the function '
      'must not vary along it.')


def _gather_roles(eqn, invals, outs):
  """Roles of a constant-folded `gather`: the indices' batch axes, then none."""
  operand, indices = invals
  out_ndim = len(eqn.outvars[0].aval.shape)
  offset = set(eqn.params['dimension_numbers'].offset_dims)
  batch = iter(indices.roles[:-1])
  return [tuple(None if i in offset else next(batch, None) for i in range(out_ndim))]


@register(P.gather_p, family='linear', det_roles=_gather_roles, structured='gather')
def gather_rule(ctx, operand, indices, *, dimension_numbers, slice_sizes, **_):
  """An embedding lookup `W[ids]`: the row of token `t` is a Gaussian source
  with `Cov(W[t], W[t′]) = σ²·[t = t′]`, a dense layer of the one-hot inputs."""
  dn = dimension_numbers
  if not (isinstance(operand, A.ParamRef) and isinstance(indices, A.Det)):
    raise ctx.unsupported('a gather that is not a lookup of rows of a parameter table by '
                          'deterministic (integer) indices')
  rows = tuple(slice_sizes[1:]) == tuple(operand.shape[1:]) and slice_sizes[0] == 1
  if not (tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
          and not dn.operand_batching_dims and rows and indices.shape[-1] == 1):
    raise ctx.unsupported('a gather other than taking whole rows of a parameter table '
                          '(`W[ids]`, `jnp.take(W, ids, axis=0)`)')
  p = operand
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  (roles,) = _gather_roles(ctx.eqn, (operand, indices), None)
  free = [i for i in range(1, len(p.shape))]
  from_leaf = [i for i in free if p.axes[i] is not None]
  big = [i for i in from_leaf if p.shape[i] != 1] or from_leaf
  if not big or any(p.shape[i] != 1 for i in free if i not in big):
    raise UnsupportedValueError(
        f'embedding table {p.leaf.name!r} of shape {p.leaf.shape} has no feature axis.')
  offset = list(dn.offset_dims)
  roles = list(roles)
  for k, i in enumerate(free):
    roles[offset[k]] = 'c' if i in big else None
  roles = tuple(roles)
  ids = jnp.asarray(indices.value)[..., 0]
  id_roles = indices.roles[:-1]
  s_axes = [i for i, r in enumerate(id_roles) if r not in ('b', None)]
  drop = [i for i, r in enumerate(id_roles) if r is None]
  if any(ids.shape[i] != 1 for i in drop):
    raise UnsupportedValueError(
        f'cannot tell which axis of token ids of shape {ids.shape} is the batch axis; '
        'the inputs must have their batch axis first.')
  ids = _batch_first(ids, id_roles, range(ids.ndim))
  spatial = tuple(id_roles[i] for i in s_axes)
  key = ('embedding-source', id(p.leaf), id(indices), p.axes, p.scale)
  src = ctx.moments.sources.get(key)
  if src is None:
    check_whole_use(ctx, p)
    src = A.LinearSource(p, ids, spatial, input_moment=_token_equality)
    src.contracted_leaf_axes = (p.axes[0],)
    check_orientation(ctx, p, src.contracted_leaf_axes)
    ctx.moments.sources[key] = src
    ctx.moments.keep_alive.append(indices)
  return A.Wide(out_shape, roles, (A.Term(Chain(), A.combo_of(src, spatial)),))


def _token_equality(m, ia, ib) -> A.PairStats:
  """`Σ_v onehot(t)_v onehot(t′)_v = [t = t′]` for `(B, *S)` token ids, in
  the moment engine's layouts (full or equal-position spatial blocks)."""
  k = ia.ndim - 1

  def eq(a, b, cross):
    if m.diag:
      return (a[:, None] == b[None]) if cross else (a == b)
    sa = a.reshape(a.shape + (1,) * k)
    sb = b.reshape(b.shape[:1] + (1,) * k + b.shape[1:])
    return (sa[:, None] == sb[None]) if cross else (sa == sb)

  dtype = m.dtype
  cross = eq(m.rows(ia), m.cols(ib), True).astype(dtype)
  d1 = eq(m.rows(ia), m.rows(ib), False).astype(dtype)
  d2 = d1 if m.x1_is_x2 else eq(m.cols(ia), m.cols(ib), False).astype(dtype)
  return A.PairStats(cross, d1, d2)


def constant_map(ctx, lhs, rhs, dimension_numbers):
  """A wide value contracted with a constant array along one spatial axis
  (`einsum('oi,bihc->bohc', M, h)`, a resize or a fixed mixing of positions):
  the map `M` on that axis, `K ↦ M K Mᵀ` on its moment blocks, or a weighted
  sum where the constant keeps no free axis."""
  (lc, rc), (lb, rb) = dimension_numbers
  wide_is_lhs = isinstance(lhs, A.Wide)
  w, d = (lhs, rhs) if wide_is_lhs else (rhs, lhs)
  wc, dc = (lc, rc) if wide_is_lhs else (rc, lc)
  if lb or rb:
    raise ctx.unsupported('a contraction of a wide value with a constant sharing batch '
                          'dimensions (per-input weights) is not supported yet')
  if 'b' in d.roles:
    raise ctx.unsupported('a contraction of a wide value with an array that depends on the '
                          'input is not supported yet')
  kinds = [w.roles[i] for i in wc]
  if 'c' in kinds or 'b' in kinds or None in kinds or w.hidden:
    raise ctx.unsupported('a constant array contracted with the channel (wide) or batch axis '
                          'of a wide value: fixed mixing of channels has no infinite-width '
                          'limit')
  d_free = [i for i in range(len(d.shape)) if i not in dc]
  if len(wc) != 1 or len(d_free) > 1:
    raise ctx.unsupported('a constant contracted with several spatial axes of a wide value, or '
                          'with several free axes of its own, is not supported yet (one axis '
                          'at a time is)')
  if isinstance(d.value, jax.core.Tracer):
    raise ctx.unsupported('a contraction of a wide value with an array known only at run time')
  (ax,) = wc
  m = np.asarray(d.value)
  if d_free:
    mat = np.moveaxis(m, dc[0], 1)  # (free, contracted)
    in_place = list(w.shape)
    in_place[ax] = mat.shape[0]
    mapped = spatial.map_axes(ctx, w, {ax: ('mat', mat)}, tuple(in_place))
    new_role = mapped.roles[ax]
    rest = [mapped.roles[i] for i in range(len(w.shape)) if i != ax]
    roles = tuple(rest + [new_role]) if wide_is_lhs else tuple([new_role] + rest)
  else:
    mapped = spatial.map_axes(ctx, w, {ax: ('vec', m)},
                              tuple(n for i, n in enumerate(w.shape) if i != ax))
    roles = mapped.roles
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  return relayout(mapped, roles, out_shape)
