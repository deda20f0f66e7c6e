"""Weights with several output axes: Flax's `DenseGeneral` with
`features=(heads, head_dim)`, hand-written head splits, `wide_axes=` over
several axes. The entries of such a projection are i.i.d. over all its output
axes (docs/semantics.md, "Weights with several output axes"): its kernel is the
one of the flat layer with `heads·head_dim` units, which the tests use as a
second implementation, and Monte Carlo confirms it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
import mc_check

H, DH, D = 4, 64, 5
X = jax.random.normal(jax.random.PRNGKey(1), (4, D))


def _unit(p):
  return jax.tree.map(lambda a: iw.ParamStats(0., 1.), p)


PARAMS = {'w1': jax.random.normal(jax.random.PRNGKey(2), (D, H * DH)),
          'b': jax.random.normal(jax.random.PRNGKey(3), (H, DH)),
          'w2': jax.random.normal(jax.random.PRNGKey(4), (H, DH, 3))}


def heads_net(p, x):
  h = (x @ p['w1']).reshape(x.shape[0], H, DH) / np.sqrt(D)
  h = jax.nn.relu(h + p['b'])
  return jnp.einsum('bhd,hdo->bo', h, p['w2']) / np.sqrt(H * DH)


def flat_net(p, x):
  h = jax.nn.relu((x @ p['w1']) / np.sqrt(D) + p['b'].reshape(-1))
  return h @ p['w2'].reshape(H * DH, -1) / np.sqrt(H * DH)


def heads_layer_norm(p, x):
  h = (x @ p['w1']).reshape(x.shape[0], H, DH) / np.sqrt(D)
  m = h.mean((-2, -1), keepdims=True)
  v = ((h - m) ** 2).mean((-2, -1), keepdims=True)
  h = jnp.tanh((h - m) / jnp.sqrt(v + 1e-6))
  return jnp.einsum('bhd,hdo->bo', h, p['w2']) / np.sqrt(H * DH)


def flat_layer_norm(p, x):
  h = (x @ p['w1']) / np.sqrt(D)
  m = h.mean(-1, keepdims=True)
  v = ((h - m) ** 2).mean(-1, keepdims=True)
  h = jnp.tanh((h - m) / jnp.sqrt(v + 1e-6))
  return h @ p['w2'].reshape(H * DH, -1) / np.sqrt(H * DH)


@pytest.mark.parametrize('heads,flat', [(heads_net, flat_net),
                                        (heads_layer_norm, flat_layer_norm)])
def test_split_heads_equal_flat_layer(heads, flat):
  k = iw.kernelize(heads, PARAMS, param_stats=_unit(PARAMS))(X, X[:2] + 1, ('nngp', 'ntk'))
  want = iw.kernelize(flat, PARAMS, param_stats=_unit(PARAMS))(X, X[:2] + 1, ('nngp', 'ntk'))
  np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-12)


class DenseGeneralNet(nn.Module):
  out: int = 256

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(nn.DenseGeneral((H, DH))(x))
    h = jnp.tanh(nn.DenseGeneral((H, DH), axis=(-2, -1))(h))
    return nn.DenseGeneral(self.out, axis=(-2, -1))(h)


def _fan_in_stats(variables):
  """N(0, 1/fan_in) kernels, N(0, 0.05) biases."""
  def stats(path, a):
    if 'bias' in jax.tree_util.keystr(path):
      return iw.ParamStats(0., 0.05)
    return iw.ParamStats(0., 1. / (D if a.shape[0] == D else H * DH))
  return jax.tree_util.tree_map_with_path(stats, variables)


def test_flax_dense_general_matches_monte_carlo():
  model = DenseGeneralNet()
  variables = model.init(jax.random.PRNGKey(0), X)
  stats = _fan_in_stats(variables)
  k = iw.kernelize(model.apply, variables, param_stats=stats)(X, None, 'nngp')
  rng = np.random.default_rng(0)
  draw = lambda: jax.tree.map(lambda a, s: jnp.asarray(np.sqrt(s.var) * rng.standard_normal(a.shape)),
                              variables, stats)
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[1])(model.apply(p, X)))
  draws = np.stack([f(draw()) for _ in range(64)])
  mc_check.check_against_mc(k, draws, 2, H * DH, 4.0, 2.0)


def test_wide_axes_on_a_multi_axis_weight():
  model = DenseGeneralNet(out=3)
  variables = model.init(jax.random.PRNGKey(0), X)
  stats = _fan_in_stats(variables)
  k = iw.kernelize(model.apply, variables, param_stats=stats)(X, None, 'nngp')
  # Naming the head_dim axis, or both output axes, wide gives the same kernel.
  for spec in ((2,), (1, 2)):
    wide = jax.tree.map(lambda a: None, variables)
    wide['params']['DenseGeneral_0']['kernel'] = spec
    k2 = iw.kernelize(model.apply, variables, param_stats=stats, wide_axes=wide)(X, None, 'nngp')
    np.testing.assert_allclose(k2, k, rtol=1e-12)
  wide['params']['DenseGeneral_0']['kernel'] = (0,)
  with pytest.raises(iw.UnsupportedPrimitiveError, match=r'names axes \(0,\).*output \(free\)'):
    iw.kernelize(model.apply, variables, param_stats=stats, wide_axes=wide)(X, None, 'nngp')


def test_sum_over_heads_only_is_refused():
  def f(p, x):
    h = jax.nn.relu((x @ p['w1']).reshape(x.shape[0], H, DH))
    return h.mean(1) @ p['w2'][0] / np.sqrt(DH)
  with pytest.raises(iw.UnsupportedPrimitiveError, match='some but not all of the channel axes'):
    iw.kernelize(f, PARAMS, param_stats=_unit(PARAMS))(X, None, 'nngp')
