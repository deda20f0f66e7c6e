"""Independent oracles for the per-rule tests (tests/test_rules.py).

Nothing here imports infwidth: every kernel is computed from the inputs
directly, with NumPy (float64) and, for evaluating a user's scalar function
φ and its derivative, plain JAX on concrete arrays.

* `trapezoid_pairs`: E[φ(u_i) ψ(u_j)] for a zero-mean Gaussian vector `u`
  with covariance K, one 2-D tensor-product trapezoidal rule per pair.
* `sampled_pairs`: the same expectation from draws of the whole vector `u`,
  with the standard error of each entry.
* `relu_kernels`: the arc-cosine kernels of Cho & Saul (2009).
* `conv_cov`: the covariance of a convolution with i.i.d. filter entries,
  a joint window sum over both copies of a spatial axis.
* `spatial_matrix`: the matrix of a linear map of a spatial axis, read off by
  applying the map to basis vectors.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def trapezoid_pairs(phi, psi, k, step=0.08, cut=10.0):
  """E[φ(u_i) ψ(u_j)] for u ~ N(0, k), `k` (N, N): an (N, N) float64 array.

  Per pair, u_i = a·z1 and u_j = b·z1 + c·z2 with z ~ N(0, I₂) (the 2×2
  Cholesky factor), integrated with the tensor-product trapezoidal rule of
  `step` on [-cut, cut]² against the Gaussian density. For φ analytic in a
  strip |Im z| < d the error is about exp(-2πd/step) (Trefethen & Weideman,
  SIAM Rev. 2014) plus the Gaussian tail beyond `cut`: with poles at
  distance 0.8 (u/(1 + u²) at unit variance) that is below 1e-25, where
  Gauss–Hermite of degree 96 is only 1e-5 accurate.
  """
  k = np.asarray(k, np.float64)
  z = np.arange(-cut, cut + step / 2, step)
  w = step * np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
  z1, z2 = np.meshgrid(z, z, indexing='ij')
  ww = np.outer(w, w)
  d = np.diag(k)
  a = np.sqrt(d)[:, None, None, None]
  b = np.where(d > 0, k / np.where(d > 0, np.sqrt(d), 1.0)[:, None], 0.0)[:, :, None, None]
  c = np.sqrt(np.maximum(d[None, :] - (b[..., 0, 0]) ** 2, 0.0))[:, :, None, None]
  u = np.broadcast_to(a * z1, b.shape[:2] + z1.shape)
  v = b * z1 + c * z2
  fu = np.asarray(jax.jit(phi)(jnp.asarray(u)), np.float64)
  gv = np.asarray(jax.jit(psi)(jnp.asarray(v)), np.float64)
  return np.einsum('ijpq,pq->ij', fu * gv, ww)


def _sqrt_psd(k):
  ev, vec = np.linalg.eigh(np.asarray(k, np.float64))
  return vec * np.sqrt(np.maximum(ev, 0.0))


def sampled_pairs(phi, k, n_samples=10**6, seed=0):
  """(E[φ(u_i) φ(u_j)], its standard error) from `n_samples` draws of u ~ N(0, k)."""
  z = np.random.default_rng(seed).standard_normal((k.shape[0], n_samples))
  u = _sqrt_psd(k) @ z
  f = np.asarray(jax.jit(phi)(jnp.asarray(u)), np.float64)
  mean = f @ f.T / n_samples
  second = (f * f) @ (f * f).T / n_samples
  se = np.sqrt(np.maximum(second - mean ** 2, 0.0) / (n_samples - 1))
  return mean, se


def derivative(phi):
  """φ' elementwise, by `jax.grad` of the scalar function."""
  def dphi(u):
    shape = jnp.shape(u)
    flat = jnp.ravel(u)
    return jax.vmap(jax.grad(lambda s: phi(s)))(flat).reshape(shape)
  return dphi


def relu_kernels(k, var_a, var_b):
  """Arc-cosine kernels: (E[relu(u) relu(v)], E[relu'(u) relu'(v)]) entrywise,
  for Cov(u, v) = k, Var u = var_a, Var v = var_b (arrays broadcasting together)."""
  norm = np.sqrt(var_a * var_b)
  cos = np.clip(np.where(norm > 0, k / np.where(norm > 0, norm, 1.0), 0.0), -1.0, 1.0)
  th = np.arccos(cos)
  t = norm * (np.sin(th) + (np.pi - th) * cos) / (2 * np.pi)
  tdot = (np.pi - th) / (2 * np.pi)
  return t, tdot


def relu_of_spatial(k):
  """(T, Ṫ) of relu for a spatial covariance `k` (N, N, S, S) (one spatial axis,
  flattened): variances from its batch-and-position diagonal."""
  n, s = k.shape[0], k.shape[2]
  var = k[np.arange(n), np.arange(n)][:, np.arange(s), np.arange(s)]   # (N, S)
  return relu_kernels(k, var[:, None, :, None], var[None, :, None, :])


def conv_cov(g, window, stride=1, dilation=1, pads=(0, 0)):
  """Covariance after a convolution along one spatial axis with i.i.d. filter
  entries (divided by the window size): `g` (N, N, S, S) →
  (N, N, S', S'), out[o, o'] = Σ_t g[o·s + t·d - p, o'·s + t·d - p] / window,
  zero outside the input (zero padding)."""
  s_in = g.shape[2]
  span = (window - 1) * dilation + 1
  s_out = (s_in + pads[0] + pads[1] - span) // stride + 1
  out = np.zeros(g.shape[:2] + (s_out, s_out))
  for o, o2 in itertools.product(range(s_out), repeat=2):
    for t in range(window):
      i = o * stride + t * dilation - pads[0]
      j = o2 * stride + t * dilation - pads[0]
      if 0 <= i < s_in and 0 <= j < s_in:
        out[:, :, o, o2] += g[:, :, i, j]
  return out / window


def spatial_matrix(op, size, channels=1):
  """The matrix P (S', S) of a linear map `op` of the spatial axis of
  (B, S, C) arrays, read off from `op` of the S basis vectors (as a batch).
  Returns P with a flattened output axis (S' = 1 for a map that removes the axis)."""
  basis = np.eye(size)[:, :, None] * np.ones((1, 1, channels))
  out = np.asarray(op(jnp.asarray(basis)), np.float64)
  return out[..., 0].reshape(size, -1).T


def map_kernel(p, k):
  """P K Pᵀ on both spatial copies of `k` (N, N, S, S)."""
  return np.einsum('as,ijst,bt->ijab', p, k, p)


def assert_symmetric_psd(k, rtol=1e-10):
  """`k` (N, N) or (N, N, S, S) is symmetric and positive semi-definite."""
  k = np.asarray(k, np.float64)
  if k.ndim == 4:
    n, s = k.shape[0], k.shape[2]
    k = k.transpose(0, 2, 1, 3).reshape(n * s, n * s)
  scale = np.abs(k).max()
  np.testing.assert_allclose(k, k.T, rtol=0, atol=rtol * scale)
  ev = np.linalg.eigvalsh((k + k.T) / 2)
  assert ev.min() >= -rtol * max(np.abs(ev).max(), 1e-300), ev.min() / np.abs(ev).max()


def max_of_two_moments(k, windows):
  """`E[m_o m′_o′]` and `Θ_m` (N, N, O, O) of `m_o = max(h[i_o], h[j_o])` for
  a centred Gaussian `h` whose kernel and NTK are both `k` (N, N, L, L) (a
  first layer in NTK parameterisation); `windows`: the pairs `(i_o, j_o)`,
  `i_o = j_o` for a window of one entry.

  `max(u₁,u₂) = s/2 + |d|/2` (`s = u₁+u₂`, `d = u₁−u₂`) and `E[s|d′|] = 0`, so
  `E[m m′] = E[ss′]/4 + E[|d||d′|]/4` with `E[|d||d′|] = (2/π)(√(ab − c²) +
  c·arcsin(c/√(ab)))` (`a, b` the variances of `d, d′`, `c` their covariance);
  `∂m/∂u₁ = 1[d > 0]` and `P(d > 0, d′ > 0) = 1/4 + arcsin(ρ)/2π` (Sheppard)."""
  i = np.array([w[0] for w in windows])
  j = np.array([w[-1] for w in windows])
  cross = lambda a, b: k[:, :, a][:, :, :, b]                     # (N, N, O, O)
  kii, kij, kji, kjj = cross(i, i), cross(i, j), cross(j, i), cross(j, j)
  n = k.shape[0]
  same = k[np.arange(n), np.arange(n)]                              # (N, L, L)
  var_d = same[:, i, i] - 2 * same[:, i, j] + same[:, j, j]         # (N, O)
  a, b = var_d[:, None, :, None], var_d[None, :, None, :]
  c = kii - kij - kji + kjj
  ab = a * b
  root = np.sqrt(np.maximum(ab, 0))
  rho = np.where(ab > 0, c / np.where(ab > 0, root, 1), 0.)
  rho = np.clip(rho, -1, 1)
  abs_moment = 2 / np.pi * (np.sqrt(np.maximum(ab - c ** 2, 0)) + c * np.arcsin(rho))
  second = (kii + kij + kji + kjj) / 4 + abs_moment / 4
  p = np.arcsin(rho) / (2 * np.pi)
  theta = (0.25 + p) * (kii + kjj) + (0.25 - p) * (kij + kji)
  return second, theta
