"""Linear maps with fresh Gaussian weights (DESIGN §2, kind 1): `dot_general`
with a parameter operand creates a new Gaussian source."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.errors import InternalError, UnsupportedValueError
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
  # The channel axis: the free weight axis that comes from the leaf (a size-1
  # output axis is a valid single channel); other free axes must be trivial.
  from_leaf = [i for i in p_free if p.axes[i] is not None]
  big = [i for i in from_leaf if p.shape[i] != 1] or from_leaf
  explicit = getattr(p.leaf, 'wide_axes', None)
  if explicit is not None:
    big = [i for i in from_leaf if p.axes[i] in explicit]
  if len(big) != 1 or any(p.shape[i] != 1 for i in p_free if i not in big):
    raise UnsupportedValueError(
        f'parameter {p.leaf.name!r} of shape {p.leaf.shape} keeps {len(big)} candidate '
        'output-feature (channel) axes after its contraction; a weight must have exactly '
        'one, every other free axis of size 1. Split fused weights, or say which axis is '
        "wide: kernelize(..., wide_axes=<pytree like params, e.g. {'W': (1,)}>).")
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
    if [x.roles[i] for i in xc_big] != ['c']:
      raise UnsupportedValueError(
          f'a weight contracts axes {[x.roles[i] for i in xc_big]} of a wide value; '
          'only a contraction over its channel axis alone is supported (a readout after '
          'flattening spatial and channel axes together is not supported yet).')
    if 'c' in x_roles:
      raise InternalError('channel axis survived its contraction')
    # After a Flatten the contracted axis also runs over the hidden spatial
    # positions: Σ_{s,i} y_si y'_si = n·Σ_s E[y_s y'_s] (a trace over s).
    n = x.shape[xc_big[0]] // int(np.prod([size for _, size in x.hidden], dtype=int))
    src = A.LinearSource(p, x, spatial, width=n, traced=tuple(r for r, _ in x.hidden))
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
