"""Concatenation along the channel axis: each block of channels keeps its own
kernel, so a contraction over the channels sees the channel-weighted average."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

import infwidth as iw

X1 = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
X2 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
SHAPES = dict(w0=(3, 8), wa=(8, 6), wb=(8, 2), r_both=(8, 1), r_a=(6, 1), r_b=(2, 1))
STATS = {k: iw.ParamStats(0., 1.) for k in SHAPES}


def net(p, x, branches=('a', 'b')):
  """A shared layer, then ReLU (6 channels) and erf (2 channels) branches."""
  h = x @ p['w0'] / np.sqrt(3) + 0.1
  outs = {'a': jax.nn.relu(h @ p['wa'] / np.sqrt(8)), 'b': erf(h @ p['wb'] / np.sqrt(8))}
  z = jnp.concatenate([outs[b] for b in branches], -1) if len(branches) > 1 else outs[branches[0]]
  z = 1.5 * z - 0.2  # a channelwise map of the concatenation
  r = p['r_both'] if len(branches) > 1 else p['r_' + branches[0]]
  return z @ r / np.sqrt(z.shape[-1])


def kernel_fn(dtype, branches=('a', 'b')):
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in SHAPES.items()}
  return iw.kernelize(lambda p, x: net(p, x, branches), params, param_stats=STATS)


@pytest.mark.parametrize('dtype', [jnp.float64, jnp.float32])
@pytest.mark.parametrize('x2', [None, X2])
def test_kernel_is_the_channel_weighted_average_of_the_branches(dtype, x2):
  x1 = X1.astype(dtype)
  x2 = None if x2 is None else x2.astype(dtype)
  k = kernel_fn(dtype)(x1, x2, ('nngp', 'ntk'))
  ka = kernel_fn(dtype, ('a',))(x1, x2, ('nngp', 'ntk'))
  kb = kernel_fn(dtype, ('b',))(x1, x2, ('nngp', 'ntk'))
  tol = 1e-12 if dtype == jnp.float64 else 2e-6
  for g in ('nngp', 'ntk'):
    want = 0.75 * getattr(ka, g) + 0.25 * getattr(kb, g)
    np.testing.assert_allclose(getattr(k, g), want, rtol=tol, atol=tol)
    # The branches' kernels differ, so the weights are tested.
    assert np.abs(getattr(ka, g) - getattr(kb, g)).max() > 0.05


def branch(p, x, which):
  h = x @ p['w0'] / np.sqrt(3)
  return {'a': jax.nn.relu, 'b': erf}[which](h @ p['w' + which] / np.sqrt(8))


def test_nested_and_jitted_concatenation():
  """Blocks of 6, 2 and 2 channels (the erf branch twice): weights 0.6, 0.4."""
  def nested(p, x):
    a, b = branch(p, x, 'a'), branch(p, x, 'b')
    z = jnp.concatenate([jnp.concatenate([a, b], -1), b], -1)
    return z @ p['r10'] / np.sqrt(10)

  def single(which):
    f = lambda p, x: branch(p, x, which) @ p['r_' + which] / np.sqrt(SHAPES['r_' + which][0])
    return iw.kernelize(f, params, param_stats=stats)(X1, None, 'nngp')

  shapes = dict(SHAPES, r10=(10, 1))
  params = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in shapes.items()}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  kf = jax.jit(iw.kernelize(nested, params, param_stats=stats), static_argnames='get')
  np.testing.assert_allclose(kf(X1, None, 'nngp'), 0.6 * single('a') + 0.4 * single('b'),
                             rtol=1e-12)


@pytest.mark.parametrize('use', ['residual_with_one_branch'])
def test_unsupported_uses_are_reported(use):
  def f(p, x):
    h = x @ p['w0'] / np.sqrt(3)
    z = jnp.concatenate([branch(p, x, 'a'), branch(p, x, 'b')], -1)
    z = z + h
    return z @ p['r_both'] / np.sqrt(8)
  params = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in SHAPES.items()}
  with pytest.raises(iw.UnsupportedPrimitiveError, match='concatenated along its channel axis'):
    iw.kernelize(f, params, param_stats=STATS)(X1)


def test_concatenated_output_gets_the_channel_average():
  """An output concatenated along channels has no single per-channel kernel:
  kernel_fn returns the average over its channels."""
  params = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in SHAPES.items()}
  both = lambda p, x: jnp.concatenate([branch(p, x, 'a'), branch(p, x, 'b')], -1)
  k = iw.kernelize(both, params, param_stats=STATS)(X1, X2, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    ka, kb = (iw.kernelize(lambda p, x: branch(p, x, w), params, param_stats=STATS)(X1, X2, g)
              for w in 'ab')
    np.testing.assert_allclose(getattr(k, g), 0.75 * ka + 0.25 * kb, rtol=1e-12)


def _mc_nngp(layer, x, width, n_draws=64):
  """NNGP of a stax network against the mean of per-draw `f fᵀ / C`."""
  import mc_check
  init_fn, apply_fn, kernel_fn = layer
  k = kernel_fn(x, None, 'nngp')
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[-1])(apply_fn(p, x)))
  draws = np.stack([f(init_fn(key, x.shape)[1])
                    for key in jax.random.split(jax.random.PRNGKey(0), n_draws)])
  mc_check.check_against_mc(k, draws, 2, width, 4.0, 2.0, per_entry=False)


@pytest.mark.parametrize('head', [pytest.param('GlobalAvgPool', marks=pytest.mark.slow),
                                  pytest.param('AvgPool', marks=pytest.mark.slow),
                                  pytest.param('Flatten', marks=pytest.mark.slow),
                                  'LayerNorm'])
def test_maps_of_concatenated_convolutions_match_monte_carlo(head):
  """Pooling, flattening and normalising over the channels act on each block
  (statistics over the channels average the blocks by their channel counts)."""
  from infwidth import stax
  width = 256
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 2))
  tail = {'GlobalAvgPool': [stax.GlobalAvgPool()],
          'AvgPool': [stax.AvgPool((2, 2)), stax.Flatten()],
          'Flatten': [stax.Flatten()],
          'LayerNorm': [stax.LayerNorm(), stax.Relu(), stax.GlobalAvgPool()]}[head]
  layer = stax.serial(
      stax.FanOut(2),
      stax.parallel(stax.serial(stax.Conv(width, (3, 3), W_std=1.3, b_std=0.2, padding='SAME'),
                                stax.Relu()),
                    stax.serial(stax.Conv(width // 2, (1, 1), W_std=1.1, b_std=0.3), stax.Erf())),
      stax.FanInConcat(), *tail, stax.Dense(128, 0.9, 0.1))
  _mc_nngp(layer, x, width)
