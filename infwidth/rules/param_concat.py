"""Parameters concatenated along an axis (`ParamConcat`).

Flax's `OptimizedLSTMCell` concatenates its four gate kernels `(H, H)` into
one `(H, 4H)` (and its four biases), computes `y = h @ kernel + bias` and
splits `y` at the pieces again. Each piece is its own leaf, with its own
moments and NTK weight, and the same leaf at every step of a loop: so a
contraction with a concatenation of parameters along one of its output axes
is the concatenation of the contractions with the pieces (a `ChannelConcat`
of their results, exact whatever the pieces' moments), a concatenated bias
is added block by block, and a split at the pieces' boundaries gives the
pieces' results back. A contraction over the concatenated axis (input rows
stacked, `[x, h] @ concatenate([W_x, W_h], 0)`) is the sum of the pieces'
contractions with the matching blocks of its input. Structural maps
(reshape, broadcast, transpose, squeeze) act on each piece. Everything else
is refused.
"""

from __future__ import annotations

import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.rules import elementwise, linear, spatial, structural
from infwidth.rules.registry import fact, lookup, register_value_kind
from infwidth.rules.wide_ops import add_wides


@register_value_kind(A.ParamConcat)
def param_concat_rule(ctx, *invals, **params):
  """Every equation that meets parameters concatenated along an axis."""
  prim = ctx.eqn.primitive
  shape = tuple(ctx.eqn.outvars[0].aval.shape)
  if prim is P.concatenate_p:
    return spatial.concatenate_rule(ctx, *invals, **params)
  if prim is P.dot_general_p:
    return _dot(ctx, *invals, dimension_numbers=params['dimension_numbers'])
  if prim is P.slice_p or (spatial.split_p is not None and prim is spatial.split_p):
    return lookup(prim).rule(ctx, *invals, **params)
  if len(invals) >= 1 and isinstance(invals[0], A.ParamConcat) and prim in _STRUCTURAL:
    return _STRUCTURAL[prim](ctx, invals[0], shape, params)
  if fact(prim, 'family') == 'elementwise':
    return elementwise.per_block(ctx, shape, invals, params)
  raise ctx.unsupported(
      'parameters concatenated along an axis are used other than by a contraction that '
      'keeps that axis free, channelwise maps, structural maps or a split at the pieces')


def _dot(ctx, lhs, rhs, *, dimension_numbers):
  (lc, rc), (lb, rb) = dimension_numbers
  if isinstance(lhs, A.ParamConcat) == isinstance(rhs, A.ParamConcat) or any(
      isinstance(v, A.ParamRef) for v in (lhs, rhs)):
    raise ctx.unsupported('a product of two parameters')
  pc_is_lhs = isinstance(lhs, A.ParamConcat)
  pcat = lhs if pc_is_lhs else rhs
  pcon, pbat = (lc, lb) if pc_is_lhs else (rc, rb)
  x = rhs if pc_is_lhs else lhs
  if pcat.axis in pbat:
    raise ctx.unsupported('a batch dimension along which parameters are concatenated')
  if pcat.axis in pcon:
    return _dot_stacked(ctx, pcat, x, pc_is_lhs, dimension_numbers)
  free = [i for i in range(len(pcat.shape)) if i not in pcon and i not in pbat]
  n_lhs_free = len(lhs.shape) - len(lc) - len(lb)
  out_axis = len(lb) + free.index(pcat.axis) + (0 if pc_is_lhs else n_lhs_free)
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  results = []
  for piece in pcat.pieces:
    shape = list(out_shape)
    shape[out_axis] = piece.shape[pcat.axis]
    args = (piece, rhs) if pc_is_lhs else (lhs, piece)
    results.append(linear.param_dot(ctx, *args, dimension_numbers, tuple(shape)))
  if all(isinstance(r, A.Det) for r in results):
    # A zero input (an RNN's zero initial state): zeros, the same for every input.
    dtype = ctx.eqn.outvars[0].aval.dtype
    return A.Det(np.zeros(out_shape, dtype), results[0].roles,
                 compact=np.zeros((1,) * len(out_shape), dtype))
  if any(not isinstance(r, A.Wide) or r.roles.count('c') != 1 or r.channel_axis != out_axis
         for r in results):
    raise ctx.unsupported('a contraction with parameters concatenated along an axis that '
                          'does not become the channel axis of the result')
  return A.ChannelConcat(out_shape, results[0].roles, (), parts=tuple(results))


def _dot_stacked(ctx, pcat: A.ParamConcat, x, pc_is_lhs: bool, dimension_numbers):
  """A contraction over the axis along which parameters are concatenated
  (`[x, h] @ concatenate([W_x, W_h], 0)`, stacked input rows): `Σ_k y_k W_k`,
  the sum of each piece's contraction with the matching block of the input."""
  (lc, rc), _ = dimension_numbers
  pcon, xcon = (lc, rc) if pc_is_lhs else (rc, lc)
  x_axis = xcon[list(pcon).index(pcat.axis)]
  widths = list(pcat.widths)
  if isinstance(x, A.ChannelConcat) and x.channel_axis == x_axis and (
      [p.width for p in x.parts] == widths):
    blocks = [spatial.det_block(p) for p in x.parts]
  elif isinstance(x, A.Det):
    bounds = np.cumsum([0] + widths)
    blocks = []
    for k in range(len(widths)):
      index = [slice(None)] * len(x.shape)
      index[x_axis] = slice(bounds[k], bounds[k + 1])
      compact = x.compact
      if compact is not None and np.shape(compact)[x_axis] != 1:
        compact = compact[tuple(index)]
      blocks.append(A.Det(x.value[tuple(index)], x.roles, compact))
  else:
    raise ctx.unsupported('a contraction over the axis along which parameters are '
                          'concatenated, with a value that is not concatenated from blocks of '
                          'the same sizes along that axis')
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  wides = []
  for piece, block in zip(pcat.pieces, blocks):
    args = (piece, block) if pc_is_lhs else (block, piece)
    out = linear.param_dot(ctx, *args, dimension_numbers, out_shape)
    if isinstance(out, A.Wide):
      wides.append(out)
    elif not isinstance(out, A.Det):
      raise ctx.unsupported('a contraction of concatenated parameters whose pieces give '
                            'values of different kinds')
  if not wides:  # zero inputs: zeros
    dtype = ctx.eqn.outvars[0].aval.dtype
    return A.Det(np.zeros(out_shape, dtype), out.roles,
                 compact=np.zeros((1,) * len(out_shape), dtype))
  if any(w.roles != wides[0].roles or isinstance(w, A.ChannelConcat) for w in wides):
    raise ctx.unsupported('a contraction of concatenated parameters whose pieces give values '
                          'of different layouts')
  total = wides[0]
  for w in wides[1:]:
    total = add_wides(total, w)
  return total


def _per_piece(ctx, pcat: A.ParamConcat, out_shape, out_axis, rule, shape_param=None,
               **params):
  pieces = []
  for piece in pcat.pieces:
    kw = dict(params)
    if shape_param is not None:
      s = list(kw[shape_param])
      s[out_axis] = piece.shape[pcat.axis]
      kw[shape_param] = tuple(s)
    pieces.append(rule(ctx, piece, **kw))
  return A.ParamConcat(tuple(pieces), tuple(out_shape), out_axis)


def _broadcast(ctx, pcat, shape, params):
  out_axis = params['broadcast_dimensions'][pcat.axis]
  return _per_piece(ctx, pcat, shape, out_axis, structural.broadcast_in_dim_rule, 'shape',
                    shape=params['shape'], broadcast_dimensions=params['broadcast_dimensions'])


def _reshape(ctx, pcat, shape, params):
  # Only size-1 axes added or removed: the concatenated axis keeps its place
  # among the others.
  old = [(i, n) for i, n in enumerate(pcat.shape) if n != 1]
  new = [(j, n) for j, n in enumerate(shape) if n != 1]
  if [n for _, n in old] != [n for _, n in new] or pcat.shape[pcat.axis] == 1:
    raise ctx.unsupported('a reshape of parameters concatenated along an axis other than '
                          'adding or removing axes of size one')
  out_axis = new[[i for i, _ in old].index(pcat.axis)][0]
  return _per_piece(ctx, pcat, shape, out_axis, structural.reshape_rule, 'new_sizes',
                    new_sizes=tuple(params['new_sizes']), dimensions=params.get('dimensions'))


def _transpose(ctx, pcat, shape, params):
  perm = tuple(params['permutation'])
  return _per_piece(ctx, pcat, shape, perm.index(pcat.axis), structural.transpose_rule,
                    permutation=perm)


def _squeeze(ctx, pcat, shape, params):
  dims = set(d % len(pcat.shape) for d in params['dimensions'])
  out_axis = pcat.axis - sum(1 for d in dims if d < pcat.axis)
  return _per_piece(ctx, pcat, shape, out_axis, structural.squeeze_rule,
                    dimensions=tuple(params['dimensions']))


_STRUCTURAL = {
    P.broadcast_in_dim_p: _broadcast,
    P.reshape_p: _reshape,
    P.transpose_p: _transpose,
    P.squeeze_p: _squeeze,
}
