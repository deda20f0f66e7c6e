"""Gaussian expectations as the interpreter needs them.

`expect_pair` and `expect_single` take `Chain`s (closed forms where
recognised, quadrature otherwise; see `infwidth.domain.gaussian`).
`expect_pair_fn` takes arbitrary callables and always integrates numerically:
the interpreter uses it for derivatives with respect to chain arguments
(the NTK terms of a LayerNorm scale inside a nonlinearity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain import gaussian
from infwidth.domain.chain import Chain

_DEGREE = 48


def _nodes(degree, dtype):
  # Probabilists' Gauss–Hermite: ∫ f(z) N(z; 0, 1) dz ≈ Σ w_i f(z_i).
  z, w = np.polynomial.hermite_e.hermegauss(degree)
  return jnp.asarray(z, dtype), jnp.asarray(w / np.sqrt(2 * np.pi), dtype)


def expect_pair_fn(f, f_args, g, g_args, mean1, mean2, var1, var2, cov, degree=_DEGREE):
  """`E[f(u, *f_args) g(v, *g_args)]` for jointly Gaussian `(u, v)`, by quadrature.

  All array arguments broadcast to one output shape. Loops over the nodes of
  the first variable so memory stays `O(output · degree)`.
  """
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (mean1, mean2, var1, var2, cov)),
                               *(jnp.shape(a) for a in f_args), *(jnp.shape(a) for a in g_args))
  dtype = jnp.result_type(*(a for a in (var1, var2, cov) if not isinstance(a, float)), jnp.float32)
  z, w = _nodes(degree, dtype)
  s1 = jnp.sqrt(jnp.maximum(var1, 0.))
  s2 = jnp.sqrt(jnp.maximum(var2, 0.))
  denom = s1 * s2
  rho = jnp.where(denom > 0, cov / jnp.where(denom > 0, denom, 1.), 0.)
  rho = jnp.clip(rho, -1., 1.)
  rest = jnp.sqrt(jnp.maximum(1. - rho ** 2, 0.))
  gz = z.reshape((-1,) + (1,) * len(shape))

  def body(i, acc):
    u = mean1 + s1 * z[i]
    fu = f(jnp.broadcast_to(u, shape), *f_args)
    v = mean2 + s2 * (rho * z[i] + rest * gz)  # (deg, *shape)
    gv = g(v, *(jnp.broadcast_to(a, shape) for a in g_args))
    return acc + w[i] * fu * jnp.tensordot(w, gv, axes=1)

  return jax.lax.fori_loop(0, degree, body, jnp.zeros(shape, dtype))


def expect_single_fn(f, f_args, mean, var, degree=_DEGREE):
  """`E[f(u, *f_args)]` for `u ~ N(mean, var)`, by quadrature."""
  shape = jnp.broadcast_shapes(jnp.shape(mean), jnp.shape(var), *(jnp.shape(a) for a in f_args))
  dtype = jnp.result_type(*(a for a in (mean, var) if not isinstance(a, float)), jnp.float32)
  z, w = _nodes(degree, dtype)
  s = jnp.sqrt(jnp.maximum(var, 0.))
  u = mean + s * z.reshape((-1,) + (1,) * len(shape))
  return jnp.tensordot(w, f(u, *(jnp.broadcast_to(a, shape) for a in f_args)), axes=1)


def expect_pair(f: Chain, f_args, g: Chain, g_args, mean1, mean2, var1, var2, cov, *, ntk=True):
  """`(E[f g], E[f' g'] or None)`: closed forms where recognised, else quadrature."""
  return gaussian.expect_pair(f, f_args, g, g_args, mean1, mean2, var1, var2, cov, ntk=ntk)


def expect_single(f: Chain, f_args, mean, var):
  """`E[f(u)]` for `u ~ N(mean, var)`."""
  return gaussian.expect_single(f, f_args, mean, var)


#: Gauss–Hermite nodes per dimension for a joint expectation over K Gaussians
#: (the grid has degree**K nodes per kernel entry).
MULTI_DEGREE = {1: 48, 2: 32, 3: 16, 4: 10, 5: 7, 6: 6}
#: The most Gaussians a joint expectation integrates over (both sides together).
MULTI_MAX = max(MULTI_DEGREE)


def expect_multi(f, f_args, ka: int, g, g_args, means, cov, degree=None):
  """`E[f(z₀, …, z_{ka−1}, *f_args) · g(z_ka, …, z_{K−1}, *g_args)]` for jointly
  Gaussian `z` with `means[i]` and covariances `cov[i][j]` (K = len(means)), by
  a tensor Gauss–Hermite rule on `z = μ + S ξ`, `S Sᵀ = Σ` from the
  eigendecomposition (exact for singular Σ, e.g. `z₁ = z₀`). `g=None` is the
  constant 1 (a first moment). All arrays broadcast to one output shape.

  The first K − r coordinates of ξ are looped over, the last r (≤ 2) are
  vectorised: memory `O(output · degree^r)`.
  """
  k = len(means)
  entries = list(means) + [c for row in cov for c in row] + list(f_args) + list(g_args or ())
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in entries))
  dtype = jnp.result_type(*(a for a in entries if not isinstance(a, float)), jnp.float32)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(float)
  degree = degree or MULTI_DEGREE[k]
  z, w = _nodes(degree, dtype)
  sigma = jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(c, dtype), shape) for c in row], -1)
                     for row in cov], -2)                         # (*shape, K, K)
  lam, vec = jnp.linalg.eigh(sigma)
  root = vec * jnp.sqrt(jnp.maximum(lam, 0.))[..., None, :]       # S, S Sᵀ = Σ
  mu = jnp.stack([jnp.broadcast_to(jnp.asarray(m, dtype), shape) for m in means], -1)
  r = min(k, 2)
  inner = np.stack(np.meshgrid(*([np.arange(degree)] * r), indexing='ij'), -1).reshape(-1, r)
  xi_in = z[inner]                                                 # (T, r)
  w_in = jnp.prod(w[inner], axis=-1)                               # (T,)
  base = mu + jnp.einsum('...kr,tr->t...k', root[..., k - r:], xi_in)  # (T, *shape, K)
  f_args = [jnp.broadcast_to(jnp.asarray(a, dtype), shape) for a in f_args]
  g_args = [jnp.broadcast_to(jnp.asarray(a, dtype), shape) for a in (g_args or ())]
  n_outer = degree ** (k - r)

  def body(i, acc):
    idx = [(i // degree ** (k - r - 1 - j)) % degree for j in range(k - r)]
    xi = jnp.stack([z[t] for t in idx]) if idx else jnp.zeros((0,), dtype)
    wi = jnp.prod(jnp.stack([w[t] for t in idx])) if idx else jnp.asarray(1., dtype)
    pts = base + jnp.einsum('...kq,q->...k', root[..., :k - r], xi)
    fa = f(*(pts[..., j] for j in range(ka)), *f_args)
    val = fa if g is None else fa * g(*(pts[..., j] for j in range(ka, k)), *g_args)
    return acc + wi * jnp.tensordot(w_in, val, axes=1)

  return jax.lax.fori_loop(0, n_outer, body, jnp.zeros(shape, dtype))
