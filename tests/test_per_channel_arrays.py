"""Deterministic arrays along a wide axis: an array whose entries are all
equal is its value (exact); distinct entries are refused with a message that
says what is supported."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

W = 256
X = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
P = {'w1': jnp.ones((5, W)), 'w2': jnp.ones((W, 3))}
STATS = jax.tree.map(lambda a: iw.ParamStats(0., 1.), P)


def _net(shift, scale):
  def f(p, x):
    h = x @ p['w1'] / np.sqrt(x.shape[1])
    return jax.nn.relu((h - shift) * scale) @ p['w2'] / np.sqrt(W)
  return f


def _kernel(f, params=P, stats=STATS):
  return iw.kernelize(f, params, param_stats=stats)(X, None, ('nngp', 'ntk'))


def test_constant_arrays_closed_over_are_their_values():
  got = _kernel(_net(jnp.full(W, 0.3), jnp.full(W, 1.7)))
  want = _kernel(_net(0.3, 1.7))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


class BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.BatchNorm(use_running_average=True)(nn.Dense(W)(x))
    return nn.Dense(3)(jax.nn.relu(h))


def test_flax_batch_norm_at_its_initial_statistics():
  """Running mean 0 and variance 1 (Flax's initial state): BatchNorm in
  inference is `scale·h/√(1 + ε) + bias`."""
  model = BatchNormMLP()
  variables = model.init(jax.random.PRNGKey(0), X)
  apply = lambda params, x: model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x)
  stats = jax.tree.map(lambda a: iw.ParamStats(0., 0.5), variables['params'])
  stats['BatchNorm_0'] = {'scale': iw.ParamStats(1., 0.), 'bias': iw.ParamStats(0., 0.)}
  got = iw.kernelize(apply, variables['params'], param_stats=stats)(X, None, ('nngp', 'ntk'))

  def plain(p, x):
    h = (x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']) / np.sqrt(1 + 1e-5)
    h = p['BatchNorm_0']['scale'] * h + p['BatchNorm_0']['bias']
    return jax.nn.relu(h) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  want = iw.kernelize(plain, variables['params'], param_stats=stats)(X, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-6)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-6)


def test_distinct_per_channel_entries_are_refused_clearly():
  shift = jnp.linspace(-1, 1, W)
  with pytest.raises(iw.UnsupportedPrimitiveError, match='per-channel array with distinct'):
    _kernel(_net(shift, 1.0))
