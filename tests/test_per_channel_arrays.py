"""Deterministic arrays along a wide axis: an array whose entries are all
equal is its value (exact); one with distinct entries (trained BatchNorm
statistics) is extended i.i.d. from its empirical distribution, all arrays
of one channel space jointly, so moments are averages over the channels
(docs/semantics.md, "Deterministic arrays along a wide axis")."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

import infwidth as iw
from infwidth.domain import moments as M
from infwidth.domain.values import ChannelArray
from test_kernelize_monte_carlo import (D, SB, SW, X, check_against_mc, dense, monte_carlo,
                                        sample_gaussian, unit_stats)

W = 256
P = {'w1': jnp.ones((5, W)), 'w2': jnp.ones((W, 3))}
STATS = jax.tree.map(lambda a: iw.ParamStats(0., 1.), P)
X5 = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
EPS = 1e-5

pytestmark = pytest.mark.filterwarnings('ignore:per-channel array of')


def _net(shift, scale):
  def f(p, x):
    h = x @ p['w1'] / np.sqrt(x.shape[1])
    return jax.nn.relu((h - shift) * scale) @ p['w2'] / np.sqrt(W)
  return f


def _kernel(f, params=P, stats=STATS, x=X5):
  return iw.kernelize(f, params, param_stats=stats)(x, None, ('nngp', 'ntk'))


def _trained_stats(width, seed=0):
  """Running statistics as training leaves them: mean ~ N(0.3, 0.2²),
  variance ~ U(0.5, 2)."""
  rng = np.random.default_rng(seed)
  return rng.normal(0.3, 0.2, width), rng.uniform(0.5, 2.0, width)


def test_constant_arrays_closed_over_are_their_values():
  got = _kernel(_net(jnp.full(W, 0.3), jnp.full(W, 1.7)))
  want = _kernel(_net(0.3, 1.7))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


# ----------------------------------------------------------------------------
# Distinct entries: linear use, against the joint moments.


def test_linear_use_before_a_dense_layer_matches_joint_moments():
  """`y = (h − m)·s` then a dense layer: `E_c[y y′] = E[s²]·K_h + E[m²s²]`
  (h centred), and the NTK adds `σ_w²·E[s²]·Θ_h`."""
  width = 128
  m, v = _trained_stats(width)
  s = 1 / np.sqrt(v + EPS)
  shapes = {'l0': ((D, width), (width,)), 'o': ((width, 3), (3,))}
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(1), shapes, stats)

  def f(p, x):
    return dense(*p['o'], (dense(*p['l0'], x) - m) * s)

  k = iw.kernelize(f, params, param_stats=stats)(X, None, ('nngp', 'ntk'))
  k_h = SW ** 2 * X @ X.T / D + SB ** 2      # = Θ_h (NTK parameterisation)
  e_y = np.mean(s ** 2) * k_h + np.mean(m ** 2 * s ** 2)
  nngp = SW ** 2 * e_y + SB ** 2
  np.testing.assert_allclose(k.nngp, nngp, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, nngp + SW ** 2 * np.mean(s ** 2) * k_h, rtol=1e-12)


def test_linear_moments_use_few_points():
  """For linear uses the 2r points with the table's mean and covariance give
  every polynomial of degree ≤ 2 exactly; otherwise the distinct rows."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=100), rng.uniform(size=100)
  arrays = [ChannelArray(a), ChannelArray(a * b), ChannelArray(np.r_[b[:50], b[:50]])]
  rows, w = M.channel_rows(arrays, linear=True)
  assert rows.shape == (6, 3) and np.isclose(w.sum(), 1)
  table = np.stack([x.values for x in arrays], 1)
  for f in (lambda r: r[..., 0] * r[..., 1], lambda r: r[..., 2] ** 2 - r[..., 1],
            lambda r: r[..., 0] * r[..., 2] + 3.0):
    np.testing.assert_allclose(w @ f(rows), f(table).mean(), rtol=1e-12)
  rows, w = M.channel_rows([ChannelArray(np.r_[b[:50], b[:50]])], linear=False)
  assert rows.shape == (50, 1)
  np.testing.assert_allclose(w @ np.exp(rows[:, 0]), np.exp(b[:50]).mean(), rtol=1e-12)


# ----------------------------------------------------------------------------
# Distinct entries: relu after BatchNorm.


def _bn_relu_net(m, v):
  s = 1 / np.sqrt(v + EPS)

  def f(p, x):
    return dense(*p['o'], jax.nn.relu((dense(*p['l0'], x) - m) * s))
  return f


def _relu_pair_oracle(k_h, m, s):
  """Per-channel `E[relu(u) relu(u′)]` and `E[1(u>0) 1(u′>0)]` with
  `u = s_c (h − m_c)`, averaged over the channels c: one-dimensional
  integrals over `h > m_c` (Gauss–Legendre on the smooth side of the kink)
  of the conditional closed forms `E[relu(v) | h]`, `P(v > 0 | h)`."""
  n = k_h.shape[0]
  z, wz = np.polynomial.legendre.leggauss(200)
  relu2 = np.zeros((n, n))
  step2 = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      v1, v2, c = k_h[i, i], k_h[j, j], k_h[i, j]
      sd1 = np.sqrt(v1)
      lo, hi = m, np.maximum(m, 0) + 12 * sd1              # (C,) limits in h
      h = (lo + hi)[:, None] / 2 + (hi - lo)[:, None] / 2 * z   # (C, Q)
      wq = (hi - lo)[:, None] / 2 * wz
      dens = np.exp(-h ** 2 / (2 * v1)) / np.sqrt(2 * np.pi * v1)
      mu = c / v1 * h                                     # h′ | h
      sd = max(np.sqrt(max(v2 - c * c / v1, 0.0)), 1e-100)   # i = j: h′ = h
      t = (mu - m[:, None]) / sd
      e_relu = s[:, None] * ((mu - m[:, None]) * ndtr(t) + sd * np.exp(-t * t / 2)
                             / np.sqrt(2 * np.pi))
      relu2[i, j] = np.mean(np.sum(wq * dens * s[:, None] * (h - m[:, None]) * e_relu, 1))
      step2[i, j] = np.mean(s ** 2 * np.sum(wq * dens * ndtr(t), 1))
  return relu2, step2


def test_relu_after_batch_norm_matches_direct_channel_average():
  width = 64
  m, v = _trained_stats(width)
  s = 1 / np.sqrt(v + EPS)
  shapes = {'l0': ((D, width), (width,)), 'o': ((width, 3), (3,))}
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(1), shapes, stats)
  k = iw.kernelize(_bn_relu_net(m, v), params, param_stats=stats)(X, None, ('nngp', 'ntk'))
  k_h = SW ** 2 * np.asarray(X @ X.T) / D + SB ** 2
  relu2, step2 = _relu_pair_oracle(k_h, m, s)   # step2 carries s_c²
  nngp = SW ** 2 * relu2 + SB ** 2
  np.testing.assert_allclose(k.nngp, nngp, rtol=1e-9)
  np.testing.assert_allclose(k.ntk, nngp + SW ** 2 * step2 * k_h, rtol=1e-9)


def test_relu_after_batch_norm_matches_monte_carlo():
  """The finite network at the arrays' own width (512), 64 draws."""
  width = 512
  m, v = _trained_stats(width, seed=1)
  shapes = {'l0': ((D, width), (width,)), 'o': ((width, 256), (256,))}
  stats = unit_stats(shapes)
  f = _bn_relu_net(m, v)
  params = sample_gaussian(jax.random.PRNGKey(1), shapes, stats)
  k = iw.kernelize(f, params, param_stats=stats)(X, None, ('nngp', 'ntk'))
  nngp, ntk = monte_carlo(f, shapes, stats, X)
  check_against_mc(k.nngp, nngp, 1, width)
  check_against_mc(k.ntk, ntk, 1, width)
  for a in (k.nngp, k.ntk):
    np.testing.assert_allclose(a, a.T, rtol=1e-12)
    assert np.linalg.eigvalsh(a).min() > -1e-10


def test_few_channels_warn_like_estimated_moments():
  m, v = _trained_stats(16)
  shapes = {'l0': ((D, 16), (16,)), 'o': ((16, 3), (3,))}
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(1), shapes, stats)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    iw.kernelize(_bn_relu_net(m, v), params, param_stats=stats)(X, None, 'nngp')
  assert any('per-channel array of 16 channels' in str(w.message) and '35.4%' in str(w.message)
             for w in caught)


# ----------------------------------------------------------------------------
# Flax BatchNorm in inference with trained statistics, against plain JAX.


class BNMLP(nn.Module):
  width: int = 32

  @nn.compact
  def __call__(self, x):
    h = nn.BatchNorm(use_running_average=True)(nn.Dense(self.width)(x))
    h = nn.Dense(self.width)(jax.nn.relu(h))
    h = nn.BatchNorm(use_running_average=True)(h)
    return nn.Dense(3)(jax.nn.relu(h))


class BNCNN(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.width, (3, 3))(x)
    y = nn.Conv(self.width, (3, 3))(jax.nn.relu(nn.BatchNorm(use_running_average=True)(h)))
    y = nn.BatchNorm(use_running_average=True)(y) + h        # a residual block
    return nn.Dense(3)(jnp.mean(y, axis=(1, 2)))


def _plain_bn(h, p, st):
  return (h - st['mean']) / jnp.sqrt(st['var'] + EPS) * p['scale'] + p['bias']


def plain_mlp(variables):
  st = variables['batch_stats']

  def f(p, x):
    dense_ = lambda q, h: h @ q['kernel'] + q['bias']
    h = _plain_bn(dense_(p['Dense_0'], x), p['BatchNorm_0'], st['BatchNorm_0'])
    h = dense_(p['Dense_1'], jax.nn.relu(h))
    h = _plain_bn(h, p['BatchNorm_1'], st['BatchNorm_1'])
    return dense_(p['Dense_2'], jax.nn.relu(h))
  return f


def plain_cnn(variables):
  st = variables['batch_stats']

  def conv(q, h):
    out = jax.lax.conv_general_dilated(h, q['kernel'], (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return out + q['bias']

  def f(p, x):
    h = conv(p['Conv_0'], x)
    y = conv(p['Conv_1'], jax.nn.relu(_plain_bn(h, p['BatchNorm_0'], st['BatchNorm_0'])))
    y = _plain_bn(y, p['BatchNorm_1'], st['BatchNorm_1']) + h
    q = p['Dense_0']
    return jnp.mean(y, axis=(1, 2)) @ q['kernel'] + q['bias']
  return f


def _trained(variables, seed):
  """Replaces the running statistics by trained-looking ones."""
  rng = np.random.default_rng(seed)
  stats = {}
  for name, st in variables['batch_stats'].items():
    n = st['mean'].shape[0]
    dtype = st['mean'].dtype
    stats[name] = {'mean': jnp.asarray(rng.normal(0.3, 0.2, n), dtype),
                   'var': jnp.asarray(rng.uniform(0.5, 2.0, n), dtype)}
  return {**variables, 'batch_stats': stats}


def _param_stats(params):
  """Weights and biases N(0, 1/fan-in)-like; BatchNorm scale 1 and bias 0
  exactly (Flax's initialisation)."""
  stats = jax.tree.map(lambda a: iw.ParamStats(0., 1.0 / max(a.shape[0], 1)), params)
  for name in params:
    if name.startswith('BatchNorm'):
      stats[name] = {'scale': iw.ParamStats(1., 0.), 'bias': iw.ParamStats(0., 0.)}
    elif name.startswith('Conv'):
      k = params[name]['kernel']
      stats[name] = {'kernel': iw.ParamStats(0., 1.0 / np.prod(k.shape[:3])),
                     'bias': iw.ParamStats(0., 0.1)}
  return stats


@pytest.mark.parametrize('model,plain,x_shape,dtype', [
    (BNMLP(), plain_mlp, (3, 5), jnp.float32),
    (BNMLP(), plain_mlp, (3, 5), jnp.float64),
    pytest.param(BNCNN(), plain_cnn, (2, 4, 4, 2), jnp.float32, marks=pytest.mark.slow),
    (BNCNN(), plain_cnn, (2, 4, 4, 2), jnp.float64),
], ids=['mlp-float32', 'mlp-float64', 'cnn-float32', 'cnn-float64'])
def test_flax_batch_norm_with_trained_statistics_equals_plain_jax(model, plain, x_shape, dtype):
  x = jax.random.normal(jax.random.PRNGKey(2), x_shape, dtype)
  variables = _trained(model.init(jax.random.PRNGKey(0), x), seed=3)
  variables = jax.tree.map(lambda a: a.astype(dtype), variables)
  params = variables['params']
  stats = _param_stats(params)
  apply = lambda p, x: model.apply({'params': p, 'batch_stats': variables['batch_stats']}, x)
  np.testing.assert_allclose(apply(params, x), plain(variables)(params, x), rtol=1e-4,
                             atol=1e-5)
  got = iw.kernelize(apply, params, param_stats=stats)(x, None, ('nngp', 'ntk'))
  want = iw.kernelize(plain(variables), params, param_stats=stats)(x, None, ('nngp', 'ntk'))
  rtol = 1e-4 if dtype == jnp.float32 else 1e-10
  for a, b in ((got.nngp, want.nngp), (got.ntk, want.ntk)):
    assert a.dtype == dtype
    np.testing.assert_allclose(a, b, rtol=rtol)
  if dtype == jnp.float32:
    return
  # The statistics matter: the kernel at Flax's initial statistics differs.
  init = model.init(jax.random.PRNGKey(0), x)
  init_apply = lambda p, x: model.apply({'params': p, 'batch_stats': init['batch_stats']}, x)
  base = iw.kernelize(init_apply, params, param_stats=stats)(x, None, 'nngp')
  assert np.max(np.abs(base - got.nngp)) > 1e-2 * np.max(np.abs(got.nngp))


def test_flax_batch_norm_at_its_initial_statistics():
  """Running mean 0 and variance 1 (Flax's initial state): BatchNorm in
  inference is `scale·h/√(1 + ε) + bias`."""
  model = BNMLP(width=W)
  variables = model.init(jax.random.PRNGKey(0), X5)
  apply = lambda params, x: model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x)
  stats = jax.tree.map(lambda a: iw.ParamStats(0., 0.5), variables['params'])
  for name in ('BatchNorm_0', 'BatchNorm_1'):
    stats[name] = {'scale': iw.ParamStats(1., 0.), 'bias': iw.ParamStats(0., 0.)}
  got = iw.kernelize(apply, variables['params'], param_stats=stats)(X5, None, ('nngp', 'ntk'))

  def plain(p, x):
    h = (x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']) / np.sqrt(1 + 1e-5)
    h = p['BatchNorm_0']['scale'] * h + p['BatchNorm_0']['bias']
    h = (jax.nn.relu(h) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']) / np.sqrt(1 + 1e-5)
    h = p['BatchNorm_1']['scale'] * h + p['BatchNorm_1']['bias']
    return jax.nn.relu(h) @ p['Dense_2']['kernel'] + p['Dense_2']['bias']
  want = iw.kernelize(plain, variables['params'], param_stats=stats)(X5, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-6)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-6)


# ----------------------------------------------------------------------------
# What is refused, with a message that says what.


def _refused(f, match):
  with pytest.raises(iw.UnsupportedPrimitiveError, match=match):
    _kernel(f)


def test_per_channel_arrays_at_the_output_are_refused():
  shift = np.linspace(-1, 1, 3)
  _refused(lambda p, x: (x @ p['w1'] / np.sqrt(5)) @ p['w2'] / np.sqrt(W) * shift,
           'output channels are not identically distributed')


def test_per_channel_arrays_in_a_function_of_several_gaussians_are_refused():
  shift = np.linspace(-1, 1, W)

  def f(p, x):
    h = x @ p['w1'] / np.sqrt(5)
    g = x @ p['w3'] / np.sqrt(5)
    return (jnp.tanh(h - shift) * g) @ p['w2'] / np.sqrt(W)
  params = {**P, 'w3': jnp.ones((5, W))}
  stats = {**STATS, 'w3': iw.ParamStats(0., 1.)}
  with pytest.raises(iw.UnsupportedPrimitiveError, match='several Gaussian values'):
    _kernel(f, params, stats)


def test_per_input_per_channel_arrays_are_refused():
  def f(p, x):
    h = x @ p['w1'] / np.sqrt(5)
    return jax.nn.relu(h - x[:, :1] * np.linspace(-1, 1, W)) @ p['w2'] / np.sqrt(W)
  _refused(f, 'varies along the channel')
