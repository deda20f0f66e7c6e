"""A Kernel in place of x1 (composition) and explicit wide axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

D, N = 5, 64
X1 = jax.random.normal(jax.random.PRNGKey(0), (4, D))
X2 = jax.random.normal(jax.random.PRNGKey(1), (3, D))
PARAMS = dict(a=jax.random.normal(jax.random.PRNGKey(2), (D, N)),
              b=jax.random.normal(jax.random.PRNGKey(3), (N, 8)),
              c=jax.random.normal(jax.random.PRNGKey(4), (8, 2)))
STATS = {k: iw.ParamStats(0., 1.) for k in PARAMS}


def first(p, x):
  return x @ p['a'] / np.sqrt(D)


def second(p, h):
  # Scaled by the wide axis of the composed kernel's output (the channel axis).
  return jax.nn.relu(h) @ p['b'] / np.sqrt(h.shape[-1])


def third(p, h):
  return jnp.tanh(h) @ p['c'] / np.sqrt(h.shape[-1])


@pytest.mark.parametrize('x2', [None, X2])
def test_composition_equals_the_composed_function(x2):
  # Oracle: kernelize of the whole function, which tracks the same Gaussian
  # input exactly; composition must reproduce NNGP, NTK and per-input
  # variances (second implementation of the same maths).
  kf = lambda f: iw.kernelize(f, PARAMS, param_stats=STATS)
  k1 = kf(first)(X1, x2)
  k12 = kf(second)(k1)
  k123 = kf(third)(k12, None, ('nngp', 'ntk'))
  direct = kf(lambda p, x: third(p, second(p, first(p, x))))(X1, x2, ('nngp', 'ntk'))
  # The direct function's inner widths are 64 and 8; composition treats the
  # composed kernel's channel axis as wide with the same bookkeeping.
  np.testing.assert_allclose(k123.nngp, direct.nngp, rtol=1e-12)
  np.testing.assert_allclose(k123.ntk, direct.ntk, rtol=1e-12)
  d12 = kf(lambda p, x: second(p, first(p, x)))(X1, x2)
  np.testing.assert_allclose(k12.cov1, d12.cov1, rtol=1e-12)
  if x2 is not None:
    np.testing.assert_allclose(k12.cov2, d12.cov2, rtol=1e-12)


def test_kernel_input_rejects_x2():
  k1 = iw.kernelize(first, PARAMS, param_stats=STATS)(X1)
  with pytest.raises(iw.InfwidthError, match='x2 must be None'):
    iw.kernelize(second, PARAMS, param_stats=STATS)(k1, X2)


def test_wide_axes_override_matches_inference():
  f = lambda p, x: second(p, first(p, x))
  inferred = iw.kernelize(f, PARAMS, param_stats=STATS)(X1, X2, 'ntk')
  explicit = iw.kernelize(f, PARAMS, param_stats=STATS,
                          wide_axes=dict(a=(1,), b=(1,), c=None))(X1, X2, 'ntk')
  np.testing.assert_allclose(explicit, inferred, rtol=1e-14)


def test_wide_axes_contradicting_the_function_is_explained():
  f = lambda p, x: second(p, first(p, x))
  with pytest.raises(iw.InfwidthError, match='wide_axes='):
    iw.kernelize(f, PARAMS, param_stats=STATS, wide_axes=dict(a=(0,), b=None, c=None))(X1)
  with pytest.raises(iw.InfwidthError, match='not axes of a parameter'):
    iw.kernelize(f, PARAMS, param_stats=STATS, wide_axes=dict(a=(3,), b=None, c=None))


def test_same_weight_on_same_input_is_one_variable():
  # relu written as where(h > 0, h, 0) computes h twice; both must be one
  # Gaussian, so the kernel equals the relu kernel exactly.
  def with_where(p, x):
    h1, h2 = x @ p['a'] / np.sqrt(D), x @ p['a'] / np.sqrt(D)
    return jnp.where(h1 > 0, h2, 0.) @ p['b'] / np.sqrt(N)
  def with_relu(p, x):
    return jax.nn.relu(x @ p['a'] / np.sqrt(D)) @ p['b'] / np.sqrt(N)
  a = iw.kernelize(with_where, PARAMS, param_stats=STATS)(X1, X2, ('nngp', 'ntk'))
  b = iw.kernelize(with_relu, PARAMS, param_stats=STATS)(X1, X2, ('nngp', 'ntk'))
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)
