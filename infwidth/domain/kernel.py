"""The `Kernel` pytree: what a kernel function returns with `get=None`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Kernel:
  """NNGP and NTK of a function at two batches of inputs, with NT's field names.

  Array fields (`None` where not computed):
    nngp: `(N1, N2, *S)`, second moment `E[f(x1) f(x2)]` per output channel.
      `S` is empty for outputs without spatial axes; otherwise it holds each
      spatial axis twice, interleaved as in Neural Tangents
      (`(N1, N2, H, H', W, W')`), or once with `diagonal_spatial=True`.
    ntk: same shape as `nngp`.
    cov1: `(N1, *S)` per-input second moments of the first batch.
    cov2: `(N2, *S)` the same for the second batch (`None` when `x1_is_x2`).

  Static fields:
    x1_is_x2: the second batch is the first.
    shape1, shape2: the output shapes of the function on the two batches.
    diagonal_spatial: spatial axes appear once (only same-position entries).
    batch_axis, channel_axis: where the batch and channel axes are in the
      output of the function.
  """

  nngp: Optional[jax.Array]
  ntk: Optional[jax.Array]
  cov1: Optional[jax.Array]
  cov2: Optional[jax.Array]
  x1_is_x2: bool = dataclasses.field(default=False, metadata=dict(static=True))
  shape1: Tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  shape2: Tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  diagonal_spatial: bool = dataclasses.field(default=False, metadata=dict(static=True))
  batch_axis: int = dataclasses.field(default=0, metadata=dict(static=True))
  channel_axis: int = dataclasses.field(default=-1, metadata=dict(static=True))

  def replace(self, **changes: Any) -> "Kernel":
    return dataclasses.replace(self, **changes)

  def get(self, get):
    """Returns one field (`'nngp'`, `'ntk'`, ...) or a namedtuple of several."""
    if isinstance(get, str):
      return getattr(self, get)
    return kernel_namedtuple(tuple(get))(*(getattr(self, g) for g in get))


def build_kernel(nngp, ntk, cov1, cov2, *, shape1: Tuple[int, ...], shape2: Tuple[int, ...],
                 x1_is_x2: bool, spatial_shape: Tuple[int, ...] = (), batch_axis: int = 0,
                 channel_axis: int = -1, dtype=None) -> Kernel:
  """The one constructor of a function's `Kernel`, for every path that makes one.

  Args:
    nngp, ntk: `(N1, N2, H, H', W, W', ...)` arrays in NT's layout, or scalars
      broadcast to it; `ntk` may be None.
    cov1, cov2: `(N1, H, H', ...)` and `(N2, H, H', ...)` (`cov2` is dropped
      when `x1_is_x2`).
    shape1, shape2: output shapes of the function on the two batches.
    x1_is_x2: the batches are the same inputs.
    spatial_shape: the sizes `(H, W, ...)` of the output's spatial axes.
    batch_axis, channel_axis: where they are in the function's output
      (stored as non-negative axes).
    dtype: the kernel's dtype (default: that of `nngp`).
  """
  n1, n2 = shape1[0], shape2[0]
  spatial = tuple(d for s in spatial_shape for d in (s, s))
  dtype = dtype or jnp.result_type(nngp)

  def full(x, lead):
    return None if x is None else jnp.broadcast_to(jnp.asarray(x, dtype), lead + spatial)

  return Kernel(full(nngp, (n1, n2)), full(ntk, (n1, n2)), full(cov1, (n1,)),
                None if x1_is_x2 else full(cov2, (n2,)), x1_is_x2=x1_is_x2,
                shape1=tuple(shape1), shape2=tuple(shape2),
                batch_axis=batch_axis % len(shape1), channel_axis=channel_axis % len(shape1))


def interleave(x, lead: Tuple[int, ...], spatial_shape: Tuple[int, ...], dtype):
  """A `(*lead, s1..sk, s1'..sk')` block (or a scalar broadcast to it) in NT's
  layout `(*lead, s1, s1', …, sk, sk')`."""
  k = len(spatial_shape)
  x = jnp.broadcast_to(jnp.asarray(x, dtype), tuple(lead) + tuple(spatial_shape) * 2)
  if k == 0:
    return x
  nb = len(lead)
  perm = list(range(nb))
  for i in range(k):
    perm += [nb + i, nb + k + i]
  return jnp.transpose(x, perm)


_NAMEDTUPLES = {}


def kernel_namedtuple(fields: Tuple[str, ...]):
  """The namedtuple type returned for `get=fields` (cached: one type per tuple)."""
  import collections
  if fields not in _NAMEDTUPLES:
    _NAMEDTUPLES[fields] = collections.namedtuple('Kernel_' + '_'.join(fields), fields)
  return _NAMEDTUPLES[fields]
