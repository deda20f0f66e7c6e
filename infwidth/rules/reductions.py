"""Reductions of wide values (DESIGN §2, "Reductions over a wide axis").

A sum over the `n` i.i.d. channels is `n·E[v] + O(√n)` fluctuations: the
deterministic part is kept (so `jnp.mean` over features, as in LayerNorm and
RMSNorm, gives the exact per-input statistic); what the fluctuation would
contribute vanishes after the network's own `1/n`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend.core import primitives as P

from infwidth import algebra as A
from infwidth.errors import InfwidthError
from infwidth.rules.registry import register
from infwidth.rules.values import Det, canonical_to_value


@register(P.reduce_sum_p)
def reduce_sum_rule(ctx, operand, *, axes, **_):
  axes = tuple(a % len(operand.shape) for a in axes)
  if isinstance(operand, A.ParamRef):
    raise ctx.unsupported('a sum over the entries of a parameter')
  big = [a for a in axes if operand.shape[a] != 1]
  kinds = [operand.roles[a] for a in big]
  if kinds and all(k not in ('b', 'c', None) for k in kinds):
    from infwidth.rules.spatial import spatial_sum
    return spatial_sum(ctx, operand, axes)
  if kinds != ['c'] or operand.hidden:
    raise ctx.unsupported(f'a sum over axes with roles {kinds} of a wide value '
                          '(sums over spatial or batch axes are not supported yet)')
  m = ctx.moments
  first = m.joint(m.wide_first_moment(operand, 'rows'), m.wide_first_moment(operand, 'cols'))
  n = operand.shape[big[0]]
  out_roles = tuple(r for i, r in enumerate(operand.roles) if i not in axes)
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  canonical = operand.canonical_shape(out_shape[out_roles.index('b')] if 'b' in out_roles else 1)
  first = jnp.broadcast_to(jnp.asarray(first, m.dtype), canonical)
  return Det(canonical_to_value(n * first, out_roles, out_shape), out_roles)
