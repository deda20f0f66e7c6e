"""The `Kernel` pytree: what a kernel function returns with `get=None`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax


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


_NAMEDTUPLES = {}


def kernel_namedtuple(fields: Tuple[str, ...]):
  """The namedtuple type returned for `get=fields` (cached: one type per tuple)."""
  import collections
  if fields not in _NAMEDTUPLES:
    _NAMEDTUPLES[fields] = collections.namedtuple('Kernel_' + '_'.join(fields), fields)
  return _NAMEDTUPLES[fields]
