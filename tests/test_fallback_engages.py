"""Every refusal falls back, and the fallback's `Kernel` has the analytic fields.

Each function below has no analytic kernel today (an unknown primitive, an
unsupported combination of values, an axis that cannot be inferred). With
`fallback='error'` kernelize raises `UnsupportedPrimitiveError`; with
`'monte_carlo'` and `'empirical'` it returns a `Kernel` whose fields have the
shapes the analytic path gives for an output of the same shape, and whose
values are what the fallback documents (checked against `empirical_kernels`).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth.empirical import empirical_kernels

D, W, C = 5, 32, 3
pytestmark = pytest.mark.filterwarnings("ignore:parameter moments estimated")
X1 = jax.random.normal(jax.random.PRNGKey(0), (4, D))
X2 = jax.random.normal(jax.random.PRNGKey(1), (3, D))


def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape)


def _dense_params(key, *shapes):
  keys = jax.random.split(key, len(shapes))
  return {f'w{i}': _normal(k, s, 1 / np.sqrt(s[0])) for i, (k, s) in enumerate(zip(keys, shapes))}


def _readout(p, h):
  return h @ p['out']


def _with_readout(net, params):
  params = dict(params, out=_normal(jax.random.PRNGKey(9), (W, C), 1 / np.sqrt(W)))
  return (lambda p, x: _readout(p, net(p, x))), params


_CONST_Z = jnp.linspace(-1, 1, W)


def sort_net(p, x):
  return jnp.sort(jax.nn.relu(x @ p['w0']), axis=-1)


def max_net(p, x):
  h = jax.nn.relu(x @ p['w0'])
  return h * jnp.max(h, axis=-1, keepdims=True)


def cumsum_net(p, x):
  return jnp.cumsum((x @ p['w0'])[..., None], axis=-1)[..., 0]


def whole_and_sliced_net(p, x):
  """A parameter used both whole and sliced (the slice would share its entries)."""
  return jnp.tanh((x @ p['w0']) * p['w1'][0] + x @ p['w1'])

def per_channel_constant_in_several_net(p, x):
  """A per-channel array with distinct entries inside a function of two Gaussians."""
  return jnp.maximum(x @ p['w0'] - _CONST_Z, x @ p['w1'])


def channel_sum_net(p, x):
  h = jax.nn.relu(x @ p['w0'])
  return h * jnp.sum(h, axis=-1, keepdims=True)


def tied_autoencoder_net(p, x):
  """A weight used with its transpose: correlated with the value it multiplies."""
  return jnp.tanh(x @ p['w0']) @ p['w0'].T @ p['w1']


CASES = {
    'sort': (sort_net, [(D, W)]),
    'reduce_max': (max_net, [(D, W)]),
    'cumsum': (cumsum_net, [(D, W)]),
    'whole and sliced parameter': (whole_and_sliced_net, [(D, W), (D, W)]),
    'per-channel array in a function of two values': (per_channel_constant_in_several_net,
                                                       [(D, W), (D, W)]),
    'channel sum': (channel_sum_net, [(D, W)]),
    'tied autoencoder': (tied_autoencoder_net, [(D, W), (D, W)]),
}


def _case(name):
  net, shapes = CASES[name]
  return _with_readout(net, _dense_params(jax.random.PRNGKey(2), *shapes))


def _plain():
  return _with_readout(lambda p, x: jax.nn.relu(x @ p['w0']), _dense_params(
      jax.random.PRNGKey(2), (D, W)))


def _fields(k: iw.Kernel):
  arrays = {f: None if getattr(k, f) is None else np.shape(getattr(k, f))
            for f in ('nngp', 'ntk', 'cov1', 'cov2')}
  static = {f: getattr(k, f) for f in ('x1_is_x2', 'shape1', 'shape2', 'batch_axis',
                                       'channel_axis', 'diagonal_spatial')}
  return arrays, static


@pytest.mark.parametrize('name', sorted(CASES))
def test_refusal_raises_unsupported(name):
  fn, params = _case(name)
  with pytest.raises(iw.UnsupportedPrimitiveError) as info:
    iw.kernelize(fn, params)(X1, X2, 'nngp')
  assert 'fallback=' in str(info.value)


@pytest.mark.parametrize('fallback, same', [('monte_carlo', False), ('empirical', True)])
@pytest.mark.parametrize('name', sorted(CASES))
def test_refusal_falls_back_with_the_analytic_fields(name, fallback, same):
  fn, params = _case(name)
  x2 = None if same else X2
  plain_fn, plain_params = _plain()
  analytic = iw.kernelize(plain_fn, plain_params)(X1, x2)
  kf = iw.kernelize(fn, params, fallback=fallback, n_samples=3, key=jax.random.PRNGKey(4))
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    k = kf(X1, x2)
  assert any(fallback in str(w.message) for w in rec)
  assert isinstance(k, iw.Kernel)
  assert _fields(k) == _fields(analytic)
  assert np.all(np.isfinite(k.nngp)) and np.all(np.isfinite(k.ntk))
  if fallback == 'empirical':
    want = empirical_kernels(fn, params, X1, x2, ('nngp', 'ntk'))
    np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(k.cov1, np.diagonal(empirical_kernels(
        fn, params, X1, None, 'nngp')), rtol=1e-5, atol=1e-7)


def test_fallback_gives_a_pytree_of_kernels_like_the_outputs():
  params = _dense_params(jax.random.PRNGKey(2), (D, W), (W, C), (W, 2 * C))

  def two_heads(p, x):
    h = jnp.sort(jax.nn.relu(x @ p['w0']), axis=-1)
    return {'a': h @ p['w1'], 'b': h @ p['w2']}

  with pytest.warns(UserWarning, match='empirical'):
    k = iw.kernelize(two_heads, params, fallback='empirical')(X1, X2)
  assert set(k) == {'a', 'b'}
  assert k['a'].shape1 == (4, C) and k['b'].shape1 == (4, 2 * C)
  assert k['b'].shape2 == (3, 2 * C) and k['b'].nngp.shape == (4, 3)
  want = empirical_kernels(two_heads, params, X1, X2, 'ntk')
  np.testing.assert_allclose(k['b'].ntk, want['b'], rtol=1e-5)


def test_transform_form_falls_back_too():
  fn, params = _case('sort')
  kf = jax.jit(iw.kernelize(fn, fallback='empirical'), static_argnames='get')
  with pytest.warns(UserWarning, match='sort'):
    k = kf(params, X1, X2, 'ntk')
  np.testing.assert_allclose(k, empirical_kernels(fn, params, X1, X2, 'ntk'), rtol=1e-5)
