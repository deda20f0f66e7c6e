"""`stax.repeat(layer, n)` with NT's semantics: `serial(*[layer] * n)` as a
loop, independent parameters per repetition stacked along a leading axis and
`apply_fn` a `lax.scan` over them. Its kernel, through kernelize of that scan
(each slice of a stacked leaf an independent leaf), equals the kernel of
`serial` with independent copies (NNGP and NTK), and Monte Carlo of the
finite network confirms it. NT 0.6.5's values: `test_stax_nt_api.py`.

Slices of parameters in plain JAX: a scan over stacked weights equals the
Python loop over them; slices that share entries are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

import mc_check
from infwidth import stax

X = jax.random.normal(jax.random.PRNGKey(0), (4, 6))


def _block(width):
  return stax.serial(stax.Dense(width, 1.4, 0.1), stax.Erf())


def test_repeat_equals_serial_with_independent_copies():
  head = stax.Dense(64, W_std=1.2, b_std=0.1)
  rep = stax.serial(head, stax.repeat(_block(64), 3), stax.Dense(3))
  ser = stax.serial(head, *[_block(64)] * 3, stax.Dense(3))
  k_rep = rep[2](X, X[:2] + 0.3, ('nngp', 'ntk'))
  k_ser = ser[2](X, X[:2] + 0.3, ('nngp', 'ntk'))
  np.testing.assert_allclose(k_rep.nngp, k_ser.nngp, rtol=1e-10)
  np.testing.assert_allclose(k_rep.ntk, k_ser.ntk, rtol=1e-10)
  init_fn, apply_fn, _ = rep
  shape, params = init_fn(jax.random.PRNGKey(1), X.shape)
  assert shape == (4, 3) and apply_fn(params, X).shape == (4, 3)
  # The parameters of the three repetitions, stacked along a leading axis.
  one = _block(64)[0](jax.random.PRNGKey(0), (4, 64))[1]
  assert ([l.shape for l in jax.tree.leaves(params[1])] ==
          [(3,) + l.shape for l in jax.tree.leaves(one)])


@pytest.mark.slow   # 30-60 s; the NT 0.6.5 fixtures check repeat's values by default
def test_repeat_matches_monte_carlo():
  width = 512
  init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(width, 1.2, 0.1),
                                             stax.repeat(_block(width), 3), stax.Dense(128))
  k = kernel_fn(X, None, 'nngp')
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[1])(apply_fn(p, X)))
  draws = np.stack([f(init_fn(key, X.shape)[1])
                    for key in jax.random.split(jax.random.PRNGKey(2), 64)])
  mc_check.check_against_mc(k, draws, 4, width, 4.0, 2.0)


@pytest.mark.slow   # 30-60 s; the NT 0.6.5 fixtures check repeat's values by default
def test_repeat_ntk_matches_monte_carlo():
  """The finite network's NTK (two logits, structured derivatives) agrees."""
  from infwidth.empirical import NtkImplementation, empirical_ntk_fn
  width = 512
  init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(width, 1.2, 0.1),
                                             stax.repeat(_block(width), 3), stax.Dense(2))
  k = kernel_fn(X, None, 'ntk')
  ntk_fn = empirical_ntk_fn(lambda p, x: apply_fn(p, x)[:, :2],
                            implementation=NtkImplementation.STRUCTURED_DERIVATIVES)
  one = jax.jit(lambda p: ntk_fn(X, None, p))
  draws = np.stack([one(init_fn(key, X.shape)[1])
                    for key in jax.random.split(jax.random.PRNGKey(2), 64)])
  mc_check.check_against_mc(k, draws, 4, width, 4.0, 2.0)


H = 256
UNIT = iw.ParamStats(0., 1.)


def _stacked_params():
  return {'w': jnp.ones((3, H, H)), 'inp': jnp.ones((6, H)), 'o': jnp.ones((H, 8))}


def _stats():
  return {'w': UNIT, 'inp': UNIT, 'o': UNIT}


def test_a_scan_over_stacked_weights_equals_the_python_loop():
  def scanned(p, x):
    h = x @ p['inp'] / np.sqrt(6)
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w * 1.3 / np.sqrt(H)), None), h, p['w'])[0]
    return h @ p['o'] / np.sqrt(H)

  def python_loop(p, x):
    h = x @ p['inp'] / np.sqrt(6)
    for i in range(3):
      h = jnp.tanh(h @ p['w'][i] * 1.3 / np.sqrt(H))
    return h @ p['o'] / np.sqrt(H)

  def separate(p, x):
    h = x @ p['inp'] / np.sqrt(6)
    for w in (p['w0'], p['w1'], p['w2']):
      h = jnp.tanh(h @ w * 1.3 / np.sqrt(H))
    return h @ p['o'] / np.sqrt(H)

  get = ('nngp', 'ntk')
  a = iw.kernelize(scanned, _stacked_params(), param_stats=_stats())(X, None, get)
  b = iw.kernelize(python_loop, _stacked_params(), param_stats=_stats())(X, None, get)
  params = {'w0': jnp.ones((H, H)), 'w1': jnp.ones((H, H)), 'w2': jnp.ones((H, H)),
            'inp': jnp.ones((6, H)), 'o': jnp.ones((H, 8))}
  c = iw.kernelize(separate, params, param_stats={k: UNIT for k in params})(X, None, get)
  for k in (a, b):
    np.testing.assert_allclose(k.nngp, c.nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk, c.ntk, rtol=1e-12)


@pytest.mark.parametrize('second', [lambda h, w: h @ w[0:2][1],
                                    lambda h, w: jnp.einsum('bh,khc->bkc', h, w).sum(1)],
                         ids=['overlapping', 'whole'])
def test_slices_that_share_entries_are_refused(second):
  def net(p, x):
    h = jnp.tanh(x @ p['inp'] / np.sqrt(6))
    return (h @ p['w'][0] + second(h, p['w'])) @ p['o'] / H
  with pytest.raises(iw.UnsupportedPrimitiveError, match='overlapping slices|both whole and'):
    iw.kernelize(net, _stacked_params(), param_stats=_stats())(X, None, 'nngp')


@pytest.mark.parametrize('layer', [stax.Dense(6), stax.serial(stax.Dense(6), stax.Relu()),
                                   stax.serial(stax.Dense(6), stax.Relu(), stax.Dense(6))])
def test_repeat_zero_times_is_the_identity(layer):
  # No repetition: empty stacked parameters, the output is the input, and the
  # kernel is NT's kernel of the inputs, `x x'ᵀ / C` with a zero NTK (what NT's
  # `repeat(layer, 0)` and `Identity()` return).
  x2 = X[:3] + 0.5
  init_fn, apply_fn, kernel_fn = stax.repeat(layer, 0)
  shape, params = init_fn(jax.random.PRNGKey(1), X.shape)
  assert shape == X.shape and all(l.shape[0] == 0 for l in jax.tree_util.tree_leaves(params))
  np.testing.assert_array_equal(apply_fn(params, X), X)
  k = kernel_fn(X, x2)
  np.testing.assert_allclose(k.nngp, X @ x2.T / 6, rtol=1e-12)
  np.testing.assert_allclose(k.cov1, jnp.sum(X**2, 1) / 6, rtol=1e-12)
  np.testing.assert_allclose(k.cov2, jnp.sum(x2**2, 1) / 6, rtol=1e-12)
  np.testing.assert_array_equal(k.ntk, 0)
  k_id = stax.Identity()[2](X, x2, ('nngp', 'ntk', 'cov1'))
  for got, want in zip(kernel_fn(X, x2, ('nngp', 'ntk', 'cov1')), k_id):
    np.testing.assert_allclose(got, want, rtol=1e-12)
  # Followed by a readout, the network is the readout alone.
  net = stax.serial(stax.repeat(layer, 0), stax.Dense(2, 1.3, 0.2))
  np.testing.assert_allclose(net[2](X, x2, 'nngp'), stax.Dense(2, 1.3, 0.2)[2](X, x2, 'nngp'),
                             rtol=1e-12)
