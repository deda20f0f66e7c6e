"""Structural primitives: broadcasts, reshapes, transposes and squeezes of
parameters, wide values and deterministic arrays (DESIGN §2, kind 3).

Also the axis-role rules for deterministic arrays (`det_roles` facts), which
say where the batch axis of an input went after constant-folded equations.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.errors import InternalError, UnsupportedValueError
from infwidth.rules.registry import register, register_primitive
from infwidth.domain.values import Det
from infwidth.rules.wide_ops import relayout


def _reshape_axis_map(old, new):
  """For each new axis, the old axis it equals (same size, same position in the
  factorisation), ignoring size-1 axes; None for axes from splits/merges."""
  out = [None] * len(new)
  i = j = 0
  while i < len(old) and j < len(new):
    if old[i] == 1:
      i += 1
      continue
    if new[j] == 1:
      j += 1
      continue
    if old[i] == new[j]:
      out[j] = i
      i += 1
      j += 1
      continue
    # A split or merge: consume until the products agree.
    pi, pj = old[i], new[j]
    i += 1
    j += 1
    while pi != pj:
      if pi < pj:
        pi *= old[i]
        i += 1
      else:
        pj *= new[j]
        j += 1
  return out


def _merged_roles(old_roles, old, new):
  """Roles after a reshape: kept for unchanged axes; merged spatial axes get a
  combined id; merging the batch axis is an error."""
  amap = _reshape_axis_map(old, new)
  roles = []
  for j, i in enumerate(amap):
    if new[j] == 1:
      roles.append(None)
    elif i is not None:
      roles.append(old_roles[i])
    else:
      roles.append(('reshaped', j, tuple(new)))
  return tuple(roles)


def default_det_roles(eqn, invals, outs):
  """Axis roles of constant-folded outputs where the primitive registers none:
  an axis keeps the role of a same-rank deterministic operand's axis of the
  same size (elementwise maps, convolutions of the input)."""
  dets = [v for v in invals if isinstance(v, Det)]
  result = []
  for shape in (tuple(np.shape(o)) for o in outs):
    same = [d for d in dets if len(d.shape) == len(shape)]
    roles = []
    for i, n in enumerate(shape):
      role = None
      for d in same:
        if d.roles[i] is not None and d.shape[i] == n:
          role = d.roles[i]
          break
      roles.append(role)
    result.append(tuple(roles))
  return result


def _broadcast_roles(eqn, invals, outs):
  v, out = invals[0], np.shape(outs[0])
  roles = [None] * len(out)
  for i, d in enumerate(eqn.params['broadcast_dimensions']):
    if v.shape[i] == out[d]:
      roles[d] = v.roles[i]
  return [tuple(roles)]


def _transpose_roles(eqn, invals, outs):
  return [tuple(invals[0].roles[i] for i in eqn.params['permutation'])]


def _reshape_roles(eqn, invals, outs):
  return [_merged_roles(invals[0].roles, invals[0].shape, tuple(np.shape(outs[0])))]


def _squeeze_roles(eqn, invals, outs):
  dims = set(d % len(invals[0].shape) for d in eqn.params['dimensions'])
  return [tuple(r for i, r in enumerate(invals[0].roles) if i not in dims)]


def reduced_roles(eqn, invals, outs):
  """Roles after a reduction over `axes`: the reduced axes are gone."""
  axes = set(eqn.params['axes'])
  return [tuple(r for i, r in enumerate(invals[0].roles) if i not in axes)]


def resized_roles(eqn, invals, outs):
  """Roles after padding, slicing, concatenation or reversal: axes keep their
  identity when their size changes; the batch axis only while it is whole."""
  v, out = invals[0], np.shape(outs[0])
  return [tuple(None if (r == 'b' and v.shape[i] != out[i]) else r
                for i, r in enumerate(v.roles))]


# Reductions with no kernel rule still fold constants (`jnp.max(x)` of an input).
for _prim in (P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p, P.argmax_p, P.argmin_p,
              P.reduce_and_p, P.reduce_or_p):
  register_primitive(_prim, family='reduction', det_roles=reduced_roles)
del _prim


# ----------------------------------------------------------------------------
# Parameter views and wide values.


def _param_reshape(p: A.ParamRef, new):
  amap = _reshape_axis_map(p.shape, new)
  axes = tuple(p.axes[i] if i is not None else (None if n == 1 else ('reshaped', j))
               for j, (i, n) in enumerate(zip(amap, new)))
  if new and all(a is None for a in axes) and any(a is not None for a in p.axes):
    # Only size-1 axes on both sides (a bias of one channel): keep the leaf's
    # last axis as the view's last axis (channels last).
    axes = axes[:-1] + ([a for a in p.axes if a is not None][-1],)
  return dataclasses.replace(p, shape=tuple(new), axes=axes)


@register(P.broadcast_in_dim_p, family='structural', det_roles=_broadcast_roles,
          structured='permutation')
def broadcast_in_dim_rule(ctx, operand, *dyn, shape, broadcast_dimensions, **_):
  shape = tuple(shape)
  if isinstance(operand, A.ParamRef):
    axes = [None] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
      axes[d] = operand.axes[i]
    return dataclasses.replace(operand, shape=shape, axes=tuple(axes))
  roles = [None] * len(shape)
  for i, d in enumerate(broadcast_dimensions):
    roles[d] = operand.roles[i]
  for d, n in enumerate(shape):
    if roles[d] is None and n != 1:
      raise UnsupportedValueError(
          f'a wide value is broadcast along a new axis of size {n}; copies of one '
          'wide value along an axis are not supported yet.')
  return relayout(operand, tuple(roles), shape)


@register(P.reshape_p, family='structural', det_roles=_reshape_roles,
          structured='permutation', accepts=(A.ChannelConcat,))
def reshape_rule(ctx, operand, *dyn, new_sizes, dimensions=None, **_):
  new = tuple(new_sizes)
  if isinstance(operand, A.ParamRef):
    return _param_reshape(operand, new)
  if isinstance(operand, A.ChannelConcat):
    return _reshape_concat(operand, new)
  return _reshape_wide(operand, new)


def _reshape_concat(operand: A.ChannelConcat, new) -> A.ChannelConcat:
  """A Flatten of values concatenated along their channel axis: each block
  flattened alone (a readout sums over all flattened channels, so their
  order does not matter; the blocks keep their channel counts)."""
  if any(isinstance(p, A.DetChannels) for p in operand.parts):
    raise UnsupportedValueError('a reshape of an array concatenated with wide values along '
                                'their channel axis is not supported yet')
  groups = _reshape_groups(operand.shape, new)
  axis = operand.channel_axis
  j = next((j for j, g in enumerate(groups) if g is not None and axis in g), None)
  if j is None:
    raise UnsupportedValueError('a reshape of a value concatenated along its channel axis '
                                'other than a Flatten')
  parts = []
  for part in operand.parts:
    shape = list(new)
    shape[j] = new[j] // operand.width * part.width
    parts.append(_reshape_wide(part, tuple(shape)))
  if any(p.roles != parts[0].roles or p.hidden != parts[0].hidden for p in parts):
    raise UnsupportedValueError('a reshape of a value concatenated along its channel axis '
                                'that splits its blocks differently')
  return A.ChannelConcat(tuple(new), parts[0].roles, (), None, parts[0].hidden,
                         parts=tuple(parts))


def _reshape_wide(operand: A.Wide, new) -> A.Wide:
  split = _channel_split(operand, new)
  if split is not None:
    return relayout(operand, split, new)
  groups = _reshape_groups(operand.shape, new)
  roles, hidden = [], list(operand.hidden)
  # A single channel (a 1-channel convolution) merged with spatial axes: the
  # merged axis is the channel axis of the flattened value.
  trivial_channel = operand.roles.count('c') == 1 and operand.width == 1
  for j, group in enumerate(groups):
    kinds = [operand.roles[i] for i in group] if group is not None else None
    if new[j] == 1:
      roles.append(None)
    elif group is not None and len(group) == 1:
      roles.append(operand.roles[group[0]])
    elif group is not None and 'b' not in kinds and (
        'c' in kinds or (trivial_channel and 'c' not in roles and None not in kinds)):
      # Flatten: spatial axes merged into the channel axis become hidden.
      roles.append('c')
      hidden += [(operand.roles[i], operand.shape[i]) for i in group
                 if operand.roles[i] not in ('c', None)]
    else:
      raise UnsupportedValueError(
          f'reshape of a wide value from {operand.shape} to {new} splits its channel '
          'axis or merges the batch axis with others; only merging spatial axes into '
          'the channel axis (Flatten) is supported.')
  if 'c' not in roles:
    raise InternalError('reshape dropped the channel axis')
  return relayout(operand, tuple(roles), new, hidden)


def _channel_split(operand, new):
  """Roles after a reshape that splits channel axes into several (`(B, H·D)` →
  `(B, H, D)`, heads) and keeps every other axis: all parts are channel axes,
  since the entries are i.i.d. over all of them. None for any other reshape."""
  old = [(n, r) for n, r in zip(operand.shape, operand.roles) if n != 1]
  if operand.hidden:
    return None
  roles, i, j = [], 0, 0
  sizes = new
  while j < len(sizes):
    if sizes[j] == 1:
      roles.append(None)
      j += 1
      continue
    if i >= len(old):
      return None
    n, r = old[i]
    if sizes[j] == n:
      roles.append(r)
      i, j = i + 1, j + 1
      continue
    if r != 'c':
      return None
    prod, k = 1, j
    while k < len(sizes) and prod < n:
      prod *= sizes[k]
      k += 1
    if prod != n:
      return None
    roles += ['c' if sizes[m] != 1 else None for m in range(j, k)]
    i, j = i + 1, k
  if i != len(old) or roles.count('c') <= operand.roles.count('c'):
    return None
  return tuple(roles)


def _reshape_groups(old, new):
  """For each new axis, the old axes (size > 1) merged into it, or None for a split."""
  groups = [[] for _ in new]
  i = j = 0
  while j < len(new):
    if new[j] == 1:
      j += 1
      continue
    while i < len(old) and old[i] == 1:
      i += 1
    prod, members = 1, []
    while i < len(old) and prod < new[j]:
      if old[i] != 1:
        members.append(i)
      prod *= old[i]
      i += 1
    groups[j] = members if prod == new[j] else None
    if prod != new[j]:
      return [None] * len(new)
    j += 1
  return groups


@register(P.transpose_p, family='structural', det_roles=_transpose_roles,
          structured='permutation')
def transpose_rule(ctx, operand, *, permutation, **_):
  perm = tuple(permutation)
  shape = tuple(operand.shape[i] for i in perm)
  if isinstance(operand, A.ParamRef):
    return dataclasses.replace(operand, shape=shape, axes=tuple(operand.axes[i] for i in perm))
  return relayout(operand, tuple(operand.roles[i] for i in perm), shape)


@register(P.squeeze_p, family='structural', det_roles=_squeeze_roles,
          structured='permutation')
def squeeze_rule(ctx, operand, *, dimensions, **_):
  dims = set(d % len(operand.shape) for d in dimensions)
  shape = tuple(n for i, n in enumerate(operand.shape) if i not in dims)
  if isinstance(operand, A.ParamRef):
    return dataclasses.replace(operand, shape=shape,
                               axes=tuple(a for i, a in enumerate(operand.axes) if i not in dims))
  roles = tuple(r for i, r in enumerate(operand.roles) if i not in dims)
  return relayout(operand, roles, shape)
