"""`jnp.stack` of wide values: a new spatial axis whose positions are the
stacked values (per-step outputs of a recurrent network kept as a sequence).

Position `t` of the result is value `t`, so the second moments between
positions `t` and `t′` are those of values `t` and `t′`: each value is
broadcast along the new axis and multiplied by the indicator of its
position, and the values are summed. Gaussian values merge into one
combination (their sources with one-hot coefficients, so a source shared by
several positions, such as a readout bias, is one random variable); other
terms keep their chains, with the indicator as one more argument.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from infwidth.domain import values as A
from infwidth.rules.registry import register
from infwidth.rules.wide_ops import add_wides, map_terms_scale, relayout

try:  # `stack` is a primitive of its own in recent JAX
  from jax._src.lax.lax import stack_p
except ImportError:  # pragma: no cover - older JAX lowers jnp.stack to concatenate
  stack_p = None


def stack_role(roles: Tuple[Any, ...], axis: int, size: int) -> str:
  """The role id of a new stacked axis: the same for stacks of the same size
  at the same place (positions align), distinct from the existing roles."""
  role = f'stack{axis}:{size}'
  while role in roles:
    role += "'"
  return role


def _stacked_roles(eqn, invals, outs):
  """Roles of a constant-folded stack: the operands' roles and the new axis."""
  roles = tuple(invals[0].roles)
  axis = eqn.params['axis']
  return [roles[:axis] + (stack_role(roles, axis, len(invals)),) + roles[axis:]]


def stack_rule(ctx, *operands, axis, **_):
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  if not all(isinstance(v, A.Wide) for v in operands):
    raise ctx.unsupported('stacking wide values with deterministic values or parameters')
  if any(isinstance(v, A.ChannelConcat) or v.hidden for v in operands):
    raise ctx.unsupported('stacking values concatenated along their channel axis or flattened')
  roles = tuple(operands[0].roles)
  if any(tuple(v.roles) != roles for v in operands):
    raise ctx.unsupported('stacking wide values with different layouts')
  size = len(operands)
  role = stack_role(roles, axis, size)
  new_roles = roles[:axis] + (role,) + roles[axis:]
  spatial = tuple(r for r in new_roles if r not in ('b', 'c', None))
  where = (1,) + tuple(size if r == role else 1 for r in spatial)
  total = None
  for t, v in enumerate(operands):
    indicator = np.zeros(size, ctx.moments.dtype)
    indicator[t] = 1.0
    part = map_terms_scale(relayout(v, new_roles, out_shape), indicator.reshape(where))
    total = part if total is None else add_wides(total, part)
  return total


if stack_p is not None:
  register(stack_p, family='spatial', det_roles=_stacked_roles)(stack_rule)
