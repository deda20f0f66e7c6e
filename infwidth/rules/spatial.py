"""Linear maps of wide values along spatial axes: pooling, spatial sums,
slicing, padding, reversal and concatenation (DESIGN §2, kind 3).

Each is a matrix `P` per spatial axis (or a weight vector, for a sum that
removes the axis), applied to both copies of the axis in every moment block:
`K ↦ P K Pᵀ`. Maps compose: a map of a mapped value is one map of the
original value, so `jnp.pad(x, mode='wrap')` (slices, then concatenation)
becomes one matrix per axis.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.errors import InternalError, UnsupportedValueError
from infwidth.domain.chain import Chain
from infwidth.rules.channel_slices import slice_channels
from infwidth.rules.conv import grid_role
from infwidth.rules.registry import register
from infwidth.rules.structural import resized_roles
from infwidth.domain.needs import Need
from infwidth.domain.values import Det



def mixes_positions(eqn, out_need: Need) -> Need:
  """The `requirement` of a map that mixes positions (pooling): full blocks."""
  return Need.FULL


def mapped_parts(w: A.Wide):
  """`(base, ops)` with `w = ops(base)`; `ops` maps base roles to ('mat', P, out_role)
  or ('vec', weights). A value that is not a map of another is its own base."""
  if (isinstance(w, A.Wide) and w.offset is None and len(w.terms) == 1 and not w.hidden):
    t = w.terms[0]
    c = t.combo
    if (t.is_gaussian and len(c.sources) == 1 and isinstance(c.sources[0], A.MappedSource)
        and isinstance(c.coefs[0], float) and c.coefs[0] == 1.0 and A._is_zero(c.mean)):
      src = c.sources[0]
      return src.base, dict(src.ops)
  return w, {}


def _apply_ops(ops, in_spatial):
  def apply(block, start):
    for i in reversed(range(len(in_spatial))):
      op = ops.get(in_spatial[i])
      if op is None:
        continue
      mat = jnp.asarray(op[1], block.dtype)
      ax = start + i
      if op[0] == 'vec':
        # A weighted sum: the axis is removed, the others keep their order.
        block = jnp.tensordot(block, mat, axes=([ax], [0]))
      else:
        block = jnp.moveaxis(jnp.tensordot(block, mat, axes=([ax], [1])), -1, ax)
    return block
  return apply


def make_mapped(ctx, base: A.Wide, ops, out_shape, out_roles) -> A.Wide:
  """The wide value `ops(base)` with axis roles `out_roles`."""
  if base.hidden:
    raise UnsupportedValueError('a spatial map after flattening spatial axes into the channel axis.')
  in_spatial = base.spatial
  out_spatial = []
  for r in in_spatial:
    op = ops.get(r)
    if op is None:
      out_spatial.append(r)
    elif op[0] == 'mat':
      out_spatial.append(op[2])
  visible = tuple(r for r in out_roles if r not in ('b', 'c', None))
  # The value may hold the mapped axes in another order (a transpose after
  # the map): its combination embeds the source's layout by role.
  if sorted(out_spatial) != sorted(visible) or len(set(visible)) != len(visible):
    raise InternalError(f'mapped spatial roles {out_spatial} vs value roles {visible}')
  src = A.MappedSource(base, _apply_ops(ops, in_spatial), tuple(out_spatial))
  src.ops = dict(ops)
  return A.Wide(tuple(out_shape), tuple(out_roles), (A.Term(Chain(), A.combo_of(src, visible)),))


def _compose(ops, role_in_value, new):
  """Adds `new` (('mat', P) or ('vec', w)) on the value axis with role `role_in_value`."""
  ops = dict(ops)
  for br, op in ops.items():
    if op[0] == 'mat' and op[2] == role_in_value:
      if new[0] == 'vec':
        ops[br] = ('vec', new[1] @ op[1])
      else:
        ops[br] = ('mat', new[1] @ op[1], new[2])
      return ops
  ops[role_in_value] = new
  return ops


def map_axes(ctx, w: A.Wide, per_axis, out_shape):
  """Applies per-value-axis maps {axis: ('mat', P) | ('vec', w)} to a wide value."""
  base, ops = mapped_parts(w)
  roles = list(w.roles)
  for ax, (kind, m) in per_axis.items():
    r = w.roles[ax]
    if r in ('b', 'c') or (r is None and w.shape[ax] != 1):
      raise InternalError(f'spatial map on a {r!r} axis')
    if kind == 'vec':
      ops = _compose(ops, r, ('vec', m))
      roles[ax] = 'drop'
    else:
      new_role = grid_role(r, w.shape[ax], out_shape[ax])
      ops = _compose(ops, r, ('mat', m, new_role))
      roles[ax] = new_role
  out_roles = tuple(r for r in roles if r != 'drop')
  return make_mapped(ctx, base, ops, out_shape, out_roles)


# ----------------------------------------------------------------------------
# Matrices.


def window_matrix(size_in, size_out, window, stride, dilation, pad, base_dilation=1):
  """P[o, i] = 1 where input i is in window o (NT/XLA reduce_window semantics)."""
  p = np.zeros((size_out, size_in))
  for o in range(size_out):
    for t in range(window):
      pos = o * stride + t * dilation - pad[0]
      if pos % base_dilation == 0 and 0 <= pos // base_dilation < size_in:
        p[o, pos // base_dilation] += 1.
  return p


def select_matrix(size_in, indices):
  p = np.zeros((len(indices), size_in))
  for o, i in enumerate(indices):
    if i is not None and 0 <= i < size_in:
      p[o, i] = 1.
  return p


# ----------------------------------------------------------------------------
# Rules.


def _check_channel_order(ctx, operand, what):
  """Refuses selecting or reordering the channels of a value with per-channel
  arrays (their entries would have to follow)."""
  if isinstance(operand, A.Wide) and A.channel_dependent(operand):
    raise ctx.unsupported(f'{what} the channel axis of a value with per-channel arrays '
                          '(e.g. BatchNorm statistics) is not supported yet')


def _check_wide(ctx, operand, what):
  if isinstance(operand, A.ParamRef):
    raise ctx.unsupported(f'{what} of a parameter')
  return operand


def per_part(operand, out_shape, fn, dropped=()):
  """`fn(value, out_shape)` of a value, or of each block of a value
  concatenated along its channel axis (a map of the spatial axes acts on
  each block alone; the blocks keep their channel counts). `dropped`: the
  operand axes the result no longer has (a sum over spatial axes)."""
  if not isinstance(operand, A.ChannelConcat):
    return fn(operand, out_shape)
  axis = operand.channel_axis
  axis -= sum(1 for a in dropped if a < axis)
  if any(isinstance(p, A.DetChannels) for p in operand.parts):
    raise UnsupportedValueError('a spatial map (pooling, a sum over positions) of an array '
                                'concatenated with wide values along their channel axis is '
                                'not supported yet')
  parts = []
  for part in operand.parts:
    shape = list(out_shape)
    shape[axis] = part.width
    parts.append(fn(part, tuple(shape)))
  if any(p.roles != parts[0].roles for p in parts):
    raise InternalError('the blocks of a channel concatenation lost their layout')
  return A.ChannelConcat(tuple(out_shape), parts[0].roles, (), None, parts[0].hidden,
                         parts=tuple(parts))


def _pool(ctx, operand, window_dimensions, window_strides, padding, base_dilation,
          window_dilation):
  _check_wide(ctx, operand, 'pooling')
  return per_part(operand, tuple(ctx.eqn.outvars[0].aval.shape),
                  lambda w, shape: _pool_one(ctx, w, shape, window_dimensions, window_strides,
                                             padding, base_dilation, window_dilation))


def _pool_one(ctx, operand, out_shape, window_dimensions, window_strides, padding,
              base_dilation, window_dilation):
  per_axis = {}
  for ax, r in enumerate(operand.roles):
    trivial = (window_dimensions[ax] == 1 and window_strides[ax] == 1 and
               tuple(padding[ax]) == (0, 0) and base_dilation[ax] == 1)
    if trivial:
      continue
    if r in ('b', 'c') or r is None:
      raise ctx.unsupported(f'pooling along the {"batch" if r == "b" else "channel"} axis')
    per_axis[ax] = ('mat', window_matrix(operand.shape[ax], out_shape[ax], window_dimensions[ax],
                                         window_strides[ax], window_dilation[ax],
                                         tuple(padding[ax]), base_dilation[ax]))
  return map_axes(ctx, operand, per_axis, out_shape)


@register(P.reduce_window_sum_p, family='spatial', requirement=mixes_positions,
          accepts=(A.ChannelConcat,))
def reduce_window_sum_rule(ctx, operand, *, window_dimensions, window_strides, padding,
                           base_dilation, window_dilation, **_):
  return _pool(ctx, operand, window_dimensions, window_strides, padding, base_dilation,
               window_dilation)


def reduce_window_sum_like(ctx, operand, init, window_dimensions, window_strides, padding,
                           base_dilation, window_dilation):
  """A generic `reduce_window` whose body is one addition (its rule is
  registered with max pooling's, `max_pool.reduce_window_rule`)."""
  if not isinstance(init, Det) or np.any(np.asarray(init.value) != 0):
    raise ctx.unsupported('a window sum with a nonzero initial value')
  # The generic reduce_window has several results (one per operand): a list.
  return [_pool(ctx, operand, window_dimensions, window_strides, padding, base_dilation,
                window_dilation)]


def spatial_sum(ctx, operand: A.Wide, axes):
  """`reduce_sum` over spatial axes (global sum/average pooling)."""
  return per_part(operand, tuple(ctx.eqn.outvars[0].aval.shape),
                  lambda w, shape: _spatial_sum_one(ctx, w, axes, shape), dropped=axes)


def _spatial_sum_one(ctx, operand, axes, out_shape):
  per_axis = {a: ('vec', np.ones(operand.shape[a])) for a in axes if operand.shape[a] != 1}
  if len(per_axis) != len(axes):
    # Size-1 axes summed away: drop them from the roles too.
    per_axis.update({a: ('vec', np.ones(1)) for a in axes if a not in per_axis})
  return map_axes(ctx, operand, per_axis, out_shape)


@register(P.slice_p, family='spatial', det_roles=resized_roles, accepts=(A.ChannelConcat,))
def slice_rule(ctx, operand, *, start_indices, limit_indices, strides=None, **_):
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  strides = strides or (1,) * len(out_shape)
  if isinstance(operand, A.ParamRef):
    return param_slice(ctx, operand, start_indices, limit_indices, strides, out_shape)
  return _slice(ctx, operand, start_indices, limit_indices, strides, out_shape)


def _slice(ctx, operand, start_indices, limit_indices, strides, out_shape):
  _check_wide(ctx, operand, 'slicing')
  if isinstance(operand, (A.ChannelConcat, A.ParamConcat)):
    return concat_slice(ctx, operand, start_indices, limit_indices, strides, out_shape)
  per_axis = {}
  for ax, r in enumerate(operand.roles):
    if (start_indices[ax], limit_indices[ax], strides[ax]) == (0, operand.shape[ax], 1):
      continue
    if r == 'c':
      _check_channel_order(ctx, operand, 'slicing')
      # Other channels: other entries of the same parameters (channel_slices).
      operand = slice_channels(ctx, operand, ax,
                               tuple(range(start_indices[ax], limit_indices[ax], strides[ax])))
      continue
    if r == 'b' or r is None:
      raise ctx.unsupported('slicing the batch axis of a wide value')
    idx = list(range(start_indices[ax], limit_indices[ax], strides[ax]))
    per_axis[ax] = ('mat', select_matrix(operand.shape[ax], idx))
  if not per_axis:
    return A.Wide(out_shape, operand.roles, operand.terms, operand.offset, operand.hidden)
  return map_axes(ctx, operand, per_axis, out_shape)


def param_slice(ctx, p: A.ParamRef, start, limit, strides, out_shape) -> A.ParamRef:
  """A slice of a parameter: a leaf of its own, with the parent's moments (its
  entries are other i.i.d. entries), the same leaf for the same slice, so
  distinct slices (the per-repetition weights of a stacked leaf) are
  independent. Overlapping slices, or a leaf used both whole and sliced,
  would share entries: refused."""
  leaf = p.leaf
  picked = []
  for ax, (s, l, st) in enumerate(zip(start, limit, strides)):
    if (s, l, st) != (0, p.shape[ax], 1) and p.axes[ax] is not None:
      picked.append((p.axes[ax], tuple(range(s, l, st))))
  if not picked:
    return A.ParamRef(leaf, out_shape, p.axes, p.scale)
  key = tuple(sorted(picked))
  subs = ctx.moments.param_slices.setdefault(id(leaf), {})
  if key not in subs:
    if any(getattr(src, 'leaf', None) is leaf for src in ctx.moments.sources.values()):
      raise ctx.unsupported(f'a slice of parameter {leaf.name!r}, which is also used whole')
    if any(_overlap(key, other) for other in subs):
      raise ctx.unsupported(f'overlapping slices of parameter {leaf.name!r}')
    shape = list(leaf.shape)
    for axis, idx in key:
      shape[axis] = len(idx)
    where = ', '.join(f'axis {a}: {i[0]}' + (f'..{i[-1]}' if len(i) > 1 else '') for a, i in key)
    subs[key] = A.ParamLeaf(leaf.index, f'{leaf.name}[{where}]', tuple(shape), leaf.mean,
                            leaf.var, leaf.ntk_weight, parent=leaf)
    ctx.moments.keep_alive.append(subs[key])
  return A.ParamRef(subs[key], out_shape, p.axes, p.scale)


def _overlap(a, b) -> bool:
  """Whether two slices (leaf axis → indices; absent axes whole) share entries."""
  da, db = dict(a), dict(b)
  return all(set(da[ax]) & set(db[ax]) for ax in set(da) & set(db))


def _split_roles(eqn, invals, outs):
  v = invals[0]
  return [tuple(None if (r == 'b' and v.shape[i] != np.shape(o)[i]) else r
                for i, r in enumerate(v.roles)) for o in outs]


# `jnp.split` binds `split` (JAX ≥ 0.4.36), which `jax.extend` does not list.
try:
  from jax._src.lax.lax import split_p
except ImportError:  # older JAX lowers jnp.split to slices
  split_p = None


def split_rule(ctx, operand, *, sizes, axis, **_):
  """`jnp.split`: one slice per piece (pieces of the channel axis are
  independent blocks, `channel_slices`)."""
  outs, start = [], 0
  for n in sizes:
    starts = [0] * len(operand.shape)
    limits = list(operand.shape)
    starts[axis], limits[axis] = start, start + int(n)
    out_shape = tuple(limits[i] - starts[i] for i in range(len(limits)))
    if isinstance(operand, A.ParamRef):
      outs.append(param_slice(ctx, operand, starts, limits, (1,) * len(starts), out_shape))
    else:
      outs.append(_slice(ctx, operand, starts, limits, (1,) * len(starts), out_shape))
    start += int(n)
  return outs


if split_p is not None:
  register(split_p, family='spatial', det_roles=_split_roles,
           accepts=(A.ChannelConcat,))(split_rule)


@register(P.dynamic_slice_p, family='spatial', det_roles=resized_roles)
def dynamic_slice_rule(ctx, operand, *starts, slice_sizes, **_):
  try:
    starts = [int(np.asarray(s.value)) for s in starts]
  except Exception:
    raise ctx.unsupported('a slice of a wide value at positions known only at run time') from None
  starts = [min(max(s, 0), n - k) for s, n, k in zip(starts, operand.shape, slice_sizes)]
  return slice_rule(ctx, operand, start_indices=starts,
                    limit_indices=[s + k for s, k in zip(starts, slice_sizes)])


@register(P.rev_p, family='spatial', det_roles=resized_roles,
          structured='permutation')
def rev_rule(ctx, operand, *, dimensions, **_):
  _check_wide(ctx, operand, 'reversal')
  per_axis = {}
  for ax in dimensions:
    r = operand.roles[ax]
    if r == 'c':
      _check_channel_order(ctx, operand, 'reversing')
      continue  # permuting i.i.d. channels changes nothing
    if r == 'b' or r is None:
      raise ctx.unsupported('reversing the batch axis of a wide value')
    n = operand.shape[ax]
    per_axis[ax] = ('mat', select_matrix(n, list(range(n - 1, -1, -1))))
  if not per_axis:
    return operand
  return map_axes(ctx, operand, per_axis, operand.shape)


@register(P.pad_p, family='spatial', det_roles=resized_roles)
def pad_rule(ctx, operand, padding_value, *, padding_config, **_):
  _check_wide(ctx, operand, 'padding')
  if not isinstance(padding_value, Det) or np.any(np.asarray(padding_value.value) != 0):
    raise ctx.unsupported('padding a wide value with a nonzero or random value')
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  per_axis = {}
  for ax, (lo, hi, interior) in enumerate(padding_config):
    if (lo, hi, interior) == (0, 0, 0):
      continue
    r = operand.roles[ax]
    if r in ('b', 'c') or r is None:
      raise ctx.unsupported('padding the batch or channel axis of a wide value')
    idx = [None] * out_shape[ax]
    for i in range(operand.shape[ax]):
      o = lo + i * (interior + 1)
      if 0 <= o < out_shape[ax]:
        idx[o] = i
    per_axis[ax] = ('mat', select_matrix(operand.shape[ax], idx))
  return map_axes(ctx, operand, per_axis, out_shape)


def _det_channels(ctx, d: Det, like: A.Wide, dimension: int) -> A.DetChannels:
  """A deterministic array concatenated with wide values along their channel
  axis (`jnp.concatenate([x_t, h], -1)`): a block of deterministic channels."""
  if like.roles.count('c') != 1 or like.hidden:
    raise ctx.unsupported('concatenating an array with a wide value whose channels span '
                          'several axes, or after a Flatten')
  if any(n != m for i, (n, m) in enumerate(zip(d.shape, like.shape)) if i != dimension):
    raise InternalError(f'concatenated shapes {d.shape} and {like.shape}')
  return A.DetChannels(d.shape, like.roles, (), value=d.value)


def det_block(part: A.Wide):
  """A block of a channel concatenation as a value of its own: a block of
  deterministic channels is the array again."""
  if isinstance(part, A.DetChannels):
    return Det(part.value, tuple(None if r == 'c' else r for r in part.roles))
  return part


def _param_concat(ctx, operands, dimension, out_shape) -> A.ParamConcat:
  """Parameter views concatenated: each piece stays its own leaf."""
  pieces = []
  for o in operands:
    if isinstance(o, A.ParamConcat):
      if o.axis != dimension:
        raise ctx.unsupported('concatenating parameters along two different axes')
      pieces.extend(o.pieces)
    else:
      pieces.append(o)
  if any(p.axes[dimension] is None for p in pieces):
    raise ctx.unsupported('concatenating parameters along an axis of size one added by a '
                          'reshape or broadcast')
  return A.ParamConcat(tuple(pieces), out_shape, dimension)


def concat_slice(ctx, operand, starts, limits, strides, out_shape):
  """A slice of a concatenation (of wide values along their channel axis, or
  of parameters) at its blocks' boundaries: the blocks themselves."""
  is_param = isinstance(operand, A.ParamConcat)
  ax = operand.axis if is_param else operand.channel_axis
  widths = operand.widths if is_param else [p.width for p in operand.parts]
  blocks = operand.pieces if is_param else operand.parts
  bounds = list(np.cumsum([0] + list(widths)))
  if any((starts[i], limits[i], strides[i]) != (0, operand.shape[i], 1)
         for i in range(len(operand.shape)) if i != ax):
    raise ctx.unsupported('slicing a concatenation along another axis than the '
                          'concatenated one')
  if strides[ax] != 1 or starts[ax] not in bounds or limits[ax] not in bounds:
    raise ctx.unsupported(
        'a slice of a concatenation that is not a union of its blocks ' +
        ('(parameters concatenated: a slice must take whole pieces)' if is_param else
         '(values concatenated along their channel axis)'))
  picked = tuple(blocks[bounds.index(starts[ax]):bounds.index(limits[ax])])
  if len(picked) == 1:
    return picked[0] if is_param else det_block(picked[0])
  if is_param:
    return A.ParamConcat(picked, tuple(out_shape), ax)
  return A.ChannelConcat(tuple(out_shape), picked[0].roles, (), parts=picked)


def _channel_concat(ctx, wides, out_shape) -> A.ChannelConcat:
  """Concatenation along the channel axis: channel blocks of different values."""
  parts = []
  for w in wides:
    parts.extend(w.parts if isinstance(w, A.ChannelConcat) else [w])
  if any(p.roles != parts[0].roles or p.hidden for p in parts):
    raise ctx.unsupported('concatenation along the channel axis of values with different '
                          'layouts, or after a Flatten')
  return A.ChannelConcat(out_shape, parts[0].roles, (), parts=tuple(parts))


@register(P.concatenate_p, family='spatial', accepts=(A.ChannelConcat,),
          det_roles=resized_roles)
def concatenate_rule(ctx, *operands, dimension, **_):
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  params = [o for o in operands if isinstance(o, (A.ParamRef, A.ParamConcat))]
  if params:
    if len(params) != len(operands):
      raise ctx.unsupported('concatenating parameters with other values')
    return _param_concat(ctx, operands, dimension, out_shape)
  wides = [o for o in operands if isinstance(o, A.Wide)]
  r = wides[0].roles[dimension]
  if len(wides) != len(operands):
    if r != 'c':
      raise ctx.unsupported('concatenating a wide value with deterministic values along an '
                            'axis other than its channel axis')
    # Input features beside wide channels (`[x_t, h] @ W` in an LSTM): a
    # contraction sums both blocks, x·x′ + H·E[h h′] (docs/semantics.md).
    return _channel_concat(ctx, [o if isinstance(o, A.Wide) else
                                 _det_channels(ctx, o, wides[0], dimension) for o in operands],
                           out_shape)
  if r == 'c':
    return _channel_concat(ctx, wides, out_shape)
  if any(isinstance(w, A.ChannelConcat) for w in wides):
    raise ctx.unsupported('concatenation along a spatial axis of values concatenated along '
                          'their channel axis')
  if r == 'b' or r is None:
    raise ctx.unsupported('concatenation along the batch axis of wide values')
  # All pieces must be maps of one value: then the result is one map of it.
  parts = [mapped_parts(w) for w in wides]
  base = parts[0][0]
  if any(b is not base for b, _ in parts):
    raise ctx.unsupported('concatenation of different wide values along a spatial axis')
  blocks, others = [], None
  for w, (_, ops) in zip(wides, parts):
    role = w.roles[dimension]
    entry = next(((br, op) for br, op in ops.items() if op[0] == 'mat' and op[2] == role), None)
    if entry is None:
      br, mat = role, np.eye(w.shape[dimension])
      rest = ops
    else:
      br, mat = entry[0], entry[1][1]
      rest = {k: v for k, v in ops.items() if k != br}
    rest_key = {k: (v[0], np.asarray(v[1]).tobytes(), v[2] if len(v) > 2 else None)
                for k, v in rest.items()}
    if others is None:
      others, base_role = rest_key, br
      base_rest = rest
    elif rest_key != others or br != base_role:
      raise ctx.unsupported('concatenation of pieces mapped differently along other axes')
    blocks.append(mat)
  new_role = grid_role(base_role, base.shape[base.roles.index(base_role)] if base_role in base.roles else -1, out_shape[dimension])
  ops = dict(base_rest)
  ops[base_role] = ('mat', np.concatenate(blocks, axis=0), new_role)
  roles = list(wides[0].roles)
  roles[dimension] = new_role
  # Other mapped axes keep the roles the pieces gave them.
  return make_mapped(ctx, base, ops, out_shape, tuple(roles))
