"""Linear maps with fresh Gaussian weights (DESIGN §2, kind 1): `dot_general`
with a parameter operand creates a new Gaussian source."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.errors import UnsupportedValueError
from infwidth.domain.chain import Chain
from infwidth.rules.registry import register


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
  (lc, rc), (lb, rb) = dimension_numbers
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
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
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
    src = A.LinearSource(p, x, spatial, width=n, traced=traced)
  else:
    if 'b' in [x.roles[i] for i in xc]:
      raise UnsupportedValueError('a weight contracts the batch axis of the input: the inputs '
                          'must have their batch axis first and it must not be summed.')
    v = jnp.asarray(x.value)
    b_axes = [i for i in x_free if x.roles[i] == 'b']
    s_axes = [i for i in x_free if x.roles[i] not in ('b', None)]
    drop = [i for i in x_free if x.roles[i] is None]
    if any(x.shape[i] != 1 for i in drop):
      raise UnsupportedValueError(
          f'cannot tell which axis of an input of shape {x.shape} is the batch axis; '
          'the inputs must have their batch axis first.')
    v = jnp.transpose(v, b_axes + s_axes + list(xc) + drop)
    v = v.reshape(v.shape[:len(b_axes) + len(s_axes) + len(xc)])
    if not b_axes:
      v = v[None]
    src = A.LinearSource(p, v, spatial)
  src.contracted_leaf_axes = contracted_leaf_axes
  ctx.moments.sources[key] = src
  ctx.moments.keep_alive.append(x)
  return A.Wide(out_shape, roles, (A.Term(Chain(), A.combo_of(src, spatial)),))
