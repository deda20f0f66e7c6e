"""Reductions of wide values (DESIGN §2, "Reductions over a wide axis").

A sum over the `n` i.i.d. channels is `n·E[v] + O(√n)` fluctuations. After
the network's own `1/n` (`jnp.mean` over features, as in LayerNorm and
RMSNorm) only the deterministic per-input statistic `E[v]` remains; so the sum
is held as a `ChannelSum` until it is divided by its width. Any other use of it
(a `1/√n` scaling, where the fluctuation would survive) is reported, never
silently dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.rules.registry import register, register_value_kind
from infwidth.rules.spatial import spatial_sum
from infwidth.rules.structural import reduced_roles
from infwidth.domain.needs import Need
from infwidth.domain.values import Det
from infwidth.rules.wide_ops import canonical_to_value


def _sum_requirement(eqn, out_need: Need) -> Need:
  """A sum over the last (channel) axis is a per-input statistic of its
  operand; a sum over other axes (global pooling) mixes positions."""
  if tuple(eqn.params['axes']) == (len(eqn.invars[0].aval.shape) - 1,):
    return Need.BATCH_DIAGONAL
  return Need.FULL


@register(P.reduce_sum_p, family='reduction', det_roles=reduced_roles,
          requirement=_sum_requirement, accepts=(A.ChannelConcat,))
def reduce_sum_rule(ctx, operand, *, axes, **_):
  axes = tuple(a % len(operand.shape) for a in axes)
  if isinstance(operand, A.ParamRef):
    raise ctx.unsupported('a sum over the entries of a parameter')
  big = [a for a in axes if operand.shape[a] != 1]
  kinds = [operand.roles[a] for a in big]
  spatial_kinds = [operand.roles[a] for a in axes if operand.roles[a] is not None]
  if spatial_kinds and all(k not in ('b', 'c') for k in spatial_kinds):
    return spatial_sum(ctx, operand, axes)
  if 'c' in kinds and set(kinds) == {'c'} and kinds.count('c') < operand.roles.count('c'):
    raise ctx.unsupported('a sum over some but not all of the channel axes of a value whose '
                          'channels span several axes (e.g. over the heads of a '
                          '(heads, head_dim) projection) is not supported yet')
  spatial = [k for k in kinds if k != 'c']
  if 'c' not in kinds or 'b' in kinds or kinds.count('c') < operand.roles.count('c') or (
      operand.hidden):
    raise ctx.unsupported(f'a sum over axes with roles {kinds} of a wide value '
                          '(sums over spatial or batch axes are not supported yet)')
  # Σ over the channels (and spatial positions, LayerNorm over (H, W, C)):
  # n·Σ_s E[v_s], a per-input statistic once divided by the count n·S.
  m = ctx.moments
  first = m.joint(m.wide_first_moment(operand, 'rows'), m.wide_first_moment(operand, 'cols'))
  out_roles = tuple(r for i, r in enumerate(operand.roles) if i not in axes)
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  b = out_shape[out_roles.index('b')] if 'b' in out_roles else (
      operand.shape[operand.roles.index('b')] if 'b' in operand.roles else 1)
  first = jnp.broadcast_to(jnp.asarray(first, m.dtype), operand.canonical_shape(b))
  if spatial:
    first = jnp.sum(first, axis=tuple(1 + operand.spatial.index(r) for r in spatial))
  count = int(np.prod([operand.shape[a] for a in big if operand.roles[a] != 'c'], dtype=int))
  n = operand.width
  return ChannelSum(Det(canonical_to_value(n * first, out_roles, out_shape), out_roles),
                    n * count)


@dataclasses.dataclass(frozen=True)
class ChannelSum:
  """`Σ_i v_i` over a wide axis of width `n`: `n·E[v]` (in `total`) plus
  fluctuations of order √n that only a division by `n` makes negligible."""
  total: Det
  n: int

  @property
  def shape(self):
    return self.total.shape


@register_value_kind(ChannelSum)
def channel_sum_rule(ctx, *invals, **params):
  """Operations on a `ChannelSum`: structural ones carry it, dividing by the
  width (or multiplying by its inverse) gives the mean `E[v]`."""
  prim = ctx.eqn.primitive
  sums = [v for v in invals if isinstance(v, ChannelSum)]
  if len(sums) == 1 and prim in _CARRY:
    (s,) = sums
    folded = ctx.fold([s.total if v is s else v for v in invals])
    return ChannelSum(folded, s.n)
  if len(sums) == 1 and len(invals) == 2 and prim in (P.div_p, P.mul_p):
    s, other = (invals[0], invals[1]) if invals[0] is sums[0] else (invals[1], invals[0])
    c = _concrete_scalar(other)
    if c is not None:
      factor = c if prim is P.mul_p else (1.0 / c if invals[0] is s else None)
      if factor is not None and abs(factor * s.n - 1.0) < 1e-6:
        return ctx.fold([s.total if v is s else v for v in invals])
  raise ctx.unsupported(
      'a sum over a wide (channel) axis that is not divided by the width; only means '
      'over wide axes (jnp.mean, as in LayerNorm) have a deterministic limit, and a '
      '1/sqrt(width)-scaled sum is not supported yet')


def _concrete_scalar(v):
  if isinstance(v, Det) and np.size(v.value) == 1 and not isinstance(v.value, jax.core.Tracer):
    return float(np.asarray(v.value).reshape(()))
  return None


_CARRY = (P.broadcast_in_dim_p, P.reshape_p, P.convert_element_type_p, P.squeeze_p, P.copy_p)
