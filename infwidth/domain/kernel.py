"""The `Kernel` pytree: what a kernel function returns with `get=None`."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _static(default):
  return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Kernel:
  """NNGP and NTK of a function at two batches of inputs, with NT's fields.

  The fields, their order and their meaning are those of Neural Tangents'
  `Kernel`, so that `Kernel(...)` and `get=` accept the same names.

  Array fields (`None` where not computed):
    nngp: `(N1, N2, *S)`, second moment `E[f(x1) f(x2)]` per output channel.
      `S` is empty for outputs without spatial axes; otherwise it holds each
      spatial axis twice, interleaved as in Neural Tangents
      (`(N1, N2, H, H', W, W')`), or once with `diagonal_spatial=True`.
    ntk: same shape as `nngp`.
    cov1: per-input second moments of the first batch: `(N1, *S)`, or
      `(N1, N1, *S)` with `diagonal_batch=False`.
    cov2: the same for the second batch (`None` when `x1_is_x2`).
    mask1, mask2: NT's input masks (masking is not supported: always `None`
      in kernels computed by infwidth).

  Static fields:
    x1_is_x2: the second batch is the first.
    is_gaussian: the output channels are i.i.d. Gaussian with covariance
      `nngp` given the inputs (the output of a linear map with fresh weights,
      a sum or pooling of such), not a nonlinearity of them.
    is_reversed: spatial axes stored in reverse order (NT's internal layout;
      always `False` in kernels computed by infwidth).
    is_input: the kernel of the inputs themselves (NT's marker).
    diagonal_batch: `cov1`/`cov2` hold only same-input entries.
    diagonal_spatial: spatial axes appear once (only same-position entries).
    shape1, shape2: the output shapes of the function on the two batches.
    batch_axis, channel_axis: where the batch and channel axes are in the
      output of the function.
  """

  nngp: Optional[jax.Array]
  ntk: Optional[jax.Array] = None
  cov1: Optional[jax.Array] = None
  cov2: Optional[jax.Array] = None
  x1_is_x2: bool = _static(False)
  is_gaussian: bool = _static(False)
  is_reversed: bool = _static(False)
  is_input: bool = _static(False)
  diagonal_batch: bool = _static(True)
  diagonal_spatial: bool = _static(False)
  shape1: Tuple[int, ...] = _static(())
  shape2: Tuple[int, ...] = _static(())
  batch_axis: int = _static(0)
  channel_axis: int = _static(-1)
  mask1: Optional[jax.Array] = None
  mask2: Optional[jax.Array] = None

  def __post_init__(self):
    # Static fields must be hashable: NT passes `x1_is_x2` as a 0-d array and
    # shapes as lists. Tracers and placeholders (pytree unflattening) pass through.
    if isinstance(self.x1_is_x2, (np.ndarray, np.bool_, jax.Array)) and not isinstance(
        self.x1_is_x2, jax.core.Tracer):
      object.__setattr__(self, 'x1_is_x2', bool(self.x1_is_x2))
    for name in ('shape1', 'shape2'):
      s = getattr(self, name)
      if isinstance(s, list):
        object.__setattr__(self, name, tuple(int(d) for d in s))

  def replace(self, **changes: Any) -> "Kernel":
    return dataclasses.replace(self, **changes)

  def asdict(self) -> dict:
    """The fields as a dict (NT's `Kernel.asdict`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def astuple(self) -> tuple:
    """The fields as a tuple in declaration order (NT's `Kernel.astuple`)."""
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

  def get(self, get):
    """Returns one field (`'nngp'`, `'ntk'`, ...) or a namedtuple of several."""
    if isinstance(get, str):
      return getattr(self, get)
    return kernel_namedtuple(tuple(get))(*(getattr(self, g) for g in get))


#: Every field name `get` accepts, in NT's order.
FIELDS = tuple(f.name for f in dataclasses.fields(Kernel))

def build_kernel(nngp, ntk, cov1, cov2, *, shape1: Tuple[int, ...], shape2: Tuple[int, ...],
                 x1_is_x2: bool, spatial_shape: Tuple[int, ...] = (), batch_axis: int = 0,
                 channel_axis: int = -1, is_gaussian: bool = False, dtype=None) -> Kernel:
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
    is_gaussian: the output channels are i.i.d. Gaussian (NT's field).
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
                batch_axis=batch_axis % len(shape1), channel_axis=channel_axis % len(shape1),
                is_gaussian=is_gaussian)


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
  if fields not in _NAMEDTUPLES:
    _NAMEDTUPLES[fields] = collections.namedtuple('Kernel_' + '_'.join(fields), fields)
  return _NAMEDTUPLES[fields]
