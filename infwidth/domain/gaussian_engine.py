"""Gaussian expectations as the interpreter needs them.

`expect_pair` and `expect_single` take `Chain`s (closed forms where
recognised, quadrature otherwise; see `infwidth.domain.gaussian`).
`expect_pair_fn` takes arbitrary callables and always integrates numerically:
the interpreter uses it for derivatives with respect to chain arguments
(the NTK terms of a LayerNorm scale inside a nonlinearity).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

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


# ----------------------------------------------------------------------------
# Functions of several Gaussians with no exact rule: quasi-Monte Carlo.

#: Points of the quasi-Monte Carlo rule (`expect_multi_sampled`) unless a
#: kernel function sets its own (`integration_points`).
SAMPLED_POINTS = 8192
#: Independent scramblings the points are split into: their spread gives the
#: rule's standard error.
SAMPLED_GROUPS = 8
#: Kernel entries integrated together (`expect_multi_sampled`): their roots
#: stay in cache while chunks of points pass over them.
ENTRY_BLOCK = 1024
_points_option = contextvars.ContextVar('integration_points', default=None)


@contextlib.contextmanager
def integration_points(n: Optional[int]):
  """Sets the point count of the quasi-Monte Carlo rule while tracing (None: default)."""
  token = _points_option.set(n)
  try:
    yield
  finally:
    _points_option.reset(token)


def sampled_point_count() -> int:
  return _points_option.get() or SAMPLED_POINTS


@functools.lru_cache(maxsize=64)
def normal_points(n: int, dim: int, groups: int = SAMPLED_GROUPS) -> np.ndarray:
  """`(groups, n // groups, dim)` standard normal points: scrambled Sobol
  sequences (one independent scrambling per group, fixed seeds) through the
  normal quantile. Deterministic, so kernels are reproducible."""
  from scipy.stats import qmc
  from scipy.special import ndtri
  per = max(1, n // groups)
  m = int(np.ceil(np.log2(per)))
  out = []
  for g in range(groups):
    u = qmc.Sobol(dim, scramble=True, seed=1234 + g).random_base2(m)[:per]
    out.append(ndtri(np.clip(u, 1e-12, 1 - 1e-12)))
  return np.stack(out)


def _principal_root(sigma):
  """`Σ^{1/2} = V diag(√λ) Vᵀ`, the symmetric root (unique, so a permutation
  of the variables permutes it: the rule is symmetric under exchanging the
  two sides where the points are)."""
  lam, vec = jnp.linalg.eigh(sigma)
  return jnp.einsum('...ik,...k,...jk->...ij', vec, jnp.sqrt(jnp.maximum(lam, 0.)), vec)


def expect_multi_sampled(f, f_args, ka: int, g, g_args, means, cov, *, n_diff_a: int = 0,
                         n_diff_b: int = 0, theta=(), n_points=None, groups: bool = False):
  """`E[f(z_a, *f_args) g(z_b, *g_args)]` for jointly Gaussian `z = (z_a, z_b)`
  (`ka` = len(z_a); `means[i]`, `cov[i][j]` as in `expect_multi`) by a
  quasi-Monte Carlo rule: `z = μ + Σ^{1/2} ξ` over fixed scrambled Sobol
  normal points `ξ`. With `theta`, a list of `(i, j, Θ_ij)`, also
  `Σ_ij E[∂_i f ∂_j g] Θ_ij`, where `i < ka + n_diff_a` indexes `z_a` then the
  first `n_diff_a` of `f_args` (likewise `j` for `g`): the NTK of the pair.
  `g=None` is the constant 1.

  Returns `(second, ntk or None)`; with `groups=True` each has a leading axis
  of `SAMPLED_GROUPS` independent estimates (their mean is the estimate, their
  spread its standard error). The points are looped over in chunks so memory
  stays `O(output · K · chunk)`.
  """
  k = len(means)
  entries = list(means) + [c for row in cov for c in row] + list(f_args) + list(g_args or ())
  entries += [t for _, _, t in theta]
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in entries))
  dtype = jnp.result_type(*(a for a in entries if not isinstance(a, float)), jnp.float32)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(float)
  n = n_points or sampled_point_count()
  if g is not None and 2 * ka == k:
    # Both halves of every point set, exchanged too: the estimate is exactly
    # symmetric under exchanging the two sides (the kernel's symmetry).
    half = normal_points(max(1, n // 2), k)
    pts = np.concatenate([half, np.roll(half, ka, axis=-1)], axis=1)
  else:
    pts = normal_points(n, k)                                       # (G, P, K)
  n_groups, per = pts.shape[:2]
  size = max(1, int(np.prod(shape, dtype=np.int64)))
  # Entries are taken in blocks, and each block's points in chunks: the roots
  # of a block (block·K² numbers) are read once per chunk of points, so that
  # chunks of many points keep the transform compute-bound.
  block = min(size, ENTRY_BLOCK)
  n_blocks = -(-size // block)
  chunk = int(max(1, min(per, 2 ** 22 // (block * (k + 2)))))
  while per % chunk:
    chunk -= 1
  pts = jnp.asarray(pts.reshape(n_groups, per // chunk, chunk, k), dtype)
  # The entries are flattened to one axis: a kernel block with several
  # spatial axes on each side would otherwise make tensors of rank 8 and more
  # (entries, points, K), beyond what XLA:CPU's fusions take.
  flat = (size,)
  cast = lambda a: jnp.reshape(jnp.broadcast_to(jnp.asarray(a, dtype), shape), flat)
  sigma = jnp.stack([jnp.stack([cast(c) for c in row], -1) for row in cov], -2)  # (E, K, K)
  root = _principal_root(sigma)
  mu = jnp.stack([cast(m) for m in means], -1)
  f_args = [cast(a) for a in f_args]
  g_args = [cast(a) for a in (g_args or ())]
  theta_idx = [(i, j) for i, j, _ in theta]
  theta_val = [cast(t) for _, _, t in theta]

  def blocked(a):                                                   # (E, …) → (blocks, block, …)
    pad = n_blocks * block - size
    if pad:
      a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])])
    return a.reshape((n_blocks, block) + a.shape[1:])

  def values_and_partials(fn, zs, args, n_diff):
    lead = jnp.broadcast_shapes(*(jnp.shape(z) for z in zs))
    args = [jnp.broadcast_to(a, lead) for a in args]
    if not theta_idx:
      return fn(*zs, *args), None
    ins = list(zs) + args[:n_diff]
    call = lambda *xs: fn(*xs[:len(zs)], *xs[len(zs):], *args[n_diff:])
    val, pull = jax.vjp(call, *ins)
    return val, pull(jnp.ones_like(val))

  def one_block(data):
    root_b, mu_b, fa_args, ga_args, th = data

    def chunk_sums(xi):                                             # xi: (C, K)
      z = mu_b + jnp.einsum('ekq,cq->cek', root_b, xi)              # (C, block, K)
      fa, da = values_and_partials(f, [z[..., i] for i in range(ka)], fa_args, n_diff_a)
      if g is None:
        return jnp.sum(fa, 0), None
      gb, db = values_and_partials(g, [z[..., i] for i in range(ka, k)], ga_args, n_diff_b)
      second = jnp.sum(fa * gb, 0)
      if not theta_idx:
        return second, None
      ntk = sum(jnp.sum(da[i] * db[j], 0) * t for (i, j), t in zip(theta_idx, th))
      return second, ntk

    def group(xs):                                                  # (chunks, C, K)
      def body(c, acc):
        s, t = chunk_sums(xs[c])
        return (acc[0] + s, acc[1] if t is None else acc[1] + t)
      zero = jnp.zeros((block,), dtype)
      s, t = jax.lax.fori_loop(0, xs.shape[0], body, (zero, zero))
      return s / per, t / per

    return jax.lax.map(group, pts)                                  # (G, block) each

  data = (blocked(root), blocked(mu), [blocked(a) for a in f_args],
          [blocked(a) for a in g_args], [blocked(t) for t in theta_val])
  sec, ntk = jax.lax.map(one_block, data)                           # (blocks, G, block) each
  unblock = lambda a: jnp.reshape(jnp.moveaxis(a, 1, 0).reshape(n_groups, -1)[:, :size],
                                  (n_groups,) + tuple(shape))
  sec, ntk = unblock(sec), unblock(ntk)
  if not theta:
    ntk = None
  if groups:
    return sec, ntk
  return jnp.mean(sec, 0), (None if ntk is None else jnp.mean(ntk, 0))
