"""Convolutions with a parameter filter and pooling (DESIGN §2 kinds 1 and 3, §5).

A convolution `z_o = c Σ_t Σ_i y_{o·s + t·d - p, i} W_{t, i}` with i.i.d.
filter entries of variance `v` has

    E[z_o z'_o'] = c² v Σ_t Σ_i E[y_{o·s+t·d-p, i} y'_{o'·s+t·d-p, i}]
                 = c² v n Σ_t K_y(o·s + t·d - p, o'·s + t·d - p),

a *joint* window sum over the two copies of each spatial axis (zero outside
the input, as the padding is), applied one spatial dimension at a time
(separable, as the filter's i.i.d. entries make it). Pooling is a linear map
`P` of each copy separately: `K ↦ P K Pᵀ`.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain import moments as M
from infwidth.domain.errors import UnsupportedValueError
from infwidth.domain.chain import Chain
from infwidth.rules.registry import register
from infwidth.rules.wide_ops import check_whole_use



def grid_role(role, size_in: int, size_out: int) -> str:
  """The role of a spatial axis mapped from `role` (size_in) to size_out."""
  return role if size_in == size_out else f'{role}/{size_out}'


def _window_axes(x, axes, window, stride, dilation, pad, base_dilation, out_size):
  """`Σ_t x[o·s + t·d - p]` along each axis in `axes` jointly (same o, t on all)."""
  if len(axes) == 1 and base_dilation == 1 and min(pad) >= 0:
    # One copy (pixel-diagonal blocks): a plain window sum. One reduce_window
    # instead of a pad, `window` slices and adds: XLA:CPU fuses chains of
    # slices of padded values across layers and recomputes them, which made
    # deep networks' run time grow quadratically with depth.
    ax = axes[0]
    dims, strides, dil, pads = [1] * x.ndim, [1] * x.ndim, [1] * x.ndim, [(0, 0)] * x.ndim
    dims[ax], strides[ax], dil[ax], pads[ax] = window, stride, dilation, tuple(pad)
    out = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, strides, pads,
                            window_dilation=dil)
    return out if out.shape[ax] == out_size else lax.slice_in_dim(out, 0, out_size, axis=ax)
  cfg = [(0, 0, 0)] * x.ndim
  for ax in axes:
    cfg[ax] = (pad[0], pad[1], base_dilation - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  out = 0.
  for t in range(window):
    start = [0] * x.ndim
    limit = list(x.shape)
    strides = [1] * x.ndim
    for ax in axes:
      start[ax] = t * dilation
      limit[ax] = t * dilation + stride * (out_size - 1) + 1
      strides[ax] = stride
    out = out + lax.slice(x, start, limit, strides)
  return out


@register(P.conv_general_dilated_p, family='linear', accepts=(A.ChannelConcat,),
          structured='conv')
def conv_rule(ctx, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count=1, batch_group_count=1, **_):
  if not isinstance(rhs, A.ParamRef) or isinstance(lhs, A.ParamRef):
    raise ctx.unsupported('a convolution whose filter is not a parameter')
  if feature_group_count != 1 or batch_group_count != 1:
    raise ctx.unsupported('grouped or depthwise convolution (feature_group_count != 1) '
                          'is not supported yet')
  lspec, rspec, ospec = dimension_numbers
  k = len(lspec) - 2
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  windows = [rhs.shape[rspec[2 + j]] for j in range(k)]
  out_sizes = [out_shape[ospec[2 + j]] for j in range(k)]
  in_roles = [lhs.roles[lspec[2 + j]] for j in range(k)]
  if lhs.roles[lspec[0]] != 'b' and lhs.shape[lspec[0]] != 1:
    raise UnsupportedValueError('a convolution over an input whose batch axis is not its batch '
                        'dimension; put the batch axis in the batch position of '
                        'dimension_numbers.')
  # Spatial roles name grids, not operations: an output axis of the same size
  # as its input keeps the input's role, another gets `role/size`, so the
  # branches of a residual block line up position by position.
  out_spatial_roles = [grid_role(in_roles[j] if in_roles[j] is not None else f'conv-dim{j}',
                                 lhs.shape[lspec[2 + j]], out_sizes[j]) for j in range(k)]
  roles = [None] * len(out_shape)
  roles[ospec[0]] = 'b' if lhs.roles[lspec[0]] == 'b' else None
  roles[ospec[1]] = 'c'
  for j in range(k):
    roles[ospec[2 + j]] = out_spatial_roles[j]
  roles = tuple(roles)
  out_order = sorted(range(k), key=lambda j: ospec[2 + j])  # canonical output order
  spatial = tuple(out_spatial_roles[j] for j in out_order)

  if isinstance(lhs, A.Wide):
    if lhs.roles[lspec[1]] != 'c' or lhs.hidden:
      raise UnsupportedValueError('a convolution must contract the channel axis of a wide value.')
    in_order = [lhs.spatial.index(r) for r in in_roles]  # conv dim j → canonical index
    width = lhs.shape[lspec[1]]
    inputs = lhs
  else:
    v = jnp.asarray(lhs.value)
    perm = [lspec[0]] + [lspec[2 + j] for j in range(k)] + [lspec[1]]
    inputs = jnp.transpose(v, perm)  # (B, *S in conv order, C)
    in_order = list(range(k))
    width = 1

  def transform(block, lead, diag=False):
    # block: (*lead, *S_a, *S_b) in the input's canonical order → conv order;
    # in diagonal mode (*lead, *S): the joint window along one copy.
    sides = 1 if diag else 2
    perm = list(range(lead))
    for side in range(sides):
      perm += [lead + side * k + i for i in in_order]
    block = jnp.transpose(block, perm)
    for j in range(k):
      axes = tuple(lead + side * k + j for side in range(sides))
      block = _window_axes(block, axes, windows[j], window_strides[j], rhs_dilation[j],
                           padding[j], lhs_dilation[j], out_sizes[j])
    perm = list(range(lead))
    for side in range(sides):
      perm += [lead + side * k + j for j in out_order]
    return jnp.transpose(block, perm)

  key = ('conv-source', id(rhs.leaf), id(lhs), rhs.axes, rhs.scale, tuple(window_strides),
         tuple(map(tuple, padding)), tuple(lhs_dilation), tuple(rhs_dilation), tuple(lspec),
         tuple(rspec), tuple(ospec))
  src = ctx.moments.sources.get(key)
  if src is None:
    check_whole_use(ctx, rhs)
    if isinstance(lhs, A.Wide):
      src = A.LinearSource(rhs, inputs, spatial, width=width, transform=transform)
    else:
      src = A.LinearSource(rhs, inputs, spatial, width=1, transform=transform,
                           input_moment=_conv_input_moment(k))
    ctx.moments.sources[key] = src
    ctx.moments.keep_alive.append(lhs)
  return A.Wide(out_shape, roles, (A.Term(Chain(), A.combo_of(src, spatial)),))


_INPUT_MOMENTS = {}


def _conv_input_moment(k: int):
  """The input moment of a `k`-dimensional convolution of the input (one
  function per `k`, so that two uses of one filter can be paired)."""
  if k not in _INPUT_MOMENTS:
    _INPUT_MOMENTS[k] = lambda m, xa, xb: det_conv_moment(m, xa, xb, k)
  return _INPUT_MOMENTS[k]


def det_conv_moment(m: M.Moments, xa, xb, k) -> A.PairStats:
  """Σ_c x_{s,c} x'_{s',c} for `(B, *S, C)` inputs: full `(N1, N2, *S, *S)` blocks."""
  la, lb = 'abcdefgh'[:k], ('abcdefgh'[:k] if m.diag else 'ijklmnop'[:k])
  out = la if m.diag else la + lb
  cross = jnp.einsum(f'x{la}q,y{lb}q->xy{out}', m.rows(xa), m.cols(xb))
  if m.x1_is_x2 and xa is xb:
    d = A.batch_diagonal(cross)
    return A.PairStats(cross, d, d)
  d1 = jnp.einsum(f'x{la}q,x{lb}q->x{out}', m.rows(xa), m.rows(xb))
  d2 = jnp.einsum(f'x{la}q,x{lb}q->x{out}', m.cols(xa), m.cols(xb))
  return A.PairStats(cross, d1, d2)

