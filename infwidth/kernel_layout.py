"""NT's `diagonal_batch` and `diagonal_spatial` layouts of a `Kernel`.

Kernels are computed in the full layout (`cov1` per input, spatial axes in
pairs) and then reduced to the layout asked for:

* `diagonal_spatial=True`: every spatial axis appears once, only entries at
  equal positions: `nngp` `(N1, N2, H, H', W, W')` → `(N1, N2, H, W)`, `cov1`
  `(N1, H, H', W, W')` → `(N1, H, W)`.
* `diagonal_batch=False`: `cov1` and `cov2` hold the covariance of all pairs
  of inputs of one batch, `(N1, N1, *S)` and `(N2, N2, *S)`: the `nngp` of
  `(x1, x1)` and `(x2, x2)`. `nngp` and `ntk` are `(N1, N2, *S)` either way.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from infwidth.errors import InfwidthError
from infwidth.kernel import Kernel


def _is_kernel(v) -> bool:
  return isinstance(v, Kernel)


def spatial_diagonal(a: Optional[jax.Array], n_batch: int) -> Optional[jax.Array]:
  """`(*B, s1, s1', …, sk, sk')` → `(*B, s1, …, sk)` (`n_batch` leading axes)."""
  if a is None or jnp.ndim(a) <= n_batch:
    return a
  k = (jnp.ndim(a) - n_batch) // 2
  for i in range(k):
    # Axes n_batch + i (done) and n_batch + i, n_batch + i + 1 (this pair).
    a = jnp.moveaxis(jnp.diagonal(a, axis1=n_batch + i, axis2=n_batch + i + 1), -1, n_batch + i)
  return a


def batch_diagonal(a: Optional[jax.Array]) -> Optional[jax.Array]:
  """`(N, N, *S)` → `(N, *S)`: the entries of equal inputs."""
  if a is None:
    return a
  return jnp.moveaxis(jnp.diagonal(a, axis1=0, axis2=1), -1, 0)


def input_kernel(k: Kernel) -> Kernel:
  """A `Kernel` given in place of `x1`, with per-input `cov1`/`cov2`."""
  if k.diagonal_batch:
    return k
  return k.replace(cov1=batch_diagonal(k.cov1), cov2=batch_diagonal(k.cov2),
                   diagonal_batch=True)


def _same_batch(k: Kernel, cov: jax.Array, shape) -> Kernel:
  """The kernel of one batch with itself, from its full covariance `cov`."""
  return Kernel(cov, None, batch_diagonal(cov), None, x1_is_x2=True, is_gaussian=k.is_gaussian,
                shape1=shape, shape2=shape, batch_axis=k.batch_axis, channel_axis=k.channel_axis)


def with_layout(full_fn: Callable[..., Any], x1, x2, diagonal_batch: Optional[bool],
                diagonal_spatial: Optional[bool], **kwargs) -> Any:
  """`full_fn(x1, x2, None, **kwargs)` (a pytree of `Kernel`s in the full layout)
  in NT's layout for these flags (`None`: NT's default, `True` / `False`)."""
  k = full_fn(x1, x2, None, **kwargs)
  if diagonal_batch is False:
    covs = _full_batch_covs(full_fn, x1, x2, k, **kwargs)
    k = jax.tree_util.tree_map(
        lambda kk, c1, c2: kk.replace(cov1=c1, cov2=c2, diagonal_batch=False),
        k, *covs, is_leaf=_is_kernel)
  if diagonal_spatial:
    # NT keeps the flag where the inputs have no spatial axes; outputs whose
    # spatial axes were flattened or pooled away report False.
    inputs_flat = isinstance(x1, Kernel) or jnp.ndim(x1) <= 2

    def diag(kk: Kernel) -> Kernel:
      n_spatial = (jnp.ndim(kk.nngp) - 2) // 2
      if n_spatial == 0:
        return kk.replace(diagonal_spatial=inputs_flat)
      nb = 1 if kk.diagonal_batch else 2
      return kk.replace(nngp=spatial_diagonal(kk.nngp, 2), ntk=spatial_diagonal(kk.ntk, 2),
                        cov1=spatial_diagonal(kk.cov1, nb), cov2=spatial_diagonal(kk.cov2, nb),
                        diagonal_spatial=True)
    k = jax.tree_util.tree_map(diag, k, is_leaf=_is_kernel)
  return k


def _full_batch_covs(full_fn, x1, x2, k, **kwargs):
  """`(cov1, cov2)` pytrees of `(N, N, *S)` covariances within each batch."""
  none = jax.tree_util.tree_map(lambda kk: None, k, is_leaf=_is_kernel)
  if isinstance(x1, Kernel):
    if x1.x1_is_x2:
      return jax.tree_util.tree_map(lambda kk: kk.nngp, k, is_leaf=_is_kernel), none
    if x1.diagonal_batch:
      raise InfwidthError(
          'diagonal_batch=False needs the input Kernel\'s covariances of all pairs of '
          'inputs, but it has diagonal_batch=True: recompute it with diagonal_batch=False.')
    c1 = full_fn(_same_batch(x1, x1.cov1, x1.shape1), None, 'nngp', **kwargs)
    c2 = full_fn(_same_batch(x1, x1.cov2, x1.shape2), None, 'nngp', **kwargs)
    return c1, c2
  if x2 is None or x2 is x1:
    return jax.tree_util.tree_map(lambda kk: kk.nngp, k, is_leaf=_is_kernel), none
  return full_fn(x1, None, 'nngp', **kwargs), full_fn(x2, None, 'nngp', **kwargs)
